"""The functions every service uses to read and record job state in the run registry.

Each function takes a SQLAlchemy `Session`. Functions that write are one unit of work each: they
open a write transaction (`begin_write`), change what they must and commit before returning, so a
worker's progress hook or the API can call them without transaction bookkeeping. Reads do not
commit. Races between processes are settled by the database, never by Python-side checks:
row locks on the job (`SELECT ... FOR UPDATE` on PostgreSQL, the write lock on SQLite), an atomic
counter for event sequence numbers, and a conditional upsert for worker leases.

This module holds jobs and stages and is the one import point for every registry function: events,
outputs (metrics, checkpoints, artifacts, eval results) and leases live in their own modules and
are re-exported here, so callers write `from shared.db import registry; registry.acquire_lease(...)`.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db.errors import IdempotencyConflict, IllegalTransition, JobNotFound, RegistryError
from shared.db.events import add_event, append_event, list_events
from shared.db.leases import acquire_lease, get_lease, jobs_needing_reconcile, release_lease, renew_lease
from shared.db.models import (
    JOB_KINDS,
    JOB_STATUSES,
    STAGE_STATUSES,
    TERMINAL_STATUSES,
    Job,
    Stage,
    WorkerLease,
    utcnow,
)
from shared.db.outputs import (
    add_metrics,
    get_metrics,
    latest_checkpoint,
    latest_checkpoints,
    list_artifacts,
    list_checkpoints,
    list_eval_results,
    record_artifact,
    record_checkpoint,
    record_eval_results,
    remove_checkpoints,
)
from shared.db.session import begin_write

__all__ = [
    "TRANSITIONS",
    "IdempotencyConflict",
    "IllegalTransition",
    "JobNotFound",
    "RegistryError",
    "acquire_lease",
    "add_event",
    "add_metrics",
    "count_jobs_by_status",
    "create_job",
    "create_or_get_job",
    "fail_stage",
    "finish_stage",
    "get_job",
    "get_lease",
    "get_metrics",
    "get_stage",
    "increment_attempts",
    "jobs_needing_reconcile",
    "latest_checkpoint",
    "latest_checkpoints",
    "list_artifacts",
    "list_checkpoints",
    "list_eval_results",
    "list_events",
    "list_jobs",
    "record_artifact",
    "record_checkpoint",
    "record_eval_results",
    "release_lease",
    "remove_checkpoints",
    "renew_lease",
    "request_cancel",
    "resume_job",
    "set_job_status",
    "set_stage_status",
    "start_stage",
    "update_progress",
]


# Which status may follow which. Staying in the same status is always allowed (redelivered tasks
# repeat their writes). `running -> queued` is the reconciler handing a job to a new worker.
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelling", "cancelled", "failed"}),
    "running": frozenset({"queued", "cancelling", "cancelled", "succeeded", "failed"}),
    "cancelling": frozenset({"cancelled", "succeeded", "failed"}),
    "cancelled": frozenset({"queued"}),
    "failed": frozenset({"queued"}),
    "succeeded": frozenset(),
}

_JOB_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
PROGRESS_FIELDS = ("step", "total_steps", "loss", "tokens_per_sec", "mfu", "eta_seconds", "peak_memory")


# --- jobs ----------------------------------------------------------------------------------------
def _spec_dict(spec: Any) -> dict[str, Any]:
    if hasattr(spec, "model_dump"):  # a validated JobSpec
        return spec.model_dump(mode="json")
    if isinstance(spec, Mapping):
        return dict(spec)
    raise TypeError(f"spec must be a JobSpec or a mapping, got {type(spec).__name__}")


def create_or_get_job(session: Session, spec: Any, idempotency_key: str | None = None) -> tuple[Job, bool]:
    """Insert a queued job with one pending stage row per spec stage; returns (job, created).

    With an idempotency key, a second call returns the first job (created=False) as long as the
    spec is the same; a different spec under the same key raises IdempotencyConflict. A race of
    two inserts with one key is settled by the unique constraint.
    """
    data = _spec_dict(spec)
    kind = data.get("kind")
    if kind not in JOB_KINDS:
        raise ValueError(f"spec.kind must be one of {JOB_KINDS}, got {kind!r}")
    stages = list(data.get("stages") or [])
    if not stages:
        raise ValueError("spec.stages is empty; a job needs at least one stage")

    if idempotency_key is not None:
        existing = _by_key(session, idempotency_key)
        if existing is not None:
            return _same_spec_or_conflict(existing, data, idempotency_key), False

    begin_write(session)
    job = Job(kind=kind, spec=data, status="queued", idempotency_key=idempotency_key, attempts=0)
    job.stages = [Stage(name=name, order=i, status="pending") for i, name in enumerate(stages)]
    session.add(job)
    try:
        session.flush()
        append_event(session, job.id, "created", f"{kind} job queued", data={"stages": stages})
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = _by_key(session, idempotency_key)
        if existing is None:
            raise
        return _same_spec_or_conflict(existing, data, idempotency_key), False
    return job, True


def create_job(session: Session, spec: Any, idempotency_key: str | None = None) -> Job:
    """A new queued job for `spec` (same idempotency key -> the same job)."""
    return create_or_get_job(session, spec, idempotency_key)[0]


def job_by_idempotency_key(session: Session, key: str) -> Job | None:
    """The job submitted under Idempotency-Key `key`, if any."""
    return _by_key(session, key)


def _by_key(session: Session, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()


def _same_spec_or_conflict(job: Job, data: dict[str, Any], key: str) -> Job:
    if job.spec != data:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r} was already used for job {job.id} with a different spec"
        )
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(job_id)
    return job


def _lock_job(session: Session, job_id: str) -> Job:
    """The job row, locked until commit (FOR UPDATE; SQLite already holds the write lock)."""
    job = session.scalars(
        select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
    ).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, job_id = raw.split("|", 1)
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError("bad job id")
        created = dt.datetime.fromisoformat(ts)
        if created.tzinfo is None:
            raise ValueError("naive timestamp")
        return created, job_id
    except ValueError as e:
        raise ValueError(f"cursor {cursor!r} is not a cursor this API returned") from e


def list_jobs(
    session: Session,
    status: str | Iterable[str] | None = None,
    cursor: str | None = None,
    limit: int = 50,
    kind: str | None = None,
    id_prefix: str | None = None,
) -> tuple[list[Job], str | None]:
    """Newest first, keyset-paged: returns (jobs, next_cursor); next_cursor None on the last page.
    `id_prefix` keeps the jobs whose id starts with it (a short id as `ncp jobs watch` prints)."""
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be in 1..1000, got {limit}")
    q = select(Job)
    if status is not None:
        statuses = [status] if isinstance(status, str) else list(status)
        bad = [s for s in statuses if s not in JOB_STATUSES]
        if bad:
            raise ValueError(f"status {bad[0]!r} is not one of {JOB_STATUSES}")
        q = q.where(Job.status.in_(statuses))
    if kind is not None:
        q = q.where(Job.kind == kind)
    if id_prefix is not None:
        if not _JOB_ID.fullmatch(id_prefix):
            raise ValueError(f"id_prefix {id_prefix!r} is not the start of a job id")
        q = q.where(Job.id.startswith(id_prefix, autoescape=True))
    if cursor:
        created, job_id = _decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    if len(rows) > limit:
        return rows[:limit], _encode_cursor(rows[limit - 1])
    return rows, None


def count_jobs_by_status(session: Session) -> dict[str, int]:
    counts = dict.fromkeys(JOB_STATUSES, 0)
    for status, n in session.execute(select(Job.status, func.count()).group_by(Job.status)):
        counts[status] = int(n)
    return counts


def _apply_status(job: Job, status: str, now: dt.datetime) -> None:
    if status not in JOB_STATUSES:
        raise ValueError(f"status {status!r} is not one of {JOB_STATUSES}")
    if status != job.status and status not in TRANSITIONS[job.status]:
        raise IllegalTransition(job.id, job.status, status)
    reopening = job.status in TERMINAL_STATUSES and status not in TERMINAL_STATUSES
    job.status = status
    if status == "running" and job.started_at is None:
        job.started_at = now
    if status in TERMINAL_STATUSES and job.finished_at is None:
        job.finished_at = now
        job.eta_seconds = None
    if reopening:
        # A finished job queued again (resume, or an operator's set_job_status) starts clean:
        # no end time, no stale error or cancel flag, and every unfinished stage pending again.
        job.finished_at = None
        job.error_code = job.error_message = None
        job.cancel_requested = False
        for st in job.stages:
            if st.status != "succeeded":
                st.status, st.started_at, st.finished_at, st.error = "pending", None, None, None


def set_job_status(
    session: Session,
    job_id: str,
    status: str,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
) -> Job:
    """Move a job to `status` if the transition is legal (else IllegalTransition); records an event."""
    begin_write(session)
    job = _lock_job(session, job_id)
    previous = job.status
    now = utcnow()
    try:
        _apply_status(job, status, now)
    except RegistryError:
        session.rollback()
        raise
    if error_code is not None:
        job.error_code = error_code
    if error_message is not None:
        job.error_message = error_message
    if status in TERMINAL_STATUSES:
        # Stages that never ran end with the job, so the per-stage view has no dangling "pending".
        for st in job.stages:
            if st.status in ("pending", "running"):
                st.status = "cancelled" if status != "succeeded" else "skipped"
                st.finished_at = st.finished_at or now
    if previous != status:
        msg = f"{previous} -> {status}" + (f": {error_message}" if error_message else "")
        append_event(
            session, job_id, "status", msg, data={"from": previous, "to": status, "error_code": error_code}
        )
    session.commit()
    return job


def update_progress(session: Session, job_id: str, **fields: Any) -> Job:
    """Overwrite the job's live progress fields (step, total_steps, loss, tokens_per_sec, mfu,
    eta_seconds, peak_memory; `peak_memory_bytes` and `current_stage` accepted too)."""
    if "peak_memory_bytes" in fields:
        fields["peak_memory"] = fields.pop("peak_memory_bytes")
    allowed = set(PROGRESS_FIELDS) | {"current_stage"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"update_progress: unknown field {unknown[0]!r}; allowed: {sorted(allowed)}")
    begin_write(session)
    values = dict(fields, updated_at=utcnow())
    result = session.execute(update(Job).where(Job.id == job_id).values(**values))
    if result.rowcount == 0:  # type: ignore[attr-defined]
        session.rollback()
        raise JobNotFound(job_id)
    session.commit()
    return get_job(session, job_id)


def increment_attempts(session: Session, job_id: str) -> int:
    """Atomically add one to the job's attempt counter; returns the new value."""
    begin_write(session)
    new = session.execute(
        update(Job).where(Job.id == job_id).values(attempts=Job.attempts + 1).returning(Job.attempts)
    ).scalar_one_or_none()
    if new is None:
        session.rollback()
        raise JobNotFound(job_id)
    session.commit()
    return int(new)


