"""Forward the training child's progress records into the registry.

Records are the JSON lines `services.train_worker.entry` appends to `progress.jsonl`:
`{"type": "progress"|"eval"|"checkpoint"|"done"|"error", ...}`. Each batch (one launcher poll)
becomes: the job's live progress fields (step, loss, tokens/s, MFU, ETA, memory), metric rows, a
registry checkpoint row per saved checkpoint, and events for evals, checkpoints and errors.

A resumed run repeats the steps between its checkpoint and the point where the previous attempt
died. Those steps were already recorded (and, training being deterministic, with the same
values), so steps at or below the highest one recorded are not written again: the metric series
stays one row per step and name.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import registry
from shared.db.models import Metric
from shared.db.session import session_scope

log = logging.getLogger(__name__)

# Progress keys stored as metric series (besides val_bpb from eval records).
METRIC_KEYS = ("loss", "raw_loss", "tokens_per_sec", "mfu", "lr_mult", "peak_memory_bytes")


def max_recorded_step(session: Session, job_id: str, stage: str) -> int:
    # Registry gap: D1's registry has no "highest metric step" query; read it over D1's model.
    value = session.scalar(
        select(func.max(Metric.step)).where(Metric.job_id == job_id, Metric.stage == stage)
    )
    return int(value) if value is not None else -1


class ProgressForwarder:
    """Callable handed to the launcher as `on_records`."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, stage: str, checkpoint_kind: str
    ) -> None:
        self.sessions, self.job_id, self.stage, self.kind = sessions, job_id, stage, checkpoint_kind
        with session_scope(sessions) as s:
            self.last_step = max_recorded_step(s, job_id, stage)
        self.done: dict[str, Any] | None = None
        self.error: str | None = None
        self.checkpoints: list[int] = []

    def __call__(self, records: list[dict[str, Any]]) -> None:
        latest: dict[str, Any] | None = None
        with session_scope(self.sessions) as s:
            for rec in records:
                kind = rec.get("type")
                step = _int(rec.get("step"))
                if kind == "progress" and step is not None:
                    latest = rec
                    if step > self.last_step:
                        registry.add_metrics(
                            s, self.job_id, self.stage, step, {k: rec.get(k) for k in METRIC_KEYS}
                        )
                        self.last_step = step
                elif kind == "eval" and step is not None:
                    registry.add_metrics(s, self.job_id, self.stage, step, {"val_bpb": rec.get("val_bpb")})
                    registry.add_event(
                        s,
                        self.job_id,
                        "eval",
                        f"step {step}: val bpb {rec.get('val_bpb')}",
                        stage=self.stage,
                        data=_jsonable(rec),
                    )
                elif kind == "checkpoint" and step is not None:
                    registry.record_checkpoint(
                        s,
                        self.job_id,
                        self.stage,
                        step,
                        str(rec.get("path", "")),
                        kind=self.kind,
                        val_bpb=rec.get("val_bpb"),
                        files=rec.get("files"),
                    )
                    self.checkpoints.append(step)
                elif kind == "done":
                    self.done = rec
                elif kind == "error":
                    self.error = str(rec.get("message") or rec.get("error") or rec)
                    registry.add_event(s, self.job_id, "error", self.error, stage=self.stage)
            if latest is not None:
                registry.update_progress(s, self.job_id, **_progress_fields(latest))


def _progress_fields(rec: dict[str, Any]) -> dict[str, Any]:
    fields = {
        "step": _int(rec.get("step")),
        "total_steps": _int(rec.get("total_steps")),
        "loss": _float(rec.get("loss")),
        "tokens_per_sec": _float(rec.get("tokens_per_sec")),
        "mfu": _float(rec.get("mfu")),
        "eta_seconds": _float(rec.get("eta_seconds")),
        "peak_memory": _int(rec.get("peak_memory_bytes")),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if isinstance(v, (str, int, float, bool, type(None), list, dict))}
