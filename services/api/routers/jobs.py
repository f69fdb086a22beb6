"""Jobs: submit, list, inspect, cancel, resume."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Request, Response
from sqlalchemy.orm import Session, sessionmaker

from services.api.deps import AuthDep, JobId, SessionDep, SettingsDep
from services.api.errors import ERROR_RESPONSES as _ERRORS
from services.api.errors import ApiError, error_responses
from services.api.schemas import JobPublic, JobsPublic
from shared.db import model_registry, registry
from shared.db.models import JobKind, JobStatus
from shared.db.session import session_scope
from shared.jobs.dispatch import enqueue_job
from shared.jobs.init_model import prepare_init_spec
from shared.jobs.progress_file import scan_kernel_reports
from shared.jobs.spec import JobCreate, field_error
from shared.paths import run_paths
from shared.settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])


def enqueue(job_id: str, settings: Settings, sessions: sessionmaker[Session]) -> bool:
    """Hand the job's next stage to the workers. Failure is not fatal: the job stays queued in the
    registry and the reconciler enqueues it later (Postgres is the truth, the broker a courier)."""
    try:
        enqueue_job(job_id, settings=settings)
        return True
    except Exception as e:  # broker down, etc.: recorded, and the reconciler retries
        log.warning("could not enqueue job %s: %s", job_id, e)
        try:
            with session_scope(sessions) as s:
                registry.add_event(
                    s, job_id, "enqueue_failed", f"broker unavailable: {type(e).__name__}: {e}"
                )
        except Exception:  # the registry itself is down too; nothing more to record
            log.exception("could not record enqueue failure for job %s", job_id)
        return False


class KernelReports:
    """Each job's kernel reports (training stage -> report), read from its progress file. A job
    status is polled every second or two while it runs, and the file only grows: each read
    continues where the last one stopped instead of scanning the whole file again."""

    MAX_FILES = 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # path -> (inode, bytes read, reports found)
        self._seen: OrderedDict[Path, tuple[int, int, dict[str, dict[str, Any]]]] = OrderedDict()

    def of(self, progress_file: Path) -> dict[str, dict[str, Any]]:
        try:
            st = progress_file.stat()
        except OSError:
            return {}
        with self._lock:
            ino, offset, found = self._seen.get(progress_file, (st.st_ino, 0, {}))
        if ino != st.st_ino or st.st_size < offset:  # replaced or truncated: start over
            offset, found = 0, {}
        if st.st_size > offset:
            found, offset = scan_kernel_reports(progress_file, offset, found)
        with self._lock:
            self._seen[progress_file] = (st.st_ino, offset, found)
            self._seen.move_to_end(progress_file)
            while len(self._seen) > self.MAX_FILES:
                self._seen.popitem(last=False)
        return found


KERNELS = KernelReports()


def _public(session: Any, job: Any, settings: Settings) -> JobPublic:
    kernels = KERNELS.of(run_paths(settings.runs_dir, job.id).progress_file)
    return JobPublic.of(job, registry.latest_checkpoint(session, job.id), kernels=kernels)


# Repeating a request with the same key returns the same job (POST /jobs, POST /models/import).
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
]


def _model_name_free(session: Session, settings: Settings, name: str) -> None:
    """An import's model name must be free in the model registry and on disk: refused at submit
    (422 at import.name) rather than by the stage later."""
    held = model_registry.get_model(session, name)
    if held is not None:
        where = f"{held.source} model at {held.path}"
    elif (settings.models_dir / name).exists():
        where = f"a folder {settings.models_dir / name} is in the way"
    else:
        return
    raise field_error(("import", "name"), f"model {name!r} already exists ({where}); pick another name", name)


def submit_spec(
    request: Request,
    response: Response,
    session: Session,
    settings: Settings,
    body: dict[str, Any],
    idempotency_key: str | None,
) -> JobPublic:
    """Validate a job spec, record the job and enqueue its first stage: POST /jobs, and the routes
    that submit a job of their own kind (POST /models/import). A refusal is a ValidationError
    (a 422 naming the field) or an ApiError."""
    # Validated here rather than by FastAPI so the configured data roots reach the path checks;
    # a ValidationError becomes a 422 naming the field (services/api/errors.py).
    spec = JobCreate.model_validate(body, context={"roots": [settings.home, *settings.data_roots]})
    if spec.parent_job_id is not None:
        try:
            registry.get_job(session, spec.parent_job_id)
        except registry.JobNotFound:
            raise ApiError(
                422, "validation_error", f"parent_job_id: no job {spec.parent_job_id!r}", "parent_job_id"
            ) from None
    if spec.init is not None:
        # The model, its checkpoints and their fit to its tokenizer are checked now (a 422 naming
        # init.* or model.*), and the stored spec takes the checkpoint's shape.
        spec = prepare_init_spec(session, spec)
    # A repeated import (same key) returns its job even after that job took the name.
    repeated = idempotency_key is not None and registry.job_by_idempotency_key(session, idempotency_key)
    if spec.import_ is not None and not repeated:
        _model_name_free(session, settings, spec.import_.name)
    job, created = registry.create_or_get_job(session, spec, idempotency_key)
    if created:
        enqueue(job.id, settings, request.app.state.session_factory)
        job = registry.get_job(session, job.id)
    response.headers["Location"] = f"/jobs/{job.id}"
    return _public(session, job, settings)


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(400, 401, 403, 409, 413, 422, 503),
    summary="Submit a job",
    description="Validates the job spec, records the job as queued and enqueues its first stage. "
    "With an Idempotency-Key header, repeating the request returns the same job. "
    "The body is a JobSpec (see components.schemas.JobSpec).",
)
def submit_job(
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    _auth: AuthDep,
    body: Annotated[dict[str, Any], Body()],
    idempotency_key: IdempotencyKey = None,
) -> JobPublic:
    return submit_spec(request, response, session, settings, body, idempotency_key)


@router.get("", response_model=JobsPublic, responses=_ERRORS, summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    _auth: AuthDep,
    status: Annotated[list[JobStatus] | None, Query(description="Filter by status (repeatable)")] = None,
    kind: Annotated[JobKind | None, Query()] = None,
    cursor: Annotated[
        str | None, Query(max_length=512, description="next_cursor of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    id_prefix: Annotated[
        str | None,
        Query(min_length=1, max_length=36, pattern=r"^[A-Za-z0-9-]+$", description="Jobs whose id starts so"),
    ] = None,
) -> JobsPublic:
    try:
        jobs, next_cursor = registry.list_jobs(
            session, status=status, cursor=cursor, limit=limit, kind=kind, id_prefix=id_prefix
        )
    except ValueError as e:
        field = "cursor" if "cursor" in str(e) else "status"
        raise ApiError(422, "validation_error", str(e), field) from None
    latest = registry.latest_checkpoints(session, [j.id for j in jobs])
    return JobsPublic(
        data=[JobPublic.of(j, latest.get(j.id)) for j in jobs], count=len(jobs), next_cursor=next_cursor
    )


@router.get("/{job_id}", response_model=JobPublic, responses=_ERRORS, summary="Job status and progress")
def get_job(job_id: JobId, session: SessionDep, settings: SettingsDep, _auth: AuthDep) -> JobPublic:
    return _public(session, registry.get_job(session, job_id), settings)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(401, 403, 404, 409, 422, 503),
    summary="Cancel a job (409 if it already finished)",
)
def cancel_job(job_id: JobId, session: SessionDep, settings: SettingsDep, _auth: AuthDep) -> JobPublic:
    return _public(session, registry.request_cancel(session, job_id), settings)


@router.post(
    "/{job_id}/resume",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(401, 403, 404, 409, 422, 503),
    summary="Resume a cancelled or failed job from its newest checkpoint (409 otherwise)",
)
def resume_job(
    request: Request, job_id: JobId, session: SessionDep, settings: SettingsDep, _auth: AuthDep
) -> JobPublic:
    registry.resume_job(session, job_id)
    enqueue(job_id, settings, request.app.state.session_factory)
    return _public(session, registry.get_job(session, job_id), settings)
