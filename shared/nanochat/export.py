"""Checkpoint (base or SFT) -> a Hugging-Face-style folder that vLLM (with our plugin) and the
native server load, and `load_exported` to rebuild our own GPT from such a folder.

Folder layout:
  config.json              architecture "NanochatForCausalLM", model_type "ncp_nanochat" (its own:
                           transformers >= 5 has an unrelated built-in "nanochat"), `auto_map` to
                           the modeling code below, every shape and constant the model needs
  configuration_ncp_nanochat.py, modeling_ncp_nanochat.py
                           the model for transformers (`trust_remote_code=True`), torch-only code
                           copied from shared/nanochat/hf/; vLLM uses our plugin instead
  model.safetensors        the reference state-dict names and shapes
  tokenizer.json, tokenizer_config.json (+ special_tokens_map.json)   copied from the run
  generation_config.json   stop on <|assistant_end|> and <|bos|>
  export_meta.json         where it came from, and the tensor list load_exported checks against

The folder is written next to its destination and renamed into place, so a reader (the serving
supervisor) never sees half an export.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from shared.nanochat.config import GPTConfig

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: `check_export` (and publish.py, which the
# API calls to choose the served model) must work in the API image, which has no torch.

ARCHITECTURE = "NanochatForCausalLM"
MODEL_TYPE = "ncp_nanochat"
FORMAT_VERSION = 2  # 2: own model_type, auto_map + modeling code
HF_CODE_DIR = Path(__file__).with_name("hf")
CONFIG_CODE = "configuration_ncp_nanochat.py"
MODELING_CODE = "modeling_ncp_nanochat.py"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_CODE[:-3]}.NanochatConfig",
    "AutoModelForCausalLM": f"{MODELING_CODE[:-3]}.{ARCHITECTURE}",
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
META_FILE = "export_meta.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
REQUIRED_FILES = (
    CONFIG_FILE,
    WEIGHTS_FILE,
    *TOKENIZER_FILES,
    GENERATION_FILE,
    META_FILE,
    CONFIG_CODE,
    MODELING_CODE,
)
# Architecture constants of the reference model, written out so a server never has to guess.
LOGIT_SOFTCAP = 15.0
ROPE_THETA = 100000.0
QK_SCALE = 1.2
VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24
ASSISTANT_END = "<|assistant_end|>"
BOS = "<|bos|>"


def hf_config(
    cfg: GPTConfig, *, bos_token_id: int, eos_token_ids: list[int], dtype: str = "bfloat16"
) -> dict:
    """config.json: our GPTConfig fields, the derived numbers, and the HF names vLLM reads."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": AUTO_MAP,
        **cfg.to_dict(),
        "padded_vocab_size": cfg.padded_vocab_size,
        "head_dim": cfg.head_dim,
        "intermediate_size": 4 * cfg.n_embd,
        "max_position_embeddings": cfg.sequence_len,
        "window_sizes": cfg.window_sizes(),
        "value_embed_layers": [i for i in range(cfg.n_layer) if cfg.has_value_embed(i)],
        "backout_layer": cfg.backout_layer,
        "logit_softcap": LOGIT_SOFTCAP,
        "rope_theta": ROPE_THETA,
        "qk_scale": QK_SCALE,
        "ve_gate_channels": VE_GATE_CHANNELS,
        "smear_channels": SMEAR_CHANNELS,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_ids,
        "torch_dtype": dtype,
    }


