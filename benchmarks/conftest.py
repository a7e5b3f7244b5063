"""Shared benchmark setup: collect bench_*.py files and run them on every available device."""

import pytest
import torch


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
