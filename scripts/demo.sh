#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the main job on the built-in default.
# Extra arguments go to `sophon demo`, e.g. `bash scripts/demo.sh --mode generation`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="$(cd "${VENV:-.venv}" && pwd)"
exec "$venv/bin/sophon" demo --out runs/demo "$@"
