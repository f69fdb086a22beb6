"""Import an upstream nanochat base dir (`~/.cache/nanochat`) as a platform model folder.

Upstream layout, any subset of it:
    tokenizer/tokenizer.pkl          pickled tiktoken Encoding (rustbpe-trained ranks + specials)
    tokenizer/token_bytes.pt         (vocab,) int32 bytes per token, for bits per byte
    base_checkpoints/<tag>/          model_NNNNNN.pt, meta_NNNNNN.json, optim_NNNNNN_rank<r>.pt
    chatsft_checkpoints/<tag>/       the same, after SFT
    chatrl_checkpoints/<tag>/        the same, after RL
Platform layout written (a run folder's, so everything that takes a run folder takes it):
    <models_dir>/<name>/tokenizer/   tokenizer.json (+ config, chat template), token_bytes.pt
    <models_dir>/<name>/<phase dir>/<tag>/   checkpoints in our format, optimizer shards kept
    <models_dir>/<name>/manifest.json        what landed where (the `--json` answer, and what the
                                             model registry records)

Order of work: everything is read and checked first (metas, the pickle through the restricted
unpickler, tokenizer vs every checkpoint's vocab size), then written into a temp folder that is
renamed into place, so a refused or failed import leaves nothing behind. The converted tokenizer
is verified against tiktoken's algorithm (bpe_ranks.reference_encode) on probe text built from
the vocabulary itself before it is accepted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "ncp-model-1"
# Upstream's phase folders (checkpoint_manager.load_model), in pipeline order.
PHASE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a model name (the job spec uses it too)
_NAME_RE = re.compile(NAME_PATTERN)
_MODEL_RE = re.compile(r"^model_(\d{6,})\.pt$")
# Probe texts are cheap in Rust and cost ~20 us each in the Python reference: cap the sample.
MAX_PROBES = 50_000


class NanochatImportError(ValueError):
    """The source is not an importable nanochat dir; the message says what and where."""


@dataclass(frozen=True)
class CheckpointSet:
    phase: str  # base | sft | rl
    tag: str  # e.g. d24
    path: Path
    steps: list[int]
    vocab_sizes: dict[int, int]  # step -> model_config.vocab_size from its meta


@dataclass(frozen=True)
class NanochatDir:
    root: Path
    tokenizer_pkl: Path | None
    token_bytes: Path | None
    checkpoints: list[CheckpointSet] = field(default_factory=list)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"name: {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NanochatImportError(f"{path}: unreadable checkpoint meta ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise NanochatImportError(f"{path}: meta has no 'model_config' object")
    return meta


def _scan_checkpoints(phase: str, phase_dir: Path) -> list[CheckpointSet]:
    out = []
    for tag_dir in sorted(p for p in phase_dir.iterdir() if p.is_dir()):
        steps = sorted(int(m.group(1)) for f in tag_dir.iterdir() if (m := _MODEL_RE.match(f.name)))
        if not steps:
            continue
        vocab = {}
        for s in steps:
            meta_path = tag_dir / f"meta_{s:06d}.json"
            if not meta_path.is_file():
                raise NanochatImportError(f"{tag_dir}: model_{s:06d}.pt has no {meta_path.name}")
            v = _read_meta(meta_path)["model_config"].get("vocab_size")
            if not isinstance(v, int):
                raise NanochatImportError(
                    f"{meta_path}: model_config.vocab_size is missing or not an integer"
                )
            vocab[s] = v
        out.append(CheckpointSet(phase, tag_dir.name, tag_dir, steps, vocab))
    return out


def scan_nanochat_dir(root) -> NanochatDir:
    """What an upstream base dir holds (reads metas, not weights); raises if it holds nothing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise NanochatImportError(f"{root} is not a directory")
    root = root.resolve()
    tok_dir = root / "tokenizer"
    pkl = tok_dir / "tokenizer.pkl"
    tb = tok_dir / "token_bytes.pt"
    checkpoints: list[CheckpointSet] = []
    for phase, sub in PHASE_DIRS.items():
        if (root / sub).is_dir():
            checkpoints += _scan_checkpoints(phase, root / sub)
    found = NanochatDir(root, pkl if pkl.is_file() else None, tb if tb.is_file() else None, checkpoints)
    if found.tokenizer_pkl is None and not checkpoints:
        raise NanochatImportError(
            f"{root}: neither tokenizer/tokenizer.pkl nor any "
            f"{{{','.join(PHASE_DIRS.values())}}}/<tag>/model_<step>.pt: not a nanochat base dir"
        )
    if found.token_bytes is not None and found.tokenizer_pkl is None:
        raise NanochatImportError(f"{tb} without tokenizer/tokenizer.pkl: token bytes need their tokenizer")
    return found


