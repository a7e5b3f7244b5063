"""Shared benchmark setup: collect bench_*.py files, run them on every available device,
and never time the pure-PyTorch fallback as if it were a compiled kernel.

A row of a compiled op (a parameter valued ``"fused"``, or the ``compiled_op``
marker) is skipped, loudly, when the compiled library has no kernels for its
device; SOPHON_BENCH_FALLBACK=1 runs it anyway. Every row records
``extra_info["kernels"]``: ``"compiled"`` or ``"fallback"``.
"""

import os

import pytest
import torch

from sophon_ext import ops

# The parameter value that names the compiled implementation in a benchmark's id.
COMPILED_PARAM_VALUE = "fused"
FALLBACK_ENV = "SOPHON_BENCH_FALLBACK"
_skipped_for_kernels: list[str] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "compiled_op: times a compiled op (skipped when the library is not loaded)")


def uses_compiled_op(item) -> bool:
    callspec = getattr(item, "callspec", None)
    named = callspec is not None and COMPILED_PARAM_VALUE in callspec.params.values()
    return named or item.get_closest_marker("compiled_op") is not None


def item_device(item) -> str:
    callspec = getattr(item, "callspec", None)
    return str(callspec.params.get("device", "cpu")) if callspec is not None else "cpu"


def kernels_label(device: str) -> str:
    return "compiled" if ops.has_compiled_kernel(device) else "fallback"


def compiled_op_gate(device: str, allow_fallback: bool | None = None) -> str:
    """The row's label, or a skip when it would time the fallback of a compiled op."""
    label = kernels_label(device)
    if allow_fallback is None:
        allow_fallback = os.environ.get(FALLBACK_ENV, "") not in ("", "0")
    if label == "fallback" and not allow_fallback:
        pytest.skip(f"NOT TIMED: no compiled kernels for {device} ({ops.extension_info()['error']}); "
                    f"this row would time the pure-PyTorch fallback ({FALLBACK_ENV}=1 times it anyway)")
    return label


def pytest_runtest_setup(item):
    if uses_compiled_op(item):
        try:
            compiled_op_gate(item_device(item))
        except pytest.skip.Exception:
            _skipped_for_kernels.append(item.nodeid)
            raise


@pytest.fixture(autouse=True)
def _label_kernels(request):
    if "benchmark" in request.fixturenames:
        request.getfixturevalue("benchmark").extra_info["kernels"] = kernels_label(item_device(request.node))


def pytest_terminal_summary(terminalreporter):
    if _skipped_for_kernels:
        terminalreporter.section("compiled kernels missing", sep="!", red=True, bold=True)
        terminalreporter.line(f"{len(_skipped_for_kernels)} benchmark(s) of compiled ops NOT run: "
                              f"{ops.extension_info()['error']}", red=True)
        terminalreporter.line("build the kernels beside the sources (bash scripts/build_inplace.sh, or bash "
                              "scripts/setup.sh), or run from an installed package", red=True)


def pytest_collect_file(file_path, parent):
    # `pytest benchmarks` collects bench_*.py (files named on the command line are collected anyway).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


def synchronized(fn, device: str):
    """fn, waiting for the device to finish before returning, so timings are honest."""
    if device != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run
