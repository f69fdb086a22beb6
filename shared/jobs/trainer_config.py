"""JobSpec -> trainer config: one function per trainer, the only place spec names meet config names.

`pretrain_config` builds the `TrainConfig` and `sft_config` the `SFTConfig` of a job. What the spec
leaves as None (batch size, horizon) is left out, so the trainer's own default applies and derived
numbers are computed once, in sizing.py. The vocabulary size is not passed: the trainer sizes the
model from the tokenizer it loads. Paths are the worker's business (where the run folder is, which
files the roots allow); they come in already resolved.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.jobs.spec import HUB_EPOCH_FIELDS, JobSpec, sft_default
from shared.nanochat.sft_config import SFTConfig
from shared.nanochat.train_config import TrainConfig


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def pretrain_config(
    spec: JobSpec,
    *,
    data_dir: Path,
    tokenizer_dir: Path,
    checkpoint_dir: Path,
    resume: bool,
    init: tuple[Path, int] | None = None,
) -> TrainConfig:
    """The TrainConfig (shared/nanochat/train_config.py) a job spec describes. `init`: the
    (checkpoint dir, step) of the init model that pretraining continues from."""
    m, hz, b, o = spec.model, spec.horizon, spec.batch, spec.optim
    return TrainConfig(
        data_dir=str(data_dir),
        tokenizer_dir=str(tokenizer_dir),
        checkpoint_dir=str(checkpoint_dir),
        depth=m.depth,
        aspect_ratio=m.aspect_ratio,
        head_dim=m.head_dim,
        max_seq_len=m.sequence_len,
        window_pattern=m.window_pattern.upper(),
        n_kv_head=m.n_kv_head,
        fp8=m.fp8,  # pretraining only: sft_config never sets SFTConfig.fp8
        device_batch_size=b.device_batch_size,
        total_batch_size=b.total_batch_size,
        embedding_lr=o.embedding_lr,
        unembedding_lr=o.unembedding_lr,
        matrix_lr=o.matrix_lr,
        scalar_lr=o.scalar_lr,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps,
        warmdown_ratio=o.warmdown_ratio,
        eval_every=spec.eval.every,
        eval_tokens=spec.eval.tokens,
        save_every=spec.checkpoint.every,
        keep_last=spec.checkpoint.keep_last,
        resume=resume,
        init_checkpoint_dir=str(init[0]) if init is not None else None,
        init_step=init[1] if init is not None else None,
        resume_optimizer=spec.resume.optimizer,
        device=spec.hardware.device,
        seed=spec.seed,
        **_given(
            {
                "num_iterations": hz.num_iterations,
                "target_flops": hz.target_flops,
                "target_param_data_ratio": hz.target_param_data_ratio,
            }
        ),
    )


def sft_config(
    spec: JobSpec,
    *,
    tokenizer_dir: Path,
    base_dir: Path,
    out_dir: Path,
    resume: bool,
    base_step: int | None = None,
    conversations: Sequence[Path] = (),
    tasks_dir: Path | None = None,
) -> SFTConfig:
    """The SFTConfig (shared/nanochat/sft_config.py) a job spec describes.

    Spec sources map onto the SFT mixtures: `demo` (generated conversations), `conversations`
    (user JSONL files, added to the mixture: `conversations` are their resolved paths), and the
    Hub-layout task folders (`smoltalk`, `mmlu`, `gsm8k`, one folder: `tasks_dir`) which select the
    reference's default mixture read from that folder.
    """
    kinds = {s.kind for s in spec.sft.sources}
    mixture: dict[str, Any]
    hub = [s for s in spec.sft.sources if s.kind in HUB_EPOCH_FIELDS]
    if hub:
        if tasks_dir is None:
            raise ValueError("sft_config: the spec names Hub-layout SFT sources but no tasks_dir was given")
        # A mixture component the spec does not name gets 0 epochs: SFTConfig's defaults would
        # otherwise make SFT look for folders the user never provided. A named one without
        # `repeat` keeps SFTConfig's default epochs.
        repeats = {s.kind: s.repeat for s in hub}
        epochs = {
            field: (repeats[kind] or sft_default(field)) if kind in repeats else 0
            for kind, field in HUB_EPOCH_FIELDS.items()
        }
        mixture = {"mixture": "default", "tasks_dir": str(tasks_dir), **epochs}
    else:
        mixture = {"mixture": "demo" if "demo" in kinds else "jsonl"}
    return SFTConfig(
        base_checkpoint_dir=str(base_dir),
        base_step=base_step,
        tokenizer_dir=str(tokenizer_dir),
        out_dir=str(out_dir),
        conversations=tuple(str(c) for c in conversations),
        device_batch_size=spec.sft.device_batch_size,
        resume=resume,
        # "fresh" starts SFT without the base run's momenta; "saved" takes them when they fit.
        load_optimizer=spec.resume.optimizer == "saved",
        device=spec.hardware.device,
        seed=spec.seed,
        **mixture,
        **_given({"num_iterations": spec.sft.num_iterations}),
    )
