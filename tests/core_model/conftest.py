"""Small models for the model tests: a few layers, GQA, sliding windows, all features active."""

from __future__ import annotations

import pytest
import torch

from shared.nanochat.config import GPTConfig
from shared.nanochat.gpt import GPT


@pytest.fixture(autouse=True)
def _one_thread():
    # Two cores shared by many test processes.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_config(**kw) -> GPTConfig:
    base = dict(
        sequence_len=64, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL"
    )
    base.update(kw)
    return GPTConfig(**base)


def tiny_model(seed: int = 0, *, perturb: bool = True, **kw) -> GPT:
    """A tiny GPT. `perturb` moves the zero-initialised pieces (output projections, smear_lambda)
    off zero so every feature actually changes the output."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    model.init_weights()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("c_proj.weight"):
                    p.normal_(0.0, 0.05)
            model.smear_lambda.fill_(0.7)
            model.backout_lambda.fill_(0.3)
    model.eval()
    return model


@pytest.fixture
def make_config():
    return tiny_config


@pytest.fixture
def make_model():
    return tiny_model
