"""Telling a registry outage from a registry refusal, and waiting one out.

A worker in the middle of a 60-hour training run must not die because PostgreSQL restarted: its
bookkeeping pauses and resumes. `is_outage` says whether an exception means "the registry cannot
be reached right now" (connection refused or lost, pool exhausted, SQLite busy) rather than a
refusal (JobNotFound, an illegal transition) or a bug, which must still surface.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0


def is_outage(exc: BaseException) -> bool:
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def wait_out_outage(
    fn: Callable[[], T],
    what: str,
    *,
    give_up: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, called again (with backoff) for as long as the registry is unreachable. Other errors
    propagate at once; so does the outage error once `give_up()` says to stop waiting."""
    delay = BACKOFF_INITIAL_SECONDS
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_outage(e) or give_up():
                raise
            log.warning(
                "registry unreachable while %s (%s); retrying in %.0fs", what, type(e).__name__, delay
            )
        sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX_SECONDS)
