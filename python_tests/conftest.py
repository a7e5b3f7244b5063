"""Fixtures shared by several test files. Keep this file tiny."""

import pytest
import torch

#: "cpu", plus "cuda" (marked ``cuda``, skipped without a GPU).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Runs a test on every available device."""
    return request.param
