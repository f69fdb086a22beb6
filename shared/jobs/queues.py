"""Celery queue names.

Postgres is the truth and Redis only carries messages, so the queue names (and which stage runs
on which queue, in shared/jobs/stages.py) are the whole contract between the API (which enqueues
the first stage) and the workers (which consume per queue).
"""

from __future__ import annotations

DATA = "data"
TRAIN = "train"
EVAL = "eval"

QUEUES: tuple[str, ...] = (DATA, TRAIN, EVAL)
