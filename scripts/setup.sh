#!/usr/bin/env bash
# Creates .venv (if missing) with the pinned CPU torch, builds and installs
# sophon_ext with every extra into it, then puts the compiled library beside
# the sources too, so commands run from the repository root (the benchmarks,
# `python -m sophon_ext`, `torchrun -m sophon_ext`), which import the source
# tree, use the kernels. After changing csrc/, rebuild with scripts/build_inplace.sh.
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
"$py" -m pip install -q "scikit-build-core>=1.1" "cmake>=3.26" ninja
"$py" -m pip install -q --no-build-isolation ".[all]"
# The installed package's library, built from these sources against this torch, beside the sources.
installed="$(cd / && "$py" -c "import pathlib, sophon_ext; print(pathlib.Path(sophon_ext.__file__).parent)")"
cp "$installed/_C.so" sophon_ext/_C.so.tmp && mv sophon_ext/_C.so.tmp sophon_ext/_C.so
cp "$installed/_build_info.json" sophon_ext/_build_info.json
# Import from outside the source tree so the installed package answers, then from the root.
(cd / && "$py" -c "import sophon_ext, json; print('sophon_ext (installed)', json.dumps(sophon_ext.extension_info()))")
"$py" -c "import sophon_ext; print('sophon_ext (source tree) kernels loaded:', sophon_ext.extension_info()['cpu'])"