def request_cancel(session: Session, job_id: str, *, now: dt.datetime | None = None) -> Job:
    """Ask a job to stop. Without a live worker lease it is cancelled at once; with one it becomes
    `cancelling` with cancel_requested set, and the worker holding the lease stops its process and
    sets `cancelled`. A worker that takes a lease must re-check the job status after taking it.
    Finished jobs raise IllegalTransition."""
    now = now or utcnow()
    begin_write(session)
    job = _lock_job(session, job_id)
    if job.is_terminal:
        session.rollback()
        raise IllegalTransition(job_id, job.status, "cancelled", "the job has already finished")
    lease = session.get(WorkerLease, job_id, populate_existing=True)
    live = lease is not None and lease.expires_at > now
    job.cancel_requested = True
    target = "cancelling" if live else "cancelled"
    if job.status != target:
        previous = job.status
        _apply_status(job, target, now)
        if target == "cancelled":
            for st in job.stages:
                if st.status in ("pending", "running"):
                    st.status, st.finished_at = "cancelled", st.finished_at or now
        append_event(
            session,
            job_id,
            "status",
            f"{previous} -> {target}: cancel requested",
            data={"from": previous, "to": target},
        )
    session.commit()
    return job


def resume_job(session: Session, job_id: str) -> Job:
    """Queue a cancelled or failed job again (IllegalTransition otherwise). Completed stages keep
    their outputs; the others go back to pending, and training resumes from its newest checkpoint."""
    begin_write(session)
    job = _lock_job(session, job_id)
    if job.status not in ("cancelled", "failed"):
        session.rollback()
        raise IllegalTransition(job_id, job.status, "queued", "only cancelled or failed jobs can resume")
    previous = job.status
    _apply_status(job, "queued", utcnow())  # reopens: clears the end time, error, cancel flag, stages
    job.attempts = 0  # a resumed job gets a fresh set of attempts from the reconciler
    append_event(
        session, job_id, "status", f"{previous} -> queued: resumed", data={"from": previous, "to": "queued"}
    )
    session.commit()
    return job


