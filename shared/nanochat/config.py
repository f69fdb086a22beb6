"""GPTConfig: the shape of a nanochat model, and how it is derived from a single `depth`.

The field names and defaults mirror the reference's `GPTConfig` so a reference checkpoint's
`meta_*.json["model_config"]` loads with `GPTConfig.from_dict` unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

# The nanochat tokenizer has 256 byte tokens plus 9 special tokens at minimum.
NUM_SPECIAL_TOKENS = 9
MIN_VOCAB_SIZE = 256 + NUM_SPECIAL_TOKENS
# Matrices are padded to a multiple of this (tensor-core friendly); logits are cropped back.
VOCAB_PAD_MULTIPLE = 64
# Short windows are rounded up to the attention kernels' tile size.
WINDOW_TILE = 128
WINDOW_CHARS = "SL"


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    # Tiled over layers; S = short (about a quarter of the context), L = full. Last layer is always L.
    window_pattern: str = "SSSL"

    def __post_init__(self) -> None:
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"GPTConfig.vocab_size must be >= {MIN_VOCAB_SIZE} (256 bytes + {NUM_SPECIAL_TOKENS} "
                f"special tokens), got {self.vocab_size}"
            )
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2 != 0:
            # RoPE rotates channel pairs.
            raise ValueError(f"GPTConfig.n_embd / n_head must be even for RoPE, got {self.head_dim}")
        if not isinstance(self.window_pattern, str) or not self.window_pattern:
            raise ValueError(
                f"GPTConfig.window_pattern must be a non-empty string, got {self.window_pattern!r}"
            )
        bad = sorted({c for c in self.window_pattern.upper() if c not in WINDOW_CHARS})
        if bad:
            raise ValueError(
                f"GPTConfig.window_pattern {self.window_pattern!r} has unknown letter(s) {bad}; use only S and L"
            )

    # --- derived shape ---------------------------------------------------------------------------
    @classmethod
    def from_depth(
        cls,
        depth: int,
        *,
        vocab_size: int = 32768,
        sequence_len: int = 2048,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        n_kv_head: int | None = None,
        window_pattern: str = "SSSL",
    ) -> GPTConfig:
        """The reference's sizing: width grows linearly with depth, rounded up to whole heads."""
        for name, value in (("depth", depth), ("aspect_ratio", aspect_ratio), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
        n_head = model_dim // head_dim
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head if n_kv_head is None else n_kv_head,
            n_embd=model_dim,
            window_pattern=window_pattern,
        )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def short_window(self) -> int:
        return -(-self.sequence_len // 4 // WINDOW_TILE) * WINDOW_TILE

    def window_sizes(self) -> list[int]:
        """Left window per layer (FA convention: a query at t sees keys t-w..t); full = sequence_len."""
        pattern = self.window_pattern.upper()
        per_char = {"L": self.sequence_len, "S": min(self.short_window, self.sequence_len)}
        sizes = [per_char[pattern[i % len(pattern)]] for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return sizes

    def has_value_embed(self, layer: int) -> bool:
        """Alternating layers, aligned so the last layer always has one."""
        return layer % 2 == (self.n_layer - 1) % 2

    @property
    def backout_layer(self) -> int:
        return self.n_layer // 2

    # --- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig.from_dict: unknown field(s) {unknown}")
        return cls(**d)
