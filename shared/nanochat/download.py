"""Parallel, resumable HTTP(S) download of parquet shards into a corpus folder.

Sources: a Hugging Face dataset repo (`https://huggingface.co/datasets/<repo>/resolve/<rev>/<file>`,
e.g. karpathy/climbmix-400b-shuffle) or any base URL + file pattern. Each shard is streamed into
`<name>.part` next to its target, resumed with an HTTP Range request after a dropped connection,
retried with exponential backoff on transient failures, checked against its size and sha256 when
known (given by the caller, or Hugging Face's `X-Linked-Size` / `X-Linked-Etag` headers on the
redirect of an LFS file), and only then renamed to `shard_XXXXX.parquet`. A `.part` file never
matches the shard pattern, so no later stage can take a partial file for a complete shard.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

HF_RESOLVE = "https://huggingface.co/datasets/{repo}/resolve/{revision}"
DEFAULT_PATTERN = "shard_{index:05d}.parquet"
# The validation shard is the last one of the dataset, whatever the number of train shards fetched.
KNOWN_VAL_INDEX = {
    "karpathy/climbmix-400b-shuffle": 6542,
    "karpathy/fineweb-edu-100b-shuffle": 1822,
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PERMANENT = {400, 401, 403, 404, 405, 410, 451}


class DownloadError(RuntimeError):
    """A shard could not be downloaded and verified; the message names it."""


class _Transient(Exception):
    """Retryable: truncated body, 5xx, 429, unexpected range reply."""


@dataclass(frozen=True)
class ShardSpec:
    name: str  # local file name, e.g. shard_00000.parquet
    url: str
    size: int | None = None  # bytes, when known
    sha256: str | None = None  # lowercase hex, when known


@dataclass(frozen=True)
class DownloadConfig:
    workers: int = 4
    retries: int = 5  # attempts after the first one, counted from the last attempt that made progress
    backoff_seconds: float = 1.0  # first wait; doubles per failed attempt
    max_backoff_seconds: float = 60.0
    timeout_seconds: float = 30.0

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ValueError("backoff_seconds and max_backoff_seconds must be >= 0")
        if self.timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {self.timeout_seconds}")


def hf_base_url(repo: str, revision: str = "main") -> str:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise ValueError(f"repo must look like 'owner/name', got {repo!r}")
    return HF_RESOLVE.format(repo=repo, revision=revision)


def shard_indices(num_train: int, val_index: int | None) -> list[int]:
    """Train shards 0..num_train-1 plus the validation shard (the dataset's last) when known."""
    if num_train < 1:
        raise ValueError(f"shards must be >= 1, got {num_train}")
    indices = list(range(num_train))
    if val_index is not None:
        if val_index < num_train:
            raise ValueError(f"val_index {val_index} overlaps the {num_train} train shards")
        indices.append(val_index)
    return indices


def shard_specs(
    base_url: str,
    indices: list[int],
    pattern: str = DEFAULT_PATTERN,
    checksums: dict[str, tuple[int | None, str | None]] | None = None,
) -> list[ShardSpec]:
    """Specs for remote files `base_url/pattern.format(index=i)`, stored under the shard name."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be http(s), got {base_url!r}")
    checksums = checksums or {}
    specs = []
    for i in indices:
        remote = pattern.format(index=i)
        size, sha = checksums.get(remote, (None, None))
        specs.append(ShardSpec(f"shard_{i:05d}.parquet", f"{base_url.rstrip('/')}/{remote}", size, sha))
    return specs


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _linked_metadata(response: httpx.Response) -> tuple[int | None, str | None]:
    """Size and sha256 that Hugging Face puts on the redirect to an LFS file's storage."""
    for r in [*response.history, response]:
        etag = r.headers.get("x-linked-etag", "").strip('"').lower()
        size = r.headers.get("x-linked-size")
        if etag or size:
            return (int(size) if size and size.isdigit() else None, etag if _SHA256.match(etag) else None)
    return None, None


def _verify(path: Path, spec: ShardSpec, size: int | None, sha: str | None) -> str | None:
    """None if the file matches what is known about it, else the reason."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} bytes, expected {size}"
    if sha is not None:
        digest = _sha256_file(path)
        if digest != sha:
            return f"checksum mismatch: sha256 {digest}, expected {sha}"
    return None


def _attempt(
    client: httpx.Client, spec: ShardSpec, part: Path, cfg: DownloadConfig
) -> tuple[int | None, str | None]:
    """One GET into `part` (resumed from its current size). -> (total size, sha256) learned."""
    offset = part.stat().st_size if part.exists() else 0
    # Identity encoding: byte offsets for Range must be offsets into the file itself.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with client.stream("GET", spec.url, headers=headers) as r:
        if r.status_code in _PERMANENT:
            raise DownloadError(f"shard {spec.name}: HTTP {r.status_code} from {spec.url}")
        if r.status_code == 416:  # our partial file is not a prefix of theirs any more
            part.unlink(missing_ok=True)
            raise _Transient("HTTP 416 for the resume range; restarting from byte 0")
        if r.status_code != 200 and r.status_code != 206:
            raise _Transient(f"HTTP {r.status_code}")
        size, sha = _linked_metadata(r)
        if r.status_code == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("content-range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _Transient(f"unexpected Content-Range {r.headers.get('content-range')!r}")
            total = int(m.group(2)) if m.group(2) != "*" else None
            mode = "ab"
        else:
            length = r.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"  # server ignored the range: start over
        size = size if size is not None else total
        with open(part, mode) as f:
            for block in r.iter_raw():  # written as it arrives: a drop keeps every byte received
                f.write(block)
    got = part.stat().st_size
    if total is not None and got < total:
        raise _Transient(f"truncated at {got} of {total} bytes")
    return size, sha


def download_shard(spec: ShardSpec, out_dir: Path, cfg: DownloadConfig, client: httpx.Client) -> Path:
    """Download, verify and place one shard; skips one already in place and valid."""
    out_dir = Path(out_dir)
    final = out_dir / spec.name
    part = out_dir / f"{spec.name}.part"
    if final.exists():
        if _verify(final, spec, spec.size, spec.sha256) is None:
            return final
        final.unlink()
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            size, sha = _attempt(client, spec, part, cfg)
            break
        except (httpx.TransportError, _Transient) as e:
            after = part.stat().st_size if part.exists() else 0
            failures = 1 if after > before else failures + 1  # progress resets the budget
            if failures > cfg.retries:
                raise DownloadError(
                    f"shard {spec.name}: giving up after {failures} failed attempt(s) at {spec.url}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            wait = min(cfg.max_backoff_seconds, cfg.backoff_seconds * 2 ** (failures - 1))
            log.warning("shard %s: %s; retry in %.1fs (%d bytes kept)", spec.name, e, wait, after)
            time.sleep(wait)
    problem = _verify(part, spec, spec.size if spec.size is not None else size, spec.sha256 or sha)
    if problem is not None:
        part.unlink(missing_ok=True)  # bad bytes must not seed a later resume
        raise DownloadError(f"shard {spec.name}: {problem} ({spec.url})")
    os.replace(part, final)
    return final


def download_shards(specs: list[ShardSpec], out_dir: Path, cfg: DownloadConfig | None = None) -> list[Path]:
    """Fetch all `specs` with `cfg.workers` threads; one DownloadError naming every failed shard."""
    cfg = cfg or DownloadConfig()
    if not specs:
        raise ValueError("no shards to download")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout = httpx.Timeout(cfg.timeout_seconds)
    with (
        httpx.Client(follow_redirects=True, timeout=timeout) as client,
        ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="shard-dl") as pool,
    ):
        futures = [(s, pool.submit(download_shard, s, out_dir, cfg, client)) for s in specs]
        paths, errors = [], []
        for spec, fut in futures:
            try:
                paths.append(fut.result())
            except DownloadError as e:
                errors.append(str(e))
            except OSError as e:  # disk full, permissions: name the shard too
                errors.append(f"shard {spec.name}: {e}")
    if errors:
        raise DownloadError(
            errors[0] if len(errors) == 1 else f"{len(errors)} shards failed: " + "; ".join(errors)
        )
    return paths
