"""What each stage records as its outputs (the `outputs` JSON of its registry row), typed.

A stage function returns one of these; the orchestrator stores it as JSON, and a later stage (or
a child job reading its parent) reads it back with `parse_outputs`. Unknown keys in a stored row
are ignored, so rows written by an older version still read.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class StageOutputs(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ImportOutputs(StageOutputs):
    model: str = Field(description="Name of the imported model (its folder under models/)")
    model_dir: str
    tokenizer_dir: str | None = Field(None, description="Converted tokenizer; None when the source had none")
    checkpoint_dirs: dict[str, str] = Field(
        default_factory=dict, description="'<phase>/<tag>' (e.g. base/d12) -> checkpoint folder"
    )
    manifest: dict[str, Any] = Field(
        description="The model's manifest.json: source, tokenizer, checkpoints (steps, optimizer "
        "shards), warnings"
    )
    reused: bool = Field(description="A retried stage found this job's own earlier import in place")


class DataOutputs(StageOutputs):
    data_dir: str = Field(description="Folder of parquet shards; the last shard is the validation split")
    source: str
    report: dict[str, Any] = Field(default_factory=dict, description="Corpus validation report")


class TokenizerOutputs(StageOutputs):
    tokenizer_dir: str
    vocab_size: int
    reused: bool = Field(description="A redelivered stage found the tokenizer already saved")
    bytes_per_token: float


class TrainOutputs(StageOutputs):
    checkpoint_dir: str
    step: int
    total_steps: int | None = None
    checkpoint_step: int | None = None
    last_loss: float | None = None
    val_bpb: float | None = None
    resumed_from: int | None = Field(None, description="Checkpoint step this attempt started from")
    checkpoints: list[int] = Field(default_factory=list, description="Checkpoint steps saved by this attempt")


class EvalOutputs(StageOutputs):
    out_dir: str
    step: int | None = Field(None, description="Checkpoint step evaluated")
    results: dict[str, float] = Field(default_factory=dict, description="task/metric -> value")


class ExportOutputs(StageOutputs):
    export_dir: str
    checkpoint_kind: str = Field(description="sft or base: which checkpoint was exported")
    checkpoint_dir: str
    served_name: str


class ServeOutputs(StageOutputs):
    model: str
    export_dir: str
    published: dict[str, Any]
    inference_url: str | None = None


class ReportOutputs(StageOutputs):
    report: str


STAGE_OUTPUTS: dict[str, type[StageOutputs]] = {
    "import": ImportOutputs,
    "data": DataOutputs,
    "tokenizer": TokenizerOutputs,
    "pretrain": TrainOutputs,
    "sft": TrainOutputs,
    "base_eval": EvalOutputs,
    "chat_eval": EvalOutputs,
    "export": ExportOutputs,
    "serve": ServeOutputs,
    "report": ReportOutputs,
}


def parse_outputs(stage: str, raw: dict[str, Any] | None) -> StageOutputs | None:
    """The typed outputs of `stage` from its stored JSON; None when the stage recorded none."""
    if not raw:
        return None
    return STAGE_OUTPUTS[stage].model_validate(raw)
