"""Suppression losses: every kernel, forward and backward, against plain float64 PyTorch.

The references below are written independently of sophon_ext/functional.py
and sophon_ext/ops/losses.py:
ICE and KLU from their definitions, the reference-code variant literally as
``F.cross_entropy(1 - z, y)``, and class weights / ignore_index / reductions
as ``F.cross_entropy`` documents them. Tests run with the compiled kernels
and, under ``SOPHON_EXT_DISABLE=1``, with the pure-PyTorch fallback.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from torch import Tensor

import sophon_ext.functional as SF
import sophon_ext.nn as SN

KINDS = ("ice", "ice_reference", "klu", "klu_target", "fused")


# --------------------------------------------------------------------------- references


def reference_rows(kind: str, z: Tensor, y: Tensor | None, ice_weight: float = 0.7, klu_weight: float = 1.3) -> Tensor:
    """Per-row loss of logits rows z (M, C), computed in z's dtype."""
    c = z.shape[1]
    klu = -math.log(c) - torch.log_softmax(z, 1).mean(1)  # KL(U || p) by definition
    if kind in ("klu", "klu_target"):
        return klu
    if kind == "ice_reference":
        return F.cross_entropy(1 - z, y, reduction="none")  # the reference code, verbatim
    # -log(1 - p_y) = logsumexp(z) - logsumexp over the other classes
    others = z.masked_fill(F.one_hot(y, c).bool(), float("-inf"))
    ice = z.logsumexp(1) - others.logsumexp(1)
    return ice if kind == "ice" else ice_weight * ice + klu_weight * klu


def reference_loss(kind, logits, target, weight=None, ignore_index=-100, reduction="mean", dtype=torch.float64):
    """The whole loss (weights, ignore_index, reduction) in ``dtype``, like F.cross_entropy."""
    z = logits.to(dtype)
    c = z.shape[0] if z.dim() == 1 else z.shape[1]
    rows = z[None] if z.dim() == 1 else z.movedim(1, -1).reshape(-1, c)
    y = None if target is None else target.reshape(-1)
    if y is None:
        valid = torch.ones(rows.shape[0], dtype=torch.bool)
    else:
        valid = y != ignore_index
        y = torch.where(valid, y, 0)
    values = torch.where(valid, reference_rows(kind, rows, y), 0)
    scale = valid.to(dtype) if weight is None else torch.where(valid, weight.to(dtype)[y], 0)
    values = values * scale
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / scale.sum()
    return values.reshape(z.shape[:1] + z.shape[2:]) if z.dim() > 1 else values.reshape(())


def call_loss(kind, logits, target, weight=None, ignore_index=-100, reduction="mean"):
    if kind == "ice":
        return SF.inverse_cross_entropy(logits, target, weight, ignore_index, reduction)
    if kind == "ice_reference":
        return SF.inverse_cross_entropy_reference(logits, target, weight, ignore_index, reduction)
    if kind == "klu":
        return SF.kl_uniform(logits, reduction=reduction)
    if kind == "klu_target":
        return SF.kl_uniform(logits, target, weight, ignore_index, reduction)
    return SF.suppression_loss(logits, target, 0.7, 1.3, weight, ignore_index, reduction)


def uses_target(kind):
    return kind != "klu"


def loss_and_grad(fn, logits, cotangent=None):
    """fn(logits) and d<fn(logits), v>/dlogits; v is random (seeded) unless given."""
    x = logits.detach().requires_grad_()
    out = fn(x)
    if cotangent is None:
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = cotangent.to(out.dtype).to(out.device)
    (grad,) = torch.autograd.grad(out, x, v, allow_unused=True)
    return out.detach(), (torch.zeros_like(x) if grad is None else grad)


def max_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    both_nan = a.isnan() & b.isnan()
    same_inf = (a == b) & a.isinf()
    diff = (a - b).abs().masked_fill(both_nan | same_inf, 0)
    return diff.max().item() if diff.numel() else 0.0


