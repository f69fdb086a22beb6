"""JobSpec: what `POST /jobs` accepts, validated once, with errors that name the offending field.

A spec says what to run (kind and stages) and every knob of the run: model shape, data source,
tokenizer, training horizon, batch, optimizer, eval and checkpoint cadence, SFT data, hardware and
seed. Unknown fields are refused (extra="forbid") so a typo never silently falls back to a default;
types are strict (`true` is not a depth, "4" is not a count), every integer fits the registry's
columns, floats are finite and strings carry no NUL byte.

Training defaults are not restated here: each knob the trainer also has reads its default from
`TrainConfig` / `SFTConfig` (shared/nanochat/train_config.py, sft_config.py), and
`shared/jobs/trainer_config.py` maps a spec onto those classes in one function per trainer.
Derived numbers (batch size from depth, iteration count from a data ratio, learning-rate scaling)
are NOT computed here: the trainer derives them in shared/nanochat/sizing.py; None means "auto".

Filesystem checks (local paths under the allowed roots, and existing) run when a spec is
submitted. The roots come from the validation context `{"roots": [...]}` when given, else from
`get_settings()`; a spec read back from the registry (`JobSpec.from_stored`) is validated with
`{"check_paths": False}` and skips them: the stage that reads the files checks every file again,
symlinks followed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.db.models import JobKind
from shared.jobs.spec_fields import (
    MAX_JSON_INT,
    Count,
    StageName,
    Strict,
    Text,
    config_default,
    field_error,
    sft_default,
    train_default,
)
from shared.jobs.spec_origin import ImportSpec, InitSpec, ResumeSpec
from shared.jobs.stages import DEFAULT_STAGES, NEEDS_MODEL, SELECTABLE_STAGES, check_stage_selection
from shared.nanochat.config import GPTConfig
from shared.nanochat.train_config import FP8_ALIGN
from shared.paths import PathEscapeError, resolve_existing_source

# Training memory per parameter that does not depend on batch size: fp32 master weights (4 bytes)
# and gradients (4) on every GPU, optimizer state (Adam moments / Muon momentum, about 8) sharded
# over all GPUs. Activations come on top, so a model over this floor cannot fit at any batch size.
_BYTES_WEIGHTS_AND_GRADS = 8
_BYTES_OPTIMIZER_STATE = 8
# The largest accelerator the platform targets (MI325X, 256 GB); MI300X has 192 GB, H100 80 GB.
MAX_DEVICE_MEMORY_BYTES = 256 * 10**9
# Hub-layout SFT source kind -> the SFTConfig field holding its epochs in the default mixture.
HUB_EPOCH_FIELDS = {"smoltalk": "smoltalk_epochs", "mmlu": "mmlu_epochs", "gsm8k": "gsm8k_epochs"}


class ModelSpec(Strict):
    """Model shape from a single depth, as in the reference (width = depth * aspect_ratio)."""

    depth: int = Field(default=train_default("depth"), ge=1, le=256, description="Transformer layers")
    aspect_ratio: int = Field(
        default=train_default("aspect_ratio"), ge=1, le=1024, description="model_dim ~= depth * aspect_ratio"
    )
    head_dim: int = Field(
        default=train_default("head_dim"), ge=8, le=512, description="Channels per attention head (even)"
    )
    n_kv_head: int | None = Field(
        default=train_default("n_kv_head"), ge=1, le=4096, description="Key/value heads (GQA); None = n_head"
    )
    window_pattern: Text = Field(
        default=train_default("window_pattern"),
        pattern=r"^[SLsl]+$",
        max_length=64,
        description="Sliding-window pattern tiled over layers: S short, L long",
    )
    sequence_len: int = Field(default=train_default("max_seq_len"), ge=16, le=131072)
    vocab_size: int = Field(
        default=config_default(GPTConfig, "vocab_size"),
        ge=265,
        le=1 << 20,
        description="Tokenizer vocabulary incl. 9 specials",
    )
    fp8: bool = Field(
        default=train_default("fp8"),
        description="Pretrain the transformer-block matmuls in FP8 (TrainConfig.fp8; needs an FP8 GPU, "
        f"and batch.device_batch_size * model.sequence_len divisible by {FP8_ALIGN}). Pretraining "
        "only: SFT and evaluation always run in bf16, and checkpoints hold ordinary weights",
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

    def gpt_config(self) -> GPTConfig:
        """The GPTConfig this spec describes (shared/nanochat/config.py)."""
        return GPTConfig.from_depth(
            self.depth,
            vocab_size=self.vocab_size,
            sequence_len=self.sequence_len,
            aspect_ratio=self.aspect_ratio,
            head_dim=self.head_dim,
            n_kv_head=self.n_kv_head,
            window_pattern=self.window_pattern.upper(),
        )


class DataSpec(Strict):
    source: Literal["demo", "local", "remote"] = "demo"
    path: Text | None = Field(
        default=None,
        max_length=4096,
        description="local: the corpus (file, folder or glob) under an allowed root; it must exist",
    )
    repo: Text | None = Field(
        default=None, max_length=256, description="remote: Hugging Face dataset repo id"
    )
    base_url: Text | None = Field(
        default=None, max_length=2048, description="remote: base URL of the shard files"
    )
    num_shards: int | None = Field(
        default=None,
        ge=2,
        le=100_000,
        description="Shards incl. the last (validation) one; None = default/all",
    )
    text_column: Text = Field(default="text", min_length=1, max_length=128)

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


class TokenizerSpec(Strict):
    vocab_size: int | None = Field(default=None, ge=265, le=1 << 20, description="None = model.vocab_size")
    max_chars: int = Field(
        default=2_000_000_000,
        ge=1000,
        le=MAX_JSON_INT,
        description="Characters of corpus to train the BPE on",
    )


class HorizonSpec(Strict):
    """How long to pretrain: at most one of the three; none = TrainConfig's target_param_data_ratio."""

    num_iterations: Count | None = Field(default=train_default("num_iterations"), ge=1)
    target_param_data_ratio: float | None = Field(
        default=None,
        gt=0,
        le=10_000,
        description=f"None = {train_default('target_param_data_ratio')} unless another horizon is set",
    )
    target_flops: float | None = Field(default=train_default("target_flops"), gt=0, le=1e30)

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


