"""Point the model server at a new export: atomically rewrite `serving/current.json`.

The serving supervisor (serve.py) watches that file and restarts its engine on the new model; a
half-written file must never be visible, hence temp file + fsync + rename.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from shared.nanochat.export import check_export

CURRENT_FILE = "current.json"


def publish_model(serving_dir, name: str, export_dir) -> dict:
    """Publish `export_dir` under the served model name `name`; returns what was written."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"served model name must be a non-empty string, got {name!r}")
    export_dir = Path(export_dir).resolve()
    check_export(export_dir)  # refuse to point the server at an incomplete folder
    record = {
        "model": name.strip(),
        "path": str(export_dir),
        "published_at": datetime.now(timezone.utc).isoformat(),
    }
    serving_dir = Path(serving_dir)
    serving_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=serving_dir, prefix=".current.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, serving_dir / CURRENT_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record


def read_current(serving_dir) -> dict | None:
    """The published record, or None when nothing is published; a malformed file is an error."""
    path = Path(serving_dir) / CURRENT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("model"), str)
        or not isinstance(record.get("path"), str)
    ):
        raise ValueError(f'{path} must hold {{"model": name, "path": export_dir}}, got {record!r}')
    return record