# --- stages --------------------------------------------------------------------------------------
def get_stage(session: Session, job_id: str, name: str) -> Stage | None:
    return session.scalars(
        select(Stage)
        .where(Stage.job_id == job_id, Stage.name == name)
        .execution_options(populate_existing=True)
    ).one_or_none()


def _stage_for_write(session: Session, job: Job, name: str) -> Stage:
    stage = next((s for s in job.stages if s.name == name), None)
    if stage is None:
        # A stage the spec did not list (e.g. `report`) is appended, not refused.
        stage = Stage(job_id=job.id, name=name, order=len(job.stages), status="pending")
        job.stages.append(stage)
    return stage


def set_stage_status(
    session: Session,
    job_id: str,
    name: str,
    status: str,
    *,
    error: str | None = None,
    outputs: Mapping[str, Any] | None = None,
) -> Stage:
    """Set one stage's status directly (e.g. `skipped`); start/finish/fail_stage are the usual path."""
    if status not in STAGE_STATUSES:
        raise ValueError(f"stage status {status!r} is not one of {STAGE_STATUSES}")
    begin_write(session)
    job = _lock_job(session, job_id)
    stage = _stage_for_write(session, job, name)
    now = utcnow()
    stage.status = status
    if status == "running":
        stage.started_at, stage.finished_at, stage.error = now, None, None
    elif status != "pending":
        stage.finished_at = now
    if error is not None:
        stage.error = error
    if outputs is not None:
        stage.outputs = dict(outputs)
    session.commit()
    return stage


