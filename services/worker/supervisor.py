"""A small process supervisor for `ncp up`: start children, restart crashed ones with backoff,
stop them all cleanly.

Each child runs in its own session (process group) with its output in `<log_dir>/<name>.log`, so
stopping a child stops everything it started (a worker's pool processes, a training child, the
model server's engine). Shutdown is SIGTERM to every group, a grace period, then SIGKILL.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.worker.launcher import group_alive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the supervisor's environment
    cwd: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty file-name-safe string, got {self.name!r}")
        if not self.argv:
            raise ValueError(f"argv of child {self.name!r} is empty")


@dataclass(frozen=True)
class SupervisorConfig:
    log_dir: Path
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 30.0
    stable_after_seconds: float = 60.0  # a child that ran this long restarts with the initial backoff
    stop_grace_seconds: float = 10.0
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        for name in ("backoff_initial_seconds", "backoff_max_seconds", "stop_grace_seconds", "poll_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class _Child:
    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restarts = 0
        self.backoff = 0.0
        self.restart_at: float | None = None


class Supervisor:
    def __init__(
        self, specs: list[ChildSpec], cfg: SupervisorConfig, on_event: Callable[[str], None] | None = None
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique, got {names}")
        self.cfg = cfg
        self.children = [_Child(s) for s in specs]
        self.on_event = on_event or (lambda msg: log.info("%s", msg))
        self.stopping = threading.Event()

    def _start(self, child: _Child) -> None:
        self.cfg.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(child.spec.env)
        with open(self.cfg.log_dir / f"{child.spec.name}.log", "ab") as out:
            out.write(
                f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(child.spec.argv)}\n".encode()
            )
            out.flush()
            child.proc = subprocess.Popen(
                child.spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=child.spec.cwd,
                start_new_session=True,
            )
        child.started = time.monotonic()
        child.restart_at = None
        self.on_event(f"{child.spec.name}: started (pid {child.proc.pid})")

    def start(self) -> None:
        for child in self.children:
            self._start(child)

    def poll_once(self) -> None:
        """Restart children that exited, after their backoff."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or self.stopping.is_set():
                continue
            rc = child.proc.poll()
            if rc is None:
                continue
            if child.restart_at is None:
                ran = now - child.started
                if ran >= self.cfg.stable_after_seconds:
                    child.backoff = self.cfg.backoff_initial_seconds
                else:
                    child.backoff = min(
                        max(child.backoff * 2, self.cfg.backoff_initial_seconds), self.cfg.backoff_max_seconds
                    )
                child.restart_at = now + child.backoff
                # Whatever the child left running in its group goes with it.
                _kill_group(child.proc.pid)
                self.on_event(
                    f"{child.spec.name}: exited with {rc} after {ran:.1f}s; "
                    f"restarting in {child.backoff:.1f}s"
                )
            elif now >= child.restart_at:
                child.restarts += 1
                self._start(child)

    def run(self, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.wait(self.cfg.poll_seconds):
                self.poll_once()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.stopping.set()
        live = [c for c in self.children if c.proc is not None]
        for child in live:
            _signal_group(child.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + self.cfg.stop_grace_seconds
        for child in live:
            proc = child.proc
            assert proc is not None
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.on_event(f"{child.spec.name}: no exit after SIGTERM; killing")
            _kill_group(proc.pid)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.on_event("all children stopped")

    def pids(self) -> dict[str, int | None]:
        return {
            c.spec.name: (c.proc.pid if c.proc and c.proc.poll() is None else None) for c in self.children
        }


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
