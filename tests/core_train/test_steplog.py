"""The training child's readable step lines: format and cadence (steady in wall time)."""

from __future__ import annotations

import pytest

from services.train_worker.steplog import StepLogger, kernel_line


class Clock:
    """A hand-driven clock: the cadence is a function of time, so the test sets time."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rec(step: int, total: int = 10, **kw) -> dict:
    return {"step": step, "total_steps": total, "loss": 3.25, "lr_mult": 1.0, "tokens_per_sec": 123456.7,
            "mfu": 0.4812, "eta_seconds": 90.0, "step_seconds": 0.3124, "total_training_seconds": 37.2, **kw}  # fmt: skip


def test_line_format_matches_nanochat():
    line = StepLogger.format_step(rec(3, 2000), 0.3124, 1.0)
    assert line == (
        "step 00003/02000 (0.15%) | loss: 3.250000 | lrm: 1.00 | dt: 312.40ms | tok/sec: 123,457 | "
        "mfu: 48.12 | elapsed: 0.62m | eta: 1.5m"
    )
    cpu = StepLogger.format_step(
        {"step": 7, "total_steps": 0, "loss": None, "mfu": None, "epoch": 1}, None, 90
    )
    assert (
        cpu
        == "step 00007 | loss: - | lrm: - | dt: - | tok/sec: - | mfu: - | epoch: 1 | elapsed: 1.50m | eta: -"
    )


def test_cadence_first_last_and_at_most_one_line_per_interval():
    lines: list[str] = []
    clock = Clock()
    log = StepLogger(lines.append, every_seconds=1.0, clock=clock)
    for step in range(1, 11):  # 10 steps of 0.3 s: lines at steps 1, 5 (1.2 s later), 9, and the last
        log.progress(rec(step))
        clock.now += 0.3
    assert [int(line[5:10]) for line in lines] == [1, 5, 9, 10]


def test_slow_steps_log_every_step_and_dt_from_wall_time_without_step_seconds():
    lines: list[str] = []
    clock = Clock()
    log = StepLogger(lines.append, every_seconds=1.0, clock=clock)
    for step in (2, 4, 6):  # SFT-style records: no step_seconds; 2 steps every 5 s -> 2500 ms a step
        log.progress({"step": step, "total_steps": 6, "loss": 1.0, "stage": "sft"})
        clock.now += 5.0
    assert len(lines) == 3 and "dt: -" in lines[0] and "dt: 2500.00ms" in lines[1]


def test_kernel_report_gets_one_line():
    lines: list[str] = []
    log = StepLogger(lines.append, clock=Clock())
    report = {"attention": {"S": "flex", "L": "fa3"}, "compiled": True, "peak_flops": 989e12}
    log.progress(rec(1, kernels=report))
    log.progress(rec(2, kernels=report))
    assert lines[0] == "kernels: attention.S=flex, attention.L=fa3, compiled=True, peak_flops=9.89e+14"
    assert sum(line.startswith("kernels:") for line in lines) == 1
    assert kernel_line("eager") == "eager"
    with pytest.raises(ValueError, match="every_seconds"):
        StepLogger(lines.append, every_seconds=-1)
