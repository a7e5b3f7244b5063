#!/usr/bin/env bash
# Developer build: compiles csrc/ into sophon_ext/_C.so beside the sources so
# `python -c "import sophon_ext"` from the repo root uses the kernels.
# Usage: scripts/build_inplace.sh [build-dir]   (SOPHON_CUDA=AUTO|ON|OFF honoured)
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${1:-build/inplace}"
python=${PYTHON:-python}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$python")" -DSOPHON_CUDA="${SOPHON_CUDA:-AUTO}" >/dev/null
cmake --build "$build_dir"
cp "$build_dir/_C.so" sophon_ext/_C.so.tmp && mv sophon_ext/_C.so.tmp sophon_ext/_C.so
cp "$build_dir/_build_info.json" sophon_ext/_build_info.json
echo "built sophon_ext/_C.so"
