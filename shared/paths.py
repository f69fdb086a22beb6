"""The layout of a run folder on the shared checkpoint volume, and safe path handling.

Every stage reads its inputs and writes its outputs under `runs/<job_id>/`; the names below are the
only place that layout is spelled out. `safe_join` is how user-supplied relative paths are resolved:
nothing a client sends can point outside an allowed root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class PathEscapeError(ValueError):
    """A user-supplied path resolves outside every allowed root."""


def safe_join(root: Path, *parts: str | Path) -> Path:
    """Join `parts` under `root`, refusing anything (.., absolute paths, symlinks) that leaves it."""
    root = Path(root).resolve()
    candidate = root.joinpath(*[str(p) for p in parts]).resolve()
    if candidate != root and root not in candidate.parents:
        raise PathEscapeError(f"path {'/'.join(str(p) for p in parts)!r} escapes {root}")
    return candidate


def resolve_under_roots(path: str | Path, roots: list[Path]) -> Path:
    """Resolve an absolute or relative user path; it must lie inside one of `roots`."""
    p = Path(path).expanduser()
    for root in roots:
        root = Path(root).resolve()
        cand = p.resolve() if p.is_absolute() else (root / p).resolve()
        if cand == root or root in cand.parents:
            return cand
    raise PathEscapeError(f"path {str(path)!r} is outside the allowed data roots {[str(r) for r in roots]}")


@dataclass(frozen=True)
class RunPaths:
    """Folders of one run. Stages create what they write; nothing here touches the disk."""

    root: Path

    @property
    def data(self) -> Path:  # parquet shards (or a pointer file to a shared dataset)
        return self.root / "data"

    @property
    def tokenizer(self) -> Path:  # tokenizer.json + tokenizer_config.json
        return self.root / "tokenizer"

    def base_checkpoints(self, tag: str) -> Path:  # reference layout: base_checkpoints/d12/
        return self.root / "base_checkpoints" / tag

    def sft_checkpoints(self, tag: str) -> Path:
        return self.root / "chatsft_checkpoints" / tag

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export(self) -> Path:  # Hugging-Face-style folder served by vLLM / the native server
        return self.root / "export"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def progress_file(self) -> Path:  # JSONL the training child appends; the worker forwards it
        return self.root / "progress.jsonl"

    @property
    def stop_file(self) -> Path:  # its existence asks the training child to save and stop
        return self.root / "STOP"


def run_paths(runs_dir: Path, job_id: str) -> RunPaths:
    return RunPaths(safe_join(runs_dir, job_id))
