"""JobSpec: what `POST /jobs` accepts, validated once, with errors that name the offending field.

A spec says what to run (kind and stages) and every knob of the run: model shape, data source,
tokenizer, training horizon, batch, optimizer, eval and checkpoint cadence, SFT data, hardware and
seed. Unknown fields are refused (extra="forbid") so a typo never silently falls back to a default.
Derived numbers (batch size from depth, iteration count from a data ratio, learning-rate scaling)
are NOT computed here: the trainer derives them in shared/nanochat/sizing.py; None means "auto".

Validation needs the allowed data roots (local corpora must lie under NCP_HOME or a configured
data root). They come from the pydantic validation context `{"roots": [...]}` when given, else
from `get_settings()`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.paths import PathEscapeError, resolve_under_roots

JobKind = Literal["pipeline", "pretrain", "sft", "eval"]
StageName = Literal["data", "tokenizer", "pretrain", "base_eval", "sft", "chat_eval", "export", "serve"]

# Pipeline order; a job's stages always run in this order.
STAGES: tuple[str, ...] = (
    "data",
    "tokenizer",
    "pretrain",
    "base_eval",
    "sft",
    "chat_eval",
    "export",
    "serve",
)
DEFAULT_STAGES: dict[str, tuple[str, ...]] = {
    "pipeline": STAGES,
    "pretrain": ("data", "tokenizer", "pretrain", "base_eval"),
    "sft": ("sft", "chat_eval"),
    "eval": ("base_eval",),
}
# Stages that read a model produced earlier; without `pretrain` in the same job they read the
# parent job's run folder.
_NEEDS_MODEL = {"base_eval", "sft", "chat_eval", "export", "serve"}

# Training memory per parameter that does not depend on batch size: fp32 master weights (4 bytes)
# and gradients (4) on every GPU, optimizer state (Adam moments / Muon momentum, about 8) sharded
# over all GPUs. Activations come on top, so a model over this floor cannot fit at any batch size.
_BYTES_WEIGHTS_AND_GRADS = 8
_BYTES_OPTIMIZER_STATE = 8
# The largest accelerator the platform targets (MI325X, 256 GB); MI300X has 192 GB, H100 80 GB.
MAX_DEVICE_MEMORY_BYTES = 256 * 10**9


def field_error(loc: tuple[str | int, ...], message: str, value: Any) -> ValidationError:
    """A ValidationError located at `loc`, for checks that span several fields."""
    err = PydanticCustomError("value_error", "{reason}", {"reason": message})
    return ValidationError.from_exception_data("JobSpec", [InitErrorDetails(type=err, loc=loc, input=value)])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """Model shape from a single depth, as in the reference (width = depth * aspect_ratio)."""

    depth: int = Field(default=20, ge=1, le=256, description="Number of transformer layers")
    aspect_ratio: int = Field(default=64, ge=1, le=1024, description="model_dim ~= depth * aspect_ratio")
    head_dim: int = Field(default=128, ge=8, le=512, description="Channels per attention head (even)")
    n_kv_head: int | None = Field(default=None, ge=1, description="Key/value heads (GQA); None = n_head")
    window_pattern: str = Field(
        default="SSSL",
        pattern=r"^[SLsl]+$",
        max_length=64,
        description="Sliding-window pattern tiled over layers: S short, L long",
    )
    sequence_len: int = Field(default=2048, ge=16, le=131072)
    vocab_size: int = Field(
        default=32768, ge=265, le=1 << 20, description="Tokenizer vocabulary incl. 9 specials"
    )

    @field_validator("head_dim")
    @classmethod
    def _even_head_dim(cls, v: int) -> int:
        if v % 2:
            raise ValueError("head_dim must be even (RoPE rotates channel pairs)")
        return v

    @model_validator(mode="after")
    def _shape(self) -> ModelSpec:
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise field_error(
                ("n_kv_head",),
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head} for depth {self.depth})",
                self.n_kv_head,
            )
        return self

    @property
    def model_dim(self) -> int:
        return math.ceil(self.depth * self.aspect_ratio / self.head_dim) * self.head_dim

    @property
    def n_head(self) -> int:
        return self.model_dim // self.head_dim

    def gpt_config(self) -> Any:
        """The GPTConfig this spec describes (shared/nanochat/config.py)."""
        from shared.nanochat.config import GPTConfig

        return GPTConfig.from_depth(
            self.depth,
            vocab_size=self.vocab_size,
            sequence_len=self.sequence_len,
            aspect_ratio=self.aspect_ratio,
            head_dim=self.head_dim,
            n_kv_head=self.n_kv_head,
            window_pattern=self.window_pattern.upper(),
        )


class DataSpec(_Strict):
    source: Literal["demo", "local", "remote"] = "demo"
    path: str | None = Field(
        default=None, description="local: the corpus (file, folder or glob) under an allowed root"
    )
    repo: str | None = Field(default=None, description="remote: Hugging Face dataset repo id")
    base_url: str | None = Field(default=None, description="remote: base URL of the shard files")
    num_shards: int | None = Field(
        default=None, ge=2, description="Shards incl. the last (validation) one; None = default/all"
    )
    text_column: str = Field(default="text", min_length=1, max_length=128)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http:// or https:// URL")
        return v

    @field_validator("repo")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        if v is not None and (v.count("/") != 1 or ".." in v or v.startswith("/")):
            raise ValueError("repo must look like 'owner/name'")
        return v

    @model_validator(mode="after")
    def _by_source(self) -> DataSpec:
        if self.source == "local" and not self.path:
            raise field_error(("path",), "data.path is required when data.source is 'local'", None)
        if self.source == "remote" and not (self.repo or self.base_url):
            raise field_error(("base_url",), "data.source 'remote' needs data.base_url or data.repo", None)
        if self.source == "demo" and (self.repo or self.base_url):
            raise field_error(
                ("source",), "data.repo/base_url are only used with source 'remote'", self.source
            )
        return self


class TokenizerSpec(_Strict):
    vocab_size: int | None = Field(default=None, ge=265, le=1 << 20, description="None = model.vocab_size")
    max_chars: int = Field(
        default=2_000_000_000, ge=1000, description="Characters of corpus to train the BPE on"
    )


class HorizonSpec(_Strict):
    """How long to pretrain: at most one of the three; none = target_param_data_ratio 12 (auto)."""

    num_iterations: int | None = Field(default=None, ge=1)
    target_param_data_ratio: float | None = Field(default=None, gt=0, le=10_000)
    target_flops: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> HorizonSpec:
        given = [
            n
            for n in ("num_iterations", "target_param_data_ratio", "target_flops")
            if getattr(self, n) is not None
        ]
        if len(given) > 1:
            raise field_error(
                (given[1],),
                f"set only one of num_iterations, target_param_data_ratio, "
                f"target_flops (got {', '.join(given)})",
                getattr(self, given[1]),
            )
        return self


class BatchSpec(_Strict):
    device_batch_size: int = Field(default=32, ge=1, le=4096, description="Sequences per GPU per micro-step")
    total_batch_size: int | None = Field(
        default=None, ge=1, description="Tokens per optimizer step; None = auto"
    )


class OptimSpec(_Strict):
    embedding_lr: float = Field(default=0.3, gt=0, le=10)
    unembedding_lr: float = Field(default=0.008, gt=0, le=10)
    matrix_lr: float = Field(default=0.02, gt=0, le=10)
    scalar_lr: float = Field(default=0.5, gt=0, le=10)
    weight_decay: float | None = Field(
        default=None, ge=0, le=10, description="None = auto from depth and batch"
    )
    warmup_steps: int = Field(default=40, ge=0)
    warmdown_ratio: float = Field(default=0.65, ge=0, le=1)


class EvalSpec(_Strict):
    every: int = Field(default=250, ge=0, description="Validation bpb every N steps; 0 = only at the end")
    tokens: int = Field(default=20 * 524288, ge=1, description="Validation tokens per bpb evaluation")
    core_max_per_task: int | None = Field(default=500, ge=1, description="CORE examples per task; None = all")
    chat_max_per_task: int | None = Field(
        default=None, ge=1, description="Chat-eval problems per task; None = all"
    )


class CheckpointSpec(_Strict):
    every: int = Field(
        default=1000, ge=0, description="Save every N steps (and at the end); 0 = only at the end"
    )
    keep_last: int = Field(default=3, ge=1, le=1000)


class SFTSource(_Strict):
    kind: Literal["demo", "conversations", "smoltalk", "mmlu", "gsm8k"] = "demo"
    path: str | None = Field(
        default=None, description="Local file/folder under an allowed root (not for 'demo')"
    )
    repeat: int = Field(default=1, ge=1, le=100, description="Epochs of this source in the mixture")

    @model_validator(mode="after")
    def _path(self) -> SFTSource:
        if self.kind != "demo" and not self.path:
            raise field_error(("path",), f"sft source kind {self.kind!r} needs a local path", None)
        return self


class SFTSpec(_Strict):
    num_iterations: int | None = Field(default=None, ge=1, description="None = one pass over the mixture")
    device_batch_size: int | None = Field(default=None, ge=1, description="None = batch.device_batch_size")
    sources: list[SFTSource] = Field(default_factory=lambda: [SFTSource()], min_length=1)


class HardwareSpec(_Strict):
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per node; 0 = CPU")
    nodes: int = Field(default=1, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _cpu(self) -> HardwareSpec:
        if self.device == "cuda" and self.gpus == 0:
            raise field_error(("gpus",), "hardware.device 'cuda' needs gpus >= 1", self.gpus)
        if self.nodes > 1 and (self.device == "cpu" or self.gpus == 0):
            raise field_error(("nodes",), "multi-node training needs GPUs", self.nodes)
        return self

    @property
    def world_size(self) -> int:
        return max(1, self.gpus) * self.nodes


class JobSpec(_Strict):
    kind: JobKind = "pipeline"
    name: str | None = Field(default=None, max_length=200, description="Free-form label")
    stages: list[StageName] | None = Field(
        default=None, description="Stages to run; None = the kind's default"
    )
    parent_job_id: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9-]+$",
        description="Job whose run folder supplies the tokenizer/checkpoints when this job does not pretrain",
    )
    model: ModelSpec = Field(default_factory=lambda: ModelSpec())
    data: DataSpec = Field(default_factory=lambda: DataSpec())
    tokenizer: TokenizerSpec = Field(default_factory=lambda: TokenizerSpec())
    horizon: HorizonSpec = Field(default_factory=lambda: HorizonSpec())
    hardware: HardwareSpec = Field(default_factory=lambda: HardwareSpec())
    batch: BatchSpec = Field(default_factory=lambda: BatchSpec())
    optim: OptimSpec = Field(default_factory=lambda: OptimSpec())
    eval: EvalSpec = Field(default_factory=lambda: EvalSpec())
    checkpoint: CheckpointSpec = Field(default_factory=lambda: CheckpointSpec())
    sft: SFTSpec = Field(default_factory=lambda: SFTSpec())
    seed: int = Field(default=42, ge=0, le=2**32 - 1)

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("stages must not be empty (omit it for the kind's default)")
        if len(set(v)) != len(v):
            raise ValueError(f"stages lists a stage twice: {v}")
        if v != sorted(v, key=STAGES.index):
            raise ValueError(f"stages must be in pipeline order {list(STAGES)}, got {v}")
        return v

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> JobSpec:
        if self.stages is None:
            object.__setattr__(self, "stages", list(DEFAULT_STAGES[self.kind]))
        stages = set(self.stages or ())
        if "pretrain" not in stages and stages & _NEEDS_MODEL and not self.parent_job_id:
            raise field_error(
                ("parent_job_id",),
                f"stages {sorted(stages & _NEEDS_MODEL)} need a model: add 'pretrain' or give parent_job_id",
                None,
            )
        if self.tokenizer.vocab_size is not None and self.tokenizer.vocab_size != self.model.vocab_size:
            raise field_error(
                ("tokenizer", "vocab_size"),
                f"tokenizer.vocab_size ({self.tokenizer.vocab_size}) "
                f"must equal model.vocab_size ({self.model.vocab_size})",
                self.tokenizer.vocab_size,
            )
        self._check_batch()
        self._check_paths(info)
        self._check_fits()
        return self

    def _check_batch(self) -> None:
        total = self.batch.total_batch_size
        if total is None:
            return
        micro = self.batch.device_batch_size * self.model.sequence_len * self.hardware.world_size
        if total % micro:
            raise field_error(
                ("batch", "total_batch_size"),
                f"total_batch_size ({total} tokens) must be a multiple of device_batch_size x "
                f"sequence_len x GPUs = {micro}",
                total,
            )

    def _check_paths(self, info: ValidationInfo) -> None:
        roots = _allowed_roots(info)
        checks: list[tuple[tuple[str | int, ...], str | None]] = [(("data", "path"), self.data.path)]
        checks += [(("sft", "sources", i, "path"), s.path) for i, s in enumerate(self.sft.sources)]
        for loc, raw in checks:
            if raw is None:
                continue
            try:
                resolve_under_roots(raw, roots)
            except PathEscapeError as e:
                raise field_error(loc, str(e), raw) from None

    def _check_fits(self) -> None:
        per_gpu = training_memory_floor(self.model, self.hardware.world_size)
        if per_gpu > MAX_DEVICE_MEMORY_BYTES:
            raise field_error(
                ("model", "depth"),
                f"depth {self.model.depth} needs at least {per_gpu / 1e9:.0f} GB per GPU for "
                f"weights, gradients and optimizer state over {self.hardware.world_size} GPU(s); "
                f"no supported accelerator has more than {MAX_DEVICE_MEMORY_BYTES / 1e9:.0f} GB",
                self.model.depth,
            )

    def resolved_stages(self) -> list[str]:
        return list(self.stages or DEFAULT_STAGES[self.kind])


def _allowed_roots(info: ValidationInfo | None) -> list[Path]:
    ctx = (info.context if info is not None else None) or {}
    if "roots" in ctx:
        return [Path(r) for r in ctx["roots"]]
    from shared.settings import get_settings

    s = get_settings()
    return [s.home, *s.data_roots]


def training_memory_floor(model: ModelSpec, world_size: int = 1) -> int:
    """Bytes per GPU that training needs before any activation: weights + grads + sharded state.
    Uses the parameter formula in shared/nanochat/sizing.py (no model is allocated)."""
    from shared.nanochat.sizing import param_breakdown

    try:
        total = int(param_breakdown(model.gpt_config())["total"])
    except ValueError as e:
        raise field_error(("model",), str(e), None) from None
    return total * _BYTES_WEIGHTS_AND_GRADS + math.ceil(total * _BYTES_OPTIMIZER_STATE / max(1, world_size))


def demo_spec(**overrides: Any) -> JobSpec:
    """The tiny demo pipeline: finishes on 2 CPU cores in a few minutes (what `ncp demo` submits)."""
    data: dict[str, Any] = {
        "kind": "pipeline",
        "name": "demo",
        "model": {
            "depth": 2,
            "aspect_ratio": 64,
            "head_dim": 64,
            "window_pattern": "L",
            "sequence_len": 256,
            "vocab_size": 1024,
        },
        "data": {"source": "demo", "num_shards": 4},
        "tokenizer": {"vocab_size": 1024, "max_chars": 2_000_000},
        "horizon": {"num_iterations": 40},
        "hardware": {"gpus": 0, "nodes": 1, "device": "cpu"},
        "batch": {"device_batch_size": 4, "total_batch_size": 4 * 256},
        "optim": {"warmup_steps": 4},
        "eval": {"every": 20, "tokens": 4 * 256 * 4, "core_max_per_task": 8, "chat_max_per_task": 8},
        "checkpoint": {"every": 20, "keep_last": 2},
        "sft": {"num_iterations": 10, "device_batch_size": 4, "sources": [{"kind": "demo"}]},
        "seed": 42,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return JobSpec.model_validate(data)


PRESETS = {"demo": demo_spec}

# The request body of POST /jobs is a job spec; the name follows the API's schema families
# (JobCreate in, JobPublic/JobsPublic out).
JobCreate = JobSpec
