"""Numbers rounded for people: 3.142 not 3.14159265, 68.0k tok/s, 41.3% MFU, 1h 02m, 12.3 GB.

Used by `ncp jobs watch` and `ncp chat`; the web console has the same rules in format.js.
"""

from __future__ import annotations

import math
from typing import Any


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def loss(x: Any) -> str:
    return f"{x:.3f}" if _num(x) else "-"


def si(x: Any, unit: str = "") -> str:
    """Three significant digits with a k/M/G/T suffix: 1234 -> 1.23k, 68000 -> 68.0k, 123456 -> 123k."""
    if not _num(x):
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            digits = 2 if abs(v) < 10 else 1 if abs(v) < 100 else 0
            return f"{v:.{digits}f}{suffix}{unit}"
    return f"{x:.0f}{unit}" if abs(x) >= 10 else f"{x:.3g}{unit}"


def percent(fraction: Any) -> str:
    return f"{100 * fraction:.1f}%" if _num(fraction) else "-"


def duration(seconds: Any) -> str:
    """45s, 3m 20s, 1h 02m, 2d 04h."""
    if not _num(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {sec:02d}s"
    return f"{sec}s"


def bytes_(n: Any) -> str:
    if not _num(n):
        return "-"
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def kernel_report(job: dict[str, Any]) -> dict[str, Any] | None:
    """The kernel report to show for a job (what runs on the device): the current training stage's,
    else the newest one's, from the job status's `kernels` (training stage -> report)."""
    by_stage = job.get("kernels") or {}
    if not by_stage:
        return None
    current = by_stage.get(job.get("current_stage") or "")
    return current if current is not None else list(by_stage.values())[-1]


def kernel_line(report: dict[str, Any]) -> str:
    parts: list[str] = []

    def walk(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, float) and abs(v) >= 1e6:
                parts.append(f"{prefix}{k} {si(v)}")
            else:
                parts.append(f"{prefix}{k} {v}")

    walk("", report)
    return " · ".join(parts)
