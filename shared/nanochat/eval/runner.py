"""What the eval stage runs: a checkpoint folder in, a results JSON (and dict) out.

`run_base_eval`: val bits-per-byte on the validation shard, CORE on an eval bundle (the project's
fixture bundle unless one is given), and greedy completions of fixed prompts.
`run_chat_eval`: the chat tasks (fixture files unless a dataset folder is given), ChatCORE, and
answers to fixed chat prompts. Both rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from shared.nanochat.checkpoint import build_model, checkpoint_meta, model_config_from_meta
from shared.nanochat.tokenizer import Tokenizer, check_vocab_fits, prompt_ids
from shared.nanochat.train_config import EVAL_TOKENS

BASE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The built-in function len()",
    "def add(a, b):",
    "If 5*x + 3 = 13, then x is",
)
CHAT_PROMPTS = (
    "Hi! Who are you?",
    "What does the Python built-in len() do?",
    "What is 12 times 7?",
)


def _device(name: str) -> torch.device:
    from shared.nanochat.device import detect_device

    return torch.device(detect_device(name).type)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a results file


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def load_checked(ckpt_dir, step, tokenizer_dir, device):
    """(model, meta, tokenizer) once the tokenizer is known to belong to the checkpoint: a
    mismatch is refused, naming both vocab sizes, before any weights are read."""
    tokenizer = Tokenizer.load(Path(tokenizer_dir))
    meta = checkpoint_meta(ckpt_dir, step)
    config = model_config_from_meta(meta, ckpt_dir)
    check_vocab_fits(
        tokenizer,
        config.vocab_size,
        tokenizer_name=str(tokenizer_dir),
        model_name=f"{ckpt_dir} step {meta['step']}",
    )
    model, meta = build_model(ckpt_dir, meta["step"], device=device)
    return model, meta, tokenizer


def _greedy(engine, tokenizer, ids: list[int], max_tokens: int) -> str:
    seqs, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0)
    return tokenizer.decode(seqs[0][len(ids) :])


def val_bpb(model, tokenizer, data_dir: Path, *, batch_size: int, seq_len: int, tokens: int, device) -> float:
    """Bits per byte over about `tokens` tokens of the validation split."""
    from shared.nanochat.dataloader import PretrainLoader
    from shared.nanochat.eval.bpb import evaluate_bpb
    from shared.nanochat.tokenizer import token_bytes

    steps = max(1, tokens // (batch_size * seq_len))
    loader = PretrainLoader(data_dir, tokenizer, batch_size, seq_len, split="val", device=device)
    try:
        pairs = ((x, y) for x, y, _ in loader)
        return evaluate_bpb(model, pairs, steps, token_bytes(tokenizer).to(device))
    finally:
        loader.close()


def run_base_eval(
    ckpt_dir,
    step,
    tokenizer_dir,
    data_dir,
    out_dir,
    *,
    bundle_dir=None,
    max_per_task=None,
    device="auto",
    bpb_tokens: int = EVAL_TOKENS,
    bpb_batch_size: int = 8,
    sample_tokens: int = 16,
) -> dict:
    """{"kind": "base", "step", "val_bpb", "core": {...}, "samples": [...]} -> out_dir/base_eval_<step>.json"""
    from shared.nanochat.engine import Engine
    from shared.nanochat.eval.core import evaluate_core
    from shared.nanochat.eval.fixtures import write_fixture_bundle

    if bpb_tokens < 1 or bpb_batch_size < 1:
        raise ValueError(f"bpb_tokens/bpb_batch_size: must be >= 1, got {bpb_tokens}, {bpb_batch_size}")
    t0 = time.time()
    dev = _device(device)
    out_dir = Path(out_dir)
    model, meta, tokenizer = load_checked(ckpt_dir, step, tokenizer_dir, dev)
    seq_len = model.config.sequence_len
    bpb = val_bpb(
        model,
        tokenizer,
        Path(data_dir),
        batch_size=bpb_batch_size,
        seq_len=seq_len,
        tokens=bpb_tokens,
        device=dev,
    )
    if bundle_dir is None:
        bundle_dir = write_fixture_bundle(out_dir / "fixture_bundle")
    core = evaluate_core(model, tokenizer, Path(bundle_dir), max_per_task=max_per_task)
    engine = Engine(model, tokenizer)
    samples = [
        {
            "prompt": p,
            "completion": _greedy(engine, tokenizer, prompt_ids(tokenizer, p), sample_tokens),
        }
        for p in BASE_PROMPTS
    ]
    result = {
        "kind": "base",
        "checkpoint_dir": str(ckpt_dir),
        "step": meta["step"],
        "val_bpb": _finite(bpb),
        "core": core,
        "bundle_dir": str(bundle_dir),
        "samples": samples,
        "seconds": time.time() - t0,
    }
    _write_json(out_dir / f"base_eval_{meta['step']:06d}.json", result)
    return result


def run_chat_eval(
    ckpt_dir,
    step,
    tokenizer_dir,
    out_dir,
    *,
    tasks_dir=None,
    tasks=None,
    max_per_task=None,
    device="auto",
    num_samples: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> dict:
    """{"kind": "chat", "step", "tasks": {...}, "chatcore", "samples"} -> out_dir/chat_eval_<step>.json"""
    from shared.nanochat.chat_format import render_for_completion
    from shared.nanochat.engine import Engine
    from shared.nanochat.eval.chat import ChatEvalConfig, evaluate_chat
    from shared.nanochat.eval.fixtures import write_fixture_chat_tasks
    from shared.nanochat.eval.tasks import CHAT_TASKS

    cfg = ChatEvalConfig(
        tasks=tuple(tasks) if tasks else tuple(CHAT_TASKS),
        max_per_task=max_per_task,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
    )
    t0 = time.time()
    dev = _device(device)
    out_dir = Path(out_dir)
    model, meta, tokenizer = load_checked(ckpt_dir, step, tokenizer_dir, dev)
    if tasks_dir is None:
        tasks_dir = write_fixture_chat_tasks(out_dir / "fixture_chat_tasks")
    engine = Engine(model, tokenizer)
    res = evaluate_chat(model, tokenizer, Path(tasks_dir), cfg, engine=engine)
    chat_samples = []
    for p in CHAT_PROMPTS:
        ids = render_for_completion(tokenizer, {"messages": [{"role": "user", "content": p}]})
        chat_samples.append({"prompt": p, "completion": _greedy(engine, tokenizer, ids, 48)})
    result = {
        "kind": "chat",
        "checkpoint_dir": str(ckpt_dir),
        "step": meta["step"],
        "tasks": res["tasks"],
        "chatcore": res["chatcore"],
        "chatcore_complete": res["chatcore_complete"],
        "failed": res["failed"],
        "tasks_dir": str(tasks_dir),
        "samples": chat_samples,
        "task_samples": res["samples"],
        "seconds": time.time() - t0,
    }
    _write_json(out_dir / f"chat_eval_{meta['step']:06d}.json", result)
    return result