def assert_matches_reference(kind, logits, target, weight=None, ignore_index=-100, reduction="mean"):
    """Kernel vs float64 reference, forward and backward.

    float64: tight tolerance. Lower precisions: the kernel's error may be at
    most 2x the error of the plain PyTorch reference run in that precision
    (plus a hair), the rule flash-attention's tests use.
    """
    actual, actual_grad = loss_and_grad(lambda x: call_loss(kind, x, target, weight, ignore_index, reduction), logits)
    # the cotangent the kernel saw, rounded to its dtype, serves all references
    v = torch.randn(actual.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(logits.dtype).double()
    cpu64 = logits.detach().double().cpu()
    t64 = None if target is None else target.cpu()
    w64 = None if weight is None else weight.double().cpu()
    expected, expected_grad = loss_and_grad(lambda x: reference_loss(kind, x, t64, w64, ignore_index, reduction), cpu64, v)
    assert actual.shape == expected.shape and actual.dtype == logits.dtype and actual_grad.dtype == logits.dtype
    scale = 1.0 + (cpu64.abs().max().item() if cpu64.numel() else 0.0)
    if logits.dtype == torch.float64:
        assert max_err(actual, expected) <= 1e-10 * scale
        assert max_err(actual_grad, expected_grad) <= 1e-10 * scale
        return
    # plain PyTorch in float32 (for float16/bfloat16 inputs too: the kernels accumulate in float32)
    plain, plain_grad = loss_and_grad(
        lambda x: reference_loss(kind, x, t64, w64, ignore_index, reduction, dtype=torch.float32), logits.detach().cpu(), v
    )
    eps = torch.finfo(logits.dtype).eps
    magnitude = max(scale, expected.abs().max().item() if expected.numel() else 0.0)  # output rounding
    assert max_err(actual, expected) <= 2 * max_err(plain, expected) + 4 * eps * magnitude
    assert max_err(actual_grad, expected_grad) <= 2 * max_err(plain_grad, expected_grad) + 4 * eps


def random_inputs(shape, device="cpu", dtype=torch.float64, scale=3.0, seed=0, ignore_index=-100, ignore_fraction=0.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    c = shape[0] if len(shape) == 1 else shape[1]
    target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    target = torch.randint(0, c, target_shape, generator=gen)
    if ignore_fraction:
        target = torch.where(torch.rand(target_shape, generator=gen) < ignore_fraction, ignore_index, target)
    weight = torch.rand(c, generator=gen, dtype=torch.float64).to(dtype) + 0.1
    return logits.to(device), target.to(device), weight.to(device)

# --------------------------------------------------------------------------- value checks

SHAPES = [(1, 2), (9, 2), (5, 1000), (33, 10), (4, 3, 5, 6), (7,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, shape, dtype, device):
    logits, target, weight = random_inputs(shape, device, dtype, seed=KINDS.index(kind) + sum(shape))
    target = target if uses_target(kind) else None
    for reduction in ("none", "mean", "sum"):
        assert_matches_reference(kind, logits, target, reduction=reduction)
    if uses_target(kind):  # class weights and ignored elements
        logits, target, weight = random_inputs(shape, device, dtype, seed=1, ignore_index=3, ignore_fraction=0.3)
        if len(shape) == 1:
            target = torch.tensor(1, device=device)
        for reduction in ("none", "mean", "sum"):
            assert_matches_reference(kind, logits, target, weight, ignore_index=3, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_large_magnitude_logits_and_ties(kind, dtype, device):
    logits, target, _ = random_inputs((16, 7), device, dtype, scale=1e4, seed=2)
    target = target if uses_target(kind) else None
    assert_matches_reference(kind, logits, target, reduction="none")
    ties = torch.zeros(6, 5, dtype=dtype, device=device)
    ties[3:, :2] = 2.5  # two tied maxima, one of them the target below
    tie_target = torch.tensor([0, 1, 4, 0, 1, 4], device=device) if uses_target(kind) else None
    assert_matches_reference(kind, ties, tie_target, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ice_is_finite_when_p_y_rounds_to_one(dtype, device):
    logits = torch.tensor([[1e4, 0.0, 0.0], [0.0, -3.0, 1e4]], dtype=dtype, device=device, requires_grad=True)
    target = torch.tensor([0, 2], device=device)
    loss = SF.inverse_cross_entropy(logits, target, reduction="none")
    # -log(1 - p_y) = softplus(z_y - logsumexp(others)) = 1e4 - log 2 and 1e4 - log(1 + e^-3), plus ~e^-1e4
    expected = torch.tensor([1e4 - math.log(2.0), 1e4 - math.log1p(math.exp(-3.0))], dtype=torch.float64)
    torch.testing.assert_close(loss.double().cpu(), expected, rtol=1e-7, atol=0)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    # p_y (e_y - q): e_y minus the softmax over the other classes
    q_other = torch.softmax(torch.tensor([-3.0, 0.0], dtype=torch.float64), 0)
    expected_grad = torch.tensor([[1.0, -0.5, -0.5], [-q_other[1], -q_other[0], 1.0]], dtype=torch.float64)
    torch.testing.assert_close(grad.double().cpu(), expected_grad, rtol=1e-6, atol=1e-7)


def test_definitions_on_moderate_logits():
    """ICE is -log(1 - p_y) and KLU is KL(U || p), straight from the definitions."""
    logits, target, _ = random_inputs((20, 6), seed=3)
    p = torch.softmax(logits, 1)
    ice = -torch.log1p(-p.gather(1, target[:, None]).squeeze(1))
    torch.testing.assert_close(SF.inverse_cross_entropy(logits, target, reduction="none"), ice)
    u = torch.full_like(p, 1 / 6)
    torch.testing.assert_close(SF.kl_uniform(logits, reduction="none"), (u * (u / p).log()).sum(1))
    torch.testing.assert_close(SF.kl_uniform(torch.full((2, 6), 4.0, dtype=torch.float64)), torch.tensor(0.0, dtype=torch.float64))
    fused = SF.suppression_loss(logits, target, 0.25, 2.0, reduction="none")
    torch.testing.assert_close(fused, 0.25 * ice + 2.0 * (u * (u / p).log()).sum(1))


def test_weight_and_ignore_index_follow_cross_entropy_conventions():
    """With ICE replaced by nothing, the weighted mean denominator is F.cross_entropy's."""
    logits, target, weight = random_inputs((12, 5), seed=4, ignore_fraction=0.4)
    ce_rows = F.cross_entropy(logits, target, weight=weight, reduction="none")
    ce_mean = F.cross_entropy(logits, target, weight=weight)
    denominator = ce_rows.sum() / ce_mean
    ice_rows = SF.inverse_cross_entropy(logits, target, weight=weight, reduction="none")
    torch.testing.assert_close(SF.inverse_cross_entropy(logits, target, weight=weight), ice_rows.sum() / denominator)
    assert torch.all(ice_rows[target == -100] == 0)
    grad = torch.autograd.grad(SF.suppression_loss(logits.requires_grad_(), target, weight=weight), logits)[0]
    assert torch.all(grad[target == -100] == 0) and torch.any(grad[target != -100] != 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_accumulates_in_float32(kind, dtype, device):
    logits, target, weight = random_inputs((24, 37), device, dtype, seed=5, ignore_fraction=0.2)
    target = target if uses_target(kind) else None
    assert_matches_reference(kind, logits, target, reduction="none")
    if uses_target(kind):
        assert_matches_reference(kind, logits, target, weight, reduction="mean")


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_and_empty_inputs(kind, device):
    base, target, _ = random_inputs((10, 12), device, seed=6)
    logits = base[:, ::2]  # strided view, C = 6
    target = (target % 6) if uses_target(kind) else None
    assert not logits.is_contiguous()
    assert_matches_reference(kind, logits, target, reduction="none")
    transposed = torch.randn(5, 4, device=device, dtype=torch.float64).t()  # (4, 5), column-major
    assert_matches_reference(kind, transposed, torch.arange(4, device=device) if uses_target(kind) else None, reduction="sum")
    empty = torch.empty(0, 4, dtype=torch.float64, device=device, requires_grad=True)
    empty_target = torch.empty(0, dtype=torch.long, device=device) if uses_target(kind) else None
    assert call_loss(kind, empty, empty_target, reduction="none").shape == (0,)
    assert call_loss(kind, empty, empty_target, reduction="sum").item() == 0
    mean = call_loss(kind, empty, empty_target, reduction="mean")
    assert mean.isnan()  # as F.cross_entropy on an empty batch
    (grad,) = torch.autograd.grad(call_loss(kind, empty, empty_target, reduction="sum"), empty)
    assert grad.shape == (0, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_propagate(kind, device):
    logits, target, _ = random_inputs((4, 5), device, torch.float32, seed=7)
    logits[1, 2] = float("nan")
    logits[2, 3] = float("inf")
    logits = logits.requires_grad_()
    target = target if uses_target(kind) else None
    loss = call_loss(kind, logits, target, reduction="none")
    assert loss[1].isnan()
    assert torch.isfinite(loss[[0, 3]]).all()
    if kind not in ("ice", "ice_reference"):  # ICE can be exactly 0 or inf there; KLU is NaN
        assert loss[2].isnan()
    (grad,) = torch.autograd.grad(loss[[0, 1, 3]].sum(), logits)
    assert grad[1].isnan().any() and torch.isfinite(grad[[0, 3]]).all()


# --------------------------------------------------------------------------- huge logits


def huge_logit_groups(dtype, seed):
    """Rows far from 0, each group (logits (M, C), target (M,)) with its own C.

    The rows of the bug reports ([0, 1, -1, .5] + 1e16 in float64; all 1e20,
    C = 3, and all 1e37, C = 100, in float32) and fresh random ones: moderate
    spreads (3 randn) on offsets where the logits' ulp is ~1, and rows of
    ulp-spaced values with ties at the max on offsets up to near the dtype's
    range. Every row lies within a factor of 2 of its max, so z - max is
    exact in float64 (Sterbenz) and the shifted float64 reference is exact.
    """
    gen = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    groups = []
    if dtype == torch.float64:
        groups.append(torch.tensor([[0.0, 1.0, -1.0, 0.5]], dtype=torch.float64) + 1e16)
        moderate, ulp_spaced = (1e12, 4e15, -8e15, 1e16), (1e20, -1e100, 1e300)
    else:
        groups.append(torch.full((1, 3), 1e20, dtype=dtype))
        groups.append(torch.full((1, 100), 1e37, dtype=dtype))
        moderate, ulp_spaced = (3e4, 8e6, -1.6e7), (1e20, -1e30, 1e37)
    for c in (3, 17):
        if finfo.eps < 1e-3:  # offsets where spreads of a few units survive rounding (not for float16/bfloat16)
            offsets = torch.tensor(moderate, dtype=torch.float64)[torch.randint(0, len(moderate), (12,), generator=gen)]
            groups.append((offsets[:, None] + 3 * torch.randn(12, c, generator=gen, dtype=torch.float64)).to(dtype))
        offsets = torch.tensor(ulp_spaced, dtype=torch.float64)[torch.randint(0, len(ulp_spaced), (12,), generator=gen)]
        base = offsets.to(dtype)
        ulp = (torch.nextafter(base.abs(), torch.tensor(math.inf, dtype=dtype)) - base.abs()).double()
        steps = torch.randint(-3, 1, (12, c), generator=gen).double()  # 0 (the max, often tied) down to 3 ulp below
        groups.append((base.double()[:, None] + steps * ulp[:, None]).to(dtype))
    return [(z, torch.randint(0, z.shape[1], (z.shape[0],), generator=gen)) for z in groups]


def exact_rows_and_grad(kind, z, y):
    """Per-row loss and its gradient from the definitions, in 300-bit arithmetic (mpmath) on the exact logits
    shifted by the row max (exactly: the rows of huge_logit_groups lie within a factor of 2 of it).

    ICE = softplus(z_y - logsumexp_{j != y} z_j) = -log(1 - p_y), gradient p_y (e_y - q) (q: softmax over j != y);
    KLU = logsumexp(z) - mean(z) - log C, gradient p - 1/C; ICE_ref = z_y + logsumexp(-z), gradient e_y - softmax(-z).
    Returns float64 (loss (M,), gradient (M, C)).
    """
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.prec = 300

    def softmax(xs):
        top = max(xs)
        e = [mp.exp(x - top) for x in xs]
        total = sum(e)
        return [x / total for x in e], top + mp.log(total)

    losses, grads = [], []
    for row, t in zip(z.double().cpu().tolist(), y.cpu().tolist()):
        # relative to the row max (every loss is shift-invariant): 1e300 + 0.7 would need 1000 bits
        x = [mp.mpf(v) - mp.mpf(max(row)) for v in row]
        assert all(xj + mp.mpf(max(row)) == mp.mpf(v) for xj, v in zip(x, row))  # exact
        c = len(x)
        p, lse = softmax(x)
        klu = lse - sum(x) / c - mp.log(c)
        klu_grad = [pj - mp.mpf(1) / c for pj in p]
        others = [x[j] for j in range(c) if j != t]
        q_others, lse_others = softmax(others)
        d = x[t] - lse_others
        ice = mp.log1p(mp.exp(d))
        p_y = 1 / (1 + mp.exp(-d))
        q = q_others[:t] + [mp.mpf(0)] + q_others[t:]
        ice_grad = [p_y * ((1 if j == t else 0) - q[j]) for j in range(c)]
        if kind in ("klu", "klu_target"):
            loss, grad = klu, klu_grad
        elif kind == "ice":
            loss, grad = ice, ice_grad
        elif kind == "ice_reference":
            r, lse_neg = softmax([-v for v in x])
            loss, grad = x[t] + lse_neg, [(1 if j == t else 0) - r[j] for j in range(c)]
        else:
            loss, grad = 0.7 * ice + 1.3 * klu, [0.7 * a + 1.3 * b for a, b in zip(ice_grad, klu_grad)]
        losses.append(float(loss))
        grads.append([float(g) for g in grad])
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64).reshape(z.shape)


def exact_cross_entropy(z, y):
    """F.cross_entropy's exact value and gradient per row (softmax - e_y), as exact_rows_and_grad."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone() if hasattr(mpmath.mp, "clone") else mpmath.mp
    mp.prec = 300
    losses, grads = [], []
    for row, t in zip(z.double().cpu().tolist(), y.cpu().tolist()):
        x = [mp.mpf(v) - mp.mpf(max(row)) for v in row]  # as in exact_rows_and_grad
        top = max(x)
        e = [mp.exp(v - top) for v in x]
        total = sum(e)
        losses.append(float(top + mp.log(total) - x[t]))
        grads.append([float(ej / total - (1 if j == t else 0)) for j, ej in enumerate(e)])
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64).reshape(z.shape)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_match_exact_reference(kind, dtype, seed, device):
    """Logits of 1e16 (float64) or up to 1e37 (float32) lose nothing: the kernels work relative to the row max.

    Per row, |error| <= 2 |F.cross_entropy's error on that row| + 8 eps (1 + |loss| + sum_j |dloss/dz_j| |z_j - max|):
    the error of perturbing each shifted logit by a relative eps, a bound F.cross_entropy itself meets.
    The gradient's error is bounded alike (plus F.cross_entropy's gradient error on the row).
    """
    eps = torch.finfo(dtype).eps
    for z, y in huge_logit_groups(dtype, seed):
        z, y = z.to(device), y.to(device)
        target = y if uses_target(kind) else None
        v = torch.randn(z.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).double()
        actual, actual_grad = loss_and_grad(lambda x: call_loss(kind, x, target, reduction="none"), z, v)
        expected, unit_grad = exact_rows_and_grad(kind, z, y)
        shifted = (z.double() - z.double().amax(1, keepdim=True)).cpu()
        condition = (unit_grad.abs() * shifted.abs()).sum(1)
        # F.cross_entropy on the same rows, in the same dtype, against its exact value
        ce, ce_grad = loss_and_grad(lambda x: F.cross_entropy(x, y, reduction="none"), z, v)
        ce_exact, ce_exact_grad = exact_cross_entropy(z, y)
        ce_err = (ce.double().cpu() - ce_exact).abs()
        ce_grad_err = (ce_grad.double().cpu() - v[:, None] * ce_exact_grad).abs().amax(1)
        err = (actual.double().cpu() - expected).abs()
        assert torch.isfinite(actual).all() and torch.isfinite(actual_grad).all()
        bound = 2 * ce_err + 8 * eps * (1 + expected.abs() + condition)
        assert (err <= bound).all(), (kind, dtype, z[err > bound], err[err > bound], bound[err > bound])
        grad_err = (actual_grad.double().cpu() - v[:, None] * unit_grad).abs().amax(1)
        grad_bound = 2 * ce_grad_err + 8 * eps * (1 + math.log(z.shape[1])) * v.abs()
        assert (grad_err <= grad_bound).all(), (kind, dtype, z[grad_err > grad_bound], grad_err, grad_bound)
        if kind in ("klu", "klu_target"):
            assert (actual >= 0).all()


def test_huge_logits_bug_report_values(device):
    """The reported rows: ICE log(4/3) (not 0.127) and KLU 0 (not 0.614, -1.0986 or -inf)."""
    z = torch.tensor([[0.0, 1.0, -1.0, 0.5]], dtype=torch.float64, device=device) + 1e16  # all 1e16 after rounding
    y = torch.tensor([0], device=device)
    torch.testing.assert_close(SF.inverse_cross_entropy(z, y).cpu(), torch.tensor(math.log(4 / 3), dtype=torch.float64))
    assert SF.kl_uniform(z).item() == 0 and SF.kl_uniform(z, y).item() == pytest.approx(0, abs=1e-15)
    for value, c in ((1e20, 3), (1e37, 100)):
        z = torch.full((2, c), value, device=device, requires_grad=True)
        assert SF.kl_uniform(z).item() == 0
        (grad,) = torch.autograd.grad(SF.kl_uniform(z), z)
        assert torch.all(grad == 0)  # p = 1/C exactly
        (grad,) = torch.autograd.grad(SF.inverse_cross_entropy(z, torch.tensor([0, 1], device=device)), z)
        expected = torch.full((c,), -1 / (c * (c - 1)), dtype=torch.float64)
        expected[0] = 1 / c
        torch.testing.assert_close(grad[0].double().cpu(), expected / 2, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_uniform_is_never_negative(dtype, device):
    """Nearly uniform rows: KLU ~ 1e-15 exactly, which float32 rounding used to turn negative (~-1e-7)."""
    gen = torch.Generator().manual_seed(20)
    for offset in (0.0, 3.0, -7.0, 1e4):
        z = (offset + 1e-7 * torch.randn(500, 7, generator=gen, dtype=torch.float64)).to(dtype).to(device)
        y = torch.randint(0, 7, (500,), generator=gen).to(device)
        for target in (None, y):
            klu = SF.kl_uniform(z, target, reduction="none")
            assert (klu >= 0).all()
            expected = reference_rows("klu", z.double().cpu(), None)
            assert max_err(klu, expected) <= 8 * torch.finfo(dtype).eps * (1 + math.log(7))
            fused = SF.suppression_loss(z, y, 0.0, 1.0, reduction="none")
            assert (fused >= 0).all()


@pytest.mark.parametrize("kind", ["ice", "ice_only_fused", "ice_reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ice_gradient_is_finite_at_infinite_off_target_logits(kind, dtype, device):
    """ICE is exactly 0 when an off-target logit is +inf; its gradient there is the limit, 0, not NaN."""
    inf = math.inf
    logits = torch.tensor(
        [[0.0, 1.0, inf], [2.0, inf, inf], [-inf, 3.0, inf], [1.0, -inf, 0.5], [0.3, -1.0, 2.0]], dtype=dtype, device=device
    )
    target = torch.tensor([0, 0, 1, 2, 1], device=device)
    if kind == "ice_reference":  # CE(1 - z, y) is infinite at a -inf logit (rows 2 and 3)
        logits, target = logits[[0, 1, 4]], target[[0, 1, 4]]

    def fn(x, t):
        if kind == "ice":
            return SF.inverse_cross_entropy(x, t, reduction="none")
        if kind == "ice_only_fused":
            return SF.suppression_loss(x, t, 2.0, 0.0, reduction="none")
        return SF.inverse_cross_entropy_reference(x, t, reduction="none")

    x = logits.clone().requires_grad_()
    loss = fn(x, target)
    assert torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
    assert torch.isfinite(grad).all()
    if kind != "ice_reference":
        assert torch.all(loss[:3] == 0) and torch.all(grad[:3] == 0)
    # the finite rows as on their own
    finite = [3, 4] if kind != "ice_reference" else [2]
    alone = logits[finite].clone().requires_grad_()
    torch.testing.assert_close(grad[finite], torch.autograd.grad(fn(alone, target[finite]).sum(), alone)[0])
    # second order stays finite too
    (hvp,) = torch.autograd.grad(grad.sum(), x)
    assert torch.isfinite(hvp).all()


@pytest.mark.parametrize("bad", [1.5, 1.0, True, False, "1", None])
def test_ignore_index_must_be_an_int(bad):
    """As F.cross_entropy: a float ignore_index (even 1.0) or a bool is a TypeError, not half-applied."""
    logits, target, weight = random_inputs((4, 3), seed=21)
    with pytest.raises(TypeError):
        F.cross_entropy(logits, target, ignore_index=bad)
    calls = [
        lambda: SF.inverse_cross_entropy(logits, target, ignore_index=bad),
        lambda: SF.inverse_cross_entropy_reference(logits, target, ignore_index=bad),
        lambda: SF.kl_uniform(logits, target, ignore_index=bad),
        lambda: SF.kl_uniform(logits, ignore_index=bad),
        lambda: SF.suppression_loss(logits, target, ignore_index=bad),
        lambda: SN.InverseCrossEntropyLoss(ignore_index=bad),
        lambda: SN.InverseCrossEntropyReferenceLoss(weight, ignore_index=bad),
        lambda: SN.KLUniformLoss(ignore_index=bad),
        lambda: SN.SuppressionLoss(ice_weight=0.5, klu_weight=1.0, ignore_index=bad),
    ]
    for call in calls:
        with pytest.raises(TypeError, match=r"ignore_index: must be an int"):
            call()
    module = SN.SuppressionLoss()
    module.ignore_index = bad  # set after construction: the functional check still applies
    with pytest.raises(TypeError, match=r"ignore_index: must be an int"):
        module(logits, target)


def test_integer_ignore_index_types_are_accepted():
    np = pytest.importorskip("numpy")
    logits, target, _ = random_inputs((6, 3), seed=22)
    target[1] = 1
    expected = SF.suppression_loss(logits, target, ignore_index=1)
    for index in (np.int64(1), np.int32(1), torch.tensor(1)):
        torch.testing.assert_close(SF.suppression_loss(logits, target, ignore_index=index), expected)
        torch.testing.assert_close(SN.SuppressionLoss(ignore_index=index)(logits, target), expected)
    with pytest.raises(TypeError, match="ignore_index"):
        SF.inverse_cross_entropy(logits, target, ignore_index=np.float64(1.0))
    for bad in (np.bool_(True), torch.tensor(True), torch.tensor(1.0)):
        with pytest.raises(TypeError, match="ignore_index"):
            SF.inverse_cross_entropy(logits, target, ignore_index=bad)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_and_gradgradcheck(kind):
    logits, target, weight = random_inputs((3, 4, 2), seed=8, ignore_index=1, ignore_fraction=0.3)
    target = target if uses_target(kind) else None
    weight = weight if kind not in ("klu",) else None

    def fn(x):
        return call_loss(kind, x, target, weight, ignore_index=1, reduction="none")

    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_gradcheck_through_raw_ops_and_their_stats():
    """Each op on its own: the stats outputs and the backward ops' inputs (grad_loss, logits, stats)."""
    logits, target, _ = random_inputs((4, 5), seed=9)
    target[1] = -100
    ops = torch.ops.sophon_ext
    g = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = logits.requires_grad_()
    for klu_target in (target, None):
        # stats (m, r): the non-target max and log sum exp(z_j - m), differentiable with or without a target
        ice_weight = 0.6 if klu_target is not None else 0.0
        assert torch.autograd.gradcheck(lambda x: ops.suppression_loss(x, klu_target, ice_weight, 1.4, -100), (x,))
        stats = ops.suppression_loss(x.detach(), klu_target, ice_weight, 1.4, -100)[1].requires_grad_()
        assert torch.autograd.gradgradcheck(
            lambda g, x, s: ops.suppression_loss_backward(g, x, klu_target, s, ice_weight, 1.4, -100), (g, x, stats)
        )
    assert torch.autograd.gradcheck(lambda x: ops.inverse_cross_entropy_reference(x, target, -100), (x,))
    ref_stats = ops.inverse_cross_entropy_reference(x.detach(), target, -100)[1].requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda g, x, s: ops.inverse_cross_entropy_reference_backward(g, x, target, s, -100), (g, x, ref_stats)
    )


# --------------------------------------------------------------------------- registrations


def _op_samples():
    logits, target, _ = random_inputs((6, 5), seed=10)
    target[2] = -100
    for dtype in (torch.float64,):  # opcheck is slow; dtypes are covered by the value tests
        z = logits.to(dtype).requires_grad_()
        yield torch.ops.sophon_ext.suppression_loss.default, (z, target, 0.5, 2.0, -100)
        yield torch.ops.sophon_ext.suppression_loss.default, (z, None, 0.0, 1.0, -100)
        yield torch.ops.sophon_ext.inverse_cross_entropy_reference.default, (z, target, -100)
        zd = z.detach()
        _, stats = torch.ops.sophon_ext.suppression_loss(zd, target, 0.5, 2.0, -100)
        g = torch.randn(6, dtype=dtype, requires_grad=True)
        yield torch.ops.sophon_ext.suppression_loss_backward.default, (g, z, target, stats, 0.5, 2.0, -100)
        _, ref_stats = torch.ops.sophon_ext.inverse_cross_entropy_reference(zd, target, -100)
        yield torch.ops.sophon_ext.inverse_cross_entropy_reference_backward.default, (g, z, target, ref_stats, -100)


@pytest.mark.parametrize("sample", list(_op_samples()), ids=lambda s: s[0].__name__ if hasattr(s, "__len__") else str(s))
def test_opcheck(sample):
    op, args = sample
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("kind", ["fused", "ice_reference"])
def test_torch_compile_fullgraph(kind):
    logits, target, weight = random_inputs((8, 6), seed=11, ignore_fraction=0.2)

    def fn(x):
        return call_loss(kind, x, target, weight)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_value, eager_grad = loss_and_grad(fn, logits)
    value, grad = loss_and_grad(compiled, logits)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_and_vmap_of_grad(kind, device):
    logits, target, weight = random_inputs((3, 5, 4), device, seed=13, ignore_index=2, ignore_fraction=0.3)
    logits = logits.movedim(1, 2)  # (B=3, N=4, C=5) batches of (N, C) problems
    target = torch.randint(0, 5, (3, 4), device=device)
    target[0, 1] = 2  # ignored
    has_target = uses_target(kind)

    def f(z, y):
        return call_loss(kind, z, y if has_target else None, weight if has_target else None, ignore_index=2)

    looped = torch.stack([f(logits[b], target[b]) for b in range(3)])
    torch.testing.assert_close(torch.func.vmap(f)(logits, target), looped)
    shared = torch.stack([f(logits[b], target[0]) for b in range(3)])
    torch.testing.assert_close(torch.func.vmap(f, in_dims=(0, None))(logits, target[0]), shared)
    grads = torch.func.vmap(torch.func.grad(f))(logits, target)
    looped_grads = torch.stack([loss_and_grad(lambda z: f(z, target[b]), logits[b], torch.tensor(1.0))[1] for b in range(3)])
    torch.testing.assert_close(grads, looped_grads)
    # grad of a vmapped loss, and a vmap over the logits' last dim (batch dim not first)
    total, _ = loss_and_grad(lambda z: torch.func.vmap(f)(z, target).sum(), logits)
    torch.testing.assert_close(total, looped.sum())
    moved = torch.func.vmap(f, in_dims=(2, None))(logits.movedim(0, 2).detach(), target[0])
    torch.testing.assert_close(moved, shared)


@pytest.mark.parametrize("kind", ["fused", "ice_reference"])
def test_hessian_under_torch_func(kind):
    """Second order through torch.func (the autograd.Function path) equals torch.autograd's (reverse mode only)."""
    logits, target, _ = random_inputs((3, 4), seed=15)

    def f(z):
        return call_loss(kind, z, target)

    hessian = torch.func.jacrev(torch.func.jacrev(f))(logits)
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(f, logits))


def test_vmap_of_grad_with_per_sample_logits():
    """Per-sample gradients: vmap over samples of an unbatched (C,) loss."""
    logits, target, _ = random_inputs((6, 4), seed=14)
    per_sample = torch.func.vmap(torch.func.grad(lambda z, y: SF.suppression_loss(z, y)))(logits, target)
    expected = torch.autograd.grad(SF.suppression_loss(logits.requires_grad_(), target, reduction="sum"), logits)[0]
    torch.testing.assert_close(per_sample, expected)


# --------------------------------------------------------------------------- property test


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(0, 6),
    c=st.integers(2, 40),
    extra=st.sampled_from([(), (3,), (2, 2)]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([0.1, 3.0, 1e3]),
    kind=st.sampled_from(KINDS),
    ignore_fraction=st.sampled_from([0.0, 0.5]),
    weighted=st.booleans(),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_property_kernel_equals_reference(n, c, extra, dtype, scale, kind, ignore_fraction, weighted, reduction, seed):
    logits, target, weight = random_inputs((n, c, *extra), dtype=dtype, scale=scale, seed=seed, ignore_fraction=ignore_fraction)
    if not uses_target(kind):
        target, weight = None, None
    assert_matches_reference(kind, logits, target, weight if weighted else None, reduction=reduction)


# --------------------------------------------------------------------------- bad input


def test_bad_logits_and_target():
    logits, target, weight = random_inputs((4, 3), seed=15)
    with pytest.raises(TypeError, match="logits"):
        SF.suppression_loss(logits.long(), target)
    with pytest.raises(TypeError, match="logits"):
        SF.suppression_loss(logits.tolist(), target)
    with pytest.raises(ValueError, match="logits"):
        SF.suppression_loss(torch.tensor(1.0), target)
    with pytest.raises(ValueError, match="C >= 2"):
        SF.inverse_cross_entropy(torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="C >= 2"):
        SF.kl_uniform(torch.randn(4, 1))
    with pytest.raises(ValueError, match="probability targets"):  # a float target means probabilities
        SF.inverse_cross_entropy(logits, target.double())
    with pytest.raises(TypeError, match="target"):  # the reference-code variant takes indices only
        SF.inverse_cross_entropy_reference(logits, target.double())
    with pytest.raises(TypeError, match="target"):
        SF.inverse_cross_entropy(logits, target.bool())
    with pytest.raises(TypeError, match="target"):
        SF.suppression_loss(logits, None)
    with pytest.raises(ValueError, match="target"):
        SF.inverse_cross_entropy(logits, target[:3])
    with pytest.raises(ValueError, match="target"):
        SF.inverse_cross_entropy_reference(logits, target[:, None])
    with pytest.raises(ValueError, match="target"):
        SF.suppression_loss(logits.to("meta"), target)
    with pytest.raises(ValueError, match="weight"):
        SF.inverse_cross_entropy(logits, target, weight=weight[:2])
    with pytest.raises(TypeError, match="weight"):
        SF.inverse_cross_entropy(logits, target, weight=weight.long())
    with pytest.raises(ValueError, match="weight"):
        SF.kl_uniform(logits, weight=weight)
    with pytest.raises(ValueError, match="reduction"):
        SF.kl_uniform(logits, reduction="avg")
    with pytest.raises(ValueError, match="ice_weight"):
        SF.suppression_loss(logits, target, ice_weight=float("nan"))
    with pytest.raises(TypeError, match="klu_weight"):
        SF.suppression_loss(logits, target, klu_weight="1")
    # int32 targets are accepted (converted), like other integer dtypes
    torch.testing.assert_close(SF.inverse_cross_entropy(logits, target.int()), SF.inverse_cross_entropy(logits, target))


@pytest.mark.parametrize("kind", ["ice", "ice_reference", "klu_target", "fused"])
@pytest.mark.parametrize("bad", [3, -1, 10**12, -100 - 1])
def test_target_out_of_range_raises_index_error(kind, bad, device):
    logits, target, _ = random_inputs((4, 3), device, seed=16)
    target[2] = bad
    with pytest.raises(IndexError, match="target"):
        call_loss(kind, logits, target)


def test_raw_ops_check_their_arguments():
    """Direct torch.ops calls cannot read out of bounds: the kernels check too."""
    logits, target, _ = random_inputs((4, 3), seed=17)
    ops = torch.ops.sophon_ext
    bad_target = target.clone()
    bad_target[0] = 7
    with pytest.raises(IndexError, match="target"):
        ops.suppression_loss(logits, bad_target, 1.0, 1.0, -100)
    with pytest.raises(IndexError, match="target"):
        ops.inverse_cross_entropy_reference(logits, bad_target, -100)
    _, stats = ops.suppression_loss(logits, target, 1.0, 1.0, -100)
    _, ref_stats = ops.inverse_cross_entropy_reference(logits, target, -100)
    g = torch.ones(4, dtype=torch.float64)
    with pytest.raises(IndexError, match="target"):
        ops.suppression_loss_backward(g, logits, bad_target, stats, 1.0, 1.0, -100)
    with pytest.raises(IndexError, match="target"):
        ops.inverse_cross_entropy_reference_backward(g, logits, bad_target, ref_stats, -100)
    with pytest.raises(TypeError, match="target"):
        ops.suppression_loss(logits, target.int(), 1.0, 1.0, -100)
    with pytest.raises(ValueError, match="target"):
        ops.suppression_loss(logits, target[:2], 1.0, 1.0, -100)
    with pytest.raises(ValueError, match="target is required"):
        ops.suppression_loss(logits, None, 1.0, 1.0, -100)
    with pytest.raises(ValueError, match="logits"):
        ops.suppression_loss(logits[None], target, 1.0, 1.0, -100)
    with pytest.raises(ValueError, match="C >= 2"):
        ops.suppression_loss(logits[:, :1], target * 0, 1.0, 1.0, -100)
    with pytest.raises(ValueError, match="stats"):
        ops.suppression_loss_backward(g, logits, target, stats[:2], 1.0, 1.0, -100)
    with pytest.raises(ValueError, match="grad_loss"):
        ops.inverse_cross_entropy_reference_backward(g[:3], logits, target, ref_stats, -100)


# --------------------------------------------------------------------------- probability targets and label smoothing
# Definitions: F.cross_entropy's conventions with the per-class term -log(1 - p_j) in place of -log p_j;
# KLU is label-free (its element weight is the target's class weight).


def soft_reference(kind, logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                   per_class=None):
    """float64 loss for index or probability targets: sum_j w_j q_j term_j with smoothed targets q."""
    z = logits.double()
    c = z.shape[0] if z.dim() == 1 else z.shape[1]
    rows = z[None] if z.dim() == 1 else z.movedim(1, -1).reshape(-1, c)
    if per_class is None:  # -log(1 - p_j) = logsumexp(z) - logsumexp of the other logits
        eye = torch.eye(c, dtype=torch.bool)
        term = torch.stack([rows.logsumexp(1) - rows.masked_fill(eye[j], float("-inf")).logsumexp(1) for j in range(c)], 1)
    else:
        term = per_class(rows)
    klu = -math.log(c) - torch.log_softmax(rows, 1).mean(1)
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    if target.is_floating_point():
        q = target.double()[None] if target.dim() == 1 else target.double().movedim(1, -1).reshape(-1, c)
        valid, element_weight = torch.ones(rows.shape[0], dtype=torch.bool), (q * w).sum(1)
        denominator = torch.tensor(float(rows.shape[0]), dtype=torch.float64)
    else:
        y = target.reshape(-1)
        valid = y != ignore_index
        q = F.one_hot(torch.where(valid, y, 0), c).double()
        element_weight = torch.where(valid, w[torch.where(valid, y, 0)], 0)
        denominator = element_weight.sum()
    smoothed = (1 - label_smoothing) * q + label_smoothing / c
    ice = (w * smoothed * term).sum(1)
    values = {"ice": ice, "klu": element_weight * klu, "fused": 0.7 * ice + 1.3 * element_weight * klu}[kind]
    values = torch.where(valid, values, 0)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / denominator
    return values.reshape(z.shape[:1] + z.shape[2:]) if z.dim() > 1 else values.reshape(())


def call_soft(kind, logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    if kind == "ice":
        return SF.inverse_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing)
    if kind == "klu":
        return SF.kl_uniform(logits, target, weight, ignore_index, reduction)
    return SF.suppression_loss(logits, target, 0.7, 1.3, weight, ignore_index, reduction, label_smoothing)


def probability_target(logits: Tensor, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    class_dim = 0 if logits.dim() == 1 else 1
    return torch.softmax(torch.randn(logits.shape, generator=gen, dtype=torch.float64) * 2, class_dim).to(logits.dtype)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
def test_soft_reference_follows_cross_entropys_convention(target_kind, reduction):
    """With -log p_j as the per-class term, the reference is F.cross_entropy (weights, smoothing, ignore_index)."""
    logits, target, weight = random_inputs((7, 5, 3), seed=30, ignore_index=2, ignore_fraction=0.3)
    ignore_index = 2  # F.cross_entropy refuses a non-default ignore_index with probability targets
    if target_kind == "probabilities":
        target, ignore_index = probability_target(logits, seed=31), -100
    expected = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.2)
    actual = soft_reference(
        "ice", logits, target, weight, ignore_index, reduction, 0.2, per_class=lambda z: -torch.log_softmax(z, 1)
    )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# (loss, target kind, label smoothing); kl_uniform has no label_smoothing (KLU is label-free)
SOFT_CASES = [
    (kind, target_kind, smoothing)
    for kind in ("ice", "klu", "fused")
    for target_kind, smoothing in (("index", 0.25), ("probabilities", 0.0), ("probabilities", 0.1))
    if not (kind == "klu" and smoothing)
]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (4,)], ids=str)
@pytest.mark.parametrize("kind,target_kind,smoothing", SOFT_CASES)
def test_probability_targets_and_label_smoothing_match_reference(kind, target_kind, smoothing, shape, reduction):
    logits, target, weight = random_inputs(shape, seed=32, ignore_index=1, ignore_fraction=0.3 if len(shape) > 1 else 0)
    ignore_index = 1
    if target_kind == "probabilities":
        target, ignore_index = probability_target(logits, seed=33), -100
    for w in (None, weight):
        actual, grad = loss_and_grad(lambda x: call_soft(kind, x, target, w, ignore_index, reduction, smoothing), logits)
        v = torch.randn(actual.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        expected, expected_grad = loss_and_grad(
            lambda x: soft_reference(kind, x, target, w, ignore_index, reduction, smoothing), logits, v
        )
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_float32_probability_targets_stay_close_to_float64():
    logits, _, weight = random_inputs((64, 10), seed=34)
    target = probability_target(logits, seed=35)
    actual = call_soft("fused", logits.float(), target.float(), weight.float(), label_smoothing=0.1)
    assert actual.dtype == torch.float32
    expected = soft_reference("fused", logits, target, weight, label_smoothing=0.1)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-6)


def test_one_hot_probabilities_and_zero_smoothing_equal_the_index_kernel():
    logits, target, _ = random_inputs((4, 6, 3), seed=36)
    one_hot = F.one_hot(target, 6).movedim(-1, 1).double()
    for reduction in ("none", "sum", "mean"):
        for kind in ("ice", "klu", "fused"):
            torch.testing.assert_close(call_soft(kind, logits, one_hot, reduction=reduction),
                                       call_soft(kind, logits, target, reduction=reduction), rtol=1e-12, atol=1e-12)
    # KLU is label-free: smoothing leaves a KLU-only suppression loss unchanged
    torch.testing.assert_close(SF.suppression_loss(logits, target, 0.0, 1.0, label_smoothing=0.4), SF.kl_uniform(logits))


def test_ice_with_soft_targets_is_exact_where_p_rounds_to_one():
    """-log(1 - p_j) for a class with p_j == 1.0 in float64: finite and exact (a direct -log1p(-p) gives inf)."""
    logits = torch.tensor([[0.0, 0.0, 60.0], [-5.0, 80.0, 30.0]], dtype=torch.float64, requires_grad=True)
    target = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    loss = SF.inverse_cross_entropy(logits, target, reduction="none")
    row1 = (60 + math.log1p(2 * math.exp(-60)) - math.log(2)) - 2 * math.log1p(-1 / (2 + math.exp(60)))
    s2 = 1 + math.exp(-85) + math.exp(-50)
    row2 = (80 + math.log(s2) - (30 + math.log1p(math.exp(-35)))) - math.log1p(-math.exp(-85) / s2) - math.log1p(-math.exp(-50) / s2)
    torch.testing.assert_close(loss, torch.tensor([row1 / 3, row2 / 3], dtype=torch.float64), rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("kind,target_kind,smoothing", SOFT_CASES)
def test_gradcheck_probability_targets_and_label_smoothing(kind, target_kind, smoothing):
    logits, target, weight = random_inputs((3, 4, 2), seed=37, ignore_index=1, ignore_fraction=0.3)
    ignore_index = 1
    if target_kind == "probabilities":
        target, ignore_index = probability_target(logits, seed=38), -100
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: call_soft(kind, x, target, weight, ignore_index, "none", smoothing), (x,))
    assert torch.autograd.gradgradcheck(lambda x: call_soft(kind, x, target, weight, ignore_index, "sum", smoothing), (x,))
    if target_kind == "probabilities":  # through the targets too (kept normalised: a softmax of free values)
        u = target.log().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda u: call_soft(kind, logits.detach(), u.softmax(1), weight, ignore_index, "none", smoothing), (u,)
        )


def test_bad_label_smoothing_and_probability_targets_raise_naming_the_argument():
    logits, target, _ = random_inputs((4, 3), seed=39)
    probs = probability_target(logits, seed=40)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            SF.inverse_cross_entropy(logits, target, label_smoothing=bad)
        with pytest.raises(ValueError, match="label_smoothing"):
            SN.SuppressionLoss(label_smoothing=bad)
    with pytest.raises(TypeError, match="label_smoothing"):
        SF.suppression_loss(logits, target, label_smoothing="0.1")
    with pytest.raises(ValueError, match="target.*shape"):
        SF.inverse_cross_entropy(logits, probs[:, :2])
    with pytest.raises(ValueError, match="target.*>= 0"):
        SF.suppression_loss(logits, probs * 2 - probs.roll(1, 1))  # sums to 1, one entry negative
    with pytest.raises(ValueError, match="target.*sum to 1"):
        SF.kl_uniform(logits, probs * 0.5)
    with pytest.raises(ValueError, match="target.*sum to 1"):
        SN.InverseCrossEntropyLoss(label_smoothing=0.1)(logits, probs + 0.01)


def test_modules_take_the_class_weight_first_like_cross_entropy_loss():
    logits, target, weight = random_inputs((6, 4), seed=41, ignore_index=0, ignore_fraction=0.3)
    probs = probability_target(logits, seed=42)
    torch.testing.assert_close(SN.SuppressionLoss(weight)(logits, target), SF.suppression_loss(logits, target, weight=weight))
    torch.testing.assert_close(SN.SuppressionLoss(weight=weight)(logits, target), SF.suppression_loss(logits, target, weight=weight))
    torch.testing.assert_close(SN.InverseCrossEntropyLoss(weight)(logits, target), SF.inverse_cross_entropy(logits, target, weight))
    torch.testing.assert_close(SN.KLUniformLoss(weight)(logits, target), SF.kl_uniform(logits, target, weight))
    # positional order as nn.CrossEntropyLoss(weight, ..., ignore_index, ..., reduction, label_smoothing)
    module = SN.SuppressionLoss(weight, 0, "sum", 0.2, ice_weight=0.5, klu_weight=2.0)
    torch.testing.assert_close(module(logits, target), SF.suppression_loss(logits, target, 0.5, 2.0, weight, 0, "sum", 0.2))
    with pytest.raises(ValueError, match="ignore_index"):  # as F.cross_entropy: not with probability targets
        module(logits, probs)
    module = SN.SuppressionLoss(weight, reduction="sum", label_smoothing=0.2, ice_weight=0.5, klu_weight=2.0)
    torch.testing.assert_close(module(logits, probs), SF.suppression_loss(logits, probs, 0.5, 2.0, weight, -100, "sum", 0.2))
    smoothed = SN.InverseCrossEntropyLoss(weight, label_smoothing=0.3)
    torch.testing.assert_close(smoothed(logits, target), soft_reference("ice", logits, target, weight, label_smoothing=0.3))
    assert "label_smoothing=0.3" in repr(smoothed)
    with pytest.raises(TypeError, match="weight.*keyword"):
        SN.SuppressionLoss(0.5)  # the old positional ice_weight
    with pytest.raises(TypeError):
        SN.SuppressionLoss(None, -100, "mean", 0.0, 0.5)  # ice_weight is keyword-only


# --------------------------------------------------------------------------- modules and generation losses


def test_modules_match_functions():
    logits, target, weight = random_inputs((6, 4), seed=18, ignore_index=0, ignore_fraction=0.3)
    pairs = [
        (SN.InverseCrossEntropyLoss(weight, 0, "sum"), SF.inverse_cross_entropy(logits, target, weight, 0, "sum")),
        (SN.InverseCrossEntropyReferenceLoss(weight, 0), SF.inverse_cross_entropy_reference(logits, target, weight, 0)),
        (SN.KLUniformLoss(weight, 0, "none"), SF.kl_uniform(logits, target, weight, 0, "none")),
        (SN.SuppressionLoss(weight, 0, ice_weight=0.5, klu_weight=3.0), SF.suppression_loss(logits, target, 0.5, 3.0, weight, 0)),
    ]
    for module, expected in pairs:
        torch.testing.assert_close(module(logits, target), expected)
        assert "weight" in module.state_dict()
    torch.testing.assert_close(SN.KLUniformLoss()(logits), SF.kl_uniform(logits))
    eps_hat, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(SN.DenialOfServiceLoss()(eps_hat), eps_hat.square().mean())
    torch.testing.assert_close(SN.NegatedMSELoss("sum")(eps_hat, eps), -F.mse_loss(eps_hat, eps, reduction="none").mean((1, 2, 3)).sum())
    with pytest.raises(ValueError, match="reduction"):
        SN.SuppressionLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="ice_weight"):
        SN.SuppressionLoss(ice_weight=None)
    with pytest.raises(ValueError, match="weight"):
        SN.InverseCrossEntropyLoss(weight=torch.ones(2, 2))


