"""The one loop that follows a training run, wherever it runs.

A training run is a `TrainingRun`: a process group on this node (launcher.LocalRun) or an Indexed
Job of pods on Kubernetes (k8s_run.KubeRun). Both write the same progress file and read the same
stop file on the run folder, so following them is one loop:

- tail the progress file (whole lines only) and hand new records to `on_records`,
- call `on_tick` and, every `cancel_check_seconds`, `should_cancel`,
- turn a cancel into the stop file (the trainer saves a checkpoint and exits), then after
  `cancel_grace_seconds` `run.terminate()`, then `run.kill()`,
- return only when the run has ended and `run.cleanup()` has freed what it held: when the job
  says "cancelled", the GPUs are free.

An exception inside the loop (the worker is shutting down, a callback failed) kills the run
before it propagates: a trainer never runs on unsupervised.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shared.jobs.progress_file import ErrorRecord, ProgressTail, Record


class TrainingRun(Protocol):
    """One attempt of a training child, local or remote."""

    @property
    def log_path(self) -> Path: ...  # where its output goes (quoted in failures)

    def start(self) -> None: ...  # launch (may only queue the launch; see exit_code)

    def exit_code(self) -> int | None: ...  # None while it runs (or waits to be placed)

    def terminate(self) -> None: ...  # polite stop (SIGTERM, or deleting the Kubernetes Job)

    def kill(self) -> None: ...  # immediate stop

    def cleanup(self) -> None: ...  # after the end: nothing of the run may be left running


@dataclass(frozen=True)
class FollowConfig:
    progress_file: Path
    stop_file: Path
    cancel_grace_seconds: float = 20.0
    poll_seconds: float = 0.5
    cancel_check_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.cancel_grace_seconds < 0:
            raise ValueError(f"cancel_grace_seconds must be >= 0, got {self.cancel_grace_seconds}")
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        if self.cancel_check_seconds < 0:
            raise ValueError(f"cancel_check_seconds must be >= 0, got {self.cancel_check_seconds}")


@dataclass(frozen=True)
class FollowResult:
    returncode: int
    cancelled: bool  # a cancel was requested while the run ran
    escalation: str | None  # None | "terminate" | "kill": how the run had to be stopped
    records: int  # progress records handed on
    last_error: str | None  # message of the run's last error record


def follow(
    run: TrainingRun,
    cfg: FollowConfig,
    *,
    on_records: Callable[[list[Record]], None],
    should_cancel: Callable[[], bool],
    on_tick: Callable[[], None] | None = None,
) -> FollowResult:
    """Start `run`, forward its progress, honour cancels; return when it has ended."""
    cfg.stop_file.unlink(missing_ok=True)  # a stale STOP from a cancelled attempt
    tail = ProgressTail(cfg.progress_file)  # from the current end: earlier attempts' lines are old
    cancelled = False
    escalation: str | None = None
    term_at = kill_at = None
    n_records = 0
    last_error: str | None = None
    last_cancel_check = 0.0

    def forward() -> None:
        nonlocal n_records, last_error
        records = tail.read()
        if records:
            for rec in records:
                if isinstance(rec, ErrorRecord):
                    last_error = rec.message or rec.error_type
            n_records += len(records)
            on_records(records)

    run.start()
    try:
        while (rc := run.exit_code()) is None:
            time.sleep(cfg.poll_seconds)
            forward()
            if on_tick is not None:
                on_tick()
            now = time.monotonic()
            if not cancelled and now - last_cancel_check >= cfg.cancel_check_seconds:
                last_cancel_check = now
                if should_cancel():
                    cancelled = True
                    cfg.stop_file.write_text("cancel requested\n")
                    term_at = now + cfg.cancel_grace_seconds
                    kill_at = term_at + max(cfg.cancel_grace_seconds / 2, 2.0)
            if term_at is not None and escalation is None and now >= term_at:
                escalation = "terminate"
                run.terminate()
            if kill_at is not None and escalation == "terminate" and now >= kill_at:
                escalation = "kill"
                run.kill()
    except BaseException:
        run.kill()
        run.cleanup()
        raise
    run.cleanup()
    forward()
    return FollowResult(
        returncode=rc,
        cancelled=cancelled,
        escalation=escalation,
        records=n_records,
        last_error=last_error,
    )
