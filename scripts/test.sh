#!/usr/bin/env bash
# Set up (with the test oracles diffusers/PEFT/LyCORIS and the web UI), type-check and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,oracle,ui
.venv/bin/python -m mypy          # typed public API: the whole package type-checks (config in pyproject.toml)
.venv/bin/python -m pytest "$@"
