"""Response schemas of the job API (JobPublic, JobsPublic, ...), built from registry rows.

Request bodies are the job spec itself (shared/jobs/spec.py: JobCreate = JobSpec).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field

from shared.db.models import Checkpoint, Event, Job, Model, ModelCheckpoint, ModelExport, Stage


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class StagePublic(BaseModel):
    name: str
    status: str
    order: int
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    error: str | None = None
    outputs: dict[str, Any] | None = None

    @classmethod
    def of(cls, st: Stage) -> StagePublic:
        return cls(
            name=st.name,
            status=st.status,
            order=st.order,
            started_at=st.started_at,
            finished_at=st.finished_at,
            error=st.error,
            outputs=st.outputs,
        )


class CheckpointPublic(BaseModel):
    stage: str
    kind: str
    step: int
    path: str
    val_bpb: float | None = None
    files: list[Any] | None = None
    created_at: dt.datetime

    @classmethod
    def of(cls, c: Checkpoint) -> CheckpointPublic:
        return cls(
            stage=c.stage,
            kind=c.kind,
            step=c.step,
            path=c.path,
            val_bpb=c.val_bpb,
            files=c.files,
            created_at=c.created_at,
        )


class Progress(BaseModel):
    percent: float = Field(description="Whole job: finished stages plus the current stage's fraction, 0..100")
    stage_percent: float | None = Field(None, description="Current stage: step / total_steps, 0..100")
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    eta_seconds: float | None = None
    peak_memory: int | None = Field(None, description="Bytes")


class JobError(BaseModel):
    code: str | None
    message: str | None


class JobPublic(BaseModel):
    id: str
    kind: str
    name: str | None = None
    status: str
    current_stage: str | None = None
    stages: list[StagePublic]
    progress: Progress
    error: JobError | None = None
    attempts: int
    cancel_requested: bool
    latest_checkpoint: CheckpointPublic | None = None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    updated_at: dt.datetime
    spec: dict[str, Any]
    kernels: dict[str, dict[str, Any]] | None = Field(
        None,
        description="What runs on the device: training stage -> the kernel report its trainer wrote with "
        "its first progress record (attention kernels, compile, dtype, FP8, device, peak FLOP/s, "
        "slow_fallbacks); {} until a trainer has written one. In a single job's answers only: null "
        "in GET /jobs lists",
    )

    @classmethod
    def of(
        cls, job: Job, latest: Checkpoint | None = None, kernels: dict[str, dict[str, Any]] | None = None
    ) -> JobPublic:
        return cls(
            id=job.id,
            kind=job.kind,
            name=(job.spec or {}).get("name"),
            status=job.status,
            current_stage=job.current_stage,
            stages=[StagePublic.of(s) for s in job.stages],
            progress=progress_of(job),
            error=JobError(code=job.error_code, message=job.error_message)
            if (job.error_code or job.error_message)
            else None,
            attempts=job.attempts,
            cancel_requested=job.cancel_requested,
            latest_checkpoint=CheckpointPublic.of(latest) if latest is not None else None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            updated_at=job.updated_at,
            spec=job.spec,
            kernels=kernels,
        )


def progress_of(job: Job) -> Progress:
    stage_frac: float | None = None
    if job.step is not None and job.total_steps:
        stage_frac = min(1.0, max(0.0, job.step / job.total_steps))
    stages = job.stages
    if job.status == "succeeded":
        percent = 100.0
    elif stages:
        done = sum(1 for s in stages if s.status in ("succeeded", "skipped"))
        running = any(s.status == "running" for s in stages)
        percent = 100.0 * (done + ((stage_frac or 0.0) if running else 0.0)) / len(stages)
    else:
        percent = 0.0
    return Progress(
        percent=round(percent, 2),
        stage_percent=None if stage_frac is None else round(100 * stage_frac, 2),
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss,
        tokens_per_sec=job.tokens_per_sec,
        mfu=job.mfu,
        eta_seconds=job.eta_seconds,
        peak_memory=job.peak_memory,
    )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next (older) page")


class EventPublic(BaseModel):
    seq: int
    ts: dt.datetime
    type: str
    stage: str | None = None
    message: str
    data: dict[str, Any] | None = None

    @classmethod
    def of(cls, e: Event) -> EventPublic:
        return cls(seq=e.seq, ts=e.ts, type=e.type, stage=e.stage, message=e.message, data=e.data)


class EventsPublic(BaseModel):
    data: list[EventPublic]
    count: int
    next_after: int = Field(description="Pass as ?after= to get newer events")


class MetricPoint(BaseModel):
    step: int
    value: float
    stage: str
    ts: dt.datetime | None = Field(
        default=None, description="When it was recorded; null in downsampled answers"
    )


class MetricsPublic(BaseModel):
    job_id: str
    mode: Literal["paged", "downsampled"] = Field(
        description="paged: raw rows in (name, step) order, continue with next_cursor; downsampled: "
        "every series whole, at most `points` rows per stage and series (first, last, and the "
        "minimum and maximum of each bucket of steps)"
    )
    series: dict[str, list[MetricPoint]]
    rows: dict[str, int] = Field(description="Rows stored per series (all stages) that the filter matches")
    points: int | None = Field(
        default=None, description="downsampled: the requested points per stage and series"
    )
    next_cursor: str | None = Field(
        default=None, description="paged: pass as ?cursor= for the next page; null when this page is the last"
    )
    last_id: int | None = Field(
        default=None,
        description="downsampled: newest row read; a live stream (?after_id=) continues after it",
    )


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    count: int


class EvalResultPublic(BaseModel):
    stage: str
    checkpoint_step: int | None
    task: str
    metric: str
    value: float


class EvalResultsPublic(BaseModel):
    data: list[EvalResultPublic]
    count: int


class ArtifactPublic(BaseModel):
    name: str
    path: str
    kind: str
    created_at: dt.datetime


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class LogsPublic(BaseModel):
    job_id: str
    logs: dict[str, str] = Field(description="Log file name -> its last lines")


class ServedModels(BaseModel):
    current: dict[str, Any] | None = Field(None, description="$NCP_HOME/serving/current.json")
    live: dict[str, Any] = Field(description="The inference server's /v1/models, or why it is unreachable")


# --- model registry ------------------------------------------------------------------------------
class ModelLineage(BaseModel):
    source: Literal["import", "job"]
    source_job_id: str | None = Field(None, description="The job that trained it (null once deleted)")
    source_path: str | None = Field(None, description="The folder it was imported from")
    parent_model: str | None = Field(None, description="The model it continued from / was fine-tuned from")


class ModelCheckpointPublic(BaseModel):
    phase: str
    step: int
    path: str
    has_optimizer: bool = Field(description="Optimizer state saved: training can resume exactly")
    optimizer_world_size: int | None = Field(None, description="Ranks that saved the optimizer state")

    @classmethod
    def of(cls, c: ModelCheckpoint) -> ModelCheckpointPublic:
        return cls(
            phase=c.phase,
            step=c.step,
            path=c.path,
            has_optimizer=c.has_optimizer,
            optimizer_world_size=c.optimizer_world_size,
        )


class ModelExportPublic(BaseModel):
    path: str
    format: str
    job_id: str | None = None
    phase: str | None = Field(None, description="Phase of the exported checkpoint")
    step: int | None = Field(None, description="Step of the exported checkpoint")
    created_at: dt.datetime

    @classmethod
    def of(cls, e: ModelExport) -> ModelExportPublic:
        return cls(
            path=e.path, format=e.format, job_id=e.job_id, phase=e.phase, step=e.step, created_at=e.created_at
        )


def _latest_steps(m: Model) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in m.checkpoints:
        out[c.phase] = max(out.get(c.phase, c.step), c.step)
    return out


class ModelSummaryPublic(BaseModel):
    name: str
    lineage: ModelLineage
    vocab_size: int | None = Field(None, description="The model's vocabulary (its checkpoints' vocab_size)")
    has_tokenizer: bool
    latest_steps: dict[str, int] = Field(description="Newest checkpoint step per phase, e.g. {base: 5000}")
    export_count: int = Field(description="How many exports were recorded")
    created_at: dt.datetime

    @classmethod
    def of(cls, m: Model) -> ModelSummaryPublic:
        return cls(
            name=m.name,
            lineage=ModelLineage(
                source=m.source,  # type: ignore[arg-type]  # the column holds MODEL_SOURCES
                source_job_id=m.source_job_id,
                source_path=m.source_path,
                parent_model=m.parent_model,
            ),
            vocab_size=m.vocab_size,
            has_tokenizer=m.tokenizer_path is not None,
            latest_steps=_latest_steps(m),
            export_count=len(m.exports),
            created_at=m.created_at,
        )


class ModelsPublic(BaseModel):
    data: list[ModelSummaryPublic]
    count: int


class ModelPublic(ModelSummaryPublic):
    path: str = Field(description="The model's run-folder-layout root")
    checkpoint_tag: str | None = None
    tokenizer_path: str | None = None
    checkpoints: list[ModelCheckpointPublic]
    exports: list[ModelExportPublic] = Field(description="Recorded exports, oldest first")
    manifest: dict[str, Any] | None = Field(None, description="The import manifest (imports only)")

    @classmethod
    def of(cls, m: Model) -> ModelPublic:
        return cls(
            **ModelSummaryPublic.of(m).model_dump(),
            path=m.path,
            checkpoint_tag=m.checkpoint_tag,
            tokenizer_path=m.tokenizer_path,
            checkpoints=[ModelCheckpointPublic.of(c) for c in m.checkpoints],
            exports=[ModelExportPublic.of(e) for e in m.exports],
            manifest=m.manifest,
        )


class ServeModelRequest(BaseModel):
    phase: Literal["base", "sft", "rl"] | None = Field(
        default=None, description="Checkpoint phase to serve; null = sft when the model has it, else base"
    )
    step: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Checkpoint step; null = the newest"
    )


class ServeModelResult(BaseModel):
    model: str
    phase: str
    step: int
    export_dir: str
    published: dict[str, Any] = Field(description="What serving/current.json now holds")


class ServeModelQueued(BaseModel):
    """POST /models/{name}/serve for a checkpoint without a recorded export: the job that exports
    and then serves it (stages export, serve) runs on the workers; the model is served once it has
    succeeded."""

    model: str
    phase: str
    step: int
    job: JobPublic = Field(description="The export-and-serve job (follow it at /jobs/{id})")
