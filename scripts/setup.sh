#!/usr/bin/env bash
# Create .venv (if missing) and install wanjax with the given extras, e.g. `bash scripts/setup.sh test`.
# torch is pinned to 2.13.0 (CPU build on this machine kind); unpinned, pip would pull GBs of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
spec="."
if [ -n "$extras" ]; then spec=".[$extras]"; fi
if [[ ",$extras," == *",test,"* ]]; then
  .venv/bin/pip install --quiet "torch==2.13.0"
fi
.venv/bin/pip install --quiet -e "$spec"
