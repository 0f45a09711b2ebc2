#!/usr/bin/env bash
# Set up and run the demo: generate sample LoRAs for a tiny FLUX-shaped model, inspect and convert them.
# Usage: scripts/demo.sh [FOLDER]   (default: demo-out in the repository; a FOLDER given is relative to the
# current directory). The folder is created; an existing FOLDER must be empty: the demo refuses a
# non-empty one and never removes or replaces files it did not create.
set -euo pipefail
folder="${1:-}"
if [ -n "$folder" ] && [ "${folder#/}" = "$folder" ]; then
    folder="$PWD/$folder"
fi
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m lorakit.samples.demo "${folder:-demo-out}"
