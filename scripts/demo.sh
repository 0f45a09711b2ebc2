#!/usr/bin/env bash
# Set up and run the demo: generate sample LoRAs for a tiny FLUX-shaped model, inspect and convert them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m lorakit.demo "${1:-demo-out}"
