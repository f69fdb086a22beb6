"""Step lines a person can read, written by the training child to its stage log.

The progress records (progress.jsonl) are for machines; the stage log (`logs/pretrain.log`,
`logs/sft.log`, which the child's stdout goes to) gets nanochat's step line:

    step 00120/05000 (2.40%) | loss: 3.456789 | lrm: 1.00 | dt: 312.40ms | tok/sec: 1,678,201 | mfu: 48.12 | elapsed: 0.62m | eta: 25.4m

at a steady cadence: the first and last step, then at most one line per `every_seconds`, so a
run of fast steps does not flood the log and a run of slow steps logs every one. Validation,
checkpoints and the kernel report (when the first record carries one) get a line each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeGuard

from shared.jobs.progress_file import kernel_report_of


def _num(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.2f}m"


def _eta(seconds: Any) -> str:
    if not _num(seconds):
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 60:.1f}m"


def kernel_line(report: Any) -> str:
    """One line from a kernel report: `key: value` pairs, nested dicts flattened with dots."""
    if not isinstance(report, dict):
        return str(report)
    parts: list[str] = []

    def walk(prefix: str, d: dict) -> None:
        for k, v in d.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(f"{name}.", v)
            elif isinstance(v, float) and v >= 1e6:
                parts.append(f"{name}={v:.3g}")
            else:
                parts.append(f"{name}={v}")

    walk("", report)
    return ", ".join(parts)


@dataclass
class StepLogger:
    """Hands readable lines to `emit` (print to the stage log in the training child)."""

    emit: Callable[[str], None]
    every_seconds: float = 1.0
    clock: Callable[[], float] = time.monotonic
    _last_line_at: float | None = field(default=None, init=False)
    _prev: tuple[float, int] | None = field(default=None, init=False)  # (clock, step) of the previous record
    _started: float | None = field(default=None, init=False)
    _kernels_logged: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.every_seconds < 0:
            raise ValueError(f"every_seconds must be >= 0, got {self.every_seconds}")

    def progress(self, rec: dict[str, Any]) -> None:
        now = self.clock()
        if self._started is None:
            self._started = now
        report = None if self._kernels_logged else kernel_report_of(rec)
        if report is not None:
            self.emit(f"kernels: {kernel_line(report)}")
            self._kernels_logged = True
        step, total = rec.get("step"), rec.get("total_steps")
        if not isinstance(step, int):
            return
        dt = rec.get("step_seconds")
        if not _num(dt) and self._prev is not None and step > self._prev[1]:
            dt = (now - self._prev[0]) / (step - self._prev[1])  # SFT records carry no step time
        self._prev = (now, step)
        first = self._last_line_at is None
        last = isinstance(total, int) and step >= total
        if not (first or last or now - (self._last_line_at or 0.0) >= self.every_seconds):
            return
        self._last_line_at = now
        self.emit(self.format_step(rec, dt, now - self._started))

    @staticmethod
    def format_step(rec: dict[str, Any], dt: Any, wall: float) -> str:
        step, total = rec["step"], rec.get("total_steps")
        if isinstance(total, int) and total > 0:
            head = f"step {step:05d}/{total:05d} ({100 * step / total:.2f}%)"
        else:
            head = f"step {step:05d}"
        loss = rec.get("loss")
        lrm = rec.get("lr_mult")
        tps = rec.get("tokens_per_sec")
        mfu = rec.get("mfu")
        elapsed = rec.get("total_training_seconds")
        parts = [
            head,
            f"loss: {loss:.6f}" if _num(loss) else "loss: -",
            f"lrm: {lrm:.2f}" if _num(lrm) else "lrm: -",
            f"dt: {1000 * dt:.2f}ms" if _num(dt) else "dt: -",
            f"tok/sec: {round(tps):,}" if _num(tps) else "tok/sec: -",
            f"mfu: {100 * mfu:.2f}" if _num(mfu) else "mfu: -",
            f"elapsed: {_minutes(elapsed if _num(elapsed) else wall)}",
            f"eta: {_eta(rec.get('eta_seconds'))}",
        ]
        if isinstance(rec.get("epoch"), int):
            parts.insert(-2, f"epoch: {rec['epoch']}")
        return " | ".join(parts)

    def eval(self, rec: dict[str, Any]) -> None:
        bpb = rec.get("val_bpb")
        self.emit(
            f"step {rec.get('step', 0):05d} | validation bpb: {bpb:.6f}" if _num(bpb) else f"eval: {rec}"
        )

    def checkpoint(self, rec: dict[str, Any]) -> None:
        self.emit(f"step {rec.get('step', 0):05d} | checkpoint saved: {rec.get('path')}")


def printer(out: TextIO) -> Callable[[str], None]:
    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    return emit
