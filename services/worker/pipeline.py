"""Run one stage of one job: the orchestration every stage task shares, without Celery.

`run_stage(job_id, stage, ...)` is what a delivered message turns into. It makes at-least-once
delivery safe:

- a finished job, an unknown job, or a stage that already succeeded is acknowledged and dropped
  (a redelivered or duplicated message); a stage whose predecessors have not finished is dropped
  too (the registry, not the message, says what runs next);
- the job's registry lease is taken first, atomically; whoever loses the race drops the message
  (a message redelivered while its first delivery still runs, e.g. after the broker's visibility
  timeout, finds the lease held and does nothing);
- the cancel flag is re-read after the lease is taken (a cancel may have landed in between);
- the stage's work runs while a heartbeat renews the lease; its outputs and status are recorded,
  the lease is released, and only then the next stage is enqueued (so the next stage's worker
  never finds the lease still held by this one). If the registry is unreachable when the work
  ends, recording waits for it (the lease, renewed again once it answers, keeps the job ours).

The stage functions themselves live in stages.py and training.py; the list of stages and their
order in shared/jobs/stages.py.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable

from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker

from services.worker.context import LeaseLost, StageCancelled, StageContext, StageError, StageInterrupted
from services.worker.heartbeat import LeaseHeartbeat
from services.worker.inputs import init_models
from services.worker.stages import STAGE_FUNCTIONS
from shared.db import registry
from shared.db.models import Job
from shared.db.outage import is_outage, wait_out_outage
from shared.db.session import session_scope
from shared.jobs.spec import JobSpec
from shared.jobs.stages import FINAL_STAGE, first_unfinished, job_stages, next_stage
from shared.paths import run_paths
from shared.settings import Settings

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]  # (job_id, stage)


def _done_stages(job: Job) -> set[str]:
    return {st.name for st in job.stages if st.status in ("succeeded", "skipped")}


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
    and tests): ran | failed | cancelled | interrupted | duplicate | leased | out_of_order |
    finished | missing."""
    with session_scope(sessions) as s:
        try:
            job = registry.get_job(s, job_id)
        except registry.JobNotFound:
            log.warning("message for unknown job %s dropped", job_id)
            return "missing"
        if job.is_terminal:
            return "finished"
        spec = JobSpec.from_stored(job.spec)
        if stage not in job_stages(spec.resolved_stages()):
            log.warning("job %s has no stage %r; message dropped", job_id, stage)
            return "out_of_order"
        if first_unfinished(spec.resolved_stages(), _done_stages(job)) != stage:
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

    ctx = StageContext(
        job_id=job_id, stage=stage, spec=spec, run=run_paths(settings.runs_dir, job_id),
        settings=settings, sessions=sessions, worker_id=worker_id,
        heartbeat=LeaseHeartbeat(sessions, job_id, worker_id, settings.lease_seconds),
    )  # fmt: skip
    ctx.run.root.mkdir(parents=True, exist_ok=True)

    def record(what: str, fn: Callable[[], str]) -> str:
        return wait_out_outage(fn, f"recording {what} of job {job_id}", give_up=ctx.heartbeat.lost.is_set)

    with ctx.heartbeat:
        try:
            if spec.init is not None:
                # Every stage of a job on a registered model first checks the checkpoints it will
                # read against the model's tokenizer: the first stage refuses a mismatch before work.
                init_models(ctx)
            outputs = STAGE_FUNCTIONS[stage](ctx).model_dump(mode="json")
            if ctx.heartbeat.lost.is_set():
                raise LeaseLost(job_id)
        except LeaseLost:
            log.error("job %s stage %s: lease lost, leaving the job to its new owner", job_id, stage)
            return "leased"
        except StageCancelled:
            return record("the cancel", lambda: _cancelled(sessions, job_id, stage, worker_id))
        except StageInterrupted as e:
            why = str(e)
            return record("the interruption", lambda: _interrupted(sessions, job_id, stage, worker_id, why))
        except Exception as e:  # every failure ends up in the registry, named
            if is_outage(e):
                # The registry went away under the stage (a Postgres restart or failover): nothing
                # is wrong with the job. Like a signalled stage it is released, not failed, and the
                # reconciler sends it again (stages are idempotent); recording that waits the outage out.
                why = f"the registry was unreachable ({error_text(e)})"
                log.warning("job %s stage %s: %s; it will run again", job_id, stage, why)
                return record(
                    "the interruption", lambda: _interrupted(sessions, job_id, stage, worker_id, why)
                )
            code = e.code if isinstance(e, StageError) else "stage_failed"
            log.error("job %s stage %s failed:\n%s", job_id, stage, traceback.format_exc())
            message = error_text(e)
            return record("the failure", lambda: _failed(sessions, job_id, stage, worker_id, message, code))
        return record("the result", lambda: _succeeded(sessions, job_id, stage, worker_id, outputs, enqueue))


def error_text(e: BaseException) -> str:
    """What a job's error says about an exception: its type and message, never a SQL statement or
    its parameters (SQLAlchemy puts both in str(e)), and no NUL byte (the registry's text columns
    cannot hold one)."""
    if isinstance(e, StatementError):
        orig = e.orig if e.orig is not None else e
        lines = str(orig).strip().splitlines()
        text = f"registry error: {type(orig).__name__}: {lines[0] if lines else ''}"
    else:
        text = f"{type(e).__name__}: {e}"
    return text.replace("\x00", "\\0")


def _succeeded(
    sessions: sessionmaker[Session], job_id: str, stage: str, worker_id: str, outputs: dict, enqueue: Enqueue
) -> str:
    with session_scope(sessions) as s:
        registry.finish_stage(s, job_id, stage, outputs)
        job = registry.get_job(s, job_id)
        follow_up = next_stage(JobSpec.from_stored(job.spec).resolved_stages(), stage)
        if job.cancel_requested:
            _finish_cancel(s, job_id, None, worker_id)
            return "cancelled"
        if follow_up is None:
            registry.set_job_status(s, job_id, "succeeded")
        registry.release_lease(s, job_id, worker_id)
        if follow_up is not None:
            registry.update_progress(s, job_id, current_stage=follow_up)
            enqueue(job_id, follow_up)
    return "ran"


def _cancelled(sessions: sessionmaker[Session], job_id: str, stage: str, worker_id: str) -> str:
    with session_scope(sessions) as s:
        _finish_cancel(s, job_id, stage, worker_id)
    return "cancelled"


def _interrupted(sessions: sessionmaker[Session], job_id: str, stage: str, worker_id: str, why: str) -> str:
    with session_scope(sessions) as s:
        registry.add_event(s, job_id, "interrupted", f"stage {stage} interrupted: {why}", stage=stage)
        registry.release_lease(s, job_id, worker_id)
    return "interrupted"


def _failed(
    sessions: sessionmaker[Session], job_id: str, stage: str, worker_id: str, message: str, code: str
) -> str:
    with session_scope(sessions) as s:
        registry.fail_stage(s, job_id, stage, message, error_code=code)
        registry.release_lease(s, job_id, worker_id)
    return "failed"


def _finish_cancel(session: Session, job_id: str, stage: str | None, worker_id: str) -> None:
    job = registry.get_job(session, job_id)
    if not job.is_terminal:
        if stage is not None:
            registry.set_stage_status(session, job_id, stage, "cancelled")
        registry.set_job_status(session, job_id, "cancelled")
    registry.release_lease(session, job_id, worker_id)
