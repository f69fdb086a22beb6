"""A job that starts from a registered model (`init`): which checkpoint each stage reads, the
tokenizer/model check, and the model's shape taken from the checkpoint.

Which checkpoint: a stage reads the model only when the job does not make it itself. Base readers
(pretrain's starting point, base_eval and sft when the job does not pretrain) read the model's
`base` phase; chat readers (chat_eval, export, serve when the job neither pretrains nor runs SFT)
read its `sft` phase when it has one, else `base`; `init.phase` overrides both. The tokenizer is
always the model's (the spec refuses a tokenizer stage next to init).

The tokenizer must fit every checkpoint the job reads (vocab size, special-token ids:
tokenizer.check_vocab_fits); the API checks it at submit and every stage again before it works, so
a mismatch is refused before any work starts, naming both sizes.

Shape: the checkpoint's meta (`model_config`) is the truth: a spec that gives a model-shape field
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

from pydantic import ValidationError
from sqlalchemy.orm import Session

from shared.db import model_registry
from shared.db.model_registry import CheckpointNotFound, ModelNotFound, ModelRef
from shared.jobs.spec import InitSpec, JobSpec, field_error

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


# --- which checkpoint ------------------------------------------------------------------------------
BASE_READERS = frozenset({"pretrain", "base_eval", "sft"})
CHAT_READERS = frozenset({"chat_eval", "export", "serve"})


def reads_model(spec: JobSpec, reader: str) -> bool:
    """Whether the job's `reader` ("base" | "chat") stages read the init model (rather than what
    the job itself trains)."""
    stages = set(spec.resolved_stages())
    if spec.init is None:
        return False
    if reader == "base":
        return "pretrain" in stages or bool(stages & BASE_READERS)
    return not stages & {"pretrain", "sft"} and bool(stages & CHAT_READERS)


def resolve_init(session: Session, init: InitSpec, reader: str) -> ModelRef:
    """The checkpoint of `init.model` that a `reader` ("base" | "chat") stage reads; raises the
    registry's ModelNotFound / CheckpointNotFound naming the model, phase and existing steps."""
    phase = init.phase
    if phase is None:
        phase = "base"
        if reader == "chat" and model_registry.steps(
            model_registry.require_model(session, init.model), "sft"
        ):
            phase = "sft"
    return model_registry.resolve_checkpoint(session, init.model, phase, init.step_or_none)


def describe(ref: ModelRef) -> str:
    return f"model {ref.name!r} {ref.phase} step {ref.step}"


def check_tokenizer_fits(ref: ModelRef) -> int:
    """The checkpoint's vocab size, once the model's tokenizer is known to fit it (else a
    ValueError naming both sizes or the special-token ids). No weights are read."""
    from shared.nanochat.tokenizer import Tokenizer, check_vocab_fits

    if ref.tokenizer_dir is None:
        raise ValueError(
            f"{describe(ref)} has no tokenizer (it was imported without tokenizer/tokenizer.pkl): "
            "training, eval, SFT, export and serving need one"
        )
    vocab = int(read_model_config(ref.checkpoint_dir, ref.step)["vocab_size"])
    check_vocab_fits(
        Tokenizer.load(ref.tokenizer_dir),
        vocab,
        tokenizer_name=f"{ref.tokenizer_dir} of model {ref.name!r}",
        # check_vocab_fits says "model <model_name>": the name and checkpoint, not describe()'s "model ...".
        model_name=f"{ref.name!r} ({ref.phase} step {ref.step})",
    )
    return vocab


def prepare_init_spec(session: Session, spec: JobSpec) -> JobSpec:
    """At submit: `spec` with its model shape from the init checkpoint, after checking that every
    checkpoint the job reads exists and fits the model's tokenizer. Refusals are ValidationErrors
    located at the field to change (init.model, init.step, init.phase, model.*)."""
    init = spec.init
    if init is None:
        return spec
    refs = []
    for reader in ("base", "chat"):
        if not reads_model(spec, reader):
            continue
        try:
            ref = resolve_init(session, init, reader)
        except ModelNotFound as e:
            raise field_error(("init", "model"), f"init.model: {e}", init.model) from None
        except CheckpointNotFound as e:
            loc = ("init", "step") if init.step_or_none is not None else ("init", "phase")
            raise field_error(loc, f"init: {e}", init.step) from None
        try:
            check_tokenizer_fits(ref)
        except (OSError, ValueError) as e:
            raise field_error(("init", "model"), f"init.model: {e}", init.model) from None
        refs.append(ref)
    if not refs:  # a job whose stages make their own model reads none of the init model's
        return spec
    try:
        return apply_checkpoint_shape(
            spec, read_model_config(refs[0].checkpoint_dir, refs[0].step), describe(refs[0])
        )
    except ValidationError:
        raise
    except ValueError as e:
        raise field_error(("init", "model"), f"init.model: {e}", init.model) from None
