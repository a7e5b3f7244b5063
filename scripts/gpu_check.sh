#!/usr/bin/env bash
# One-shot check on a lent GPU machine (torch with CUDA, nvcc, cmake, ninja,
# scikit-build-core preinstalled; no network): build and install the package
# with its CUDA kernels, then run the CUDA tests, the whole suite and the
# benchmarks. Logs and bench.json go to $OUT (default: out/gpu_check).
# Usage: bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="${OUT:-$repo/out/gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" SOPHON_CUDA="${SOPHON_CUDA:-ON}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
status=0
step() { echo "== $*" | tee -a "$out/summary.txt"; }

step "machine"
{ nvidia-smi || true; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } 2>&1 | tee "$out/machine.txt"
"$py" -c "import pytest, pytest_benchmark, hypothesis" 2>&1 | tee -a "$out/summary.txt" || step "WARNING: pytest / pytest-benchmark / hypothesis missing"

step "install (no build isolation, no dependency downloads)"
if ! "$py" -m pip install --no-build-isolation --no-deps -v . > "$out/install.log" 2>&1; then
  tail -40 "$out/install.log"; step "FAILED: install"; exit 1
fi

# From outside the source tree, so the installed package (with _C.so) is imported.
cd "$repo/python_tests"
step "extension_info"
"$py" -c "import json, sophon_ext; print(json.dumps(sophon_ext.extension_info()))" 2>&1 | tee "$out/extension_info.json"

step "pytest -m cuda"
"$py" -m pytest -m cuda -q -p no:cacheprovider -ra . 2>&1 | tee "$out/pytest_cuda.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; step "FAILED: cuda tests"; }

step "pytest (whole suite)"
"$py" -m pytest -q -p no:cacheprovider --benchmark-disable -ra . 2>&1 | tee "$out/pytest_all.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; step "FAILED: test suite"; }

cd "$repo/benchmarks"
step "benchmarks"
"$py" -m pytest . --benchmark-only --benchmark-json "$out/bench.json" -q -p no:cacheprovider \
  --benchmark-columns=min,median,mean,rounds 2>&1 | tee "$out/bench.log" | tail -40
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; step "FAILED: benchmarks"; }

step "done, status $status"
exit $status
