"""vLLM general plugin: teaches vLLM the nanochat architecture.

vLLM calls `register()` in every one of its processes (API server, engine core, workers) through
the `vllm.general_plugins` entry point declared in pyproject.toml. Registration is lazy (a
`module:Class` string) so importing this package never imports torch-heavy vLLM modules early.
The configuration class is the one export folders carry for transformers (shared/nanochat/hf), so
config.json means the same to vLLM and to `AutoModelForCausalLM`.
"""

from __future__ import annotations

ARCHITECTURE = "NanochatForCausalLM"
MODEL_TYPE = "ncp_nanochat"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from shared.nanochat.hf.configuration_ncp_nanochat import NanochatConfig

    # vLLM reads config.json through transformers' AutoConfig, which must know our model_type.
    AutoConfig.register(MODEL_TYPE, NanochatConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "services.inference.vllm_plugin.model:NanochatForCausalLM")
