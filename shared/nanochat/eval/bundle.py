"""Fetching the DCLM eval bundle (the zip the reference nanochat uses for CORE).

The download is verified (size and sha256 when known) before anything is extracted, extraction
refuses members that would land outside the target, and the bundle appears at its final path
by one rename, so a crash mid-way never leaves a half bundle that a later run would trust.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
import zipfile
from pathlib import Path

# The bundle the reference nanochat's base_eval downloads.
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


class BundleDownloadError(RuntimeError):
    """The bundle could not be fetched, failed verification or is not a bundle."""


def _download(url: str, dest: Path, timeout: float) -> tuple[int, str]:
    """Stream `url` into `dest`; return (size, sha256 hex)."""
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except OSError as e:  # URLError and HTTPError are OSErrors
        raise BundleDownloadError(f"download of {url} failed: {e}") from e
    return size, digest.hexdigest()


def _safe_extract(zip_path: Path, into: Path) -> None:
    root = into.resolve()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():
                target = (root / member).resolve()
                if target != root and root not in target.parents:
                    raise BundleDownloadError(
                        f"{zip_path}: member {member!r} would extract outside the bundle"
                    )
            zf.extractall(root)
    except zipfile.BadZipFile as e:
        raise BundleDownloadError(f"{zip_path}: not a zip file ({e})") from e


def _bundle_root(extracted: Path) -> Path:
    """The zip holds `eval_bundle/core.yaml`; accept a bundle at the top level too."""
    for cand in (extracted / "eval_bundle", extracted):
        if (cand / "core.yaml").is_file():
            return cand
    raise BundleDownloadError("archive has no core.yaml (neither at the top nor under eval_bundle/)")


def download_bundle(
    dest_dir: Path,
    *,
    url: str = EVAL_BUNDLE_URL,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download and extract the bundle to `dest_dir` (a no-op if it already holds core.yaml)."""
    dest_dir = Path(dest_dir)
    if (dest_dir / "core.yaml").is_file():
        return dest_dir
    if size is not None and size <= 0:
        raise ValueError(f"size: must be positive, got {size}")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    # the temp dir sits next to the destination so the final rename stays on one filesystem
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=dest_dir.parent) as tmp:
        tmp_path = Path(tmp)
        zip_path = tmp_path / "eval_bundle.zip"
        got_size, got_sha = _download(url, zip_path, timeout)
        if size is not None and got_size != size:
            raise BundleDownloadError(f"{url}: expected {size} bytes, got {got_size}")
        if sha256 is not None and got_sha != sha256.lower():
            raise BundleDownloadError(f"{url}: sha256 mismatch: expected {sha256}, got {got_sha}")
        extracted = tmp_path / "extracted"
        extracted.mkdir()
        _safe_extract(zip_path, extracted)
        root = _bundle_root(extracted)
        try:
            os.rename(root, dest_dir)
        except OSError:
            # someone else finished first (or an empty dest exists): keep a complete one
            if (dest_dir / "core.yaml").is_file():
                return dest_dir
            if dest_dir.is_dir() and not any(dest_dir.iterdir()):
                dest_dir.rmdir()
                os.rename(root, dest_dir)
            else:
                raise BundleDownloadError(f"{dest_dir}: exists and is not an eval bundle") from None
    return dest_dir
