"""Putting "run stage S of job J" on the right queue.

`enqueue_job(job_id)` is what the API calls after creating (or resuming) a job and what the
reconciler calls for a job that lost its message: it asks the registry which stage comes next and
sends that stage's task. Messages carry the job id only; everything else is read from the
registry when the task runs, so a stale or duplicated message can do no harm.
"""

from __future__ import annotations

import functools
import logging

from sqlalchemy.orm import Session, sessionmaker

from services.worker.celery_app import app_for_broker, task_name
from services.worker.pipeline import first_unfinished_stage
from shared.db import registry
from shared.db.session import make_engine, make_session_factory, session_scope
from shared.jobs.queues import QUEUES, queue_for_stage
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _sessions_for(database_url: str) -> sessionmaker[Session]:
    return make_session_factory(make_engine(database_url))


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    """One engine per registry URL per process (engines pool connections; build them once)."""
    assert settings.database_url is not None
    return _sessions_for(settings.database_url)


def enqueue_stage(job_id: str, stage: str, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    assert settings.broker_url is not None
    queue = queue_for_stage(stage)
    app = app_for_broker(settings.broker_url)
    app.send_task(task_name(stage), args=[job_id], queue=queue, routing_key=queue)
    log.info("enqueued %s of job %s on %s", stage, job_id, queue)


def enqueue_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Send the task for the job's next unfinished stage; returns that stage (None if finished)."""
    settings = settings or get_settings()
    with session_scope(sessions_for(settings)) as s:
        job = registry.get_job(s, job_id)
        if job.is_terminal:
            return None
        stage = first_unfinished_stage(s, job_id)
        if stage is None:
            return None
        registry.add_event(
            s, job_id, "enqueued", f"stage {stage} sent to queue {queue_for_stage(stage)}", stage=stage
        )
    enqueue_stage(job_id, stage, settings)
    return stage


def waiting_messages(settings: Settings | None = None) -> bytes | None:
    """The raw messages waiting in our queues, when the broker lets us look (Redis); else None.

    The reconciler uses it to tell a job whose message is merely waiting behind other work from
    one whose message was lost, so a long queue does not fill up with re-sent duplicates.
    """
    settings = settings or get_settings()
    url = settings.broker_url or ""
    if not url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        # kombu's Redis transport keeps each queue as a list named after it (JSON per message,
        # the task's arguments, i.e. the job id, readable in its headers).
        items = [item for q in QUEUES for item in client.lrange(q, 0, -1)]  # type: ignore[union-attr]
        return b"\n".join(i if isinstance(i, bytes) else str(i).encode() for i in items)
    finally:
        client.close()
