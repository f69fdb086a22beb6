"""Children that die with the process that started them.

A supervisor (the training launcher, the serving supervisor) runs its child in a process group of
its own, so that stopping the child stops everything the child started. The price is that a
supervisor killed with -9 (the OOM killer, `kill -9`, a hard stop of that one process) leaves its
child running: a trainer writing checkpoints behind the next attempt's back, an inference server
holding the port the next supervisor wants. PR_SET_PDEATHSIG asks the kernel to signal the child
when its parent goes.

Linux only; elsewhere the preexec function does nothing. The signal fires when the *thread* that
forked the child exits, so start such children from a thread that lives as long as the supervisor
(both callers start them from their main loop).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> Callable[[], None]:
    """A `preexec_fn` for subprocess.Popen: the child gets `sig` when its parent dies."""

    def preexec() -> None:  # runs in the child between fork and exec (kept across exec)
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
        except OSError:
            pass

    return preexec
