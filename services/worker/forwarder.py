"""Forward the training child's progress records (shared/jobs/progress_file.py) into the registry.

Each batch (one poll of the follow loop) becomes: the job's live progress fields (step, loss,
tokens/s, MFU, ETA, memory), metric rows, a registry checkpoint row per saved checkpoint, and
events for evals, checkpoints and errors.

The registry may be unreachable for a while (a PostgreSQL restart, a network partition): records
then wait in memory, in order, and are written when it answers again. Nothing here ever raises an
outage error into the follow loop, because the trainer must keep its GPU through an outage. Each
record is written idempotently (metrics once per step, checkpoint rows upserted), so a record
retried after a half-finished write leaves no duplicate.

The first progress record of every trainer run carries its kernel report; when that lists slow
fallbacks (a GPU running a slow attention path or an eager model, with the cause), the forwarder
adds one `warning` event for that run naming each cause. The event records the time of the record
that raised it, so a worker that restarts and replays the same record adds nothing; a new run of
the stage (a resume) starts with a record of its own and is warned about again.

A resumed run repeats the steps between its checkpoint and the point where the previous attempt
died. Those steps were already recorded (and, training being deterministic, with the same
values), so steps at or below the highest one recorded are not written again: the metric series
stays one row per step and name.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.worker.checkpoints import prune_missing
from shared.db import registry
from shared.db.models import MAX_INT32, Event, Metric
from shared.db.outage import is_outage
from shared.db.session import session_scope
from shared.jobs.progress_file import (
    CheckpointRecord,
    DoneRecord,
    ErrorRecord,
    EvalRecord,
    Record,
    StepRecord,
    kernel_report_of,
)

log = logging.getLogger(__name__)

# Retry cadence while the registry is unreachable (records wait in memory meanwhile).
RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 5.0


def max_recorded_step(session: Session, job_id: str, stage: str) -> int:
    value = session.scalar(
        select(func.max(Metric.step)).where(Metric.job_id == job_id, Metric.stage == stage)
    )
    return int(value) if value is not None else -1


# The event type of warnings (events have one level per type; "error" is the other non-info one).
WARNING = "warning"


def has_metric(session: Session, job_id: str, stage: str, step: int, name: str) -> bool:
    return (
        session.scalar(
            select(func.count())
            .select_from(Metric)
            .where(Metric.job_id == job_id, Metric.stage == stage, Metric.step == step, Metric.name == name)
        )
        or 0
    ) > 0


class ProgressForwarder:
    """Callable handed to the follow loop as `on_records`; `flush()` retries what is buffered."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, stage: str, checkpoint_kind: str
    ) -> None:
        self.sessions, self.job_id, self.stage, self.kind = sessions, job_id, stage, checkpoint_kind
        with session_scope(sessions) as s:
            self.last_step = max_recorded_step(s, job_id, stage)
        self.done: DoneRecord | None = None
        self.error: str | None = None
        self.checkpoints: list[int] = []  # steps checkpointed during this attempt
        self.eval_bpb: dict[int, float] = {}  # step -> val bpb evaluated at exactly that step
        self.pending: deque[Record] = deque()
        self.registry_down = False
        self._retry_at = 0.0  # while the registry is away, polls do not hammer it
        self._backoff = 0.0

    def __call__(self, records: Iterable[Record]) -> None:
        for rec in records:
            if rec.stage != self.stage:
                continue  # the other trainer's lines in a shared progress file
            # State the stage needs is taken at once, whether or not the registry answers.
            if isinstance(rec, DoneRecord):
                self.done = rec
            elif isinstance(rec, ErrorRecord):
                self.error = rec.message or rec.error_type or "trainer error"
            elif isinstance(rec, CheckpointRecord):
                self.checkpoints.append(rec.step)
            elif isinstance(rec, EvalRecord) and rec.val_bpb is not None:
                self.eval_bpb[rec.step] = rec.val_bpb
            self.pending.append(rec)
        if time.monotonic() >= self._retry_at:
            self.flush()

    def flush(self) -> bool:
        """Write what is buffered; True when nothing is left (False: the registry is still away)."""
        latest: StepRecord | None = None
        try:
            with session_scope(self.sessions) as s:
                while self.pending:
                    rec = self.pending[0]
                    self._write(s, rec)
                    if isinstance(rec, StepRecord):
                        latest = rec
                    self.pending.popleft()
                if latest is not None:
                    registry.update_progress(s, self.job_id, **_progress_fields(latest))
        except Exception as e:
            if not is_outage(e):
                raise
            if not self.registry_down:
                log.warning(
                    "job %s: registry unreachable (%s); buffering progress records",
                    self.job_id,
                    type(e).__name__,
                )
            self.registry_down = True
            self._backoff = min(max(2 * self._backoff, RETRY_INITIAL_SECONDS), RETRY_MAX_SECONDS)
            self._retry_at = time.monotonic() + self._backoff
            return False
        if self.registry_down:
            log.info("job %s: registry back; buffered progress forwarded", self.job_id)
            self.registry_down = False
        self._backoff, self._retry_at = 0.0, 0.0
        return True

    def _write(self, s: Session, rec: Record) -> None:
        if isinstance(rec, StepRecord):
            if rec.step > self.last_step:
                registry.add_metrics(s, self.job_id, self.stage, rec.step, rec.metrics())
                self.last_step = rec.step
            report = kernel_report_of(rec)
            if report is not None:
                self._warn_slow_fallbacks(s, rec, report)
        elif isinstance(rec, EvalRecord):
            if rec.val_bpb is None:
                return
            if not has_metric(s, self.job_id, self.stage, rec.step, "val_bpb"):
                registry.add_metrics(s, self.job_id, self.stage, rec.step, {"val_bpb": rec.val_bpb})
                registry.add_event(
                    s,
                    self.job_id,
                    "eval",
                    f"step {rec.step}: val bpb {rec.val_bpb:.4f}",
                    stage=self.stage,
                    data={"step": rec.step, "val_bpb": rec.val_bpb, **_scalars(rec.extra)},
                )
        elif isinstance(rec, CheckpointRecord):
            registry.record_checkpoint(
                s,
                self.job_id,
                self.stage,
                rec.step,
                rec.path,
                kind=self.kind,
                # Only an evaluation of this very step describes this checkpoint.
                val_bpb=self.eval_bpb.get(rec.step),
                files=rec.files,
            )
            # The trainer applied retention just before announcing this checkpoint.
            prune_missing(s, self.job_id, self.kind)
        elif isinstance(rec, ErrorRecord):
            registry.add_event(s, self.job_id, "error", rec.message, stage=self.stage)

    def _warn_slow_fallbacks(self, s: Session, rec: StepRecord, report: dict) -> None:
        """One warning per trainer run whose kernel report lists slow fallbacks (GPU only)."""
        causes = [str(c) for c in report.get("slow_fallbacks") or [] if c]
        if not causes:
            return
        # The record's own time identifies the run that wrote it: a replay of it is no new run.
        key = {"kind": "slow_fallbacks", "record_time": rec.time, "step": rec.step}
        earlier = s.scalars(
            select(Event.data).where(
                Event.job_id == self.job_id, Event.stage == self.stage, Event.type == WARNING
            )
        )
        if any(isinstance(d, dict) and all(d.get(k) == v for k, v in key.items()) for d in earlier):
            return
        registry.add_event(
            s,
            self.job_id,
            WARNING,
            f"{self.stage} runs slow kernels on {report.get('device') or 'its device'}: " + "; ".join(causes),
            stage=self.stage,
            data={**key, "causes": causes, "device": report.get("device")},
        )


def _progress_fields(rec: StepRecord) -> dict[str, float | int]:
    # A trainer's estimate (an SFT epoch's length extrapolated from its first steps) may not fit
    # the registry's 32-bit column; an unknown total beats a failed stage.
    total = rec.total_steps if rec.total_steps is not None and 0 <= rec.total_steps <= MAX_INT32 else None
    fields = {
        "step": rec.step,
        "total_steps": total,
        "loss": rec.loss,
        "tokens_per_sec": rec.tokens_per_sec,
        "mfu": rec.mfu,
        "eta_seconds": rec.eta_seconds,
        "peak_memory": rec.peak_memory_bytes,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))}
