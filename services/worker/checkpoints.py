"""Keep the registry's checkpoint rows in step with the checkpoint folder on disk.

The trainer announces each checkpoint in a progress record, and deletes old ones (retention,
`keep_last`) on its own. The registry must list exactly what a resume or an export could use:
- a checkpoint that is complete on disk but was never announced (the worker died between the
  trainer writing it and forwarding its record) is registered;
- a row whose checkpoint is gone from disk (retention removed it) is dropped.
A row's val_bpb is an evaluation of that very step (the trainer evaluates before it saves), never
an older step's value.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from shared.db import registry
from shared.db.models import Metric
from shared.db.session import session_scope


def _val_bpb_at(session: Session, job_id: str, stage: str, step: int) -> float | None:
    rows = registry.get_metrics(session, job_id, names=["val_bpb"], stage=stage, after_step=step - 1, limit=1)
    hit: list[Metric] = [m for m in rows if m.step == step]
    return hit[0].value if hit else None


def prune_missing(session: Session, job_id: str, kind: str) -> list[int]:
    """Drop rows of `kind` whose meta file no longer exists; returns their steps."""
    gone = [
        c.step for c in registry.list_checkpoints(session, job_id, kind=kind) if not Path(c.path).exists()
    ]
    registry.remove_checkpoints(session, job_id, kind, gone, "deleted by retention")
    return gone


def sync_checkpoints(
    sessions: sessionmaker[Session], job_id: str, stage: str, ckpt_dir: Path, kind: str
) -> None:
    """Register complete checkpoints on disk that the registry lacks; drop rows of deleted ones."""
    from shared.nanochat.checkpoint import META_FILE, list_checkpoints

    on_disk = [c for c in list_checkpoints(ckpt_dir) if c.complete] if ckpt_dir.is_dir() else []
    with session_scope(sessions) as s:
        known = {c.step for c in registry.list_checkpoints(s, job_id, kind=kind)}
        for c in on_disk:
            if c.step not in known:
                meta = c.meta or {}
                # Same shape as a forwarded record: the meta file's path and the file names.
                registry.record_checkpoint(
                    s, job_id, stage, c.step, str(ckpt_dir / META_FILE.format(step=c.step)), kind=kind,
                    val_bpb=_val_bpb_at(s, job_id, stage, c.step), files=sorted(meta.get("files") or {}),
                )  # fmt: skip
        prune_missing(s, job_id, kind)
