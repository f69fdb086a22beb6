"""vLLM general plugin: teaches vLLM the nanochat architecture.

vLLM calls `register()` in every one of its processes (API server, engine core, workers) through
the `vllm.general_plugins` entry point declared in pyproject.toml. Registration is lazy (a
`module:Class` string) so importing this package never imports torch-heavy vLLM modules early.
"""

from __future__ import annotations

ARCHITECTURE = "NanochatForCausalLM"
MODEL_TYPE = "nanochat"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from services.inference.vllm_plugin.config import NanochatConfig

    # vLLM reads config.json through transformers' AutoConfig, which must know our model_type.
    AutoConfig.register(MODEL_TYPE, NanochatConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "services.inference.vllm_plugin.model:NanochatForCausalLM")
