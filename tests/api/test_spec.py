"""JobSpec validation: every refusal names the offending field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.jobs.spec import JobSpec, demo_spec, training_memory_floor
from shared.jobs.stages import DEFAULT_STAGES, PIPELINE_STAGES


def bad_field(data: dict, roots: list[Path] | None = None) -> tuple[str, str]:
    ctx = {"roots": roots} if roots is not None else None
    with pytest.raises(ValidationError) as ei:
        JobSpec.model_validate(data, context=ctx)
    err = ei.value.errors()[0]
    return ".".join(str(p) for p in err["loc"]), err["msg"]


def test_defaults_per_kind():
    assert JobSpec().stages == list(PIPELINE_STAGES)
    assert "import" not in PIPELINE_STAGES  # a stage of its own kind, never part of a pipeline
    assert JobSpec(kind="pretrain").stages == list(DEFAULT_STAGES["pretrain"])
    spec = JobSpec.model_validate({"kind": "sft", "parent_job_id": "abc-123"})
    assert spec.stages == ["sft", "chat_eval"]


def test_fp8_refused_at_submit_when_the_batch_rows_are_not_aligned():
    from shared.nanochat.train_config import FP8_ALIGN, TrainConfig

    data = {"model": {"fp8": True, "sequence_len": 17}, "batch": {"device_batch_size": 3}}
    field, msg = bad_field(data)
    assert field == "model.fp8"
    assert "batch.device_batch_size" in msg and "model.sequence_len" in msg and str(FP8_ALIGN) in msg
    # The trainer would refuse the same numbers: the spec only moves the refusal to submit time.
    with pytest.raises(ValueError, match="fp8"):
        TrainConfig(
            data_dir="d", tokenizer_dir="t", checkpoint_dir="c", fp8=True, device_batch_size=3, max_seq_len=17
        )
    # Aligned rows (3 x 32) or FP8 off: accepted.
    assert JobSpec.model_validate({**data, "model": {"fp8": True, "sequence_len": 32}}).model.fp8 is True
    assert JobSpec.model_validate({**data, "model": {"fp8": False, "sequence_len": 17}}).model.fp8 is False


def test_demo_preset_is_tiny_and_cpu():
    spec = demo_spec()
    assert 2 <= spec.model.depth <= 4 and spec.model.head_dim == 64
    assert 512 <= spec.model.vocab_size <= 2048
    assert spec.hardware.device == "cpu" and spec.hardware.gpus == 0
    assert spec.horizon.num_iterations is not None and spec.horizon.num_iterations <= 100
    # The preset round-trips through JSON unchanged (what the CLI sends is what the API stores).
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"model": {"depth": 4, "layers": 3}}, "model.layers"),
        ({"model": {"depth": 0}}, "model.depth"),
        ({"model": {"depth": "deep"}}, "model.depth"),
        ({"model": {"depth": 4, "head_dim": 63}}, "model.head_dim"),
        ({"model": {"depth": 4, "window_pattern": "SXL"}}, "model.window_pattern"),
        ({"model": {"depth": 4, "n_kv_head": 3}}, "model.n_kv_head"),
        ({"model": {"fp8": "true"}}, "model.fp8"),
        ({"model": {"fp8": 1}}, "model.fp8"),
        ({"horizon": {"num_iterations": -5}}, "horizon.num_iterations"),
        ({"horizon": {"num_iterations": 10, "target_flops": 1e18}}, "horizon.target_flops"),
        ({"checkpoint": {"every": -1}}, "checkpoint.every"),
        ({"batch": {"device_batch_size": 0}}, "batch.device_batch_size"),
        ({"batch": {"device_batch_size": 4, "total_batch_size": 1000}}, "batch.total_batch_size"),
        ({"tokenizer": {"vocab_size": 4096}}, "tokenizer.vocab_size"),
        ({"kind": "sft"}, "parent_job_id"),
        ({"stages": ["pretrain", "data"]}, "stages"),
        ({"stages": []}, "stages"),
        ({"stages": ["data", "train"]}, "stages.1"),
        ({"kind": "finetune"}, "kind"),
        ({"hardware": {"gpus": 0, "device": "cuda"}}, "hardware.gpus"),
        ({"data": {"source": "local"}}, "data.path"),
        ({"data": {"source": "remote"}}, "data.base_url"),
        ({"data": {"source": "remote", "base_url": "ftp://x/y"}}, "data.base_url"),
        ({"sft": {"sources": [{"kind": "gsm8k"}]}}, "sft.sources.0.path"),
        ({"seed": -1}, "seed"),
    ],
)
def test_refusals_name_the_field(data, field):
    assert bad_field(data)[0] == field


def test_model_too_big_for_any_gpu_names_depth():
    field, msg = bad_field({"model": {"depth": 64}, "hardware": {"gpus": 1}})
    assert field == "model.depth" and "GB" in msg
    # The same model sharded over 8 GPUs has a floor under the largest accelerator.
    JobSpec.model_validate({"model": {"depth": 64}, "hardware": {"gpus": 8}})
    floor_1, floor_8 = (training_memory_floor(JobSpec().model, n) for n in (1, 8))
    assert floor_8 < floor_1


def test_data_path_must_stay_under_allowed_roots(tmp_path):
    home, extra, outside = tmp_path / "home", tmp_path / "datasets", tmp_path / "elsewhere"
    for d in (home, extra, outside):
        d.mkdir()
    (home / "link").symlink_to(outside)
    (extra / "corpus").write_text("text")
    (home / "corpus" / "shards").mkdir(parents=True)
    roots = [home, extra]
    ok = {"data": {"source": "local", "path": str(extra / "corpus")}}
    assert JobSpec.model_validate(ok, context={"roots": roots}).data.path == str(extra / "corpus")
    JobSpec.model_validate({"data": {"source": "local", "path": "corpus/shards"}}, context={"roots": roots})
    for escape in [
        "../elsewhere",
        str(outside),
        "/etc/passwd",
        str(home / "link" / "x"),
        "corpus/../../elsewhere",
    ]:
        field, msg = bad_field({"data": {"source": "local", "path": escape}}, roots)
        assert field == "data.path" and "outside the allowed data roots" in msg, escape
    field, _ = bad_field({"sft": {"sources": [{"kind": "conversations", "path": "/etc"}]}}, roots)
    assert field == "sft.sources.0.path"


def test_import_spec(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    (root / "nanochat").mkdir(parents=True)
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file").write_text("x")
    roots = [root]
    ok = {"kind": "import", "import": {"source": "nanochat", "path": str(root / "nanochat"), "name": "m-1.2"}}
    spec = JobSpec.model_validate(ok, context={"roots": roots})
    assert spec.stages == ["import"] and spec.import_ is not None and spec.import_.name == "m-1.2"
    # Spelled "import" in JSON both ways, so the stored spec reads back.
    stored = spec.model_dump(mode="json")
    assert stored["import"]["path"] == str(root / "nanochat") and "import_" not in stored
    assert JobSpec.from_stored(stored) == spec

    def refused(change: dict) -> tuple[str, str]:
        data = {**ok, **change}
        return bad_field(data, roots)

    section = ok["import"]
    for path in (str(outside), "../elsewhere", str(root / "link"), "/etc"):
        field, msg = refused({"import": {**section, "path": path}})
        assert field == "import.path" and "outside the allowed data roots" in msg, path
    assert refused({"import": {**section, "path": str(root / "missing")}})[0] == "import.path"
    field, msg = refused({"import": {**section, "path": str(root / "file")}})
    assert field == "import.path" and "not a directory" in msg
    for name in ("", "-x", "a/b", "../x", "x" * 65):
        assert refused({"import": {**section, "name": name}})[0] == "import.name", name
    assert refused({"import": {**section, "source": "hf"}})[0] == "import.source"
    assert refused({"import": {**section, "extra": 1}})[0] == "import.extra"
    field, msg = refused({"stages": ["import", "data"]})
    assert field == "stages" and "runs alone" in msg
    assert refused({"stages": ["data"]})[0] == "stages"
    assert refused({"import": None})[0] == "import"
    assert bad_field({"stages": ["import"]}, roots)[0] == "kind"
    assert bad_field({"import": section}, roots)[0] == "import"
    assert bad_field({"kind": "import", "import_": section}, roots)[0] == "import_"


def test_roots_default_to_settings(tmp_path, monkeypatch):
    data_root = tmp_path / "mounted"
    data_root.mkdir()
    (data_root / "x").write_text("text")
    (Path(os.environ["NCP_HOME"]) / "datasets" / "y").mkdir(parents=True)
    monkeypatch.setenv("NCP_DATA_ROOTS", f'["{data_root}"]')
    from shared.settings import get_settings

    get_settings.cache_clear()
    JobSpec.model_validate({"data": {"source": "local", "path": str(data_root / "x")}})
    JobSpec.model_validate({"data": {"source": "local", "path": os.environ["NCP_HOME"] + "/datasets/y"}})
    assert bad_field({"data": {"source": "local", "path": str(tmp_path / "other")}})[0] == "data.path"


@settings(max_examples=40, deadline=None)
@given(
    depth=st.integers(1, 12),
    iters=st.integers(1, 10_000),
    dbs=st.sampled_from([1, 2, 4, 8]),
    gpus=st.integers(1, 8),
    kind=st.sampled_from(["pipeline", "pretrain"]),
)
def test_valid_specs_round_trip(depth, iters, dbs, gpus, kind):
    spec = JobSpec.model_validate(
        {
            "kind": kind,
            "model": {"depth": depth, "sequence_len": 512},
            "horizon": {"num_iterations": iters},
            "hardware": {"gpus": gpus},
            "batch": {"device_batch_size": dbs, "total_batch_size": dbs * 512 * gpus * 2},
        }
    )
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert spec.stages == list(DEFAULT_STAGES[kind])


# --- init: start from a registered model (issue #13) -------------------------------------------


def test_init_is_an_alternative_to_parent_job_id():
    spec = JobSpec.model_validate({"kind": "sft", "init": {"model": "my-run"}})
    assert spec.stages == ["sft", "chat_eval"]
    assert spec.init is not None and spec.init.step == "latest" and spec.init.step_or_none is None
    assert spec.init.phase is None and spec.resume.optimizer == "saved"
    # The defaults lose the tokenizer stage (the model brings one) and gain data where a corpus is read.
    assert JobSpec.model_validate({"kind": "pretrain", "init": {"model": "m", "step": 3}}).stages == [
        "data",
        "pretrain",
        "base_eval",
    ]
    assert JobSpec.model_validate({"kind": "eval", "init": {"model": "m"}}).stages == ["data", "base_eval"]
    both = {"kind": "eval", "init": {"model": "m"}, "parent_job_id": "abc"}
    loc, msg = bad_field(both)
    assert loc == "init" and "init" in msg and "parent_job_id" in msg


@pytest.mark.parametrize(
    ("data", "field", "says"),
    [
        ({"init": {"model": "../etc"}}, "init.model", "pattern"),
        ({"init": {"model": "m", "step": "3"}}, "init.step.constrained-int", "integer"),
        ({"init": {"model": "m", "step": -1}}, "init.step.constrained-int", "0"),
        ({"init": {"model": "m", "phase": "rl"}}, "init.phase", "base"),
        ({"init": {"model": "m", "tag": "d2"}}, "init.tag", "Extra"),
        ({"resume": {"optimizer": "old"}}, "resume.optimizer", "saved"),
        ({"init": {"model": "m"}, "stages": ["data", "tokenizer", "pretrain"]}, "stages", "tokenizer"),
        ({"init": {"model": "m"}, "stages": ["base_eval"]}, "stages", "data"),
    ],
)
def test_init_refusals_name_the_field(data, field, says):
    loc, msg = bad_field(data)
    assert loc == field and says in msg


def test_init_shape_comes_from_the_checkpoint():
    from shared.jobs.init_model import apply_checkpoint_shape

    ckpt = {"sequence_len": 32, "vocab_size": 300, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "n_embd": 64}
    spec = JobSpec.model_validate({"kind": "eval", "init": {"model": "m"}, "model": {"depth": 2}})
    filled = apply_checkpoint_shape(spec, ckpt, "model m base step 3")
    assert filled.model.gpt_config().to_dict() == {**ckpt, "window_pattern": "L"}
    assert filled.checkpoint_tag == "d2" and filled.init == spec.init
    for field, value, theirs in (("vocab_size", 512, "300"), ("depth", 4, "2"), ("head_dim", 64, "32")):
        contra = JobSpec.model_validate({"kind": "eval", "init": {"model": "m"}, "model": {field: value}})
        with pytest.raises(ValidationError) as ei:
            apply_checkpoint_shape(contra, ckpt, "model m base step 3")
        err = ei.value.errors()[0]
        assert err["loc"] == ("model", field)
        assert f"is {value} but model m base step 3 has {theirs}" in err["msg"]
