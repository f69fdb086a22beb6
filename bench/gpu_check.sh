#!/usr/bin/env bash
# One command for a GPU box: `bash bench/gpu_check.sh` prints one table (see bench/gpu_check.py)
# in at most 8 minutes. The box needs only a CUDA/ROCm torch >= 2.11 with Triton and, in .whl/,
# the wheels of bench/gpu_check_requirements.txt that it lacks (bench/gpu_check_deps.py download,
# run where PyPI is reachable); nothing is fetched here. `--dry-run` runs everything but the
# device on the CPU at tiny sizes (the test suite does, tests/core_train/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "${1:-}" != "--dry-run" ]; then
  site=${GPU_CHECK_SITE:-/tmp/ncp-gpu-check-site}
  "$PYTHON" bench/gpu_check_deps.py install --target "$site" || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" bench/gpu_check.py "$@"
