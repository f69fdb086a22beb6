"""What the serving supervisor is doing, for `GET /models/served` and `ncp`: `serving/served.json`.

The supervisor rewrites it atomically on every change of state:
    {"state": "waiting" | "starting" | "running" | "restarting" | "failed" | "stopped",
     "model", "path", "engine", "pid", "restarts", "start_failures", "last_exit_code",
     "next_start_at" (epoch seconds or null), "error" (one line or null), "log_tail" (list),
     "updated_at"}
"failed" means the engine could not be started `max_start_failures` times in a row (or the
published folder is unusable); `error` says why in one line, `log_tail` has the engine's last
output lines. The supervisor keeps retrying at its longest backoff, and a new publish starts over.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

STATE_FILE = "served.json"
STATES = ("waiting", "starting", "running", "restarting", "failed", "stopped")


def write_state(serving_dir, state: dict) -> dict:
    if state.get("state") not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state.get('state')!r}")
    record = {**state, "updated_at": datetime.now(timezone.utc).isoformat()}
    serving_dir = Path(serving_dir)
    serving_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=serving_dir, prefix=".served.", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, serving_dir / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record


def read_state(serving_dir) -> dict | None:
    """The supervisor's last state, or None when no supervisor ever wrote one."""
    path = Path(serving_dir) / STATE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        return {"state": "failed", "error": f"unreadable {path.name}: {e}"}
    return (
        record if isinstance(record, dict) else {"state": "failed", "error": f"{path.name} is not an object"}
    )
