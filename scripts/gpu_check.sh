#!/usr/bin/env bash
# One-shot check on a lent GPU machine (torch with CUDA, nvcc, cmake, ninja,
# scikit-build-core preinstalled; no network): build and install the package
# with its CUDA kernels, run the CUDA tests, the GPU benchmarks and then as
# much of the whole suite as the time left allows. Every step is time-boxed
# against one deadline (GPU_CHECK_SECONDS, default 420) so the logs always
# come back. Logs and bench.json go to $OUT (default: out/gpu_check).
# Pure-Python wheels the machine lacks (mlxtend) may be carried in .whl/.
# Usage: PYTHON=python3 bash scripts/gpu_check.sh   (GPU_CHECK_BENCH=0 skips the benchmarks)
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
out="${OUT:-$repo/out/gpu_check}"
mkdir -p "$out"
py="${PYTHON:-python}"
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-420} ))
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" SOPHON_CUDA="${SOPHON_CUDA:-ON}" PYTHONUNBUFFERED=1
# That machine's default CXX (/opt/gcc) links libstdc++ statically, which the
# build rejects (cmake/check_dynamic_libstdcxx.cmake): use the system compiler.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
status=0
step() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
left() { echo $(( deadline - $(date +%s) )); }
# boxed SECONDS_MAX CMD...: run CMD for at most min(SECONDS_MAX, time left - 5) seconds
boxed() { local cap=$1; shift; local t; t=$(left); t=$(( t - 5 < cap ? t - 5 : cap )); [ "$t" -gt 10 ] || { step "SKIPPED (no time left): $*"; return 124; }; timeout -k 5 "$t" "$@"; }

step "machine"
{ nvidia-smi || true; "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"; } 2>&1 | tee "$out/machine.txt"
if ls .whl/*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
"$py" -c "import pytest, pytest_benchmark, hypothesis, mlxtend" 2>&1 | tee -a "$out/summary.txt" || step "WARNING: a test dependency is missing"

step "install (no build isolation, no dependency downloads)"
if ! boxed 300 "$py" -m pip install --no-build-isolation --no-deps -v . > "$out/install.log" 2>&1; then
  tail -40 "$out/install.log"; step "FAILED: install"; exit 1
fi
grep -E "Elapsed|nvcc|\.cu" "$out/install.log" | tail -5

# From outside the source tree, so the installed package (with _C.so) is imported.
cd "$repo/python_tests"
step "extension_info"
"$py" -c "import json, sophon_ext; print(json.dumps(sophon_ext.extension_info()))" 2>&1 | tee "$out/extension_info.json"

step "pytest -m cuda"
boxed 150 "$py" -m pytest -m cuda -q -p no:cacheprovider -ra . 2>&1 | tee "$out/pytest_cuda.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; step "FAILED: cuda tests"; }

if [ "${GPU_CHECK_BENCH:-1}" = 1 ]; then
  cd "$repo/benchmarks"
  step "GPU benchmarks"
  boxed 200 "$py" -m pytest . -k cuda -s --benchmark-only --benchmark-json "$out/bench.json" -q -p no:cacheprovider \
    --benchmark-columns=min,median,mean,rounds 2>&1 | tee "$out/bench.log" | tail -60
  [ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; step "FAILED: benchmarks"; }
fi

cd "$repo/python_tests"
step "pytest (whole suite, what time allows)"
OMP_NUM_THREADS=2 boxed 600 "$py" -m pytest -q -p no:cacheprovider --benchmark-disable -ra -n 6 --durations=5 . 2>&1 | tee "$out/pytest_all.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || { status=1; step "FAILED or cut short: test suite"; }

step "done, status $status"
exit $status
