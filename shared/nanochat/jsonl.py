"""Reading line-delimited JSON with errors that name the file and line.

Corpora, eval bundles, chat task files and SFT conversations are all JSONL written by someone
else; a bad line must be reported as `path:line: problem`, never as a bare decoder traceback.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_jsonl(path: str | Path, error: type[ValueError] = ValueError) -> Iterator[tuple[str, Any]]:
    """Yield `(where, value)` per non-blank line, `where` being "path:line" for the caller's own
    messages. Invalid JSON or non-UTF-8 bytes raise `error` naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(
                    f"{where}: non-UTF-8 bytes at offset {e.start} ({raw[e.start : e.start + 4]!r})"
                ) from e
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: invalid JSON: {e.msg}") from None
            yield where, value
