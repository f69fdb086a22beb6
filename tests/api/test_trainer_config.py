"""JobSpec -> TrainConfig / SFTConfig: one mapping per trainer, and one definition per default.

A spec with every default must map to exactly the trainer's defaults (the spec reads them from the
trainer's config class; this fails the day someone restates a number in one place only), and every
knob the spec has must reach the trainer.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from shared.jobs.spec import JobSpec
from shared.jobs.trainer_config import pretrain_config, sft_config
from shared.nanochat.sft_config import SFTConfig
from shared.nanochat.train_config import EVAL_TOKENS, TrainConfig

PATHS = {"data_dir": Path("/d"), "tokenizer_dir": Path("/t"), "checkpoint_dir": Path("/c")}


def _pretrain(spec: JobSpec) -> TrainConfig:
    return pretrain_config(spec, resume=True, **PATHS)


def test_default_spec_maps_to_the_trainer_defaults():
    assert _pretrain(JobSpec()) == TrainConfig(**{k: str(v) for k, v in PATHS.items()}, resume=True)


def test_default_sft_spec_maps_to_the_sft_defaults():
    spec = JobSpec.model_validate({"kind": "sft", "parent_job_id": "p-1"})
    cfg = sft_config(spec, tokenizer_dir=Path("/t"), base_dir=Path("/b"), out_dir=Path("/o"), resume=True)
    assert cfg == SFTConfig(base_checkpoint_dir="/b", tokenizer_dir="/t", out_dir="/o", resume=True)


def test_validation_tokens_have_one_definition():
    from shared.nanochat.eval.runner import run_base_eval

    assert JobSpec().eval.tokens == TrainConfig.__dataclass_fields__["eval_tokens"].default == EVAL_TOKENS
    assert inspect.signature(run_base_eval).parameters["bpb_tokens"].default == EVAL_TOKENS
    assert EVAL_TOKENS == 80 * 2**19  # the reference base_train's --eval-tokens


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("model", "depth", 3, "depth"),
        ("model", "aspect_ratio", 32, "aspect_ratio"),
        ("model", "head_dim", 64, "head_dim"),
        ("model", "sequence_len", 512, "max_seq_len"),
        ("model", "window_pattern", "L", "window_pattern"),
        ("model", "n_kv_head", 1, "n_kv_head"),
        ("model", "fp8", True, "fp8"),
        ("horizon", "num_iterations", 77, "num_iterations"),
        ("horizon", "target_flops", 1e15, "target_flops"),
        ("horizon", "target_param_data_ratio", 8.0, "target_param_data_ratio"),
        ("batch", "device_batch_size", 8, "device_batch_size"),
        ("batch", "total_batch_size", 8 * 2048 * 4, "total_batch_size"),
        ("optim", "embedding_lr", 0.1, "embedding_lr"),
        ("optim", "unembedding_lr", 0.01, "unembedding_lr"),
        ("optim", "matrix_lr", 0.03, "matrix_lr"),
        ("optim", "scalar_lr", 0.4, "scalar_lr"),
        ("optim", "weight_decay", 0.1, "weight_decay"),
        ("optim", "warmup_steps", 3, "warmup_steps"),
        ("optim", "warmdown_ratio", 0.5, "warmdown_ratio"),
        ("eval", "every", 10, "eval_every"),
        ("eval", "tokens", 4096, "eval_tokens"),
        ("checkpoint", "every", 7, "save_every"),
        ("checkpoint", "keep_last", 9, "keep_last"),
        ("hardware", "device", "cpu", "device"),
    ],
)
def test_every_training_knob_reaches_the_trainer(section, key, value, field):
    data: dict = {section: {key: value}}
    if section == "hardware":
        data["hardware"]["gpus"] = 0
    cfg = _pretrain(JobSpec.model_validate(data))
    assert getattr(cfg, field) == value
    assert getattr(_pretrain(JobSpec()), field) != value  # the case tests a change


def test_fp8_is_for_pretraining_only():
    spec = JobSpec.model_validate({"kind": "pipeline", "model": {"fp8": True}})
    assert _pretrain(spec).fp8 is True
    sft = sft_config(spec, tokenizer_dir=Path("/t"), base_dir=Path("/b"), out_dir=Path("/o"), resume=False)
    assert sft.fp8 is False  # SFT (and evaluation) stay bf16 whatever the spec says


def test_seed_reaches_both_trainers():
    spec = JobSpec.model_validate({"seed": 5, "kind": "sft", "parent_job_id": "p"})
    assert _pretrain(spec).seed == 5
    assert (
        sft_config(spec, tokenizer_dir=Path("/t"), base_dir=Path("/b"), out_dir=Path("/o"), resume=False).seed
        == 5
    )


def test_sft_sources_select_the_mixture(tmp_path):
    (tmp_path / "convs.jsonl").write_text("{}\n")
    spec = JobSpec.model_validate(
        {
            "kind": "sft",
            "parent_job_id": "p",
            "sft": {
                "num_iterations": 12,
                "device_batch_size": 2,
                "sources": [
                    {"kind": "mmlu", "path": str(tmp_path)},
                    {"kind": "gsm8k", "path": str(tmp_path), "repeat": 2},
                ],
            },
        },
        context={"roots": [tmp_path]},
    )
    cfg = sft_config(
        spec,
        tokenizer_dir=Path("/t"),
        base_dir=Path("/b"),
        out_dir=Path("/o"),
        resume=False,
        tasks_dir=tmp_path,
    )
    default = SFTConfig.__dataclass_fields__
    assert cfg.mixture == "default" and cfg.tasks_dir == str(tmp_path)
    assert cfg.mmlu_epochs == default["mmlu_epochs"].default  # named without repeat: the default
    assert cfg.gsm8k_epochs == 2 and cfg.smoltalk_epochs == 0  # not named: left out
    assert cfg.num_iterations == 12 and cfg.device_batch_size == 2
    jsonl = JobSpec.model_validate(
        {
            "kind": "sft",
            "parent_job_id": "p",
            "sft": {"sources": [{"kind": "conversations", "path": str(tmp_path / "convs.jsonl")}]},
        },
        context={"roots": [tmp_path]},
    )
    cfg = sft_config(
        jsonl, tokenizer_dir=Path("/t"), base_dir=Path("/b"), out_dir=Path("/o"), resume=False,
        conversations=[tmp_path / "convs.jsonl"],
    )  # fmt: skip
    assert cfg.mixture == "jsonl" and cfg.conversations == (str(tmp_path / "convs.jsonl"),)
