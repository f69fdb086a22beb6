"""The Celery application: queues, routing and delivery guarantees.

Postgres (the registry) is the truth and the broker only carries "run stage S of job J" messages,
so there is no result backend and every task takes a job id, nothing else. Delivery is
at-least-once: tasks are acknowledged after they finish (`acks_late`) and put back when the worker
process dies (`task_reject_on_worker_lost`); the registry lease and the stage status make a
redelivered message harmless.

The embedded default broker is kombu's SQLAlchemy transport over a SQLite file under NCP_HOME
(`sqla+sqlite:///...`), which needs no server; deployments point NCP_BROKER_URL at Redis.
"""

from __future__ import annotations

import functools

from celery import Celery
from kombu import Exchange, Queue

from shared.jobs.queues import QUEUES, STAGE_QUEUES
from shared.settings import Settings, get_settings

TASK_PREFIX = "ncp.stage."


def task_name(stage: str) -> str:
    if stage not in STAGE_QUEUES:
        raise ValueError(f"stage {stage!r} has no task; known stages: {sorted(STAGE_QUEUES)}")
    return TASK_PREFIX + stage


def transport_options(settings: Settings) -> dict:
    broker_url = settings.broker_url or ""
    if broker_url.startswith("sqla+"):
        # kombu hands these to SQLAlchemy's create_engine: several processes share one SQLite
        # file, so a writer waits for the lock instead of failing.
        return {"connect_args": {"timeout": 30}} if "sqlite" in broker_url else {}
    # Redis (and SQS): a message a worker took but never acknowledged comes back after this long.
    # It must be longer than any stretch of work between checkpoints, or a healthy training task
    # would be handed to a second worker; the reconciler (lease expiry) is the fast path.
    return {"visibility_timeout": settings.visibility_timeout_seconds}


def celery_config(settings: Settings) -> dict:
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


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    celery = Celery("ncp", include=["services.worker.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


@functools.lru_cache(maxsize=4)
def app_for_broker(broker_url: str) -> Celery:
    """One producer app per broker (the API and the reconciler enqueue through it; tests switch
    brokers between modules, so this is keyed by URL rather than built once at import)."""
    celery = Celery("ncp")
    celery.conf.update(celery_config(get_settings().model_copy(update={"broker_url": broker_url})))
    return celery


# What `celery -A services.worker.celery_app` and `ncp worker` run. Built from the environment at
# import, which is when a worker process starts.
app = make_app()
