#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded tiny default, offline on CPU:
# LoRA training on a tiny random Wan pipeline and a generated sample cache (built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m wanjax.train --config configs/lora.py:tiny "$@"
