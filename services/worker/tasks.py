"""The Celery tasks: one per pipeline stage, each a thin wrapper over `pipeline.run_stage`.

A task takes a job id and nothing else; the registry says what to do. Worker identity is made
once per worker process (a restarted process never reuses a dead one's lease).
"""

from __future__ import annotations

import functools
import logging

from services.worker.celery_app import app
from services.worker.heartbeat import new_worker_id
from services.worker.pipeline import run_stage
from shared.db.session import cached_session_factory
from shared.jobs.broker import task_name
from shared.jobs.dispatch import enqueue_stage
from shared.jobs.stages import STAGE_QUEUES
from shared.settings import get_settings

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _worker_id() -> str:
    return new_worker_id()


def execute(job_id: str, stage: str) -> str:
    settings = get_settings()
    outcome = run_stage(
        job_id,
        stage,
        settings=settings,
        sessions=cached_session_factory(settings),
        worker_id=_worker_id(),
        enqueue=lambda j, st: enqueue_stage(j, st, settings),
    )
    log.info("job %s stage %s: %s", job_id, stage, outcome)
    return outcome


def _make_task(stage: str):  # noqa: ANN202 - a Celery task object
    def stage_task(job_id: str) -> str:
        return execute(job_id, stage)

    stage_task.__name__ = f"stage_{stage}"
    stage_task.__doc__ = f"Run stage {stage!r} of a job (queue {STAGE_QUEUES[stage]!r})."
    return app.task(name=task_name(stage), queue=STAGE_QUEUES[stage])(stage_task)


TASKS = {stage: _make_task(stage) for stage in STAGE_QUEUES}