def test_generation_losses():
    eps_hat = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(5, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(SF.denial_of_service_loss(eps_hat), F.mse_loss(eps_hat, torch.zeros_like(eps_hat)))
    torch.testing.assert_close(SF.negated_mse(eps_hat, eps), -F.mse_loss(eps_hat, eps))
    per_sample = SF.negated_mse(eps_hat, eps, reduction="none")
    assert per_sample.shape == (5,)
    torch.testing.assert_close(per_sample, -((eps_hat - eps) ** 2).mean((1, 2)))
    torch.testing.assert_close(SF.denial_of_service_loss(eps_hat, "sum"), (eps_hat**2).mean((1, 2)).sum())
    (grad,) = torch.autograd.grad(SF.denial_of_service_loss(eps_hat), eps_hat)
    torch.testing.assert_close(grad, 2 * eps_hat / eps_hat.numel())
    with pytest.raises(ValueError, match="eps"):
        SF.negated_mse(eps_hat, eps[:, :2])
    with pytest.raises(TypeError, match="eps_hat"):
        SF.denial_of_service_loss(eps_hat.long())
    with pytest.raises(ValueError, match="eps_hat"):
        SF.denial_of_service_loss(torch.tensor(1.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_are_compiled():
    import sophon_ext

    info = sophon_ext.extension_info()
    if info["error"] != "disabled by SOPHON_EXT_DISABLE":
        assert info["cuda"], info