class BatchSpec(Strict):
    device_batch_size: int = Field(
        default=train_default("device_batch_size"),
        ge=1,
        le=4096,
        description="Sequences per GPU per micro-step",
    )
    total_batch_size: Count | None = Field(
        default=train_default("total_batch_size"), ge=1, description="Tokens per optimizer step; None = auto"
    )


class OptimSpec(Strict):
    embedding_lr: float = Field(default=train_default("embedding_lr"), gt=0, le=10)
    unembedding_lr: float = Field(default=train_default("unembedding_lr"), gt=0, le=10)
    matrix_lr: float = Field(default=train_default("matrix_lr"), gt=0, le=10)
    scalar_lr: float = Field(default=train_default("scalar_lr"), gt=0, le=10)
    weight_decay: float = Field(
        default=train_default("weight_decay"),
        ge=0,
        le=10,
        description="Muon weight decay at depth 12; scaled with depth and batch by the trainer",
    )
    warmup_steps: Count = Field(default=train_default("warmup_steps"), ge=0)
    warmdown_ratio: float = Field(default=train_default("warmdown_ratio"), ge=0, le=1)


class EvalSpec(Strict):
    every: Count = Field(
        default=train_default("eval_every"),
        ge=0,
        description="Validation bpb every N steps; 0 = only at the end",
    )
    tokens: int = Field(
        default=train_default("eval_tokens"),
        ge=1,
        le=MAX_JSON_INT,
        description="Validation tokens per bpb evaluation (training and the base_eval stage)",
    )
    core_max_per_task: Count | None = Field(
        default=500, ge=1, description="CORE examples per task; None = all"
    )
    chat_max_per_task: Count | None = Field(
        default=None, ge=1, description="Chat-eval problems per task; None = all"
    )


class CheckpointSpec(Strict):
    every: Count = Field(
        default=train_default("save_every"),
        ge=0,
        description="Save every N steps (and at the end); 0 = only at the end",
    )
    keep_last: int = Field(default=train_default("keep_last"), ge=1, le=1000)


