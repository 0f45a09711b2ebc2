#!/usr/bin/env bash
# Set up (with the test oracles diffusers/PEFT/LyCORIS) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,oracle
.venv/bin/python -m pytest "$@"
