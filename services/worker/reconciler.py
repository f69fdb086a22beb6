"""The reconciler: Postgres is the truth, so whatever the broker lost is sent again.

Every `reconcile_interval_seconds` it asks the registry for jobs that are queued, running or
cancelling with no live lease and no activity for a while (`grace`), and

- a `cancelling` job whose worker died is marked cancelled (nothing runs it any more);
- a job whose lease *expired* (a worker took it and died: kill -9, OOM, node loss) counts one
  more attempt and fails with `max_attempts` once Settings.max_attempts is exceeded; otherwise
  the dead lease is dropped and the next unfinished stage is enqueued again;
- a job with no lease at all (its message was lost: Redis flushed or restarted without
  persistence, a crash between two stages) is enqueued again without counting an attempt.

A lease that expired while the registry itself was unreachable proves nothing: its worker could
not renew it. After an outage (a pass that failed), expired leases are left alone for one grace
period, time enough for a living worker's heartbeat to renew its lease again.

Duplicates this may create are harmless: a stage runs only under the job's lease and only while
it is the job's first unfinished stage. To keep them few, a job is left alone while its message
is visibly waiting in the broker (Redis), and `grace` (one lease TTL) must pass since the job's
last activity before it counts as lost.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from shared.db import registry
from shared.db.models import utcnow
from shared.db.outage import is_outage
from shared.db.session import session_scope
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconcileConfig:
    max_attempts: int
    grace_seconds: float  # quiet time before a lease-less job is considered lost
    interval_seconds: float

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace_seconds must be >= 0, got {self.grace_seconds}")
        if self.interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be > 0, got {self.interval_seconds}")

    @classmethod
    def from_settings(cls, settings: Settings) -> ReconcileConfig:
        return cls(
            max_attempts=settings.max_attempts,
            grace_seconds=float(settings.lease_seconds),
            interval_seconds=settings.reconcile_interval_seconds,
        )


@dataclass(frozen=True)
class Action:
    job_id: str
    action: str  # requeued | retried | failed | cancelled | error
    stage: str | None = None
    detail: str = ""


def reconcile_once(
    sessions: sessionmaker[Session],
    cfg: ReconcileConfig,
    enqueue_job: Callable[[str], str | None],
    now: dt.datetime | None = None,
    waiting: Callable[[], bytes | None] | None = None,
    expired_leases: bool = True,
) -> list[Action]:
    """One pass; returns what it did. `waiting` returns the broker's waiting messages when it can
    (None = unknown): a job whose id is among them is still on its way and is left alone.
    `expired_leases=False` leaves jobs whose lease expired alone (right after a registry outage)."""
    now = now or utcnow()
    with session_scope(sessions) as s:
        stuck = [
            j.id
            for j in registry.jobs_needing_reconcile(
                s, now, grace_seconds=cfg.grace_seconds, statuses=("queued", "running", "cancelling")
            )
        ]
    queued = waiting() if (waiting is not None and stuck) else None
    actions = []
    for job_id in stuck:
        if queued is not None and job_id.encode() in queued:
            continue
        try:
            actions.append(_reconcile_job(sessions, cfg, enqueue_job, job_id, now, expired_leases))
        except Exception as e:  # one bad job must not stop the others from being reconciled
            log.exception("reconciling job %s failed", job_id)
            actions.append(Action(job_id, "error", detail=f"{type(e).__name__}: {e}"))
    return actions


def _reconcile_job(
    sessions: sessionmaker[Session],
    cfg: ReconcileConfig,
    enqueue_job: Callable[[str], str | None],
    job_id: str,
    now: dt.datetime,
    expired_leases: bool = True,
) -> Action:
    with session_scope(sessions) as s:
        job = registry.get_job(s, job_id)
        lease = registry.get_lease(s, job_id)
        if lease is not None and lease.expires_at > now:
            return Action(job_id, "skipped", detail="lease renewed meanwhile")
        if lease is not None and not expired_leases:
            return Action(job_id, "skipped", detail="lease expired during a registry outage; waiting")
        if job.status == "cancelling":
            if lease is not None:
                registry.release_lease(s, job_id, lease.worker_id)
            registry.set_job_status(s, job_id, "cancelled")
            return Action(job_id, "cancelled", detail="the cancelling worker is gone")
        action = "requeued"
        if lease is not None:  # a worker took the job and died
            dead = lease.worker_id
            attempts = registry.increment_attempts(s, job_id)
            registry.release_lease(s, job_id, dead)
            if attempts >= cfg.max_attempts:
                stage = job.current_stage
                msg = f"gave up after {attempts} attempts (last worker {dead} stopped renewing its lease)"
                if stage and job.status == "running":
                    registry.fail_stage(s, job_id, stage, msg, error_code="max_attempts")
                else:
                    registry.set_job_status(s, job_id, "failed", error_code="max_attempts", error_message=msg)
                return Action(job_id, "failed", stage, msg)
            registry.add_event(
                s,
                job_id,
                "retry",
                f"worker {dead} lost; attempt {attempts + 1}",
                stage=job.current_stage,
                data={"attempts": attempts, "dead_worker": dead},
            )
            action = "retried"
    stage = enqueue_job(job_id)
    log.info("reconciler: job %s %s (stage %s)", job_id, action, stage)
    return Action(job_id, action, stage)


def run_forever(
    sessions: sessionmaker[Session],
    cfg: ReconcileConfig,
    enqueue_job: Callable[[str], str | None],
    stop: threading.Event,
    on_pass: Callable[[list[Action]], None] | None = None,
    waiting: Callable[[], bytes | None] | None = None,
) -> None:
    """Reconcile every `interval_seconds` until `stop` is set; registry outages are logged and retried."""
    back_at: float | None = None  # when the registry answered again after a failed pass
    while not stop.is_set():
        now = time.monotonic()
        quiet = back_at is not None and now - back_at < cfg.grace_seconds
        try:
            actions = reconcile_once(sessions, cfg, enqueue_job, waiting=waiting, expired_leases=not quiet)
            if back_at is not None and not quiet:
                back_at = None
            if on_pass is not None:
                on_pass(actions)
        except Exception as e:
            if is_outage(e):
                log.warning("reconcile pass: registry unreachable (%s); retrying", type(e).__name__)
            else:
                log.exception("reconcile pass failed; retrying in %.1fs", cfg.interval_seconds)
            back_at = time.monotonic() + cfg.interval_seconds  # at the earliest: the next pass
        stop.wait(cfg.interval_seconds)
