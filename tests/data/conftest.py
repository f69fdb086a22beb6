"""Fixtures of the data area: a small demo corpus and a tokenizer trained on it, built once."""

from __future__ import annotations

import pytest

from shared.nanochat.corpus import iter_shard_texts, split_shards
from shared.nanochat.demo_corpus import write_demo_corpus
from shared.nanochat.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_corpus")
    write_demo_corpus(out, num_shards=3, max_bytes=400_000)
    return out


@pytest.fixture(scope="session")
def tok(demo_dir, tmp_path_factory):
    train, _ = split_shards(demo_dir)
    return train_tokenizer(iter_shard_texts(train), vocab_size=512, out_dir=tmp_path_factory.mktemp("tok"))
