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
    assert config["architectures"] == ["NanochatForCausalLM"] and config["model_type"] == "ncp_nanochat"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_ncp_nanochat.NanochatForCausalLM"
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


# ------------------------------------------------------------------ Hugging Face loads the folder


def _hf_model(export_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def gqa_export(tmp_path_factory, tiny_run):
    """A second export with grouped-query attention (2 query heads per kv head) and a 3-layer
    "SSL" pattern, from the same tokenizer."""
    from shared.nanochat.checkpoint import save_checkpoint
    from shared.nanochat.config import GPTConfig
    from shared.nanochat.export import export_model
    from shared.nanochat.gpt import GPT

    root = tmp_path_factory.mktemp("gqa")
    cfg = GPTConfig(
        sequence_len=256, vocab_size=tiny_run["config"].vocab_size, n_layer=3, n_head=4, n_kv_head=2,
        n_embd=128, window_pattern="SSL",
    )  # fmt: skip
    torch.manual_seed(5)
    model = GPT(cfg, compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "lambda" in name else 0.05))
    save_checkpoint(root / "ckpt", 1, model.state_dict(), None, {"model_config": cfg.to_dict()})
    out = export_model(root / "ckpt", None, tiny_run["tokenizer_dir"], root / "export", dtype="float32")
    return {"ckpt_dir": root / "ckpt", "export_dir": out}


@pytest.mark.parametrize("which", ["tiny", "gqa"])
def test_transformers_auto_model_gives_our_logits(tiny_run, gqa_export, which):
    run = tiny_run if which == "tiny" else gqa_export
    ours, _ = build_model(run["ckpt_dir"])
    hf = _hf_model(run["export_dir"])
    assert type(hf).__name__ == "NanochatForCausalLM" and hf.config.model_type == "ncp_nanochat"
    g = torch.Generator().manual_seed(7)
    # 200 tokens: past the 128-token windows of the "S" layers
    for ids in (torch.randint(0, 500, (2, 200), generator=g), torch.randint(0, 500, (1, 1), generator=g)):
        with torch.no_grad():
            want = ours(ids)
            got = hf(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_transformers_generate_and_tokenizer_follow_our_rules(tiny_run):
    from transformers import AutoTokenizer

    from shared.nanochat.engine import Engine
    from shared.nanochat.tokenizer import prompt_ids

    d = tiny_run["export_dir"]
    ours, tok = load_exported(d)
    hf_tok = AutoTokenizer.from_pretrained(str(d), trust_remote_code=True)
    text = "def decode(self, s):\n    return json.loads(s)  # 12 345"
    # The BOS rule: a raw prompt is <|bos|> + its ids, in transformers as in prompt_ids.
    assert hf_tok(text)["input_ids"] == prompt_ids(tok, text)
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    messages = [{"role": "user", "content": "What does json.dumps do?"}]
    chat = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert list(chat) == render_for_completion(tok, messages)  # the template brings its own BOS

    hf = _hf_model(d)
    prompt = prompt_ids(tok, "import json")
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    seqs, _ = Engine(ours, tok).generate_batch(prompt, 1, max_tokens=12, temperature=0.0)
    assert out[0].tolist() == seqs[0]


def test_outdated_or_mismatched_export_is_refused(tiny_run, tmp_path):
    d = tmp_path / "exp"
    shutil.copytree(tiny_run["export_dir"], d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "nanochat"}))
    with pytest.raises(ValueError, match="older version of the platform"):
        check_export(d)
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    with pytest.raises(
        ValueError, match=rf"{config['vocab_size']} tokens .* vocab_size {config['vocab_size'] + 64}"
    ):
        check_export(d)
