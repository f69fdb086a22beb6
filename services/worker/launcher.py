"""Run the training child (`services.train_worker.entry`) as its own process group and watch it.

The Celery task never trains in its own process: a crash, an OOM kill or a cancel must be able to
take the whole GPU process tree down without taking the worker with it, and vice versa. So the
child runs in a new session (its own process group), pinned to this worker's GPUs, with its
output in `logs/train.log`. While it runs, the launcher

- tails `progress.jsonl` (whole lines only) and hands new records to `on_records`,
- calls `on_tick` (lease renewal) and `should_cancel` (the registry's cancel flag) at a steady
  cadence,
- turns a cancel into the stop file, then after `cancel_grace_seconds` SIGTERM, then SIGKILL to
  the process group, and returns only when no process of that group is left: when the job says
  "cancelled", the GPU is free.

The child also gets PR_SET_PDEATHSIG=SIGKILL, so a worker killed with -9 does not leave a trainer
writing checkpoints behind the back of the next attempt; a pid file catches the rest (torchrun's
ranks) when the next attempt starts.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.paths import RunPaths

ENTRY_MODULE = "services.train_worker.entry"
MODES = ("pretrain", "sft")
_PR_SET_PDEATHSIG = 1


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


@dataclass(frozen=True)
class LaunchResult:
    returncode: int
    cancelled: bool  # a cancel was requested while the child ran
    escalation: str | None  # None | "SIGTERM" | "SIGKILL": how the child had to be stopped
    records: int  # progress records forwarded
    last_error: str | None  # message of the child's last {"type": "error"} record


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


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. Linux only; elsewhere the pid file still works.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


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


class ProgressTail:
    """Reads whole JSON lines appended to a file since the last call."""

    def __init__(self, path: Path, start_at_end: bool = True) -> None:
        self.path = path
        self.offset = path.stat().st_size if (start_at_end and path.exists()) else 0
        self._partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        records = []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed writer; the next records are intact
            if isinstance(rec, dict):
                records.append(rec)
        return records


def run_training(
    cfg: LaunchConfig,
    *,
    on_records: Callable[[list[dict]], None],
    should_cancel: Callable[[], bool],
    on_tick: Callable[[], None] | None = None,
    cancel_check_seconds: float = 1.0,
) -> LaunchResult:
    """Start the child, forward its progress, honour cancels; return when its group is gone."""
    cfg.run.logs.mkdir(parents=True, exist_ok=True)
    kill_stale_child(cfg)
    cfg.run.stop_file.unlink(missing_ok=True)  # a stale STOP from a cancelled attempt
    tail = ProgressTail(cfg.run.progress_file)
    cmd = build_command(cfg)
    with open(cfg.log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} launching: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = _popen(cmd, cfg, log)
    pgid = proc.pid  # start_new_session: the child leads its own group
    cfg.pid_path.write_text(str(pgid))

    cancelled = False
    escalation: str | None = None
    stop_at = term_at = kill_at = None
    n_records = 0
    last_error: str | None = None
    last_cancel_check = 0.0

    def forward() -> None:
        nonlocal n_records, last_error
        records = tail.read()
        if records:
            for rec in records:
                if rec.get("type") == "error":
                    last_error = str(rec.get("message") or rec.get("error") or rec)
            n_records += len(records)
            on_records(records)

    try:
        while proc.poll() is None:
            time.sleep(cfg.poll_seconds)
            forward()
            if on_tick is not None:
                on_tick()
            now = time.monotonic()
            if not cancelled and now - last_cancel_check >= cancel_check_seconds:
                last_cancel_check = now
                if should_cancel():
                    cancelled = True
                    stop_at = now
                    cfg.run.stop_file.write_text("cancel requested\n")
                    term_at = stop_at + cfg.cancel_grace_seconds
                    kill_at = term_at + max(cfg.cancel_grace_seconds / 2, 2.0)
            if term_at is not None and escalation is None and now >= term_at:
                escalation = "SIGTERM"
                _signal_group(pgid, signal.SIGTERM)
            if kill_at is not None and escalation == "SIGTERM" and now >= kill_at:
                escalation = "SIGKILL"
                _signal_group(pgid, signal.SIGKILL)
    except BaseException:
        # The worker itself is going down (cold shutdown, error in a callback): never leave a
        # trainer running unsupervised.
        kill_group(pgid)
        proc.wait()
        raise
    finally:
        # Ranks of a torchrun child may outlive their leader; the group must be empty on return.
        if proc.poll() is not None and group_alive(pgid):
            kill_group(pgid)
    forward()
    cfg.pid_path.unlink(missing_ok=True)
    return LaunchResult(
        returncode=proc.returncode,
        cancelled=cancelled,
        escalation=escalation,
        records=n_records,
        last_error=last_error,
    )


def _popen(cmd: list[str], cfg: LaunchConfig, log):  # noqa: ANN001, ANN202 - file object / Popen
    import subprocess

    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env(cfg),
        cwd=str(Path(__file__).resolve().parents[2]),  # repo root: `-m services...` resolves
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
