"""An offline demo corpus built from text that ships with every Python installation.

No network: the documents are the pydoc help topics (`pydoc_data.topics`, the language
reference in prose) and the docstrings of the standard library, read from its source with `ast`
(never imported: some modules have side effects on import). The same Python version, seed and
size give byte-identical shards. Written in the ClimbMix layout (see corpus.py).
"""

from __future__ import annotations

import ast
import os
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from shared.nanochat.corpus import CorpusReport, read_marker, write_sharded_corpus

DEFAULT_DEMO_BYTES = 4_000_000  # enough to train a tiny model for the demo
DOC_CHARS = 4000  # document size: many docs per loader buffer, several per 2048-token row
# Test suites and tool folders are code, not prose, and some hold deliberately broken files.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "__pycache__",
    "turtledemo",
    "ensurepip",
    "venv",
    "tkinter",
}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune while walking: site-packages alone can be far bigger than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"def {node.name}({ast.unparse(node.args)}):"
    except Exception:  # unparse of exotic defaults; the name alone is fine
        return f"def {node.name}(...):"


def _chunks(pieces: list[str], title: str, limit: int = DOC_CHARS) -> list[str]:
    """Group pieces into documents of about `limit` chars (whole pieces, in order)."""
    docs, cur = [], ""
    for piece in pieces:
        if cur and len(cur) + len(piece) > limit:
            docs.append(cur)
            cur = f"{title} (continued)"
        cur = f"{cur}\n\n{piece}" if cur else f"{title}\n\n{piece}"
    if cur:
        docs.append(cur)
    return docs


def _parse(path: Path) -> tuple[ast.Module, str] | None:
    try:
        source = path.read_bytes().decode("utf-8")
        return ast.parse(source, filename=str(path)), source
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None


def module_documents(path: Path, module: str) -> list[str]:
    """Prose of a module: its docstring, then each documented public class/function with its
    signature and docstring, in source order, grouped into ~DOC_CHARS documents."""
    parsed = _parse(path)
    if parsed is None:
        return []
    tree = parsed[0]
    pieces = []
    doc = ast.get_docstring(tree)
    if doc:
        pieces.append(doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            d = ast.get_docstring(node)
            if not d or node.name.startswith("_"):
                continue
            head = f"class {node.name}:" if isinstance(node, ast.ClassDef) else _signature(node)
            pieces.append(f"{head}\n    {d}")
    return _chunks(pieces, f"Module {module}") if pieces else []


def source_documents(path: Path, module: str) -> list[str]:
    """The module's source split at top-level statements into ~DOC_CHARS documents."""
    parsed = _parse(path)
    if parsed is None:
        return []
    tree, source = parsed
    lines = source.splitlines()
    pieces = []
    for node in tree.body:
        seg = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        if seg.strip():
            pieces.append(seg)
    return _chunks(pieces, f"# Source of {module}")


def _topic_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [
        doc
        for name, text in sorted(topics.items())
        if text.strip()
        for doc in _chunks([p for p in text.strip().split("\n\n") if p.strip()], f"Python help: {name}")
    ]


def iter_demo_documents(seed: int = 0) -> Iterator[str]:
    """Help topics, then stdlib docstrings, then stdlib source code; modules in a seeded order
    (so a small budget still mixes many modules)."""
    yield from _topic_documents()
    files = _stdlib_files()
    random.Random(seed).shuffle(files)
    root = Path(sysconfig.get_paths()["stdlib"])
    names = [".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__") for p in files]
    for path, module in zip(files, names, strict=True):
        yield from module_documents(path, module)
    for path, module in zip(files, names, strict=True):
        yield from source_documents(path, module)


def write_demo_corpus(
    out_dir: Path, *, num_shards: int = 4, seed: int = 0, max_bytes: int | None = None
) -> CorpusReport:
    """Write `num_shards` parquet shards (the last = validation, ~10% of docs) of up to `max_bytes`
    UTF-8 bytes (None = DEFAULT_DEMO_BYTES). Idempotent: same arguments reuse a completed folder."""
    if num_shards < 2:
        raise ValueError(f"num_shards must be >= 2 (train + validation), got {num_shards}")
    budget = DEFAULT_DEMO_BYTES if max_bytes is None else max_bytes
    if budget < 1000:
        raise ValueError(f"max_bytes must be at least 1000, got {max_bytes}")
    out_dir = Path(out_dir)
    fingerprint = {
        "kind": "demo",
        "num_shards": num_shards,
        "seed": seed,
        "max_bytes": budget,
        "python": sys.version.split()[0],
    }
    marker = read_marker(out_dir)
    if marker and marker.get("fingerprint") == fingerprint:
        return CorpusReport.from_dict(marker["report"])
    docs: list[str] = []
    total = 0
    for doc in iter_demo_documents(seed):
        n = len(doc.encode("utf-8"))
        if total + n > budget:
            # Crop the last document at a line boundary so tiny budgets still fill up.
            room = budget - total
            doc = doc.encode("utf-8")[:room].decode("utf-8", errors="ignore").rsplit("\n", 1)[0]
            if doc.strip():
                docs.append(doc)
            break
        docs.append(doc)
        total += n
    if len(docs) < num_shards:
        # Small budgets: split long documents into paragraphs so every shard gets some.
        docs = [p for d in docs for p in d.split("\n\n") if p.strip()]
    if len(docs) < num_shards:
        raise ValueError(f"max_bytes={budget} gives only {len(docs)} documents for {num_shards} shards")
    random.Random(seed).shuffle(docs)
    n_val = max(1, len(docs) // 10)
    return write_sharded_corpus(out_dir, docs[n_val:], docs[:n_val], num_shards - 1, fingerprint=fingerprint)
