#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (end-to-end tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The MLflow UI test drives Debian's chromium; CI installs it (it runs as root).
if [ "${CI:-}" = true ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/ruff check .
# -rs: say why a test was skipped; --durations: the slowest tests, to keep the suite in budget
exec .venv/bin/python -m pytest -q -rs -p no:cacheprovider --durations=25 "$@"
