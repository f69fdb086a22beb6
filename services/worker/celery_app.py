"""The workers' Celery application (`celery -A services.worker.celery_app`, `ncp worker`).

Its configuration (queues, routes, acknowledgement after the task, redelivery on worker loss) is
the one the producers use too: shared/jobs/broker.py.
"""

from __future__ import annotations

from celery import Celery

from shared.jobs.broker import celery_config
from shared.settings import Settings, get_settings


def make_app(settings: Settings | None = None) -> Celery:
    celery = Celery("ncp", include=["services.worker.tasks"])
    celery.conf.update(celery_config(settings or get_settings()))
    return celery


# Built from the environment at import, which is when a worker process starts.
app = make_app()
