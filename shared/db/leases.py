"""Worker leases (who runs a job; taken atomically) and the reconciler's query for orphaned jobs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db.errors import JobNotFound
from shared.db.models import Job, WorkerLease, utcnow
from shared.db.session import begin_write


def _upsert(session: Session) -> Any:
    """The dialect's INSERT with ON CONFLICT support (same API on both backends)."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    if name == "sqlite":
        from sqlalchemy.dialects import sqlite

        return sqlite.insert
    raise RuntimeError(f"registry leases support PostgreSQL and SQLite, not {name}")


def acquire_lease(
    session: Session, job_id: str, worker_id: str, ttl_seconds: float, *, now: dt.datetime | None = None
) -> bool:
    """Take the job's lease for `ttl_seconds`. One statement: insert the row, or take it over only
    if it has expired or is already ours; two racing workers cannot both win. True if we hold it."""
    now = now or utcnow()
    expires = now + dt.timedelta(seconds=ttl_seconds)
    insert = _upsert(session)
    stmt = insert(WorkerLease).values(job_id=job_id, worker_id=worker_id, acquired_at=now, expires_at=expires)
    stmt = stmt.on_conflict_do_update(
        index_elements=[WorkerLease.job_id],
        set_={"worker_id": worker_id, "acquired_at": now, "expires_at": expires},
        where=or_(WorkerLease.expires_at <= now, WorkerLease.worker_id == worker_id),
    ).returning(WorkerLease.worker_id)
    begin_write(session)
    try:
        won = session.execute(stmt).scalar_one_or_none()
        session.commit()
    except IntegrityError as e:  # foreign key: no such job
        session.rollback()
        raise JobNotFound(job_id) from e
    return won == worker_id


def renew_lease(
    session: Session, job_id: str, worker_id: str, ttl_seconds: float, *, now: dt.datetime | None = None
) -> bool:
    """Extend our lease; False if another worker holds it now (we lost it and must stop)."""
    now = now or utcnow()
    begin_write(session)
    res = session.execute(
        update(WorkerLease)
        .where(WorkerLease.job_id == job_id, WorkerLease.worker_id == worker_id)
        .values(expires_at=now + dt.timedelta(seconds=ttl_seconds))
    )
    session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def release_lease(session: Session, job_id: str, worker_id: str) -> bool:
    """Drop our lease (no-op if someone else holds it); True if a row was removed."""
    begin_write(session)
    res = session.execute(
        delete(WorkerLease).where(WorkerLease.job_id == job_id, WorkerLease.worker_id == worker_id)
    )
    session.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def get_lease(session: Session, job_id: str) -> WorkerLease | None:
    return session.get(WorkerLease, job_id, populate_existing=True)


def jobs_needing_reconcile(
    session: Session,
    now: dt.datetime | None = None,
    *,
    grace_seconds: float = 0.0,
    statuses: Iterable[str] = ("queued", "running"),
) -> list[Job]:
    """Jobs in `statuses` that no live worker holds: no lease row, or an expired one.

    `grace_seconds` skips jobs updated more recently than that, so a job just enqueued (its task
    still in flight to a worker) is not enqueued twice. Pass statuses=("queued", "running",
    "cancelling") to also finish cancellations whose worker died.
    """
    now = now or utcnow()
    live = select(WorkerLease.job_id).where(WorkerLease.expires_at > now)
    q = select(Job).where(Job.status.in_(list(statuses)), Job.id.not_in(live))
    if grace_seconds > 0:
        q = q.where(Job.updated_at <= now - dt.timedelta(seconds=grace_seconds))
    return list(session.scalars(q.order_by(Job.created_at)))
