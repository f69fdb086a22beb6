"""Putting "run stage S of job J" on the right queue (producer side; no worker code imported).

`enqueue_job(job_id)` is what the API calls after creating (or resuming) a job and what the
reconciler calls for a job that lost its message: it asks the registry which stage comes next and
sends that stage's task. Messages carry the job id only; everything else is read from the
registry when the task runs, so a stale or duplicated message can do no harm.
"""

from __future__ import annotations

import logging

from shared.db import registry
from shared.db.session import cached_session_factory, session_scope
from shared.jobs.broker import producer_for, task_name
from shared.jobs.queues import QUEUES
from shared.jobs.spec import JobSpec
from shared.jobs.stages import first_unfinished, queue_for_stage
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)


def enqueue_stage(job_id: str, stage: str, settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    assert settings.broker_url is not None
    queue = queue_for_stage(stage)
    producer_for(settings.broker_url).send_task(
        task_name(stage), args=[job_id], queue=queue, routing_key=queue
    )
    log.info("enqueued %s of job %s on %s", stage, job_id, queue)


def enqueue_job(job_id: str, settings: Settings | None = None) -> str | None:
    """Send the task for the job's next unfinished stage; returns that stage (None if finished)."""
    settings = settings or get_settings()
    with session_scope(cached_session_factory(settings)) as s:
        job = registry.get_job(s, job_id)
        if job.is_terminal:
            return None
        done = [st.name for st in job.stages if st.status in ("succeeded", "skipped")]
        stage = first_unfinished(JobSpec.from_stored(job.spec).resolved_stages(), done)
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
