#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned CPU torch and builds/installs sophon_ext into it.
# Usage: source-free; run `bash scripts/setup.sh`. VENV=path overrides the location.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$(cd "$venv" && pwd)/bin/python"
"$py" -m pip install -q --upgrade pip
# torch first (the pinned CPU build lies on disk here), then the build tools,
# then the package without build isolation so the kernels link this torch.
"$py" -m pip install -q "torch==2.13.0" numpy
"$py" -m pip install -q "scikit-build-core>=0.10" "cmake>=3.26" ninja
"$py" -m pip install -q --no-build-isolation ".[test]"
# Import from outside the source tree so the installed package answers.
(cd / && "$py" -c "import sophon_ext, json; print('sophon_ext', json.dumps(sophon_ext.extension_info()))")
