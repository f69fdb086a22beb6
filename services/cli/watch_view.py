"""What `ncp jobs watch` draws in a terminal: rich progress bars for the job and its stage, the
live numbers rounded for people, and the kernel line; events scroll above them.

Off a terminal (a pipe, a log file, a test) the same information is printed as one plain line per
change, which `follow` in services/cli/commands/jobs.py does without this module.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn
from rich.text import Text

from services.cli import human


def stage_position(job: dict[str, Any]) -> str:
    stages = job.get("stages") or []
    names = [s["name"] for s in stages]
    cur = job.get("current_stage")
    if cur in names:
        return f"{cur} ({names.index(cur) + 1}/{len(names)})"
    return cur or "-"


def stage_detail(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    parts = []
    if p.get("step") is not None:
        total = p.get("total_steps")
        parts.append(f"step {p['step']:,}/{total:,}" if total else f"step {p['step']:,}")
    if p.get("loss") is not None:
        parts.append(f"loss {human.loss(p['loss'])}")
    if p.get("tokens_per_sec") is not None:
        parts.append(f"{human.si(p['tokens_per_sec'])} tok/s")
    if p.get("mfu") is not None:
        parts.append(f"MFU {human.percent(p['mfu'])}")
    if p.get("peak_memory") is not None:
        parts.append(f"mem {human.bytes_(p['peak_memory'])}")
    if p.get("eta_seconds") is not None and job.get("status") == "running":
        parts.append(f"ETA {human.duration(p['eta_seconds'])}")
    return " · ".join(parts)


class WatchView:
    """A rich Live display of one job; `update(job)` redraws, `event(line)` scrolls above it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(bar_width=40),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
        )
        self.job_task = self.progress.add_task("job", total=100.0, detail="")
        self.stage_task = self.progress.add_task("stage", total=None, detail="", visible=False)
        self.kernels = Text("", style="dim")
        self.live = Live(Group(self.progress, self.kernels), console=self.console, refresh_per_second=4)

    def __enter__(self) -> WatchView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def event(self, line: str) -> None:
        self.console.print(line, highlight=False, markup=False)  # "[pretrain]" is text, not a style

    def update(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        status = job.get("status", "?")
        name = job.get("name") or job.get("kind", "")
        self.progress.update(
            self.job_task,
            completed=float(p.get("percent") or 0.0),
            description=f"{job['id'][:8]} {name} · {status}",
            detail=f"stage {stage_position(job)}"
            + (f" · error {job['error'].get('code')}" if job.get("error") else ""),
        )
        if p.get("step") is not None and p.get("total_steps"):
            self.progress.update(
                self.stage_task,
                visible=True,
                total=float(p["total_steps"]),
                completed=float(min(p["step"], p["total_steps"])),
                description=f"  {job.get('current_stage') or 'stage'}",
                detail=stage_detail(job),
            )
        else:
            self.progress.update(self.stage_task, visible=False)
        report = human.kernel_report(job)
        self.kernels.plain = f"  kernels: {human.kernel_line(report)}" if report else ""
        self.live.refresh()
