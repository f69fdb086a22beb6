"""SFTConfig: every knob of one supervised fine-tuning run, validated once, importable without torch.

The job spec (shared/jobs/spec.py) reads its SFT defaults from this class (the API has no torch),
so each default lives here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from shared.nanochat.train_config import FP8_ALIGN

# What an SFT run trains on: the reference mixture read from a Hub-layout folder (SmolTalk + MMLU
# + GSM8K), generated demo conversations, or only the user's JSONL files.
MIXTURES = ("default", "demo", "jsonl")


@dataclass(frozen=True)
class SFTConfig:
    base_checkpoint_dir: str
    tokenizer_dir: str
    out_dir: str  # chatsft_checkpoints/<tag>
    base_step: int | None = None  # None = newest complete base checkpoint
    # data
    mixture: str = "demo"  # default (SmolTalk + MMLU x3 + GSM8K x4) | demo | jsonl
    tasks_dir: str | None = None  # Hub-layout dataset folder for the default mixture
    conversations: tuple[str, ...] = ()  # user JSONL files, added to the mixture
    smoltalk_epochs: int = 1  # repeats of each default-mixture component; 0 = leave it out
    mmlu_epochs: int = 3
    gsm8k_epochs: int = 4
    val_fraction: float = 0.05  # conversations held out for val bpb
    # horizon and batch
    num_iterations: int = -1  # -1 = one epoch of the mixture
    device_batch_size: int = 4
    max_seq_len: int | None = None  # None = the base model's sequence_len
    grad_accum_steps: int = 1
    # optimization; None = the base run's value, else the reference default
    embedding_lr: float | None = None
    unembedding_lr: float | None = None
    matrix_lr: float | None = None
    scalar_lr: float | None = None
    init_lr_frac: float = 0.8
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0
    weight_decay: float = 0.0
    load_optimizer: bool = True
    # cadence
    eval_every: int = 0  # steps; 0 = only at the end
    eval_batches: int = 4
    checkpoint_every: int = 0  # steps; 0 = only at the end
    log_every: int = 1
    resume: bool = True  # continue from the newest checkpoint in out_dir if there is one
    device: str = "auto"
    compile: bool | None = None  # torch.compile the training forward; None = on GPU only
    fp8: bool = False  # transformer-block matmuls in FP8 while training (fp8.py); eval stays bf16
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("base_checkpoint_dir", "tokenizer_dir", "out_dir"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        if self.mixture not in MIXTURES:
            raise ValueError(f"mixture: {self.mixture!r} is not one of {MIXTURES}")
        if self.mixture == "default" and not self.tasks_dir:
            raise ValueError("tasks_dir: required by the default mixture")
        if self.mixture == "jsonl" and not self.conversations:
            raise ValueError("conversations: the jsonl mixture needs at least one file")
        if isinstance(self.conversations, (str, list)):
            conv = (self.conversations,) if isinstance(self.conversations, str) else tuple(self.conversations)
            object.__setattr__(self, "conversations", conv)
        if self.num_iterations == 0 or self.num_iterations < -1:
            raise ValueError(f"num_iterations: must be >= 1 or -1 (one epoch), got {self.num_iterations}")
        for name in ("device_batch_size", "grad_accum_steps", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("smoltalk_epochs", "mmlu_epochs", "gsm8k_epochs", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.max_seq_len is not None and self.max_seq_len < 8:
            raise ValueError(f"max_seq_len: must be >= 8, got {self.max_seq_len}")
        if self.base_step is not None and self.base_step < 0:
            raise ValueError(f"base_step: must be >= 0, got {self.base_step}")
        for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}: must be positive, got {v}")
        if not 0 < self.init_lr_frac <= 1:
            raise ValueError(f"init_lr_frac: must be in (0, 1], got {self.init_lr_frac}")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ValueError(f"warmdown_ratio: must be in [0, 1], got {self.warmdown_ratio}")
        if not 0 <= self.final_lr_frac <= 1:
            raise ValueError(f"final_lr_frac: must be in [0, 1], got {self.final_lr_frac}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.device not in ("auto", "cuda", "rocm", "mps", "cpu"):
            raise ValueError(f"device: must be auto/cuda/rocm/mps/cpu, got {self.device!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"compile: must be true, false or null, got {self.compile!r}")
        if not isinstance(self.fp8, bool):
            raise ValueError(f"fp8: must be true or false, got {self.fp8!r}")
        if (
            self.fp8
            and self.max_seq_len is not None
            and (self.device_batch_size * self.max_seq_len) % FP8_ALIGN
        ):
            raise ValueError(
                f"fp8: needs device_batch_size * max_seq_len divisible by {FP8_ALIGN}, "
                f"got {self.device_batch_size} * {self.max_seq_len}"
            )
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conversations"] = list(self.conversations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SFTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SFTConfig: unknown fields {unknown}")
        d = dict(d)
        if "conversations" in d:
            d["conversations"] = tuple(d["conversations"])
        return cls(**d)
