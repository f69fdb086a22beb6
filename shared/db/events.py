"""Job events: an append-only, per-job numbered log (the SSE stream and `ncp jobs watch` read it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.db.errors import JobNotFound
from shared.db.models import Event, Job, utcnow
from shared.db.session import begin_write


def append_event(
    session: Session,
    job_id: str,
    type: str,
    message: str = "",
    *,
    stage: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> Event:
    """Add an event inside the caller's transaction (no commit)."""
    # The per-job counter is bumped by one UPDATE ... RETURNING, which the database serializes, so
    # two processes adding events to one job never get the same seq.
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(event_seq=Job.event_seq + 1).returning(Job.event_seq)
    ).scalar_one_or_none()
    if seq is None:
        raise JobNotFound(job_id)
    ev = Event(
        job_id=job_id,
        seq=int(seq),
        ts=utcnow(),
        type=type,
        stage=stage,
        message=message,
        data=dict(data) if data is not None else None,
    )
    session.add(ev)
    return ev


def add_event(
    session: Session,
    job_id: str,
    type: str,
    message: str = "",
    *,
    stage: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> Event:
    """Append an event (seq 1, 2, ... per job) and commit."""
    begin_write(session)
    try:
        ev = append_event(session, job_id, type, message, stage=stage, data=data)
    except JobNotFound:
        session.rollback()
        raise
    session.commit()
    return ev


def list_events(session: Session, job_id: str, after_seq: int = 0, limit: int = 100) -> list[Event]:
    return list(
        session.scalars(
            select(Event)
            .where(Event.job_id == job_id, Event.seq > after_seq)
            .order_by(Event.seq)
            .limit(limit)
        )
    )
