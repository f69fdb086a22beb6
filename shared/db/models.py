"""Run-registry and model-registry tables (SQLAlchemy 2 typed declarative); the same schema on PostgreSQL and SQLite.

The registry is the source of truth for every job: what was asked (the spec), where it is (status,
current stage, progress), what it produced (checkpoints, artifacts, eval results) and who is
working on it (a lease row). Alembic migrations in services/api/migrations create exactly these
tables; nothing creates them at application start.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# --- vocabularies --------------------------------------------------------------------------------
JobKind = Literal["pipeline", "pretrain", "sft", "eval"]
JobStatus = Literal["queued", "running", "cancelling", "cancelled", "succeeded", "failed"]
JOB_KINDS: tuple[str, ...] = get_args(JobKind)
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL_STATUSES = frozenset({"cancelled", "succeeded", "failed"})
STAGE_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled", "skipped")
CheckpointKind = Literal["base", "sft"]
CHECKPOINT_KINDS: tuple[str, ...] = get_args(CheckpointKind)
ModelSource = Literal["import", "job"]
MODEL_SOURCES: tuple[str, ...] = get_args(ModelSource)
# A model's checkpoint phases, in pipeline order; "rl" only arrives through imports (upstream's
# chatrl_checkpoints), the platform itself trains base and sft.
ModelPhase = Literal["base", "sft", "rl"]
MODEL_PHASES: tuple[str, ...] = get_args(ModelPhase)


# The largest value the registry's Integer columns hold (steps, sequence numbers, counters): every
# integer that reaches one is bounded by it where it enters (the job spec, the API's queries).
MAX_INT32 = 2**31 - 1


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_job_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC timestamps on both backends.

    SQLite has no timezone type and hands back naive datetimes, which then refuse to compare with
    aware ones; storing naive UTC and re-attaching UTC on the way out keeps comparisons (lease
    expiry) correct everywhere.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the registry; use UTC-aware datetimes")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_job_id)
    kind: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    current_stage: Mapped[str | None] = mapped_column(String(32), default=None)
    # Progress of the running stage, overwritten in place; the history lives in `metrics`.
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    total_steps: Mapped[int | None] = mapped_column(Integer, default=None)
    loss: Mapped[float | None] = mapped_column(Float, default=None)
    tokens_per_sec: Mapped[float | None] = mapped_column(Float, default=None)
    mfu: Mapped[float | None] = mapped_column(Float, default=None)
    eta_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    peak_memory: Mapped[int | None] = mapped_column(BigInteger, default=None)  # bytes
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Per-job event sequence counter, bumped atomically by add_event (see registry.add_event).
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    stages: Mapped[list[Stage]] = relationship(
        back_populates="job", order_by="Stage.order", cascade="all, delete-orphan", lazy="selectin"
    )

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_stages_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    order: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    job: Mapped[Job] = relationship(back_populates="stages")


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)  # 1, 2, ... per job: the SSE id and paging cursor
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    type: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)


class Metric(Base):
    """One scalar of a time series: (job, stage, step, name) -> value."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_job_name_step", "job_id", "name", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "kind", "step", name="uq_checkpoints_job_kind_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(8))  # base | sft
    val_bpb: Mapped[float | None] = mapped_column(Float, default=None)
    files: Mapped[list[Any] | None] = mapped_column(JSON, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))  # e.g. tokenizer, export, report, corpus
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkerLease(Base):
    """Who is working on a job. One row per job; taken over only once it has expired."""

    __tablename__ = "worker_leases"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)


class EvalResult(Base):
    __tablename__ = "eval_results"
    __table_args__ = (Index("ix_eval_results_job", "job_id", "stage", "checkpoint_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(32))
    checkpoint_step: Mapped[int | None] = mapped_column(Integer, default=None)
    task: Mapped[str] = mapped_column(String(128))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


# --- model registry ------------------------------------------------------------------------------
class Model(Base):
    """A model the platform can start from, evaluate, export or serve: an imported nanochat run or
    the model a job trained. `path` is a run-folder-layout root (tokenizer/, base_checkpoints/<tag>/,
    chatsft_checkpoints/<tag>/); its checkpoints are rows of `model_checkpoints` (shared/db/model_registry.py)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)  # nanochat_import.validate_name
    source: Mapped[str] = mapped_column(String(16))  # import | job
    # The job that trained it; a deleted job leaves the model (its files stay on disk).
    source_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), default=None, index=True
    )
    source_path: Mapped[str | None] = mapped_column(Text, default=None)  # the import's source dir
    path: Mapped[str] = mapped_column(Text)
    checkpoint_tag: Mapped[str | None] = mapped_column(String(64), default=None)  # e.g. d24
    vocab_size: Mapped[int | None] = mapped_column(Integer, default=None)  # the model's (checkpoint meta)
    tokenizer_path: Mapped[str | None] = mapped_column(Text, default=None)  # None: imported without one
    parent_model: Mapped[str | None] = mapped_column(String(64), default=None)  # lineage, by name
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)

    checkpoints: Mapped[list[ModelCheckpoint]] = relationship(
        order_by="[ModelCheckpoint.phase, ModelCheckpoint.step]",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )
    exports: Mapped[list[ModelExport]] = relationship(
        order_by="ModelExport.created_at", cascade="all, delete-orphan", passive_deletes=True, lazy="selectin"
    )


class ModelCheckpoint(Base):
    __tablename__ = "model_checkpoints"
    __table_args__ = (
        UniqueConstraint("model_id", "phase", "step", name="uq_model_checkpoints_model_phase_step"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    phase: Mapped[str] = mapped_column(String(8))  # base | sft | rl
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)  # the checkpoint folder (<phase dir>/<tag>)
    has_optimizer: Mapped[bool] = mapped_column(Boolean, default=False)
    optimizer_world_size: Mapped[int | None] = mapped_column(Integer, default=None)  # ranks that saved it


class ModelExport(Base):
    __tablename__ = "model_exports"
    __table_args__ = (UniqueConstraint("model_id", "path", name="uq_model_exports_model_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(16))  # hf: shared/nanochat/export.py
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    # The checkpoint it was exported from (None: unknown, e.g. an export recorded by path only).
    phase: Mapped[str | None] = mapped_column(String(8), default=None)
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
