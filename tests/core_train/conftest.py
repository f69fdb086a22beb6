"""Shared fixtures for the trainer tests: a tiny offline corpus, a tokenizer trained on it inside
the test session (hermetic: nothing from ~/.cache), and a tiny-model TrainConfig factory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_corpus, tiny_train_config

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(data_dir, tokenizer_dir): 2 train shards + 1 validation shard, vocab 512."""
    return tiny_corpus(tmp_path_factory.mktemp("core_train_corpus"), max_bytes=400_000)


@pytest.fixture
def tiny_config(corpus, tmp_path):
    """TrainConfig factory for the tiny model (tests/tiny.py) on T=64 (2 micro-batches/step)."""
    data, tok = corpus

    def make(**overrides):
        paths = {"data_dir": data, "tokenizer_dir": tok, "checkpoint_dir": tmp_path / "ckpt"}
        paths.update({k: overrides.pop(k) for k in list(paths) if k in overrides})
        return tiny_train_config(**paths, **overrides)

    return make
