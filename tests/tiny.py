"""The one tiny model the tests train: small enough for two CPU cores, real in every part.

Depth 2, width 64 (aspect ratio 32), one head of 64 channels, full attention (window "L"), a
512-token BPE vocabulary trained in the test on the offline demo corpus. `tiny_train_config` is
the trainer's config for it, `tiny_spec` a job spec of it for the platform tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_MODEL = {"depth": 2, "aspect_ratio": 32, "head_dim": 64, "window_pattern": "L"}
TINY_VOCAB = 512


def tiny_corpus(root: Path, *, max_bytes: int = 300_000, seed: int = 0) -> tuple[Path, Path]:
    """(data_dir, tokenizer_dir) under `root`: 2 train shards + 1 validation shard, vocab 512."""
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.demo_corpus import write_demo_corpus
    from shared.nanochat.tokenizer import train_tokenizer

    data, tok = root / "data", root / "tokenizer"
    write_demo_corpus(data, num_shards=3, seed=seed, max_bytes=max_bytes)
    train_tokenizer(iter_shard_texts(split_shards(data)[0]), vocab_size=TINY_VOCAB, out_dir=tok)
    return data, tok


def tiny_train_config(data_dir: Path, tokenizer_dir: Path, checkpoint_dir: Path, **overrides: Any) -> Any:
    """The TrainConfig of the tiny model: T=64, 4 rows per micro-batch, 2 micro-batches per step."""
    from shared.nanochat.train_config import TrainConfig

    kw: dict[str, Any] = {
        **TINY_MODEL,
        "data_dir": str(data_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "max_seq_len": 64,
        "device_batch_size": 4,
        "total_batch_size": 512,
        "num_iterations": 10,
        "warmup_steps": 2,
        "eval_every": 0,
        "eval_tokens": 1024,
        "device": "cpu",
        "seed": 1234,
    }
    kw.update(overrides)
    return TrainConfig(**kw)


def tiny_spec(**overrides: Any) -> dict[str, Any]:
    """A pretraining job of the tiny model (data, tokenizer, pretrain) as JSON; sections merge."""
    spec: dict[str, Any] = {
        "kind": "pretrain",
        "name": "tiny",
        "stages": ["data", "tokenizer", "pretrain"],
        "model": {**TINY_MODEL, "sequence_len": 64, "vocab_size": TINY_VOCAB},
        "data": {"source": "demo", "num_shards": 3},
        "tokenizer": {"vocab_size": TINY_VOCAB, "max_chars": 300_000},
        "horizon": {"num_iterations": 12},
        "hardware": {"gpus": 0, "nodes": 1, "device": "cpu"},
        "batch": {"device_batch_size": 4, "total_batch_size": 256},
        "optim": {"warmup_steps": 2},
        "eval": {"every": 0, "tokens": 1024, "core_max_per_task": 4, "chat_max_per_task": 2},
        "checkpoint": {"every": 4, "keep_last": 10},
        "seed": 7,
    }
    for k, v in overrides.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    return spec