# ----------------------------------------------------------------------------- tokenizer


def convert_tokenizer(pkl: Path, *, max_probes: int = MAX_PROBES):
    """(Tokenizer, info) from an upstream tokenizer.pkl: restricted unpickling, conversion, and a
    check that the converted tokenizer gives tiktoken's ids on probe text. Writes nothing."""
    from shared.nanochat.bpe_ranks import probe_texts, reference_encode
    from shared.nanochat.tiktoken_pickle import read_encoding
    from shared.nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

    enc = read_encoding(pkl)
    missing = [s for s in SPECIAL_TOKENS if s not in enc.special_tokens]
    if missing:
        raise NanochatImportError(
            f"{pkl}: the encoding lacks the nanochat special tokens {missing} "
            f"(has {sorted(enc.special_tokens)}): not a nanochat tokenizer"
        )
    try:
        tok = Tokenizer.from_ranks(enc.mergeable_ranks, enc.pat_str, enc.special_tokens)
    except ValueError as e:
        raise NanochatImportError(f"{pkl}: cannot convert the encoding: {e}") from e
    probes = [p for _, p in zip(range(max_probes), probe_texts(enc.mergeable_ranks), strict=False)]
    got = cast(list[list[int]], tok.encode(probes))
    for text, ids in zip(probes, got, strict=True):
        want = reference_encode(enc.mergeable_ranks, enc.pat_str, text)
        if ids != want:
            raise NanochatImportError(
                f"{pkl}: the converted tokenizer gives other ids than tiktoken for {text[:60]!r} "
                f"({ids[:12]} vs {want[:12]}); refusing an inexact conversion"
            )
    info = {
        "encoding_name": enc.name,
        "vocab_size": tok.vocab_size,
        "bpe_tokens": len(enc.mergeable_ranks),
        "special_tokens": dict(sorted(enc.special_tokens.items(), key=lambda kv: kv[1])),
        "pattern": enc.pat_str,
        "verified_probes": len(probes),
    }
    return tok, info


def _compare_token_bytes(path: Path, tok) -> str | None:
    """None when upstream's token_bytes.pt equals ours, else a warning saying how it differs."""
    import torch

    from shared.nanochat.tokenizer import token_bytes

    try:
        theirs = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt zip, forbidden pickle content, ...
        raise NanochatImportError(f"{path}: not a loadable tensor file ({type(e).__name__}: {e})") from e
    ours = token_bytes(tok)
    if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != tuple(ours.shape):
        shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
        raise NanochatImportError(
            f"{path}: holds {shape}, expected a ({tok.vocab_size},) tensor for this tokenizer"
        )
    diff = int((theirs.to(torch.int64) != ours.to(torch.int64)).sum())
    if diff == 0:
        return None
    # Older upstream counted bytes after decoding each token to str, which inflates ids that
    # are not valid UTF-8 on their own; the platform recomputes from the raw bytes.
    return (
        f"{path.name} differs from the tokenizer's raw byte lengths at {diff} id(s) (older nanochat "
        "counted them through str); token_bytes.pt was rewritten from the tokenizer"
    )


# ----------------------------------------------------------------------------- import


