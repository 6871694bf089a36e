#!/usr/bin/env bash
# Set up, then run the example pipeline job on an embedded Ray with MLflow in ./mlruns.db.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/unlocked run "${1:-examples/pipeline.yaml}" "${@:2}"
