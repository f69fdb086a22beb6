"""The training child's progress file (`runs/<job>/progress.jsonl`): record types, writer and tail.

Rank 0 of the trainer appends one JSON object per line; the worker tails the file and forwards the
records into the registry; the run report reads it back. This module is the schema all three
share. A line is `{"type": T, "time": unix_seconds, "stage": "pretrain"|"sft", ...fields}` with

    type        fields
    progress    step, total_steps, loss, raw_loss, tokens_per_sec, mfu, eta_seconds,
                peak_memory_bytes, lr_mult (+ anything else the trainer reports, kept in `extra`)
    eval        step, val_bpb (+ extra, e.g. min_val_bpb)
    checkpoint  step, path (the checkpoint's meta file), files, val_bpb (+ extra)
    done        mode, step, total_steps, stopped, last_loss, val_bpb, checkpoint_step
    error       message, error_type, traceback

Numbers that are not finite are written as null (JSON has no NaN). Keys a record type does not
name are preserved in `extra` both ways, so the trainer can report more (a kernel report, the
schedule) without a schema change here; readers must ignore keys they do not know. Lines written
before `stage` existed carry none: they are pretraining's.

The kernel report (shared/nanochat/kernel_report.py: what actually runs on the device) rides in
`extra` of the first `progress` record of every (re)started training run; `kernel_report_of` and
`scan_kernel_reports` are the one way to find it (the API's job status, the stage log and the
worker's slow-fallback warning all read it here).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TextIO


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    n = _num(value)
    return int(n) if n is not None else None


@dataclass(frozen=True)
class _Record:
    TYPE: ClassVar[str] = ""
    stage: str = "pretrain"
    time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.TYPE}
        for f in fields(self):
            if f.name != "extra":
                out[f.name] = _finite(getattr(self, f.name))
        for k, v in self.extra.items():
            out.setdefault(k, _finite(v))
        return out

    @classmethod
    def _known(cls) -> set[str]:
        return {f.name for f in fields(cls)} - {"extra"}


@dataclass(frozen=True)
class StepRecord(_Record):
    TYPE: ClassVar[str] = "progress"
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    raw_loss: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    eta_seconds: float | None = None
    peak_memory_bytes: int | None = None
    lr_mult: float | None = None

    def metrics(self) -> dict[str, float | None]:
        """The per-step metric series the registry keeps."""
        return {
            "loss": self.loss,
            "raw_loss": self.raw_loss,
            "tokens_per_sec": self.tokens_per_sec,
            "mfu": self.mfu,
            "lr_mult": self.lr_mult,
            "peak_memory_bytes": None if self.peak_memory_bytes is None else float(self.peak_memory_bytes),
        }


@dataclass(frozen=True)
class EvalRecord(_Record):
    TYPE: ClassVar[str] = "eval"
    step: int = 0
    val_bpb: float | None = None


@dataclass(frozen=True)
class CheckpointRecord(_Record):
    TYPE: ClassVar[str] = "checkpoint"
    step: int = 0
    path: str = ""
    files: list[str] = field(default_factory=list)
    val_bpb: float | None = None


@dataclass(frozen=True)
class DoneRecord(_Record):
    TYPE: ClassVar[str] = "done"
    mode: str = "pretrain"
    step: int = 0
    total_steps: int | None = None
    stopped: bool = False
    last_loss: float | None = None
    val_bpb: float | None = None
    checkpoint_step: int | None = None


@dataclass(frozen=True)
class ErrorRecord(_Record):
    TYPE: ClassVar[str] = "error"
    message: str = ""
    error_type: str | None = None
    traceback: str | None = None


Record = StepRecord | EvalRecord | CheckpointRecord | DoneRecord | ErrorRecord
RECORD_TYPES: dict[str, type[_Record]] = {
    c.TYPE: c for c in (StepRecord, EvalRecord, CheckpointRecord, DoneRecord, ErrorRecord)
}
_INTS = {"step", "total_steps", "peak_memory_bytes", "checkpoint_step"}
_FLOATS = {
    "loss",
    "raw_loss",
    "tokens_per_sec",
    "mfu",
    "eta_seconds",
    "lr_mult",
    "val_bpb",
    "last_loss",
    "time",
}


def record_from_dict(kind: str, data: dict[str, Any], *, stage: str | None = None) -> Record:
    """A typed record of `kind` from a JSON object or a trainer hook's dict. Known keys are coerced
    (numbers that are not finite become None); unknown keys go to `extra`. ValueError for an
    unknown kind or a record without its required key."""
    cls = RECORD_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"progress record type {kind!r} is not one of {sorted(RECORD_TYPES)}")
    known = cls._known()
    values: dict[str, Any] = {}
    for k in known & set(data):
        v = data[k]
        if k in _INTS:
            v = _int(v)
        elif k in _FLOATS:
            v = _num(v)
        values[k] = v
    if "step" in known and values.get("step") is None:
        raise ValueError(f"progress record of type {kind!r} has no integer step")
    if kind == "error":
        values["message"] = str(data.get("message") or data.get("error") or "")
    if kind == "checkpoint":
        values["path"] = str(values.get("path") or "")
        files = values.get("files")
        values["files"] = [str(f) for f in files] if isinstance(files, list) else []
    if kind == "done":
        values["stopped"] = bool(values.get("stopped"))
    if stage is not None:
        values["stage"] = stage
    elif not isinstance(values.get("stage"), str):
        values["stage"] = "pretrain"  # lines from before records named their stage
    extra = {k: v for k, v in data.items() if k not in known and k != "type"}
    return cls(**values, extra=extra)  # type: ignore[return-value]


def parse_line(line: bytes | str) -> Record | None:
    """One line of the file as a record; None for a blank, torn or foreign line."""
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        return None
    try:
        return record_from_dict(obj["type"], obj)
    except (ValueError, TypeError):
        return None


class ProgressWriter:
    """Appends records, one flushed line each; a no-op where `enabled` is False (ranks other than 0)."""

    def __init__(self, path: Path, enabled: bool, stage: str):
        self.stage = stage
        self._f: TextIO | None = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the run

    def write(self, kind: str, payload: dict[str, Any]) -> None:
        """Write a record of `kind` built from a trainer hook's dict (stage and time filled in)."""
        if self._f is None:
            return
        rec = record_from_dict(kind, {**payload, "time": time.time()}, stage=self.stage)
        # One write per line so a reader never sees half a record followed by another.
        self._f.write(json.dumps(rec.to_json(), default=_jsonable, allow_nan=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return repr(value)


class ProgressTail:
    """Reads the whole records appended to the file since the last call (an unfinished last line
    waits for the next read; a torn line from a killed writer is skipped)."""

    def __init__(self, path: Path, start_at_end: bool = True) -> None:
        self.path = path
        self.offset = path.stat().st_size if (start_at_end and path.exists()) else 0
        self._partial = b""

    def read(self) -> list[Record]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        return [r for r in (parse_line(line) for line in lines if line.strip()) if r is not None]


def read_records(path: Path) -> list[Record]:
    """Every whole record in the file (the run report and a retried stage's replay read it all)."""
    return ProgressTail(path, start_at_end=False).read()


# Keys of a progress record that may hold the kernel report: the trainer writes "kernels"; records
# of older trainers said "kernel_report".
KERNEL_KEYS = ("kernels", "kernel_report")
# A scan for kernel reports reads at most this much of a progress file: the reports sit at the start
# of each training stage, and a long run's file is mostly plain steps.
MAX_KERNEL_SCAN_BYTES = 64 * 1024 * 1024


def kernel_report_of(record: Record | dict[str, Any]) -> dict[str, Any] | None:
    """The kernel report a progress record (typed, or a trainer hook's dict) carries, else None."""
    holder = record.extra if isinstance(record, _Record) else record
    if isinstance(record, _Record) and not isinstance(record, StepRecord):
        return None
    for key in KERNEL_KEYS:
        if isinstance(holder.get(key), dict):
            return holder[key]
    return None


def scan_kernel_reports(
    path: Path, start: int = 0, found: dict[str, dict[str, Any]] | None = None
) -> tuple[dict[str, dict[str, Any]], int]:
    """The first kernel report of each training stage in the progress file, from byte `start` on,
    added to `found` (reports already there win: the first one counts). Returns (found, offset of
    the first byte not read): the file only grows, so a caller may keep both and continue later.
    An unfinished last line is left for the next call."""
    found = dict(found or {})
    try:
        f = path.open("rb")
    except (FileNotFoundError, NotADirectoryError):
        return found, start
    with f:
        f.seek(start)
        offset = start
        while offset < MAX_KERNEL_SCAN_BYTES:
            line = f.readline()
            if not line.endswith(b"\n"):
                break  # end of file, or a line the trainer is still writing
            offset += len(line)
            if b'"kernel' not in line:  # most lines are plain steps: skip them unparsed
                continue
            rec = parse_line(line)
            report = kernel_report_of(rec) if rec is not None else None
            if report is not None and rec is not None and rec.stage not in found:
                found[rec.stage] = report
    return found, offset