def check_vocab_matches(found: NanochatDir, tokenizer_vocab: int | None) -> None:
    """Every checkpoint's vocab_size equals the tokenizer's (and each other's when there is no
    tokenizer): refused before anything is written, naming both sizes."""
    sizes = {(c.phase, c.tag, s): v for c in found.checkpoints for s, v in c.vocab_sizes.items()}
    ref = tokenizer_vocab
    ref_name = f"tokenizer {found.tokenizer_pkl}"
    for (phase, tag, step), v in sizes.items():
        if ref is None:
            ref, ref_name = v, f"checkpoint {PHASE_DIRS[phase]}/{tag} step {step}"
            continue
        if v != ref:
            raise NanochatImportError(
                f"{PHASE_DIRS[phase]}/{tag} step {step} has vocab_size {v} but {ref_name} has "
                f"{ref} tokens: the model and tokenizer do not belong together"
            )


def import_nanochat(src, models_dir, name: str, *, job_id: str | None = None) -> dict:
    """Import `src` (an upstream nanochat base dir) as `models_dir/name`; returns the manifest.

    `job_id`: the platform job doing the import (the `import` stage). It is recorded in the
    manifest, so a retried stage recognises a model its own earlier attempt put in place, and it
    names the temp folder, so a retry clears what a crashed attempt left half-written (the job's
    lease makes its attempts sequential; other imports' temp folders are never touched)."""
    from shared.nanochat.checkpoint import import_reference
    from shared.nanochat.tiktoken_pickle import PickleRefused
    from shared.nanochat.tokenizer import token_bytes

    name = validate_name(name)
    models_dir = Path(models_dir)
    dest = models_dir / name
    if dest.exists():
        raise NanochatImportError(f"name: model {name!r} already exists at {dest}; pick another name")
    found = scan_nanochat_dir(src)
    tok, tok_info = None, None
    if found.tokenizer_pkl is not None:
        try:
            tok, tok_info = convert_tokenizer(found.tokenizer_pkl)
        except PickleRefused as e:
            raise NanochatImportError(str(e)) from e
    check_vocab_matches(found, tok.vocab_size if tok is not None else None)
    warnings: list[str] = []
    if tok is not None and found.token_bytes is not None:
        if (w := _compare_token_bytes(found.token_bytes, tok)) is not None:
            warnings.append(w)
    if tok is None:
        warnings.append("no tokenizer/tokenizer.pkl: eval, SFT, export and serving need one")

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".{name}.tmp-{job_id or uuid.uuid4().hex[:8]}"
    if job_id is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest: dict = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "source": {"kind": "nanochat", "path": str(found.root)},
            "imported_at": datetime.now(timezone.utc).isoformat(),
            "tokenizer": None,
            "checkpoints": [],
            "warnings": warnings,
        }
        if job_id is not None:
            manifest["job_id"] = job_id
        if tok is not None:
            import torch

            tok.save(tmp / "tokenizer")
            torch.save(token_bytes(tok), tmp / "tokenizer" / "token_bytes.pt")
            manifest["tokenizer"] = {"path": "tokenizer", **(tok_info or {})}
        for c in found.checkpoints:
            rel = Path(PHASE_DIRS[c.phase]) / c.tag
            steps = import_reference(c.path, tmp / rel)
            ranks = {s: len(list((tmp / rel).glob(f"optim_{s:06d}_rank*.pt"))) for s in steps}
            manifest["checkpoints"].append(
                {
                    "phase": c.phase,
                    "tag": c.tag,
                    "path": str(rel),
                    "steps": steps,
                    "vocab_size": c.vocab_sizes[steps[-1]],
                    "optimizer_ranks": {str(s): n for s, n in ranks.items()},
                }
            )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, dest)  # fails if a concurrent import took the name meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["path"] = str(dest)
    return manifest


def read_manifest(model_dir) -> dict:
    path = Path(model_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable model manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    manifest["path"] = str(Path(model_dir).resolve())
    return manifest
