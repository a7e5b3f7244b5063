"""Loads the compiled kernels once and gives every op a pure-PyTorch fallback.

Every op is called as ``torch.ops.sophon_ext.<name>``. When the compiled
library is loaded, its CPU (and, if built, CUDA) kernels answer; the Python
reference is registered as the ``CompositeExplicitAutograd`` kernel, which the
dispatcher only uses for devices without a compiled kernel. When the library
is missing or was built for another torch, :func:`define_op` defines the
schema here and the reference answers everywhere, so the package works the
same, only slower.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

NAMESPACE = "sophon_ext"
_PACKAGE_DIR = Path(__file__).resolve().parent
_LIBRARY_PATH = _PACKAGE_DIR / "_C.so"
_BUILD_INFO_PATH = _PACKAGE_DIR / "_build_info.json"

# Set SOPHON_EXT_DISABLE=1 to ignore the compiled library (tests, benchmarks).
_DISABLED = os.environ.get("SOPHON_EXT_DISABLE", "0") not in ("", "0", "false", "False")

_state: dict = {"loaded": False, "cuda": False, "torch": None, "error": None}
# Python-side definitions live on this fragment (schemas the library lacks,
# fallback kernels). Kept alive for the life of the process.
_fragment = torch.library.Library(NAMESPACE, "FRAGMENT")


def _same_torch(built: str, runtime: str) -> bool:
    # "2.13.0+cpu" and "2.13.0" are ABI-compatible builds of the same release
    # only if the local tag matches too; compare exactly.
    return built == runtime


def _load() -> None:
    if _DISABLED:
        _state["error"] = "disabled by SOPHON_EXT_DISABLE"
        return
    if not _LIBRARY_PATH.exists():
        _state["error"] = f"compiled library not found at {_LIBRARY_PATH}"
    else:
        try:
            info = json.loads(_BUILD_INFO_PATH.read_text())
        except (OSError, ValueError) as exc:
            info = {}
            _state["error"] = f"unreadable build info {_BUILD_INFO_PATH}: {exc}"
        built = info.get("torch")
        if built is not None and not _same_torch(built, torch.__version__):
            _state["error"] = (
                f"kernels were built against torch {built} but torch {torch.__version__} "
                "is running; rebuild with `pip install --no-build-isolation .`"
            )
        elif built is not None:
            try:
                torch.ops.load_library(str(_LIBRARY_PATH))
            except (OSError, RuntimeError) as exc:
                _state["error"] = f"could not load {_LIBRARY_PATH}: {exc}"
            else:
                _state.update(loaded=True, cuda=bool(info.get("cuda")), torch=built, error=None)
                return
    warnings.warn(
        f"sophon_ext: using the pure-PyTorch reference implementations ({_state['error']}).",
        RuntimeWarning,
        stacklevel=3,
    )


_load()


def extension_info() -> dict:
    """What was loaded: compiled CPU/CUDA kernels and the torch they were built against."""
    return {
        "cpu": _state["loaded"],
        "cuda": _state["loaded"] and _state["cuda"],
        "torch": _state["torch"],
        "runtime_torch": torch.__version__,
        "library": str(_LIBRARY_PATH) if _state["loaded"] else None,
        "error": _state["error"],
    }


def has_compiled_kernel(device: torch.device | str) -> bool:
    """True when the compiled library has kernels for tensors on ``device``."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return _state["loaded"]
    if device_type == "cuda":
        return _state["loaded"] and _state["cuda"]
    return False


def define_op(name: str, schema: str, reference: Callable) -> Callable:
    """Make ``torch.ops.sophon_ext.<name>`` exist and give it ``reference`` as fallback.

    ``schema`` is the part after the name, e.g. ``"(Tensor x) -> Tensor"``; it
    must equal the one in csrc/ops.cpp. Returns the op's default overload.
    """
    if not hasattr(torch.ops.sophon_ext, name):
        _fragment.define(name + schema)
    _fragment.impl(name, reference, "CompositeExplicitAutograd")
    return getattr(torch.ops.sophon_ext, name).default
