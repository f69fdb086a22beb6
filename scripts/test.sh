#!/usr/bin/env bash
# Set up everything the test suite needs, then run it: lint, then pytest against the real
# PostgreSQL and Redis on this machine, real Celery workers, and vLLM (CPU) in its own venv.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
# Last, scripts/e2e_compose.sh builds the images and runs `docker compose up` end to end on a
# private Docker daemon (root; about 20 min cold, less with its cache in /var/cache/ncp-e2e).
# NCP_E2E_SKIP=1 skips it (e.g. locally, or without root).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
scripts/setup.sh
if [ -x scripts/setup_vllm_venv.sh ]; then scripts/setup_vllm_venv.sh; fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy shared services
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test: pytest collected no tests; that is a failure" >&2
  exit 1
fi
if [ "$rc" = 0 ] && [ "${NCP_E2E_SKIP:-0}" != 1 ]; then
  scripts/e2e_compose.sh || rc=$?
fi
exit "$rc"
