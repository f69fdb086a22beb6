#!/usr/bin/env bash
# Set up and run the demo pipeline on one machine, no Docker, no GPU: start the platform
# (`ncp up`: API, workers, reconciler, inference server), submit a tiny pipeline job on the
# offline demo corpus, follow it to the end and ask the served model a question.
# Data goes to $NCP_HOME (default ~/.ncp). Extra arguments go to `ncp demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ncp demo "$@"
