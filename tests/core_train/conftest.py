"""Shared fixtures for the trainer tests: a tiny offline corpus, a tokenizer trained on it inside
the test session (hermetic: nothing from ~/.cache), and a tiny-model TrainConfig factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(data_dir, tokenizer_dir): 2 train shards + 1 validation shard, vocab 512."""
    from shared.nanochat.corpus import iter_shard_texts, split_shards
    from shared.nanochat.demo_corpus import write_demo_corpus
    from shared.nanochat.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("core_train_corpus")
    data = root / "data"
    write_demo_corpus(data, num_shards=3, seed=0, max_bytes=400_000)
    train_shards, _ = split_shards(data)
    train_tokenizer(iter_shard_texts(train_shards), vocab_size=512, out_dir=root / "tokenizer")
    return data, root / "tokenizer"


@pytest.fixture
def tiny_config(corpus, tmp_path):
    """TrainConfig factory for a depth-2, width-64, head_dim-64 model on T=64 (2 micro-batches/step)."""
    from shared.nanochat.train import TrainConfig

    data, tok = corpus

    def make(**overrides) -> TrainConfig:
        kw = dict(
            data_dir=str(data),
            tokenizer_dir=str(tok),
            checkpoint_dir=str(tmp_path / "ckpt"),
            depth=2,
            aspect_ratio=32,
            head_dim=64,
            max_seq_len=64,
            window_pattern="L",
            device_batch_size=4,
            total_batch_size=512,
            num_iterations=10,
            warmup_steps=2,
            eval_every=0,
            eval_tokens=1024,
            device="cpu",
            seed=1234,
        )
        kw.update(overrides)
        return TrainConfig(**kw)

    return make
