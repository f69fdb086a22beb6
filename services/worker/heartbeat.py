"""Worker identity and the heartbeat that proves a worker is still working on a job.

A stage holds the job's registry lease (shared/db/leases.py) for as long as it runs; a background
thread renews it every third of its TTL. If a renewal finds the lease taken by someone else (this
process stalled past the TTL and the reconciler handed the job to another worker), `lost` is set
and the stage must stop without recording anything more. A renewal that cannot reach the registry
is no such proof: the thread keeps trying, and the first renewal after the outage extends the lease
again (it is still ours as long as nobody took it over; the reconciler waits a lease TTL after an
outage before it treats an expired lease as a dead worker).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from sqlalchemy.orm import Session, sessionmaker

from shared.db import registry
from shared.db.outage import is_outage
from shared.db.session import session_scope

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    """Unique per process and call: a restarted worker never mistakes a dead one's lease for its own."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseHeartbeat:
    """Renews `job_id`'s lease for `worker_id` in a daemon thread until `stop()`."""

    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, worker_id: str, ttl_seconds: float
    ) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        self.sessions, self.job_id, self.worker_id, self.ttl = sessions, job_id, worker_id, ttl_seconds
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def renew_now(self) -> bool:
        try:
            with session_scope(self.sessions) as s:
                ok = registry.renew_lease(s, self.job_id, self.worker_id, self.ttl)
        except Exception as e:  # the registry is away: keep trying, the lease is not lost
            if is_outage(e):
                log.warning(
                    "lease renewal for job %s: registry unreachable (%s)", self.job_id, type(e).__name__
                )
            else:
                log.exception("lease renewal for job %s failed", self.job_id)
            return True
        if not ok:
            log.error("lease of job %s was taken over; this worker stops working on it", self.job_id)
            self.lost.set()
        return ok

    def _run(self) -> None:
        interval = max(self.ttl / 3.0, 0.2)
        while not self._stop.wait(interval):
            if not self.renew_now():
                return
