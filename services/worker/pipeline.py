"""Run one stage of one job: the orchestration every stage task shares, without Celery.

`run_stage(job_id, stage, ...)` is what a delivered message turns into. It makes at-least-once
delivery safe:

- a finished job, an unknown job, or a stage that already succeeded is acknowledged and dropped
  (a redelivered or duplicated message); a stage whose predecessors have not finished is dropped
  too (the registry, not the message, says what runs next);
- the job's registry lease is taken first, atomically; whoever loses the race drops the message;
- the cancel flag is re-read after the lease is taken (a cancel may have landed in between);
- the stage's work runs while a heartbeat renews the lease; its outputs and status are recorded,
  the lease is released, and only then the next stage is enqueued (so the next stage's worker
  never finds the lease still held by this one).

The stage functions themselves (shared work on the run folder) live in `stages.py`.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from services.worker.lease import LeaseHeartbeat
from shared.db import registry
from shared.db.session import session_scope
from shared.paths import RunPaths, run_paths
from shared.settings import Settings

log = logging.getLogger(__name__)

# The report closes every job: it reads whatever the other stages wrote.
FINAL_STAGE = "report"

Enqueue = Callable[[str, str], None]  # (job_id, stage)


class StageCancelled(Exception):
    """The job was cancelled while the stage ran; its partial outputs are kept for a resume."""


class LeaseLost(Exception):
    """Another worker owns the job now; this one must stop without recording anything."""


class StageInterrupted(Exception):
    """The stage stopped early for a reason other than a cancel (its process was signalled). It
    is neither done nor failed: the lease is released and the reconciler sends it again, and the
    next attempt resumes from the newest checkpoint."""


class StageError(Exception):
    """A stage failure with a stable error code for the job (e.g. `multinode_unavailable`)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StageContext:
    """Everything a stage function may use; built per delivery."""

    job_id: str
    stage: str
    spec: dict[str, Any]  # the job's validated JobSpec, as JSON
    run: RunPaths
    settings: Settings
    sessions: sessionmaker[Session]
    worker_id: str
    heartbeat: LeaseHeartbeat

    def cancel_requested(self) -> bool:
        with session_scope(self.sessions) as s:
            return bool(registry.get_job(s, self.job_id).cancel_requested)

    def event(self, type: str, message: str, data: dict | None = None) -> None:
        with session_scope(self.sessions) as s:
            registry.add_event(s, self.job_id, type, message, stage=self.stage, data=data)

    def stage_outputs(self, name: str) -> dict[str, Any]:
        """Outputs an earlier stage recorded ({} if it did not run in this job)."""
        with session_scope(self.sessions) as s:
            row = registry.get_stage(s, self.job_id, name)
            return dict(row.outputs or {}) if row is not None else {}


StageFn = Callable[[StageContext], dict[str, Any]]


def job_stages(spec: dict[str, Any]) -> list[str]:
    from shared.jobs.spec import DEFAULT_STAGES

    stages = list(spec.get("stages") or DEFAULT_STAGES[spec.get("kind", "pipeline")])
    return [*stages, FINAL_STAGE]


def next_stage(spec: dict[str, Any], stage: str) -> str | None:
    stages = job_stages(spec)
    i = stages.index(stage)
    return stages[i + 1] if i + 1 < len(stages) else None


def first_unfinished_stage(session: Session, job_id: str) -> str | None:
    """The stage a (re)started job continues with: the first one not succeeded or skipped."""
    job = registry.get_job(session, job_id)
    done = {st.name for st in job.stages if st.status in ("succeeded", "skipped")}
    return next((name for name in job_stages(job.spec) if name not in done), None)


