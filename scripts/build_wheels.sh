#!/usr/bin/env bash
# Builds the wheels a user downloads, into dist/cpu/ and dist/cu<CUDA>/:
# - the CPU wheel, against the CPU torch of PYTHON (default .venv/bin/python);
# - the CUDA wheel, where nvcc and a CUDA build of torch are present: against
#   the torch of CUDA_PYTHON (default: PYTHON when its torch is a CUDA build),
#   for TORCH_CUDA_ARCH_LIST (default "8.0;9.0").
# Each wheel requires the torch minor version it was built against
# (torch==X.Y.*, build_support/torch_pin.py). Where auditwheel (and patchelf)
# are installed, each wheel is repaired to a manylinux tag without grafting
# torch's libraries (libtorch*, libc10*, the CUDA runtime, libgomp): the
# installed torch provides them. Without auditwheel the wheel keeps its
# linux_x86_64 tag, which pip installs only locally. The manylinux tag is set
# by the glibc the wheel was built on: build inside a manylinux_2_28 image for
# the widest one.
# Usage: bash scripts/build_wheels.sh      (SOPHON_BUILD_DIR: scratch build directories, default build/wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
cpu_python="${PYTHON:-.venv/bin/python}"
build_root="${SOPHON_BUILD_DIR:-build/wheels}"
# libraries that come with torch (and its CUDA wheels), never copied into ours
excludes=(libtorch*.so libc10*.so libgomp*.so* libcudart.so* libcublas*.so* libcublasLt.so* libnvrtc*.so* libnvToolsExt.so*
          libcusparse*.so* libcufft*.so* libcurand*.so* libcusolver*.so* libcudnn*.so* libnccl.so* libnvJitLink.so*)

torch_flavour() {  # "cpu" or "cu130" for the torch of python $1
  "$1" -c "import torch; print('cu' + torch.version.cuda.replace('.', '') if torch.version.cuda else 'cpu')"
}

build_wheel() {  # python, flavour, SOPHON_CUDA
  local python=$1 flavour=$2 cuda=$3 raw="$build_root/raw-$2" out="dist/$2"
  rm -rf "$raw" && mkdir -p "$raw" "$out"
  echo "== $flavour wheel against torch $("$python" -c 'import torch; print(torch.__version__)')"
  SOPHON_CUDA="$cuda" "$python" -m pip wheel -q --no-build-isolation --no-deps -w "$raw" \
    -Cbuild-dir="$build_root/$flavour" .
  local wheel
  wheel="$(ls "$raw"/sophon_ext-*.whl)"
  if command -v auditwheel > /dev/null && command -v patchelf > /dev/null; then
    local args=()
    for lib in "${excludes[@]}"; do args+=(--exclude "$lib"); done
    auditwheel repair -w "$out" "${args[@]}" "$wheel" 2>&1 | grep -E "Fixed-up|error|Error" || true
  else
    echo "auditwheel or patchelf not installed (pip install auditwheel patchelf): keeping the linux tag"
    cp "$wheel" "$out/"
  fi
  "$python" - "$out" <<'PY'
import pathlib, sys, zipfile
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("sophon_ext-*.whl")):
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        pins = [l for l in zf.read(meta).decode().splitlines() if l.startswith("Requires-Dist: torch")]
    print(f"built {wheel} ({', '.join(pins)})")
PY
}

[ -x "$cpu_python" ] || { echo "no python at $cpu_python: run scripts/setup.sh or set PYTHON" >&2; exit 2; }
flavour="$(torch_flavour "$cpu_python")"
if [ "$flavour" = cpu ]; then
  build_wheel "$cpu_python" cpu OFF
else
  echo "== no CPU wheel: the torch of $cpu_python is a CUDA build (set PYTHON to a python with a CPU torch)"
fi

cuda_python="${CUDA_PYTHON:-}"
if [ -z "$cuda_python" ] && [ "$flavour" != cpu ]; then cuda_python="$cpu_python"; fi
if [ -z "$cuda_python" ]; then
  echo "== no CUDA wheel: set CUDA_PYTHON to a python whose torch is a CUDA build"
elif ! command -v "${CUDACXX:-nvcc}" > /dev/null; then
  echo "== no CUDA wheel: nvcc not found (put it on PATH or set CUDACXX)"
else
  cuda_flavour="$(torch_flavour "$cuda_python")"
  [ "$cuda_flavour" != cpu ] || { echo "the torch of $cuda_python is not a CUDA build" >&2; exit 2; }
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
  build_wheel "$cuda_python" "$cuda_flavour" ON
fi
echo "wheels in $repo/dist"
