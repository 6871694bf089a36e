#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the project, its test tools and the
# peer libraries the benchmarks compare against.
# TORCH_SPEC picks the torch build; the default is the CPU build these machines use.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}" -e ".[test,bench]" \
    2> >(grep -v "^WARNING: Location" >&2)
