"""What a stage function gets (StageContext) and what it may raise: the bottom of the worker package.

Every other worker module imports this one and nothing here imports them, so the orchestration
(pipeline.py), the stage functions (stages.py, training.py) and the helpers they share never
import each other in a circle.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from services.worker.heartbeat import LeaseHeartbeat
from shared.db import registry
from shared.db.outage import is_outage
from shared.db.session import session_scope
from shared.jobs.spec import JobSpec
from shared.jobs.stage_outputs import StageOutputs, parse_outputs
from shared.paths import RunPaths
from shared.settings import Settings

log = logging.getLogger(__name__)
OUTAGE_LOG_SECONDS = 60.0
O = TypeVar("O", bound=StageOutputs)  # noqa: E741 - the outputs type of one stage


class StageCancelled(Exception):
    """The job was cancelled while the stage ran; its partial outputs are kept for a resume."""


class LeaseLost(Exception):
    """Another worker owns the job now; this one must stop without recording anything."""


class StageInterrupted(Exception):
    """The stage stopped early for a reason other than a cancel (its process was signalled). It
    is neither done nor failed: the lease is released and the reconciler sends it again, and the
    next attempt resumes from the newest checkpoint."""


class StageError(Exception):
    """A stage failure with a stable error code for the job (e.g. `multinode_unavailable`)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class StageContext:
    """Everything a stage function may use; built per delivery."""

    job_id: str
    stage: str
    spec: JobSpec  # validated when the job was submitted; read back typed
    run: RunPaths
    settings: Settings
    sessions: sessionmaker[Session]
    worker_id: str
    heartbeat: LeaseHeartbeat
    # When each kind of outage warning was last logged (a long outage logs once a minute, not
    # once a second).
    _warned: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def _warn_outage(self, what: str, e: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned.get(what, -math.inf) >= OUTAGE_LOG_SECONDS:
            self._warned[what] = now
            log.warning("job %s: %s, registry unreachable (%s)", self.job_id, what, type(e).__name__)

    @property
    def roots(self) -> list[Path]:
        """Where a job may read local files from (every file read is checked against these)."""
        return [self.settings.home, *self.settings.data_roots]

    def cancel_requested(self) -> bool:
        """The registry's cancel flag. While the registry is unreachable the answer is "no": an
        outage must not stop a training run (a cancel sent meanwhile is seen once it is back)."""
        try:
            with session_scope(self.sessions) as s:
                return bool(registry.get_job(s, self.job_id).cancel_requested)
        except Exception as e:
            if not is_outage(e):
                raise
            self._warn_outage("cancel checks skipped", e)
            return False

    def should_stop(self) -> bool:
        """Stop the stage's work: the lease went to another worker, or the job was cancelled."""
        return self.heartbeat.lost.is_set() or self.cancel_requested()

    def event(self, type: str, message: str, data: dict | None = None) -> None:
        """Record an event of this stage. Events are informational: one that cannot reach the
        registry is logged and dropped rather than failing the stage."""
        try:
            with session_scope(self.sessions) as s:
                registry.add_event(s, self.job_id, type, message, stage=self.stage, data=data)
        except Exception as e:
            if not is_outage(e):
                raise
            self._warn_outage(f"event {type!r} not recorded", e)

    def stage_outputs(self, name: str, kind: type[O], job_id: str | None = None) -> O | None:
        """Outputs stage `name` recorded (of this job, or of `job_id`); None if it did not run."""
        with session_scope(self.sessions) as s:
            row = registry.get_stage(s, job_id or self.job_id, name)
            parsed = parse_outputs(name, dict(row.outputs or {}) if row is not None else None)
        if parsed is not None and not isinstance(parsed, kind):
            raise TypeError(f"stage {name!r} records {type(parsed).__name__}, not {kind.__name__}")
        return parsed


StageFn = Callable[[StageContext], StageOutputs]


def plain(info: Any) -> dict[str, Any]:
    """The JSON-safe scalars of a dict, for event data."""
    if isinstance(info, dict):
        return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None), list))}
    return {"result": str(info)}
