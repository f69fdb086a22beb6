"""The Celery side of the platform that both ends share: queues, routing, delivery guarantees.

Postgres (the registry) is the truth and the broker only carries "run stage S of job J" messages,
so there is no result backend and every task takes a job id, nothing else. Delivery is
at-least-once: tasks are acknowledged after they finish (`acks_late`) and put back when the worker
process dies (`task_reject_on_worker_lost`); the registry lease and the stage status make a
redelivered message harmless.

The producers (the API, the reconciler: shared/jobs/dispatch.py) and the workers
(services/worker/celery_app.py) build their Celery apps from `celery_config`, so a task name or a
route never differs between them; the producers never import the worker.

The embedded default broker is kombu's SQLAlchemy transport over a SQLite file under NCP_HOME
(`sqla+sqlite:///...`), which needs no server; deployments point NCP_BROKER_URL at Redis.
"""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from shared.jobs.queues import QUEUES
from shared.jobs.stages import STAGE_QUEUES
from shared.settings import Settings, get_settings

TASK_PREFIX = "ncp.stage."


def task_name(stage: str) -> str:
    if stage not in STAGE_QUEUES:
        raise ValueError(f"stage {stage!r} has no task; known stages: {sorted(STAGE_QUEUES)}")
    return TASK_PREFIX + stage


def transport_options(settings: Settings) -> dict[str, Any]:
    broker_url = settings.broker_url or ""
    if broker_url.startswith("sqla+"):
        # kombu hands these to SQLAlchemy's create_engine: several processes share one SQLite
        # file, so a writer waits for the lock instead of failing.
        return {"connect_args": {"timeout": 30}} if "sqlite" in broker_url else {}
    # Redis (and SQS): a message a worker took but never acknowledged comes back after this long.
    # A stage that outlives it (a multi-day training run) is redelivered while it still runs; the
    # second delivery finds the job's lease held and is dropped, so the timeout only bounds how
    # long a message of a truly dead worker waits (the reconciler, on lease expiry, is faster).
    timeout = settings.visibility_timeout_seconds
    return {
        "visibility_timeout": timeout,
        # How often workers look for messages whose timeout passed: kombu's default sweep (every
        # 10 s, scanning on every 10th) suits hours; a short timeout is honoured within a quarter
        # of itself. One cheap sorted-set query per sweep.
        "unacked_restore_interval": max(1, min(10, timeout // 4)),
        "unacked_restore_throttle": 1,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """Every Celery knob the platform sets, in one place."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport_options(settings),
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Every queue is declared; a typo in a route fails instead of silently creating a queue
        # that no worker consumes.
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        "task_create_missing_queues": False,
        "task_default_queue": QUEUES[0],
        "task_routes": {task_name(s): {"queue": q, "routing_key": q} for s, q in STAGE_QUEUES.items()},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message at a time per process: a train worker must not hoard a second job's message
        # while it trains the first.
        "worker_prefetch_multiplier": 1,
        # A broker hiccup must not kill a multi-hour training task; the lease decides ownership.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


@functools.lru_cache(maxsize=4)
def producer_for(broker_url: str) -> Celery:
    """One producer app per broker (the API and the reconciler enqueue through it; tests switch
    brokers between modules, so this is keyed by URL rather than built once at import)."""
    celery = Celery("ncp")
    celery.conf.update(celery_config(get_settings().model_copy(update={"broker_url": broker_url})))
    return celery