def gpt_config_from_hf(config: dict) -> GPTConfig:
    """The GPTConfig inside a config.json (its own field names; the rest is derived)."""
    from dataclasses import fields

    names = [f.name for f in fields(GPTConfig)]
    missing = [n for n in names if n not in config]
    if missing:
        raise ValueError(f"{CONFIG_FILE} lacks the field(s) {missing}")
    return GPTConfig.from_dict({n: config[n] for n in names})


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _state_dict_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors that don't share storage; persistent entries only.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def write_export(
    model: torch.nn.Module,
    cfg: GPTConfig,
    tokenizer_dir: Path,
    out_dir: Path,
    *,
    served_name: str | None = None,
    source: dict | None = None,
    dtype: str = "bfloat16",
) -> Path:
    """Write an export folder for an in-memory model; atomic (temp folder + rename)."""
    from safetensors.torch import save_file

    from shared.nanochat.tokenizer import Tokenizer, check_vocab_fits

    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    for name in TOKENIZER_FILES:
        if not (tokenizer_dir / name).is_file():
            raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} has no {name}")
    tok = Tokenizer.load(tokenizer_dir)
    check_vocab_fits(
        tok,
        cfg.vocab_size,
        tokenizer_name=str(tokenizer_dir),
        model_name=str((source or {}).get("checkpoint_dir", "being exported")),
    )
    bos, eos = tok.encode_special(BOS), tok.encode_special(ASSISTANT_END)
    state = _state_dict_for_export(model)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(
            tmp / CONFIG_FILE, hf_config(cfg, bos_token_id=bos, eos_token_ids=[eos, bos], dtype=dtype)
        )
        # Saved rather than copied: a tokenizer folder written before the BOS rule existed lacks
        # its post-processor and add_bos_token (tokenizer.py); the chat template is ours.
        tok.save(tmp)
        for name in (CONFIG_CODE, MODELING_CODE):
            shutil.copyfile(HF_CODE_DIR / name, tmp / name)
        _write_json(
            tmp / GENERATION_FILE,
            {"bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": bos},
        )
        _write_json(
            tmp / META_FILE,
            {
                "format_version": FORMAT_VERSION,
                "served_name": served_name or out_dir.name,
                "source": source or {},
                "gpt_config": cfg.to_dict(),
                "tensors": {k: list(v.shape) for k, v in state.items()},
            },
        )
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    # rename() can't replace a non-empty folder: move the old one aside first, then drop it.
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_model(
    ckpt_dir, step, tokenizer_dir, out_dir, *, served_name=None, dtype: str = "bfloat16"
) -> Path:
    """Export checkpoint `step` (None = newest complete) of `ckpt_dir` to `out_dir`."""
    from shared.nanochat.checkpoint import build_model, checkpoint_meta, model_config_from_meta
    from shared.nanochat.tokenizer import Tokenizer, check_vocab_fits

    meta = checkpoint_meta(Path(ckpt_dir), step)
    check_vocab_fits(  # before the weights are read
        Tokenizer.load(Path(tokenizer_dir)),
        model_config_from_meta(meta, ckpt_dir).vocab_size,
        tokenizer_name=str(tokenizer_dir),
        model_name=f"{ckpt_dir} step {meta['step']}",
    )
    model, meta = build_model(Path(ckpt_dir), meta["step"], device="cpu")
    source = {"checkpoint_dir": str(ckpt_dir), "step": meta.get("step", step)}
    return write_export(
        model,
        model.config,
        Path(tokenizer_dir),
        Path(out_dir),
        served_name=served_name,
        source=source,
        dtype=dtype,
    )


def check_export(export_dir: Path) -> dict:
    """Refuse an incomplete, outdated or mismatched folder naming what is wrong (before a server
    spends minutes starting on it); returns config.json."""
    from shared.nanochat.tokenizer import Tokenizer, check_vocab_fits

    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise FileNotFoundError(f"export folder {export_dir} does not exist")
    try:
        config = json.loads((export_dir / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"export {export_dir} is incomplete: {CONFIG_FILE} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{export_dir / CONFIG_FILE} is not valid JSON: {e}") from e
    if config.get("architectures") != [ARCHITECTURE]:
        raise ValueError(
            f"{export_dir / CONFIG_FILE}: architectures is {config.get('architectures')}, not [{ARCHITECTURE!r}]"
        )
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(
            f"{export_dir / CONFIG_FILE}: model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}: "
            "an export from an older version of the platform; export the checkpoint again"
        )
    for name in REQUIRED_FILES:
        if not (export_dir / name).is_file():
            raise FileNotFoundError(f"export {export_dir} is incomplete: {name} is missing")
    check_vocab_fits(
        Tokenizer.load(export_dir),
        int(config.get("vocab_size", -1)),
        tokenizer_name=f"{export_dir}/tokenizer.json",
        model_name=f"{export_dir}/{CONFIG_FILE}",
    )
    return config


def load_exported(export_dir, device="cpu", *, compute_dtype: torch.dtype | None = None):
    """Rebuild (GPT, Tokenizer) from an export folder; every tensor must be present with its shape."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from shared.nanochat.gpt import GPT
    from shared.nanochat.tokenizer import Tokenizer

    export_dir = Path(export_dir)
    config = check_export(export_dir)
    cfg = gpt_config_from_hf(config)
    try:
        state = load_file(str(export_dir / WEIGHTS_FILE), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {export_dir / WEIGHTS_FILE}: {e}") from e
    device = torch.device(device)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = GPT(cfg, compute_dtype=compute_dtype)
    model.to_empty(device=device)
    model.init_weights()  # storage dtypes + rotary tables; every value is overwritten below
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"{export_dir / WEIGHTS_FILE} lacks tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{export_dir / WEIGHTS_FILE} has unexpected tensor(s) {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{export_dir / WEIGHTS_FILE}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, Tokenizer.load(export_dir)
