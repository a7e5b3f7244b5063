"""Loads the compiled kernels once and gives every op a pure-PyTorch fallback.

The one place for the compiled ops: this module loads ``sophon_ext/_C.so``
and defines :func:`define_op`; the ops themselves are registered by
:mod:`sophon_ext.ops.losses` (the suppression losses, used by
:mod:`sophon_ext.functional`) and :mod:`sophon_ext.ops.multi_step` (the fused
multi-trajectory update, used by :mod:`sophon_ext.optim`). Importing
``sophon_ext`` imports both.

Every op is called as ``torch.ops.sophon_ext.<name>``. When the compiled
library is loaded, its CPU (and, if built, CUDA) kernels answer; the Python
reference is registered as the ``CompositeExplicitAutograd`` kernel, which the
dispatcher only uses for devices without a compiled kernel. When the library
is missing or was built for another torch, :func:`define_op` defines the
schema here and the reference answers everywhere, so the package works the
same, only slower; the first use of the fallback warns once, with the reason
(:func:`extension_info` gives it too).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

NAMESPACE = "sophon_ext"
# The compiled library and its build info sit at the package root (sophon_ext/), one level above this file.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_LIBRARY_PATH = _PACKAGE_DIR / "_C.so"
_BUILD_INFO_PATH = _PACKAGE_DIR / "_build_info.json"
# A source checkout (not an installed package) has the CMake project one level up.
_SOURCE_CHECKOUT = (_PACKAGE_DIR.parent / "CMakeLists.txt").is_file()

# Set SOPHON_EXT_DISABLE=1 to ignore the compiled library (tests, benchmarks).
_DISABLED = os.environ.get("SOPHON_EXT_DISABLE", "0") not in ("", "0", "false", "False")

# torch: the torch the library was built against (from _build_info.json), even
# when it was not loaded. warned: the fallback has been announced once.
_state: dict = {"loaded": False, "cuda": False, "torch": None, "error": None, "warned": False}
# Python-side definitions live on this fragment (schemas the library lacks,
# fallback kernels). Kept alive for the life of the process.
_fragment = torch.library.Library(NAMESPACE, "FRAGMENT")


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def torch_mismatch(built: str, built_cuda: str | None) -> str | None:
    """Why a library built against torch ``built`` (CUDA ``built_cuda``) cannot load here, or None.

    A library links one torch release: the same major.minor (what a wheel pins,
    ``torch==2.13.*``) and the same CUDA version, or none on both sides.
    """
    runtime, runtime_cuda = torch.__version__, torch.version.cuda
    if _release(built) == _release(runtime) and (built_cuda or None) == (runtime_cuda or None):
        return None
    return (f"kernels were built against torch {built} ({_flavour(built_cuda)}) but torch {runtime} "
            f"({_flavour(runtime_cuda)}) is running; {_rebuild_hint()}")


def _flavour(cuda: str | None) -> str:
    return f"CUDA {cuda}" if cuda else "CPU-only"


def _rebuild_hint() -> str:
    if _SOURCE_CHECKOUT:
        return "rebuild with `bash scripts/build_inplace.sh` (or install with `pip install --no-build-isolation .`)"
    return "rebuild with `pip install --no-build-isolation .`, or install the wheel built for this torch"


def _why_not_loaded() -> str | None:
    """Load the library; on failure return why (and record the torch it was built for when known)."""
    if _DISABLED:
        return "disabled by SOPHON_EXT_DISABLE"
    if not _LIBRARY_PATH.exists():
        where = "this source checkout has no build of it" if _SOURCE_CHECKOUT else "the package was installed without it"
        return f"compiled library not found at {_LIBRARY_PATH} ({where}); {_rebuild_hint()}"
    try:
        info = json.loads(_BUILD_INFO_PATH.read_text())
        built = info["torch"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable build info {_BUILD_INFO_PATH} ({exc}); {_rebuild_hint()}"
    _state["torch"] = built
    mismatch = torch_mismatch(built, info.get("torch_cuda"))
    if mismatch:
        return mismatch
    try:
        torch.ops.load_library(str(_LIBRARY_PATH))
    except (OSError, RuntimeError) as exc:
        return f"could not load {_LIBRARY_PATH}: {exc}"
    _state.update(loaded=True, cuda=bool(info.get("cuda")))
    return None


def _load() -> None:
    _state["error"] = _why_not_loaded()


def _warn_fallback() -> None:
    """Warn once per process, at the first use of a fallback, unless disabled on purpose."""
    if _state["warned"] or _state["loaded"] or _DISABLED:
        return
    _state["warned"] = True
    warnings.warn(f"sophon_ext: using the pure-PyTorch reference implementations ({_state['error']}).",
                  RuntimeWarning, stacklevel=3)


_load()


def extension_info() -> dict:
    """What was loaded: compiled CPU/CUDA kernels, the torch they were built against, and why not if not.

    ``torch`` is the torch the library was built against (None when no build
    info was found); ``error`` says why the library is not in use: disabled,
    missing file, built for another torch, or the loader's error text.
    """
    return {
        "cpu": _state["loaded"],
        "cuda": _state["loaded"] and _state["cuda"],
        "torch": _state["torch"],
        "runtime_torch": torch.__version__,
        "library": str(_LIBRARY_PATH) if _state["loaded"] else None,
        "error": _state["error"],
    }


def kernel_note() -> str | None:
    """The line the command line prints first when it runs without compiled kernels, else None.

    Printing it announces the fallback, so the first fallback call does not warn again.
    """
    if _state["loaded"]:
        return None
    _state["warned"] = True
    return f"sophon: running without compiled kernels, on the pure-PyTorch fallback: {_state['error']}"


def has_compiled_kernel(device: torch.device | str) -> bool:
    """True when the compiled library has kernels for tensors on ``device``."""
    device_type = torch.device(device).type
    _warn_fallback()
    if device_type == "cpu":
        return _state["loaded"]
    if device_type == "cuda":
        return _state["loaded"] and _state["cuda"]
    return False


#: the schema each op's Python side was written for (name -> "(args) -> returns")
PYTHON_SCHEMAS: dict[str, str] = {}


def schema_mismatch(name: str, schema: str | None = None) -> str | None:
    """How the registered schema of op ``name`` (the compiled library's, when loaded) differs from
    ``schema`` (default: the one its Python side was defined with), or None when they agree."""
    expected = torch._C.parse_schema(f"{NAMESPACE}::{name}{PYTHON_SCHEMAS[name] if schema is None else schema}")
    registered = getattr(torch.ops.sophon_ext, name).default._schema
    return None if registered == expected else f"registered {registered}, Python expects {expected}"


def define_op(name: str, schema: str, reference: Callable) -> Callable:
    """Make ``torch.ops.sophon_ext.<name>`` exist and give it ``reference`` as fallback.

    ``schema`` is the part after the name, e.g. ``"(Tensor x) -> Tensor"``; it
    must equal the one in csrc/ops.cpp (:func:`schema_mismatch` checks, tested
    for every op). Returns the op's default overload.
    """
    PYTHON_SCHEMAS[name] = schema
    if not hasattr(torch.ops.sophon_ext, name):
        _fragment.define(name + schema)
    _fragment.impl(name, reference if _state["loaded"] else _announcing(reference), "CompositeExplicitAutograd")
    return getattr(torch.ops.sophon_ext, name).default


def _announcing(reference: Callable) -> Callable:
    """``reference`` that announces the fallback the first time it runs."""

    @functools.wraps(reference)
    def kernel(*args, **kwargs):
        _warn_fallback()
        return reference(*args, **kwargs)

    return kernel
