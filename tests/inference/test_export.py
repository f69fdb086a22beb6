from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.nanochat.chat_format import CHAT_TEMPLATE, render_for_completion
from shared.nanochat.checkpoint import build_model
from shared.nanochat.export import check_export, load_exported
from shared.nanochat.tokenizer import Tokenizer


def test_round_trip_same_logits(tiny_run):
    ref, _ = build_model(tiny_run["ckpt_dir"])
    model, tok = load_exported(tiny_run["export_dir"])
    ids = torch.randint(
        0, tiny_run["config"].vocab_size, (2, 200), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        assert torch.equal(ref(ids), model(ids))
    assert tok.vocab_size == tiny_run["config"].vocab_size


def test_config_and_generation_files(tiny_run):
    d = tiny_run["export_dir"]
    cfg, tok = tiny_run["config"], Tokenizer.load(d)
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["NanochatForCausalLM"] and config["model_type"] == "nanochat"
    assert config["window_sizes"] == [128, 256, 128, 256]
    assert config["value_embed_layers"] == [1, 3]
    assert (config["head_dim"], config["logit_softcap"], config["rope_theta"]) == (64, 15.0, 100000.0)
    assert config["padded_vocab_size"] == cfg.padded_vocab_size
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.encode_special("<|assistant_end|>"), tok.encode_special("<|bos|>")]
    tconf = json.loads((d / "tokenizer_config.json").read_text())
    assert tconf["chat_template"] == CHAT_TEMPLATE and tconf["eos_token"] == "<|assistant_end|>"
    assert json.loads((d / "export_meta.json").read_text())["served_name"] == "tiny"
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".export.")]  # no temp leftovers


def test_chat_template_renders_sft_format(tiny_run):
    jinja2 = pytest.importorskip("jinja2")
    tok = Tokenizer.load(tiny_run["export_dir"])
    template = json.loads((tiny_run["export_dir"] / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    text = (
        jinja2.Environment()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True, bos_token="<|bos|>")
    )
    assert tok.decode(render_for_completion(tok, messages)) == text


@pytest.mark.parametrize(
    "missing", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
)
def test_incomplete_export_names_missing_file(tiny_run, tmp_path, missing):
    d = tmp_path / "exp"
    shutil.copytree(tiny_run["export_dir"], d)
    (d / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        load_exported(d)


def test_missing_tensor_is_named(tiny_run, tmp_path):
    d = tmp_path / "exp"
    shutil.copytree(tiny_run["export_dir"], d)
    state = load_file(str(d / "model.safetensors"))
    del state["transformer.h.1.attn.ve_gate.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.ve_gate\.weight"):
        load_exported(d)


def test_wrong_shape_and_truncated_weights(tiny_run, tmp_path):
    d = tmp_path / "exp"
    shutil.copytree(tiny_run["export_dir"], d)
    state = load_file(str(d / "model.safetensors"))
    state["x0_lambdas"] = torch.zeros(7)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="x0_lambdas has shape"):
        load_exported(d)
    data = (tiny_run["export_dir"] / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_exported(d)


def test_not_a_nanochat_folder(tiny_run, tmp_path):
    d = tmp_path / "exp"
    shutil.copytree(tiny_run["export_dir"], d)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures"):
        check_export(d)


def test_reexport_replaces_atomically(tiny_run, tmp_path):
    from shared.nanochat.export import export_model

    out = tmp_path / "exp"
    export_model(tiny_run["ckpt_dir"], 3, tiny_run["tokenizer_dir"], out)
    (out / "stale.txt").write_text("old")
    export_model(tiny_run["ckpt_dir"], 3, tiny_run["tokenizer_dir"], out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