def run_stage(
    job_id: str,
    stage: str,
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    worker_id: str,
    enqueue: Enqueue,
) -> str:
    """Run `stage` of `job_id` if it is this delivery's to run; returns what happened (for logs
    and tests): ran | failed | cancelled | duplicate | leased | out_of_order | finished | missing."""
    from services.worker.stages import STAGE_FUNCTIONS  # stages import this module

    with session_scope(sessions) as s:
        try:
            job = registry.get_job(s, job_id)
        except registry.JobNotFound:
            log.warning("message for unknown job %s dropped", job_id)
            return "missing"
        if job.is_terminal:
            return "finished"
        stages = job_stages(job.spec)
        if stage not in stages:
            log.warning("job %s has no stage %r; message dropped", job_id, stage)
            return "out_of_order"
        upcoming = first_unfinished_stage(s, job_id)
        if upcoming != stage:
            # A redelivered or duplicated message of a finished stage, or one that came too early.
            # Dropped without sending anything: re-sending from here would multiply duplicates down
            # the pipeline; a pipeline that stalled (worker died between finishing a stage and
            # sending the next) is the reconciler's to restart.
            return "duplicate" if stage in _done_stages(job) else "out_of_order"
        if not registry.acquire_lease(s, job_id, worker_id, settings.lease_seconds):
            return "leased"
        job = registry.get_job(s, job_id)
        if job.is_terminal or job.cancel_requested:
            _finish_cancel(s, job_id, stage, worker_id)
            return "cancelled"
        if registry.get_stage(s, job_id, FINAL_STAGE) is None:
            # The spec lists the job's stages; the closing report is ours. Adding its row up front
            # keeps the job's progress percentage from jumping back when the report starts.
            registry.set_stage_status(s, job_id, FINAL_STAGE, "pending")
        registry.start_stage(s, job_id, stage)
        spec = dict(job.spec)

    ctx = StageContext(
        job_id=job_id, stage=stage, spec=spec, run=run_paths(settings.runs_dir, job_id),
        settings=settings, sessions=sessions, worker_id=worker_id,
        heartbeat=LeaseHeartbeat(sessions, job_id, worker_id, settings.lease_seconds),
    )  # fmt: skip
    ctx.run.root.mkdir(parents=True, exist_ok=True)
    with ctx.heartbeat:
        try:
            outputs = STAGE_FUNCTIONS[stage](ctx)
            if ctx.heartbeat.lost.is_set():
                raise LeaseLost(job_id)
        except LeaseLost:
            log.error("job %s stage %s: lease lost, leaving the job to its new owner", job_id, stage)
            return "leased"
        except StageCancelled:
            with session_scope(sessions) as s:
                _finish_cancel(s, job_id, stage, worker_id)
            return "cancelled"
        except StageInterrupted as e:
            with session_scope(sessions) as s:
                registry.add_event(s, job_id, "interrupted", f"stage {stage} interrupted: {e}", stage=stage)
                registry.release_lease(s, job_id, worker_id)
            return "interrupted"
        except Exception as e:  # every failure ends up in the registry, named
            code = e.code if isinstance(e, StageError) else "stage_failed"
            log.error("job %s stage %s failed:\n%s", job_id, stage, traceback.format_exc())
            with session_scope(sessions) as s:
                registry.fail_stage(s, job_id, stage, f"{type(e).__name__}: {e}", error_code=code)
                registry.release_lease(s, job_id, worker_id)
            return "failed"

    with session_scope(sessions) as s:
        registry.finish_stage(s, job_id, stage, outputs)
        job = registry.get_job(s, job_id)
        follow = next_stage(job.spec, stage)
        if job.cancel_requested:
            _finish_cancel(s, job_id, None, worker_id)
            return "cancelled"
        if follow is None:
            registry.set_job_status(s, job_id, "succeeded")
        registry.release_lease(s, job_id, worker_id)
        if follow is not None:
            _kick(s, job_id, follow, enqueue)
    return "ran"


def _done_stages(job: Any) -> set[str]:
    return {st.name for st in job.stages if st.status in ("succeeded", "skipped")}


def _kick(session: Session, job_id: str, stage: str | None, enqueue: Enqueue) -> None:
    if stage is None:
        return
    registry.update_progress(session, job_id, current_stage=stage)
    enqueue(job_id, stage)


def _finish_cancel(session: Session, job_id: str, stage: str | None, worker_id: str) -> None:
    job = registry.get_job(session, job_id)
    if not job.is_terminal:
        if stage is not None:
            registry.set_stage_status(session, job_id, stage, "cancelled")
        registry.set_job_status(session, job_id, "cancelled")
    registry.release_lease(session, job_id, worker_id)