class SFTSource(Strict):
    kind: Literal["demo", "conversations", "smoltalk", "mmlu", "gsm8k"] = "demo"
    path: Text | None = Field(
        default=None,
        max_length=4096,
        description="Local file/folder under an allowed root (not for 'demo'); it must exist",
    )
    repeat: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="Epochs of this source in the mixture; None = SFTConfig's default for the kind",
    )

    @model_validator(mode="after")
    def _path(self) -> SFTSource:
        if self.kind != "demo" and not self.path:
            raise field_error(("path",), f"sft source kind {self.kind!r} needs a local path", None)
        if self.kind == "demo" and self.path:
            raise field_error(("path",), "sft source kind 'demo' reads no path", self.path)
        return self


class SFTSpec(Strict):
    num_iterations: Count | None = Field(default=None, ge=1, description="None = one pass over the mixture")
    device_batch_size: int = Field(default=sft_default("device_batch_size"), ge=1, le=4096)
    sources: list[SFTSource] = Field(default_factory=lambda: [SFTSource()], min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_tasks_dir(self) -> SFTSpec:
        # The Hub-layout sources are subfolders of one dataset folder (smol-smoltalk/, mmlu/, gsm8k/).
        hub = [(i, s) for i, s in enumerate(self.sources) if s.kind in HUB_EPOCH_FIELDS]
        for i, s in hub[1:]:
            if s.path != hub[0][1].path:
                raise field_error(
                    ("sources", i, "path"),
                    f"smoltalk/mmlu/gsm8k sources read one dataset folder; got {hub[0][1].path!r} and "
                    f"{s.path!r}",
                    s.path,
                )
        return self


class HardwareSpec(Strict):
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per node; 0 = CPU")
    nodes: int = Field(default=1, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = train_default("device")

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


class JobSpec(Strict):
    # `import` is a Python keyword: the field is `import_`, spelled "import" in JSON both ways.
    model_config = ConfigDict(**Strict.model_config, serialize_by_alias=True)

    kind: JobKind = "pipeline"
    name: Text | None = Field(default=None, max_length=200, description="Free-form label")
    stages: list[StageName] | None = Field(
        default=None,
        max_length=len(SELECTABLE_STAGES),
        description="Stages to run, in pipeline order; None = the kind's default",
        json_schema_extra={"items": {"type": "string", "enum": list(SELECTABLE_STAGES)}},
    )
    parent_job_id: Text | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9-]+$",
        description="Job whose run folder supplies the tokenizer/checkpoints when this job does not pretrain",
    )
    init: InitSpec | None = Field(
        default=None,
        description="Registered model that supplies the tokenizer/checkpoints (instead of parent_job_id); "
        "with 'pretrain' in the stages, pretraining continues from its checkpoint",
    )
    resume: ResumeSpec = Field(default_factory=lambda: ResumeSpec())
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
    seed: int = Field(default=train_default("seed"), ge=0, le=2**32 - 1)
    import_: ImportSpec | None = Field(
        default=None, alias="import", description="kind 'import' only: the model to import"
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            check_stage_selection(v)
        return v

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> JobSpec:
        if self.stages is None:
            # A job starting from a model uses that model's tokenizer: the kind's default stages
            # lose their tokenizer stage (an explicit list that names it is refused below).
            # It also has no corpus: a default list that trains or measures validation bpb gets
            # the data stage (first in pipeline order).
            chosen = list(DEFAULT_STAGES[self.kind])
            if self.init is not None:
                chosen = [s for s in chosen if s != "tokenizer"]
                if {"pretrain", "base_eval"} & set(chosen) and "data" not in chosen:
                    chosen.insert(0, "data")
            object.__setattr__(self, "stages", chosen)
        stages = set(self.stages or ())
        self._check_import(stages)
        if self.init is not None:
            self._check_init(stages)
        elif "pretrain" not in stages and stages & NEEDS_MODEL and not self.parent_job_id:
            raise field_error(
                ("parent_job_id",),
                f"stages {sorted(stages & NEEDS_MODEL)} need a model: add 'pretrain' or give "
                "parent_job_id or init",
                None,
            )
        if self.tokenizer.vocab_size is not None and self.tokenizer.vocab_size != self.model.vocab_size:
            raise field_error(
                ("tokenizer", "vocab_size"),
                f"tokenizer.vocab_size ({self.tokenizer.vocab_size}) "
                f"must equal model.vocab_size ({self.model.vocab_size})",
                self.tokenizer.vocab_size,
            )
        ctx = (info.context if info is not None else None) or {}
        if ctx.get("check_paths", True):
            self._check_paths(_allowed_roots(ctx))
        if not self.shape_pending:  # checked once the init checkpoint's shape is filled in
            self._check_batch()
            self._check_fp8()
            self._check_fits()
        return self

    def _check_import(self, stages: set[str]) -> None:
        if self.kind == "import":
            if self.import_ is None:
                raise field_error(("import",), "kind 'import' needs import: {source, path, name}", None)
            if stages != {"import"}:
                raise field_error(("stages",), "kind 'import' runs the one stage ['import']", self.stages)
        elif "import" in stages:
            raise field_error(("kind",), "stage 'import' runs only in a job of kind 'import'", self.kind)
        elif self.import_ is not None:
            raise field_error(("import",), "only a job of kind 'import' reads the import section", None)

    @property
    def shape_pending(self) -> bool:
        """A job on a registered model whose spec does not state the model's shape yet: it is taken
        from the checkpoint at submit (shared/jobs/init_model.py), which validates the spec again."""
        return self.init is not None and "sequence_len" not in self.model.model_fields_set

    def _check_init(self, stages: set[str]) -> None:
        assert self.init is not None
        if self.parent_job_id is not None:
            raise field_error(
                ("init",),
                "give either init or parent_job_id, not both: each names where the model comes from",
                self.parent_job_id,
            )
        if "tokenizer" in stages:
            raise field_error(
                ("stages",),
                f"init.model {self.init.model!r} brings its own tokenizer: drop the 'tokenizer' stage "
                "(a retrained tokenizer would not match the model's embeddings)",
                self.stages,
            )
        reads_data = stages & {"pretrain", "base_eval"}
        if reads_data and "data" not in stages:
            raise field_error(
                ("stages",),
                f"stages {sorted(reads_data)} read a corpus (training batches / validation bpb) and a "
                "model from init has none: add the 'data' stage",
                self.stages,
            )

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

    def _check_fp8(self) -> None:
        # TrainConfig refuses the same, but only once the trainer starts: refuse at submit instead.
        rows = self.batch.device_batch_size * self.model.sequence_len
        if self.model.fp8 and rows % FP8_ALIGN:
            raise field_error(
                ("model", "fp8"),
                f"model.fp8 needs batch.device_batch_size x model.sequence_len divisible by {FP8_ALIGN} "
                f"(FP8 matmuls need every dimension aligned); got {self.batch.device_batch_size} x "
                f"{self.model.sequence_len} = {rows}",
                self.model.fp8,
            )

    def local_paths(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(field location, raw path) of every local path the spec names."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        if self.data.source == "local" and self.data.path:
            found.append((("data", "path"), self.data.path))
        for i, s in enumerate(self.sft.sources):
            if s.path is not None:
                found.append((("sft", "sources", i, "path"), s.path))
        if self.import_ is not None:
            found.append((("import", "path"), self.import_.path))
        return found

    def _check_paths(self, roots: list[Path]) -> None:
        for loc, raw in self.local_paths():
            try:
                resolved = resolve_existing_source(raw, roots)
            except (PathEscapeError, FileNotFoundError) as e:
                raise field_error(loc, str(e), raw) from None
            except OSError as e:  # a name too long for the filesystem, a folder we may not read
                raise field_error(loc, f"path {raw[:200]!r} cannot be checked: {e.strerror}", raw) from None
            if loc == ("import", "path") and not resolved.is_dir():
                raise field_error(loc, f"path {raw!r} is not a directory (a nanochat base dir)", raw)

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

    @property
    def checkpoint_tag(self) -> str:
        """The checkpoint folder name of this spec's model (the reference layout: d12/)."""
        return f"d{self.model.depth}"

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> JobSpec:
        """A spec read back from the registry: validated on submit, so no filesystem checks."""
        return cls.model_validate(data, context={"check_paths": False})


def _allowed_roots(ctx: dict[str, Any]) -> list[Path]:
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
