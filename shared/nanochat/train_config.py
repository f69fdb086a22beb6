"""TrainConfig: every knob of one pretraining run, validated once, importable without torch.

The job spec (shared/jobs/spec.py) reads its training defaults from this class, so the API (which
has no torch) and the trainer agree on every number: each default lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

# torch._scaled_mm needs every GEMM dimension divisible by 16 (fp8.py imports it from here: this
# module must stay importable without torch).
FP8_ALIGN = 16

if TYPE_CHECKING:
    from shared.nanochat.optim import OptimizerConfig

# Validation tokens per bits-per-byte evaluation: the reference base_train's --eval-tokens. The
# eval stage's runner uses the same number.
EVAL_TOKENS = 80 * 524288
# What a run started from another run's checkpoint does with that checkpoint's optimizer state.
RESUME_OPTIMIZER = ("saved", "fresh")


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str
    tokenizer_dir: str
    checkpoint_dir: str
    # model shape
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    window_pattern: str = "SSSL"
    n_kv_head: int | None = None
    # horizon, in order of precedence: num_iterations, target_flops, target_param_data_ratio
    num_iterations: int | None = None
    target_flops: float | None = None
    target_param_data_ratio: float = 12.0
    # batch
    device_batch_size: int = 32
    total_batch_size: int | None = None  # tokens per step; None = auto (sizing)
    # optimizer and schedule
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.28
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    # evaluation and checkpoints
    eval_every: int = 250  # steps; 0 = only at the end
    eval_tokens: int = EVAL_TOKENS
    # A long run must survive a crash, so checkpoints are periodic by default (the reference
    # saves only at the end); retention keeps the disk bounded.
    save_every: int = 1000  # steps; 0 = only at the end (and on stop)
    keep_last: int = 3  # complete checkpoints kept; 0 = all
    milestone_every: int = 0  # steps whose checkpoints retention never deletes
    resume: bool = True  # continue from the newest complete checkpoint in checkpoint_dir
    resume_from_step: int | None = None  # ... or from exactly this one
    # Start from another run's checkpoint (a registered model, issue #13) when this run has none of
    # its own: its own newest checkpoint always wins, so a crashed continuation resumes itself.
    # The step counter, LR schedule, data position and loop state start fresh for this run.
    init_checkpoint_dir: str | None = None
    init_step: int | None = None  # None = newest complete checkpoint in init_checkpoint_dir
    # "saved": load the init checkpoint's optimizer state, resharded when it was written by another
    # number of ranks (and refuse to start when it has none); "fresh": weights only.
    resume_optimizer: str = "saved"
    # runtime
    device: str = "auto"  # auto | cuda | rocm | mps | cpu
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    compile: bool | None = None  # None = on GPU only
    attn_backend: str = "auto"
    fp8: bool = False  # transformer-block matmuls in FP8 while training (fp8.py); eval stays bf16
    seed: int = 42
    log_every: int = 1  # steps between progress events

    def __post_init__(self) -> None:
        for name in ("data_dir", "tokenizer_dir", "checkpoint_dir"):
            v = getattr(self, name)
            if not isinstance(v, (str, Path)) or not str(v):
                raise ValueError(f"TrainConfig.{name} must be a non-empty path, got {v!r}")
            object.__setattr__(self, name, str(v))
        positive = (
            "depth",
            "aspect_ratio",
            "head_dim",
            "max_seq_len",
            "device_batch_size",
            "eval_tokens",
            "log_every",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {v!r}")
        non_negative = ("warmup_steps", "eval_every", "save_every", "keep_last", "milestone_every", "seed")
        for name in non_negative:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {v!r}")
        for name in ("num_iterations", "total_batch_size", "n_kv_head", "resume_from_step"):
            v = getattr(self, name)
            low = 0 if name == "resume_from_step" else 1
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ValueError(f"TrainConfig.{name} must be None or an integer >= {low}, got {v!r}")
        if self.init_checkpoint_dir is not None and (
            not isinstance(self.init_checkpoint_dir, (str, Path)) or not str(self.init_checkpoint_dir)
        ):
            raise ValueError(
                f"TrainConfig.init_checkpoint_dir must be None or a non-empty path, got {self.init_checkpoint_dir!r}"
            )
        if self.init_checkpoint_dir is not None:
            object.__setattr__(self, "init_checkpoint_dir", str(self.init_checkpoint_dir))
        if self.init_step is not None:
            if not isinstance(self.init_step, int) or isinstance(self.init_step, bool) or self.init_step < 0:
                raise ValueError(
                    f"TrainConfig.init_step must be None or an integer >= 0, got {self.init_step!r}"
                )
            if self.init_checkpoint_dir is None:
                raise ValueError("TrainConfig.init_step needs init_checkpoint_dir (the run it is a step of)")
        if self.resume_optimizer not in RESUME_OPTIMIZER:
            raise ValueError(
                f"TrainConfig.resume_optimizer must be one of {list(RESUME_OPTIMIZER)}, got {self.resume_optimizer!r}"
            )
        if self.target_flops is not None and not self.target_flops > 0:
            raise ValueError(f"TrainConfig.target_flops must be None or > 0, got {self.target_flops!r}")
        if self.num_iterations is None and self.target_flops is None and not self.target_param_data_ratio > 0:
            raise ValueError("TrainConfig.target_param_data_ratio must be > 0 when no other horizon is set")
        if (
            not isinstance(self.window_pattern, str)
            or not self.window_pattern
            or set(self.window_pattern.upper()) - {"S", "L"}
        ):
            raise ValueError(f"TrainConfig.window_pattern must be letters S/L, got {self.window_pattern!r}")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ValueError(f"TrainConfig.warmdown_ratio must be in [0, 1], got {self.warmdown_ratio}")
        if not 0 <= self.final_lr_frac <= 1:
            raise ValueError(f"TrainConfig.final_lr_frac must be in [0, 1], got {self.final_lr_frac}")
        if self.device not in ("auto", "cuda", "rocm", "mps", "cpu"):
            raise ValueError(f"TrainConfig.device must be auto/cuda/rocm/mps/cpu, got {self.device!r}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"TrainConfig.dtype must be auto/bfloat16/float16/float32, got {self.dtype!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"TrainConfig.compile must be true, false or null, got {self.compile!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"TrainConfig.fp8 must be true or false, got {self.fp8!r}")
        if self.fp8 and (self.device_batch_size * self.max_seq_len) % FP8_ALIGN:
            # FP8 GEMMs need every dimension, the B*T rows included, divisible by 16.
            raise ValueError(
                f"TrainConfig.fp8 needs device_batch_size * max_seq_len divisible by {FP8_ALIGN}, "
                f"got {self.device_batch_size} * {self.max_seq_len}"
            )
        self.optimizer_config()  # LRs and weight decay validated where they are defined

    def optimizer_config(self) -> OptimizerConfig:
        # Imported here: the optimizer module needs torch, this class must not (the API reads it).
        from shared.nanochat.optim import OptimizerConfig

        return OptimizerConfig(
            embedding_lr=self.embedding_lr,
            unembedding_lr=self.unembedding_lr,
            matrix_lr=self.matrix_lr,
            scalar_lr=self.scalar_lr,
            weight_decay=self.weight_decay,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise ValueError(f"TrainConfig.from_dict needs an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {unknown}")
        missing = sorted(n for n in ("data_dir", "tokenizer_dir", "checkpoint_dir") if n not in d)
        if missing:
            raise ValueError(f"TrainConfig: missing required field(s) {missing}")
        return cls(**d)
