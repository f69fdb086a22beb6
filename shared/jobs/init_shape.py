"""A job that starts from a model (`init`) takes the model's shape from the checkpoint.

The checkpoint's meta (`model_config`) is the truth: a spec that gives a model-shape field
explicitly must agree with it (else the job is refused at submit, naming both values); fields the
spec leaves out are filled in from the checkpoint, so the stored spec describes the model the job
really trains or evaluates, and its checkpoint folder tag (d<depth>) is the model's.

Torch-free on purpose: the API runs this at submit and the API has no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shared.jobs.spec import JobSpec, field_error

META_FILE = "meta_{step:06d}.json"  # the checkpoint layout of shared/nanochat/checkpoint.py


def read_model_config(checkpoint_dir: Path, step: int) -> dict[str, Any]:
    """`model_config` of checkpoint `step` in `checkpoint_dir`, read from its meta JSON only."""
    path = Path(checkpoint_dir) / META_FILE.format(step=step)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable checkpoint meta ({e})") from e
    cfg = meta.get("model_config") if isinstance(meta, dict) else None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: meta has no 'model_config' object")
    return cfg


def model_fields_of(model_config: dict[str, Any], source: str) -> dict[str, Any]:
    """The ModelSpec fields (depth, aspect_ratio, ...) that give exactly `model_config`."""
    try:
        depth, n_embd, n_head = (int(model_config[k]) for k in ("n_layer", "n_embd", "n_head"))
        n_kv_head = int(model_config.get("n_kv_head") or n_head)
        seq, vocab = int(model_config["sequence_len"]), int(model_config["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: model_config lacks a shape field ({e})") from None
    head_dim = n_embd // n_head
    # model_dim = ceil(depth * aspect_ratio / head_dim) * head_dim (GPTConfig.from_depth); the
    # largest aspect ratio that does not overshoot n_embd reproduces it whenever any does.
    aspect = n_embd // depth
    if head_dim * n_head != n_embd or math.ceil(depth * aspect / head_dim) * head_dim != n_embd:
        raise ValueError(
            f"{source}: width {n_embd} with {n_head} heads at depth {depth} is not a depth x aspect "
            "ratio model the platform can describe"
        )
    return {
        "depth": depth,
        "aspect_ratio": aspect,
        "head_dim": head_dim,
        "n_kv_head": None if n_kv_head == n_head else n_kv_head,
        "window_pattern": str(model_config.get("window_pattern") or "L").upper(),
        "sequence_len": seq,
        "vocab_size": vocab,
    }


def _disagreement(spec: JobSpec, name: str, theirs: dict[str, Any]) -> tuple[Any, Any] | None:
    """(spec's value, checkpoint's value) when the explicitly given field `name` contradicts."""
    m = spec.model
    depth, head_dim = theirs["depth"], theirs["head_dim"]

    def width(aspect_ratio: int) -> int:
        return math.ceil(depth * aspect_ratio / head_dim) * head_dim

    if name == "aspect_ratio":  # only its effect, the width, is in the checkpoint
        return (
            (m.aspect_ratio, theirs["aspect_ratio"])
            if width(m.aspect_ratio) != width(theirs["aspect_ratio"])
            else None
        )
    if name == "n_kv_head":
        heads = width(theirs["aspect_ratio"]) // head_dim
        mine, ckpt = m.n_kv_head or heads, theirs["n_kv_head"] or heads
        return (mine, ckpt) if mine != ckpt else None
    mine = getattr(m, name)
    if name == "window_pattern":
        mine = mine.upper()
    return (mine, theirs[name]) if mine != theirs[name] else None


def apply_checkpoint_shape(spec: JobSpec, model_config: dict[str, Any], source: str) -> JobSpec:
    """`spec` with its model shape taken from `model_config` (the init checkpoint's). A shape
    field the spec gives explicitly and that contradicts the checkpoint raises a ValidationError at
    that field naming both values; `source` says which checkpoint (model, phase, step)."""
    theirs = model_fields_of(model_config, source)
    for name in sorted(spec.model.model_fields_set):
        bad = _disagreement(spec, name, theirs)
        if bad is not None:
            raise field_error(
                ("model", name),
                f"model.{name} is {bad[0]} but {source} has {bad[1]}: the checkpoint's shape is the "
                f"model's; leave model.{name} out to take it",
                bad[0],
            )
    tok_vocab = spec.tokenizer.vocab_size
    if tok_vocab is not None and tok_vocab != theirs["vocab_size"]:
        raise field_error(
            ("tokenizer", "vocab_size"),
            f"tokenizer.vocab_size is {tok_vocab} but {source} has vocab_size {theirs['vocab_size']}",
            tok_vocab,
        )
    data = spec.model_dump(mode="json")
    data["model"] = theirs
    return JobSpec.model_validate(data, context={"check_paths": False})
