"""The layout of a run folder on the shared checkpoint volume, and safe path handling.

Every stage reads its inputs and writes its outputs under `runs/<job_id>/`; the names below are the
only place that layout is spelled out. `safe_join` is how user-supplied relative paths are resolved:
nothing a client sends can point outside an allowed root. `resolve_under_roots` checks a path a
job spec names when it is submitted; `confine` / `confine_files` / `confine_tree` check every file
a stage reads, at the moment it reads it, with symlinks followed.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
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


def _real_roots(roots: Iterable[Path | str]) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in roots]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def resolve_under_roots(path: str | Path, roots: Iterable[Path | str]) -> Path:
    """Resolve an absolute or relative user path (symlinks followed, `..` applied after them); it
    must lie inside one of `roots`. A relative path is tried against each root in turn."""
    p = Path(path).expanduser()
    real = _real_roots(roots)
    for root in real:
        cand = p.resolve() if p.is_absolute() else (root / p).resolve()
        if _inside(cand, real):
            return cand
    raise PathEscapeError(f"path {str(path)!r} is outside the allowed data roots {[str(r) for r in real]}")


def confine(path: str | Path, roots: Iterable[Path | str]) -> Path:
    """The real path of an existing file or folder, refused unless it lies inside `roots`. What a
    stage reads goes through here right before it is opened: a symlink inside a root that points
    elsewhere (to /etc, to /proc/self/root/..., to another job's run) is caught at the file."""
    real = Path(path).resolve(strict=True)
    roots_real = _real_roots(roots)
    if not _inside(real, roots_real):
        raise PathEscapeError(
            f"{path} resolves to {real}, outside the allowed data roots {[str(r) for r in roots_real]}"
        )
    return real


def confine_files(files: Iterable[str | Path], roots: Iterable[Path | str]) -> list[Path]:
    """`confine` for each file, in order."""
    roots = list(roots)
    return [confine(f, roots) for f in files]


def confine_tree(folder: str | Path, roots: Iterable[Path | str]) -> Path:
    """The real path of `folder`, after checking that it and every entry below it (symlinked files
    and folders included) resolve inside `roots`; for folders a library reads by itself."""
    roots = list(roots)
    top = confine(folder, roots)
    if top.is_dir():
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            for name in [*dirnames, *filenames]:
                confine(Path(dirpath) / name, roots)
    return top


def resolve_existing_source(raw: str | Path, roots: Iterable[Path | str]) -> Path:
    """A user's local source (file, folder or glob) resolved under `roots`; FileNotFoundError when
    it names nothing. Every glob match must lie inside the roots too."""
    roots = list(roots)
    resolved = resolve_under_roots(raw, roots)
    text = str(resolved)
    if any(ch in text for ch in "*?["):
        matches = glob.glob(text, recursive=True)
        if not matches:
            raise FileNotFoundError(f"glob {str(raw)!r} matches no file")
        confine_files(matches, roots)
        return resolved
    if not resolved.exists():
        raise FileNotFoundError(f"path {str(raw)!r} does not exist ({resolved})")
    return resolved


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
