#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu with nvcc against a CUDA build of torch
# (no GPU needed): each file is compiled to an object in a scratch directory
# with the flags CMakeLists.txt uses. Exit status is non-zero if any fails.
#
# Usage: scripts/check_cuda_compile.sh [file.cu ...]     (default: all of csrc/cuda/*.cu)
# Environment:
#   CUDA_PYTHON  python whose torch is a CUDA build (default /work/venv-cuda/bin/python if present, else python)
#   NVCC         nvcc to use (default: nvcc on PATH, else /usr/local/bin/nvcc)
#   TORCH_CUDA_ARCH_LIST  e.g. "9.0" (default) or "8.0;9.0"
#   OUT_DIR      where objects go (default: a temporary directory, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CUDA_PYTHON:-}" ]; then
  if [ -x /work/venv-cuda/bin/python ]; then CUDA_PYTHON=/work/venv-cuda/bin/python; else CUDA_PYTHON=python; fi
fi
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/bin/nvcc)}"
[ -x "$NVCC" ] || { echo "nvcc not found (set NVCC)" >&2; exit 2; }

# torch's include dirs, C++ ABI, and the CUDA headers that ship in the torch wheel (nvidia/cu13/include ...)
mapfile -t TORCH_INFO < <("$CUDA_PYTHON" - <<'PY'
import glob, os, site, torch
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
root = os.path.dirname(torch.__file__)
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(os.path.join(root, "include"))
print(os.path.join(root, "include", "torch", "csrc", "api", "include"))
for sp in site.getsitepackages():
    for d in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include"))):
        print(d)
PY
)
abi="${TORCH_INFO[0]}"
includes=()
for dir in "${TORCH_INFO[@]:1}"; do includes+=("-I$dir"); done

gencode=()
IFS=';' read -r -a archs <<< "${TORCH_CUDA_ARCH_LIST:-9.0}"
for arch in "${archs[@]}"; do
  a="${arch//./}"; a="${a%+PTX}"
  gencode+=("-gencode=arch=compute_${a},code=sm_${a}")
done

out_dir="${OUT_DIR:-$(mktemp -d)}"
[ -n "${OUT_DIR:-}" ] || trap 'rm -rf "$out_dir"' EXIT
mkdir -p "$out_dir"

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  shopt -s nullglob
  files=(csrc/cuda/*.cu)
fi
[ ${#files[@]} -gt 0 ] || { echo "no .cu files to check" >&2; exit 2; }

failed=0
for cu in "${files[@]}"; do
  obj="$out_dir/$(basename "${cu%.cu}").o"
  start=$(date +%s)
  # Same flags as CMakeLists.txt (-O3 --use_fast_math -lineinfo, C++20, SOPHON_WITH_CUDA=1) plus
  # torch's extension defines (no implicit half conversions, relaxed constexpr).
  if "$NVCC" -c "$cu" -o "$obj" -std=c++20 -O3 --use_fast_math -lineinfo -Xcompiler -fPIC \
      "${gencode[@]}" -Icsrc "${includes[@]}" \
      -D_GLIBCXX_USE_CXX11_ABI="$abi" -DSOPHON_WITH_CUDA=1 \
      -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
      -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr && [ -s "$obj" ]; then
    echo "OK    $cu ($(( $(date +%s) - start )) s, $(stat -c %s "$obj") bytes)"
  else
    echo "FAIL  $cu" >&2
    failed=1
  fi
done
exit $failed
