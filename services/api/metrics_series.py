"""Metric series at any scale: cursor pages of raw rows, per-series min/max downsampling, and the
rows written after a given one (what a live chart appends).

A 29,000-step run with six series holds 174,000 rows. A chart cannot use more points than it has
pixels, but it must not lose the spikes either, so `downsample` keeps, per (stage, series), the
first and last point and the minimum and maximum of every bucket of consecutive steps: the curve's
envelope survives at any size. Pages walk the rows in (name, step, id) order, the order of the
registry's (job_id, name, step) index, with a keyset cursor, so the 100th page costs what the
first did.

Row ids increase with insertion; the training forwarder is the only writer of a job's metrics and
writes one step at a time, so "rows with id > n" is exactly what was recorded after row n.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.orm import Session

from shared.db.models import Metric

MAX_PAGE_ROWS = 10_000
MIN_POINTS = 16
MAX_POINTS = 20_000


_Q = TypeVar("_Q", bound=Select)  # type: ignore[type-arg]


@dataclass(frozen=True)
class MetricFilter:
    """Which rows of one job: series names, one stage, steps after a value (all optional)."""

    job_id: str
    names: tuple[str, ...] | None = None
    stage: str | None = None
    after_step: int | None = None

    def apply(self, q: _Q) -> _Q:
        q = q.where(Metric.job_id == self.job_id)
        if self.names is not None:
            q = q.where(Metric.name.in_(self.names))
        if self.stage is not None:
            q = q.where(Metric.stage == self.stage)
        if self.after_step is not None:
            q = q.where(Metric.step > self.after_step)
        return q


@dataclass(frozen=True)
class Row:
    id: int
    stage: str
    name: str
    step: int
    value: float
    ts: dt.datetime | None  # None where it was not read (downsampled and live rows)


_COLUMNS = (Metric.id, Metric.stage, Metric.name, Metric.step, Metric.value)


class CursorError(ValueError):
    pass


def encode_cursor(row: Row) -> str:
    raw = json.dumps([row.name, row.step, row.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        name, step, row_id = json.loads(raw)
        if not (isinstance(name, str) and isinstance(step, int) and isinstance(row_id, int)):
            raise TypeError("cursor fields")
    except (ValueError, TypeError) as e:
        raise CursorError(f"cursor {cursor[:40]!r} is not a cursor this API handed out") from e
    return name, step, row_id


def series_sizes(session: Session, flt: MetricFilter) -> dict[tuple[str, str], int]:
    """Stored rows per (stage, name) that the filter matches."""
    q = flt.apply(select(Metric.stage, Metric.name, func.count()).group_by(Metric.stage, Metric.name))
    return {(stage, name): int(n) for stage, name, n in session.execute(q)}


def row_counts(sizes: dict[tuple[str, str], int]) -> dict[str, int]:
    """Rows per series name, all stages together."""
    out: dict[str, int] = {}
    for (_stage, name), n in sizes.items():
        out[name] = out.get(name, 0) + n
    return out


def read_page(
    session: Session, flt: MetricFilter, cursor: str | None, limit: int
) -> tuple[list[Row], str | None]:
    """Up to `limit` rows after `cursor` in (name, step, id) order, and the next page's cursor
    (None when these rows end the matching set)."""
    if not 1 <= limit <= MAX_PAGE_ROWS:
        raise ValueError(f"limit must be in 1..{MAX_PAGE_ROWS}, got {limit}")
    q = flt.apply(select(*_COLUMNS, Metric.ts))
    if cursor is not None:
        q = q.where(tuple_(Metric.name, Metric.step, Metric.id) > tuple_(*decode_cursor(cursor)))
    q = q.order_by(Metric.name, Metric.step, Metric.id).limit(limit + 1)
    rows = [Row(*r) for r in session.execute(q)]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1]) if more and rows else None)


def minmax_indices(values: np.ndarray, points: int) -> np.ndarray:
    """Indices (ascending) of at most `points` samples of a series that keep its envelope: the
    first and last sample, and the minimum and maximum of each of (points - 2) // 2 equal runs of
    the samples between them."""
    n = len(values)
    if n <= points:
        return np.arange(n)
    buckets = max(1, (points - 2) // 2)
    inner = np.arange(1, n - 1)
    picks = [0, n - 1]
    for chunk in np.array_split(inner, buckets):
        if len(chunk) == 0:
            continue
        seg = values[chunk[0] : chunk[-1] + 1]
        picks.append(int(chunk[0] + np.argmin(seg)))
        picks.append(int(chunk[0] + np.argmax(seg)))
    return np.unique(np.array(picks))


def _series_array(session: Session, flt: MetricFilter, stage: str, name: str) -> np.ndarray:
    """(n, 3) float64 of (id, step, value) for one stage and series, sorted by step then id."""
    q = flt.apply(select(Metric.id, Metric.step, Metric.value)).where(
        Metric.stage == stage, Metric.name == name
    )
    # Straight from the DBAPI cursor: three numbers per row need no ORM row objects, and building
    # those is most of the cost at 29,000 rows a series. Sorted here, not in SQL: the database
    # would sort text-collated keys of the whole run to produce the same order.
    result = session.connection().execute(q)
    try:
        data = np.array(result.cursor.fetchall(), dtype=np.float64).reshape(-1, 3)
    finally:
        result.close()
    return data[np.lexsort((data[:, 0], data[:, 1]))]


def downsample(
    session: Session, flt: MetricFilter, points: int, sizes: dict[tuple[str, str], int] | None = None
) -> tuple[list[Row], int | None]:
    """Every matching (stage, series) reduced to at most `points` rows (min/max per bucket), in
    (name, step) order; and the newest row id read (where a live stream continues)."""
    if not MIN_POINTS <= points <= MAX_POINTS:
        raise ValueError(f"points must be in {MIN_POINTS}..{MAX_POINTS}, got {points}")
    sizes = series_sizes(session, flt) if sizes is None else sizes
    kept: list[tuple[str, str, int, int, float]] = []
    last_id: int | None = None
    for stage, name in sizes:
        data = _series_array(session, flt, stage, name)
        if len(data) == 0:
            continue
        newest = int(data[:, 0].max())
        last_id = newest if last_id is None else max(last_id, newest)
        for i in minmax_indices(data[:, 2], points):
            row_id, step, value = data[int(i)]
            kept.append((name, stage, int(row_id), int(step), float(value)))
    # A kept point stands for its bucket; its wall-clock time is not read (ts None): fetching it
    # would cost a second query and a third of the answer's bytes for a value no chart uses.
    out = [Row(row_id, stage, name, step, value, None) for name, stage, row_id, step, value in kept]
    out.sort(key=lambda r: (r.name, r.step, r.id))
    return out, last_id


def rows_after(session: Session, flt: MetricFilter, after_id: int, limit: int = 5000) -> list[Row]:
    """Rows recorded after row `after_id`, oldest first (what a live chart appends)."""
    q = flt.apply(select(*_COLUMNS)).where(Metric.id > after_id).order_by(Metric.id).limit(limit)
    return [
        Row(row_id, stage, name, step, value, None) for row_id, stage, name, step, value in session.execute(q)
    ]


def group_by_name(rows: Iterable[Row]) -> dict[str, list[Row]]:
    series: dict[str, list[Row]] = {}
    for r in rows:
        series.setdefault(r.name, []).append(r)
    return series
