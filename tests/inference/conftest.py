"""Tiny exported nanochat model shared by the inference tests (built once per session).

depth 2 would leave windows untested, so the model has 4 layers with pattern "SL" and a
256-token context: layers 0 and 2 use a 128-token sliding window that prompts of ~200 tokens
exercise. head_dim 64 (vLLM's CPU attention needs 32/64/128...). Weights are the reference init
plus noise, so every path (smear, value embeddings, gates, lambdas, backout) changes the output.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch

from shared.nanochat.checkpoint import save_checkpoint
from shared.nanochat.config import GPTConfig
from shared.nanochat.export import export_model
from shared.nanochat.gpt import GPT
from shared.nanochat.tokenizer import train_tokenizer


def tiny_corpus() -> list[str]:
    # Python's own source: plenty of varied text, shipped with the interpreter (hermetic).
    return [inspect.getsource(m) for m in (json.decoder, json.encoder, textwrap, inspect)]


def build_tiny_run(root: Path) -> dict:
    torch.manual_seed(0)
    tok_dir = root / "tokenizer"
    tok = train_tokenizer(tiny_corpus(), vocab_size=512, out_dir=tok_dir)
    cfg = GPTConfig(
        sequence_len=256,
        vocab_size=tok.vocab_size,
        n_layer=4,
        n_head=2,
        n_kv_head=2,
        n_embd=128,
        window_pattern="SL",
    )
    model = GPT(cfg, compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "lambda" in name else 0.05))
    ckpt_dir = root / "base_checkpoints" / "d4"
    save_checkpoint(ckpt_dir, 3, model.state_dict(), None, {"model_config": cfg.to_dict()})
    export_dir = export_model(ckpt_dir, None, tok_dir, root / "export", served_name="tiny", dtype="float32")
    return {"tokenizer_dir": tok_dir, "ckpt_dir": ckpt_dir, "export_dir": export_dir, "config": cfg}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"))
