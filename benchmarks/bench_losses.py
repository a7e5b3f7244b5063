"""Fused suppression loss (ICE + KLU) forward+backward vs the same loss written with torch ops.

Three implementations of ``mean(ICE + KLU)`` over logits (N, C):
- ``fused``: sophon_ext.functional.suppression_loss (one compiled kernel each way),
- ``eager``: the stable composition with torch ops (two logsumexps, a scatter, a mean),
- ``compiled``: torch.compile of that composition (inductor).
Each benchmark group is one (device, N, C) case, so pytest-benchmark's table
reads as ratios. Run: python -m pytest benchmarks/bench_losses.py --benchmark-only
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, synchronized

import sophon_ext.functional as SF
from sophon_ext.ops import has_compiled_kernel

CASES = {"N8192-C1000": (8192, 1000), "N256-C10": (256, 10)}


def eager_suppression_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ICE + KLU with plain torch ops, the stable way: -log(1 - p_y) = lse(z) - lse(z without y)."""
    lse = torch.logsumexp(logits, 1)
    lse_rest = torch.logsumexp(logits.scatter(1, target[:, None], float("-inf")), 1)
    ice = lse - lse_rest
    klu = lse - logits.mean(1) - math.log(logits.shape[1])
    return (ice + klu).mean()


def fused_suppression_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return SF.suppression_loss(logits, target, ice_weight=1.0, klu_weight=1.0)


_compiled = {}


def implementation(name: str):
    if name == "fused":
        return fused_suppression_loss
    if name == "eager":
        return eager_suppression_loss
    if "compiled" not in _compiled:
        _compiled["compiled"] = torch.compile(eager_suppression_loss, dynamic=False)
    return _compiled["compiled"]


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return request.param


@pytest.fixture(params=DEVICES, scope="module")
def device(request):
    return request.param


def forward_backward(fn, logits, target):
    x = logits.detach().requires_grad_()
    loss = fn(x, target)
    loss.backward()
    return loss.detach(), x.grad


@pytest.fixture(scope="module")
def inputs(case, device):
    """Logits and targets of a case, after checking that all implementations agree on them.

    A fixture rather than a test, so the check also runs under --benchmark-only.
    """
    n, c = CASES[case]
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, c, generator=gen) * 3).to(device)
    target = torch.randint(0, c, (n,), generator=gen).to(device)
    exact_loss, exact_grad = forward_backward(eager_suppression_loss, logits.double(), target)
    for name in ("fused", "eager", "compiled"):
        loss, grad = forward_backward(implementation(name), logits, target)
        torch.testing.assert_close(loss.double(), exact_loss, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-4, atol=1e-7, msg=name)
    return logits, target


@pytest.mark.parametrize("name", ["fused", "eager", "compiled"])
def test_forward_backward(benchmark, name, case, device, inputs):
    logits, target = inputs
    fn = implementation(name)
    step = synchronized(lambda: forward_backward(fn, logits, target), device)
    benchmark.group = f"suppression loss fwd+bwd {device} {case}"
    benchmark.extra_info["compiled_kernels"] = has_compiled_kernel(device)
    benchmark.pedantic(step, rounds=10 if case == "N8192-C1000" else 200, warmup_rounds=2)
