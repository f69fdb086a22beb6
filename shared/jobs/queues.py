"""Celery queue names and which queue runs which pipeline stage.

Postgres is the truth and Redis only carries messages, so the queue names are the whole contract
between the API (which enqueues the first stage) and the workers (which consume per queue).
"""

from __future__ import annotations

DATA = "data"
TRAIN = "train"
EVAL = "eval"

QUEUES: tuple[str, ...] = (DATA, TRAIN, EVAL)

# Stage -> queue. CPU-light corpus work on `data`, anything that holds a GPU for a long time on
# `train` (one task per GPU set), short model-reading work (evals, export, publishing) on `eval`.
STAGE_QUEUES: dict[str, str] = {
    "data": DATA,
    "tokenizer": DATA,
    "pretrain": TRAIN,
    "sft": TRAIN,
    "base_eval": EVAL,
    "chat_eval": EVAL,
    "export": EVAL,
    "serve": EVAL,
    "report": EVAL,
}


def queue_for_stage(stage: str) -> str:
    """The queue a stage's task is sent to; unknown stages are a programming error, named."""
    try:
        return STAGE_QUEUES[stage]
    except KeyError:
        raise ValueError(f"stage {stage!r} has no queue; known stages: {sorted(STAGE_QUEUES)}") from None