def start_stage(session: Session, job_id: str, name: str) -> Stage:
    """Mark a stage running, make it the job's current stage and the job running (from queued)."""
    begin_write(session)
    job = _lock_job(session, job_id)
    now = utcnow()
    if job.status == "queued":
        _apply_status(job, "running", now)
    elif job.status != "running":
        session.rollback()
        raise IllegalTransition(job_id, job.status, "running", f"cannot start stage {name!r}")
    stage = _stage_for_write(session, job, name)
    stage.status, stage.started_at, stage.finished_at, stage.error = "running", now, None, None
    job.current_stage = name
    # Progress fields describe the current stage only.
    for f in PROGRESS_FIELDS:
        setattr(job, f, None)
    append_event(session, job_id, "stage_started", f"stage {name} started", stage=name)
    session.commit()
    return stage


def finish_stage(session: Session, job_id: str, name: str, outputs: Mapping[str, Any] | None = None) -> Stage:
    """Mark a stage succeeded with its outputs (paths, numbers). The job's status is untouched:
    the orchestrator decides whether the job continues or succeeds."""
    begin_write(session)
    job = _lock_job(session, job_id)
    stage = _stage_for_write(session, job, name)
    stage.status, stage.finished_at = "succeeded", utcnow()
    stage.started_at = stage.started_at or stage.finished_at
    if outputs is not None:
        stage.outputs = dict(outputs)
    append_event(
        session,
        job_id,
        "stage_finished",
        f"stage {name} succeeded",
        stage=name,
        data=dict(outputs) if outputs else None,
    )
    session.commit()
    return stage


def fail_stage(
    session: Session,
    job_id: str,
    name: str,
    error: str,
    *,
    error_code: str = "stage_failed",
    fail_job: bool = True,
) -> Stage:
    """Mark a stage failed; by default the job fails too with `error_code` and the error text."""
    begin_write(session)
    job = _lock_job(session, job_id)
    now = utcnow()
    stage = _stage_for_write(session, job, name)
    stage.status, stage.finished_at, stage.error = "failed", now, error
    append_event(
        session,
        job_id,
        "stage_failed",
        f"stage {name} failed: {error}",
        stage=name,
        data={"error_code": error_code},
    )
    if fail_job and job.status != "failed":
        previous = job.status
        try:
            _apply_status(job, "failed", now)
        except IllegalTransition:
            session.rollback()
            raise
        job.error_code, job.error_message = error_code, f"{name}: {error}"
        for st in job.stages:
            if st.status == "pending":
                st.status, st.finished_at = "cancelled", now
        append_event(
            session,
            job_id,
            "status",
            f"{previous} -> failed: {error}",
            data={"from": previous, "to": "failed", "error_code": error_code},
        )
    session.commit()
    return stage
