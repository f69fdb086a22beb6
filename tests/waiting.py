"""The one way tests wait for something: poll a predicate until it is truthy or a deadline passes.

A timeout is a failure with a message saying what never happened; the deadline only bounds a hung
test, it is never the thing under test.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T], timeout: float, interval: float = 0.25, what: str = "condition"
) -> T:
    """Return the first truthy value of `predicate()`; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
