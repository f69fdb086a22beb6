"""A training child on this node: `services.train_worker.entry` in its own process group.

The Celery task never trains in its own process: a crash, an OOM kill or a cancel must be able to
take the whole GPU process tree down without taking the worker with it, and vice versa. So the
child runs in a new session (its own process group), pinned to this worker's GPUs, with its
output in `logs/<mode>.log`. `LocalRun` is the local `TrainingRun` the follow loop (follow.py)
drives: terminate is SIGTERM and kill is SIGKILL to the whole group, and cleanup returns only when
no process of that group is left.

The child also gets PR_SET_PDEATHSIG=SIGKILL, so a worker killed with -9 does not leave a trainer
writing checkpoints behind the back of the next attempt; a pid file catches the rest (torchrun's
ranks) when the next attempt starts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.worker.follow import FollowConfig, FollowResult, follow
from shared.jobs.progress_file import Record
from shared.parent_death import die_with_parent
from shared.paths import RunPaths

ENTRY_MODULE = "services.train_worker.entry"
MODES = ("pretrain", "sft")


@dataclass(frozen=True)
class LaunchConfig:
    mode: str  # pretrain | sft
    config_path: Path  # the trainer's JSON config
    run: RunPaths
    nproc: int = 1  # processes on this node; 1 runs the entry module directly (no torchrun)
    gpus: str = ""  # CUDA/HIP_VISIBLE_DEVICES for the child; "" leaves the environment alone
    cancel_grace_seconds: float = 20.0
    poll_seconds: float = 0.5
    python: str = sys.executable
    extra_env: dict[str, str] = field(default_factory=dict)
    entry_module: str = ENTRY_MODULE  # the trainer's CLI (`{mode} --config --progress --stop`)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.cancel_grace_seconds < 0:
            raise ValueError(f"cancel_grace_seconds must be >= 0, got {self.cancel_grace_seconds}")
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")

    @property
    def log_path(self) -> Path:
        return self.run.logs / f"{self.mode}.log"

    @property
    def pid_path(self) -> Path:
        return self.run.logs / f"{self.mode}.pgid"


def build_command(cfg: LaunchConfig) -> list[str]:
    args = [
        cfg.mode,
        "--config",
        str(cfg.config_path),
        "--progress",
        str(cfg.run.progress_file),
        "--stop",
        str(cfg.run.stop_file),
    ]
    if cfg.nproc == 1:
        return [cfg.python, "-m", cfg.entry_module, *args]
    # `python -m torch.distributed.run` is torchrun without depending on PATH.
    return [
        cfg.python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc}",
        "-m", cfg.entry_module, *args,
    ]  # fmt: skip


def child_env(cfg: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(cfg.extra_env)
    env["PYTHONUNBUFFERED"] = "1"
    if cfg.gpus:
        # Imported here: the worker module must load without torch (api image); the launcher only
        # runs in worker images, which have it.
        from shared.nanochat.device import visible_devices_env

        env.update(visible_devices_env(cfg.gpus))
    return env


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL a process group and wait (bounded) until it is gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


def kill_stale_child(cfg: LaunchConfig) -> bool:
    """Kill a trainer left by a previous attempt of this run (recorded in the pid file)."""
    try:
        pgid = int(cfg.pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return False
    if pgid <= 1 or pgid == os.getpgid(0) or not group_alive(pgid):
        return False
    # Only a group whose leader is still our trainer: pids are reused.
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        cmdline = ""
    if ENTRY_MODULE not in cmdline and "torch.distributed.run" not in cmdline:
        return False
    kill_group(pgid)
    return True


class LocalRun:
    """The `TrainingRun` of a child process group on this node."""

    def __init__(self, cfg: LaunchConfig) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.cfg.log_path

    def start(self) -> None:
        cfg = self.cfg
        cfg.run.logs.mkdir(parents=True, exist_ok=True)
        kill_stale_child(cfg)
        cmd = build_command(cfg)
        with open(cfg.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} launching: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = _popen(cmd, cfg, log)
        # start_new_session: the child leads its own group, whose id is its pid
        cfg.pid_path.write_text(str(self.proc.pid))

    def _require(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("LocalRun: start() was not called")
        return self.proc

    def exit_code(self) -> int | None:
        return self._require().poll()

    def terminate(self) -> None:
        _signal_group(self._require().pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)  # cleanup() waits for the group to go

    def cleanup(self) -> None:
        proc = self._require()
        if proc.poll() is None:
            kill_group(proc.pid)
        proc.wait()
        # Ranks of a torchrun child may outlive their leader; the group must be empty on return.
        if group_alive(proc.pid):
            kill_group(proc.pid)
        self.cfg.pid_path.unlink(missing_ok=True)


def run_training(
    cfg: LaunchConfig,
    *,
    on_records: Callable[[list[Record]], None],
    should_cancel: Callable[[], bool],
    on_tick: Callable[[], None] | None = None,
    cancel_check_seconds: float = 1.0,
) -> FollowResult:
    """Run the child here and follow it until its group is gone (the follow loop over LocalRun)."""
    follow_cfg = FollowConfig(
        progress_file=cfg.run.progress_file,
        stop_file=cfg.run.stop_file,
        cancel_grace_seconds=cfg.cancel_grace_seconds,
        poll_seconds=cfg.poll_seconds,
        cancel_check_seconds=cancel_check_seconds,
    )
    return follow(
        LocalRun(cfg), follow_cfg, on_records=on_records, should_cancel=should_cancel, on_tick=on_tick
    )


def _popen(cmd: list[str], cfg: LaunchConfig, log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env(cfg),
        cwd=str(Path(__file__).resolve().parents[2]),  # repo root: `-m services...` resolves
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGKILL),
    )


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
