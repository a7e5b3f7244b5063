"""The suppression-loss ops: schemas, pure-PyTorch references, fake kernels, autograd and vmap rules.

Registers ``torch.ops.sophon_ext.suppression_loss``, ``suppression_loss_backward``,
``inverse_cross_entropy_reference`` and ``inverse_cross_entropy_reference_backward``
(compiled kernels: csrc/cpu/suppression_loss.cpp and csrc/cuda/suppression_loss.cu;
schemas: csrc/ops.cpp). Each op works on rows: logits ``(N, C)`` and an int64
target ``(N,)`` (or None), giving per-row losses ``(N,)`` and float64 per-row
stats for its backward op. The references answer when the library is missing
(``SOPHON_EXT_DISABLE=1``) or for devices without kernels, with the kernels'
argument checks. :func:`_suppression_rows` and :func:`_ice_reference_rows` call
the ops as :mod:`sophon_ext.functional` does (through ``autograd.Function``s
under ``torch.func`` transforms); the user-facing losses, with weights,
reductions, probability targets and label smoothing, are there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import define_op

# ---------------------------------------------------------------------------
# Row-wise ops: logits (N, C), target (N,) int64 or None. Every tensor argument
# and output is indexed by row first, which makes the vmap rule a reshape.
# ---------------------------------------------------------------------------

_SUPPRESSION_SCHEMA = "(Tensor logits, Tensor? target, float ice_weight, float klu_weight, int ignore_index) -> (Tensor, Tensor)"
_SUPPRESSION_BACKWARD_SCHEMA = (
    "(Tensor grad_loss, Tensor logits, Tensor? target, Tensor stats, float ice_weight, float klu_weight, int ignore_index) -> Tensor"
)
_ICE_REFERENCE_SCHEMA = "(Tensor logits, Tensor target, int ignore_index) -> (Tensor, Tensor)"
_ICE_REFERENCE_BACKWARD_SCHEMA = "(Tensor grad_loss, Tensor logits, Tensor target, Tensor stats, int ignore_index) -> Tensor"


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(op: str, logits: Tensor, target: Tensor | None, needs_target: bool) -> None:
    """The checks the C++ kernels make (TORCH_CHECK), for the pure-PyTorch fallback."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"sophon_ext::{op}: logits must have shape (N, C) with C >= 2, got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"sophon_ext::{op}: logits must be floating point, got {logits.dtype}")
    if target is None:
        if needs_target:
            raise ValueError(f"sophon_ext::{op}: target is required when ice_weight != 0")
        return
    if target.dtype != torch.int64:
        raise TypeError(f"sophon_ext::{op}: target must be int64, got {target.dtype}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"sophon_ext::{op}: target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"sophon_ext::{op}: target is on {target.device} but logits on {logits.device}")


def _check_row_input(op: str, name: str, value: Tensor, logits: Tensor, row_shape: tuple) -> None:
    """A backward op's (N,) or (N, k) input: the kernels' check_row_input."""
    if value.shape != logits.shape[:1] + row_shape or value.device != logits.device or not value.is_floating_point():
        raise ValueError(
            f"sophon_ext::{op}: {name} has shape {tuple(value.shape)} ({value.dtype}, {value.device}), which does not "
            f"match logits {tuple(logits.shape)} on {logits.device}"
        )


def _check_target_range(op: str, target: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Mask of non-ignored rows; raises IndexError for labels outside [0, C)."""
    valid = target != ignore_index
    if bool((valid & ((target < 0) | (target >= num_classes))).any()):
        raise IndexError(f"sophon_ext::{op}: target values must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")
    return valid


def _row_masks(target: Tensor | None, ignore_index: int, z: Tensor) -> tuple[Tensor, Tensor]:
    """(valid rows (N,), target-class mask (N, C); all False without a target)."""
    n, c = z.shape
    if target is None:
        return torch.ones(n, dtype=torch.bool, device=z.device), torch.zeros(n, c, dtype=torch.bool, device=z.device)
    valid = target != ignore_index
    return valid, F.one_hot(torch.where(valid, target, 0), c).bool()


def _zero_invalid(valid: Tensor, x: Tensor) -> Tensor:
    return torch.where(valid.reshape(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _target_logit(z: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """z[i, target[i]] (z[i, 0] for ignored rows); gather, so inf elsewhere stays out."""
    return z.gather(1, torch.where(target != ignore_index, target, 0)[:, None]).squeeze(1)


def _shifted_logsumexp(z: Tensor, skip: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Row logsumexp as the kernels compute it, kept apart as shift + log_sum.

    Returns (shift in z's dtype, float64 r = log sum_j exp(z_j - shift), z - shift).
    The shift is the row max (of the entries not in ``skip``), or 0 when that
    is infinite (as torch.logsumexp). shift + r is never formed: at logits of
    1e16 (float64) or 1e37 (float32) it would round r away.
    """
    kept = z if skip is None else z.masked_fill(skip, float("-inf"))
    m = kept.amax(1)
    shift = torch.where(m.isinf(), 0, m)
    dev = z - shift[:, None]
    e = torch.exp(dev if skip is None else dev.masked_fill(skip, float("-inf")))
    return shift, e.sum(1).double().log(), dev


def _scaled_exp(x: Tensor, m: Tensor, r: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """a q + b with q = exp(x - m - r) in [0, 1] for float64 row stats (m, r), as the kernels.

    Finite m and r: (a exp(-r)) exp(x - m), exact to x's precision at any
    magnitude of m; otherwise exp(x - (m + r)). a == 0 gives b: q is bounded,
    so a q is 0 even where q is inf - inf (a +inf logit when p_y = 0).
    """
    finite = m.isfinite() & r.isfinite()
    shift = torch.where(finite, m, m + r).to(x.dtype)
    coef = torch.where(finite, a * torch.exp(-r), a).to(x.dtype)
    out = coef[:, None] * torch.exp(x - shift[:, None]) + b.to(x.dtype)[:, None]
    return torch.where((a == 0)[:, None], b.to(x.dtype)[:, None], out)


def _suppression_d(z: Tensor, target: Tensor | None, ignore_index: int, m: Tensor, r: Tensor) -> Tensor:
    """d = (z_y - m) - r, float64, as the kernels (-inf without a target)."""
    if target is None:
        return torch.full_like(r, float("-inf"))
    return (_target_logit(z, target, ignore_index).double() - m) - r


def _suppression_reference(logits, target, ice_weight, klu_weight, ignore_index):
    """Reference for sophon_ext::suppression_loss; same outputs as the kernels.

    Per row: ``loss = ice_weight * ICE + klu_weight * KLU`` (0 for ignored rows)
    and float64 ``stats = (m, r)``: m is the max of the non-target logits (of
    all logits without a target; 0 when infinite) and r = log sum_{j != y}
    exp(z_j - m), so L = m + r is the logsumexp over the non-target classes.
    With d = (z_y - m) - r (-inf without a target): ICE = softplus(d),
    p_y = sigmoid(d), logsumexp(z) - m = r + softplus(d), and
    KLU = r + softplus(d) - mean_j (z_j - m) - log C, clamped at 0 (KL >= 0
    by Jensen, so a negative value is rounding, and clamping it only moves the
    result toward the exact one). Nothing is computed as m + (small): that
    would lose the small part at logits of 1e16.
    """
    _check_rows("suppression_loss", logits, target, ice_weight != 0)
    z = logits.to(_accumulation_dtype(logits.dtype))
    c = z.shape[1]
    if target is not None:
        _check_target_range("suppression_loss", target, c, ignore_index)
    valid, is_y = _row_masks(target, ignore_index, z)
    shift, r, dev = _shifted_logsumexp(z, is_y)
    m = shift.double()
    d = _suppression_d(z, target, ignore_index, m, r)
    ice = torch.logaddexp(d, torch.zeros_like(d))  # softplus without overflow
    loss = torch.zeros_like(d)
    # A zero weight must not turn an infinite term into NaN (0 * inf).
    if ice_weight != 0:
        loss = loss + ice_weight * ice
    if klu_weight != 0:
        klu = r + ice - dev.sum(1).double() / c - math.log(c)
        loss = loss + klu_weight * klu.clamp_min(0)  # clamp_min keeps NaN
    stats = _zero_invalid(valid, torch.stack([m, r], 1))
    return _zero_invalid(valid, loss).to(logits.dtype), stats


def _suppression_backward_reference(grad_loss, logits, target, stats, ice_weight, klu_weight, ignore_index):
    """Reference for sophon_ext::suppression_loss_backward.

    With q = softmax over the non-target classes (q_j = exp(z_j - m - r),
    q_y = 0) and p = softmax(z): dICE/dz = p_y (e_y - q) and dKLU/dz = p - 1/C,
    where p_j = (1 - p_y) q_j for j != y. So grad_j = a q_j + b off the target
    with a = g (klu_weight (1 - p_y) - ice_weight p_y), b = -g klu_weight / C,
    and grad_y = g (ice_weight p_y + klu_weight (p_y - 1/C)); d is recomputed
    from z_y and the stats (m, r) as the forward computed it.
    """
    _check_rows("suppression_loss_backward", logits, target, ice_weight != 0)
    _check_row_input("suppression_loss_backward", "grad_loss", grad_loss, logits, ())
    _check_row_input("suppression_loss_backward", "stats", stats, logits, (2,))
    z = logits.to(_accumulation_dtype(logits.dtype))
    c = z.shape[1]
    if target is not None:
        _check_target_range("suppression_loss_backward", target, c, ignore_index)
    valid, is_y = _row_masks(target, ignore_index, z)
    g = grad_loss.double()
    m, r = stats.double().unbind(1)
    d = _suppression_d(z, target, ignore_index, m, r)
    p_y, rest = torch.sigmoid(d), torch.sigmoid(-d)
    a = g * (klu_weight * rest - ice_weight * p_y)
    b = g * (-klu_weight / c)
    grad_y = (g * (ice_weight * p_y + klu_weight * (p_y - 1.0 / c))).to(z.dtype)
    grad = torch.where(is_y, grad_y[:, None], _scaled_exp(z, m, r, a, b))
    return _zero_invalid(valid, grad).to(logits.dtype)


def _ice_reference_reference(logits, target, ignore_index):
    """Reference for sophon_ext::inverse_cross_entropy_reference.

    Per row: loss = CE(1 - z, y) = z_y + logsumexp(-z) = (z_y + m) + r with
    float64 stats (m, r): m = max_j (-z_j) (0 when infinite), r = log sum_j exp(-z_j - m).
    """
    _check_rows("inverse_cross_entropy_reference", logits, target, True)
    z = logits.to(_accumulation_dtype(logits.dtype))
    _check_target_range("inverse_cross_entropy_reference", target, z.shape[1], ignore_index)
    valid, is_y = _row_masks(target, ignore_index, z)
    shift, r, _ = _shifted_logsumexp(-z)
    m = shift.double()
    # z_y + m first: both large and close when y is the lowest logit
    loss = (_target_logit(z, target, ignore_index).double() + m) + r
    return _zero_invalid(valid, loss).to(logits.dtype), _zero_invalid(valid, torch.stack([m, r], 1))


def _ice_reference_backward_reference(grad_loss, logits, target, stats, ignore_index):
    """Reference for sophon_ext::inverse_cross_entropy_reference_backward: g (e_y - softmax(-z))."""
    _check_rows("inverse_cross_entropy_reference_backward", logits, target, True)
    _check_row_input("inverse_cross_entropy_reference_backward", "grad_loss", grad_loss, logits, ())
    _check_row_input("inverse_cross_entropy_reference_backward", "stats", stats, logits, (2,))
    z = logits.to(_accumulation_dtype(logits.dtype))
    _check_target_range("inverse_cross_entropy_reference_backward", target, z.shape[1], ignore_index)
    valid, is_y = _row_masks(target, ignore_index, z)
    g = grad_loss.double()
    m, r = stats.double().unbind(1)
    # g (1 - R_y) from float64 values: R_y can be within rounding of 1
    grad_y = (g * -torch.expm1((-_target_logit(z, target, ignore_index).double() - m) - r)).to(z.dtype)
    grad = torch.where(is_y, grad_y[:, None], _scaled_exp(-z, m, r, -g, torch.zeros_like(g)))
    return _zero_invalid(valid, grad).to(logits.dtype)


_suppression_op = define_op("suppression_loss", _SUPPRESSION_SCHEMA, _suppression_reference)
_suppression_backward_op = define_op("suppression_loss_backward", _SUPPRESSION_BACKWARD_SCHEMA, _suppression_backward_reference)
_ice_reference_op = define_op("inverse_cross_entropy_reference", _ICE_REFERENCE_SCHEMA, _ice_reference_reference)
_ice_reference_backward_op = define_op(
    "inverse_cross_entropy_reference_backward", _ICE_REFERENCE_BACKWARD_SCHEMA, _ice_reference_backward_reference
)


# --- fake (shape) kernels for torch.compile / meta tensors ---


def _fake_rows(logits: Tensor, stats_shape: tuple) -> tuple[Tensor, Tensor]:
    n = logits.shape[0]
    stats = logits.new_empty((n, *stats_shape), dtype=torch.float64)
    return logits.new_empty((n,)), stats


@torch.library.register_fake("sophon_ext::suppression_loss")
def _(logits, target, ice_weight, klu_weight, ignore_index):
    _check_rows("suppression_loss", logits, target, ice_weight != 0)
    return _fake_rows(logits, (2,))


@torch.library.register_fake("sophon_ext::suppression_loss_backward")
def _(grad_loss, logits, target, stats, ice_weight, klu_weight, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("sophon_ext::inverse_cross_entropy_reference")
def _(logits, target, ignore_index):
    _check_rows("inverse_cross_entropy_reference", logits, target, True)
    return _fake_rows(logits, (2,))


@torch.library.register_fake("sophon_ext::inverse_cross_entropy_reference_backward")
def _(grad_loss, logits, target, stats, ignore_index):
    return logits.new_empty(logits.shape)


# --- autograd. First derivatives by the compiled backward ops. The stats
# outputs are differentiable too (they are functions of the logits), and the
# backward ops' derivatives are the partial ones with respect to each input
# (grad_loss, logits, stats), written as PyTorch formulas: every op is right
# on its own, so gradients of any order of the composition are right. ---


def _shift_vjp(z: Tensor) -> Tensor:
    """d(shift)/dz for a row shift = max_j z_j (first argmax on ties); 0 where the max is not finite (shift = 0)."""
    m, k = z.max(1)
    return F.one_hot(k, z.shape[1]).double() * m.isfinite().double()[:, None]


def _times_bounded(coef: Tensor, x: Tensor) -> Tensor:
    """coef[:, None] * x for x with values in [0, 1] (a softmax): 0 where coef is 0, even where x is NaN
    from inf - inf (a +inf logit), as the kernels' a q_j."""
    return torch.where((coef == 0)[:, None], 0.0, coef[:, None] * x)


def _suppression_stats_vjp(grad_stats: Tensor, logits: Tensor, target, ignore_index: int) -> Tensor:
    """d/dz of <grad_stats, (m, r)>: m = L - r is the non-target max, L = m + r the
    non-target logsumexp, so dm/dz = e_k (k its argmax) and dr/dz = q - e_k, q the
    softmax over the non-target classes."""
    z = logits.double()
    valid, is_y = _row_masks(target, ignore_index, z)
    grad_m, grad_r = grad_stats.double().unbind(1)
    rest = z.masked_fill(is_y, float("-inf"))
    grad = (grad_m - grad_r)[:, None] * _shift_vjp(rest) + _times_bounded(grad_r, torch.softmax(rest, 1))
    return _zero_invalid(valid, grad).to(logits.dtype)


def _suppression_setup(ctx, inputs, output):
    logits, target, ice_weight, klu_weight, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.constants = (ice_weight, klu_weight, ignore_index)
    ctx.set_materialize_grads(False)


def _suppression_backward(ctx, grad_loss, grad_stats, backward_op=_suppression_backward_op):
    logits, target, stats = ctx.saved_tensors
    grad = None
    if grad_loss is not None:
        grad = backward_op(grad_loss, logits, target, stats, *ctx.constants)
    if grad_stats is not None:  # only when something differentiates through the stats
        extra = _suppression_stats_vjp(grad_stats, logits, target, ctx.constants[2])
        grad = extra if grad is None else grad + extra
    return grad, None, None, None, None


def _suppression_second_setup(ctx, inputs, output):
    grad_loss, logits, target, stats, ice_weight, klu_weight, ignore_index = inputs
    ctx.save_for_backward(grad_loss, logits, target, stats)
    ctx.constants = (ice_weight, klu_weight, ignore_index)


def _suppression_second_backward(ctx, v):
    """Partial derivatives of G = suppression_loss_backward(g, z, target, (m, r)).

    With d = z_y - m - r, off the target G_j = a(d) E_j + b with
    E_j = exp(z_j - m - r), a(d) = g (klu_weight s(-d) - ice_weight s(d)),
    b = -g klu_weight / C; G_y = g (ice_weight s(d) + klu_weight (s(d) - 1/C)).
    a'(d) = -w and G_y'(d) = w with w = g (ice_weight + klu_weight) s(d) s(-d).
    G depends on m and r only through m + r, so their partials are equal.
    """
    grad_loss, logits, target, stats = ctx.saved_tensors
    ice_weight, klu_weight, ignore_index = ctx.constants
    z, v, g = logits.double(), v.double(), grad_loss.double()
    c = z.shape[1]
    valid, is_y = _row_masks(target, ignore_index, z)
    m, r = stats.double().unbind(1)
    d = _suppression_d(z, target, ignore_index, m, r)
    p_y, rest = torch.sigmoid(d), torch.sigmoid(-d)
    a0 = klu_weight * rest - ice_weight * p_y
    a, w = g * a0, g * (ice_weight + klu_weight) * p_y * rest
    # masking z (not E) keeps E_y = 0 without inf * 0 in higher derivatives;
    # where every use of E has coefficient 0, E (in [0, 1]) is 0 even at inf - inf
    e = torch.exp((z.masked_fill(is_y, float("-inf")) - m[:, None]) - r[:, None])
    e = torch.where(((a0 == 0) & (p_y * rest == 0))[:, None], 0.0, e)
    g_y = ice_weight * p_y + klu_weight * (p_y - 1.0 / c)
    u = torch.where(is_y, g_y[:, None], a0[:, None] * e - klu_weight / c)
    v_e = (v * e).sum(1)
    v_y = (v * is_y.double()).sum(1)
    grad_g = (v * u).sum(1)
    grad_z = a[:, None] * v * e + is_y.double() * (w * (v_y - v_e))[:, None]
    grad_shift = -a * v_e - w * (v_y - v_e)
    return (
        _zero_invalid(valid, grad_g).to(grad_loss.dtype),
        _zero_invalid(valid, grad_z).to(logits.dtype),
        None,
        _zero_invalid(valid, torch.stack([grad_shift, grad_shift], 1)).to(stats.dtype),
        None,
        None,
        None,
    )


def _ice_reference_setup(ctx, inputs, output):
    logits, target, ignore_index = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.ignore_index = ignore_index
    ctx.set_materialize_grads(False)


def _ice_reference_backward(ctx, grad_loss, grad_stats, backward_op=_ice_reference_backward_op):
    logits, target, stats = ctx.saved_tensors
    grad = None
    if grad_loss is not None:
        grad = backward_op(grad_loss, logits, target, stats, ctx.ignore_index)
    if grad_stats is not None:
        # stats (m, r): m = max(-z), m + r = logsumexp(-z), so dm/dz = -e_k (k = argmin z), dr/dz = e_k - softmax(-z)
        valid, _ = _row_masks(target, ctx.ignore_index, logits)
        neg = -logits.double()
        grad_m, grad_r = grad_stats.double().unbind(1)
        extra = (grad_r - grad_m)[:, None] * _shift_vjp(neg) - _times_bounded(grad_r, torch.softmax(neg, 1))
        extra = _zero_invalid(valid, extra).to(logits.dtype)
        grad = extra if grad is None else grad + extra
    return grad, None, None


def _ice_reference_second_setup(ctx, inputs, output):
    grad_loss, logits, target, stats, ignore_index = inputs
    ctx.save_for_backward(grad_loss, logits, target, stats)
    ctx.ignore_index = ignore_index


def _ice_reference_second_backward(ctx, v):
    """Partial derivatives of G = g (e_y - R), R_j = exp(-z_j - m - r), (m, r) the stats (equal partials)."""
    grad_loss, logits, target, stats = ctx.saved_tensors
    z, v, g = logits.double(), v.double(), grad_loss.double()
    valid, is_y = _row_masks(target, ctx.ignore_index, z)
    m, r = stats.double().unbind(1)
    big_r = torch.exp((-z - m[:, None]) - r[:, None])
    grad_g = (v * (is_y.double() - big_r)).sum(1)
    grad_z = g[:, None] * v * big_r
    grad_shift = grad_z.sum(1)
    return (
        _zero_invalid(valid, grad_g).to(grad_loss.dtype),
        _zero_invalid(valid, grad_z).to(logits.dtype),
        None,
        _zero_invalid(valid, torch.stack([grad_shift, grad_shift], 1)).to(stats.dtype),
        None,
    )


torch.library.register_autograd("sophon_ext::suppression_loss", _suppression_backward, setup_context=_suppression_setup)
torch.library.register_autograd(
    "sophon_ext::suppression_loss_backward", _suppression_second_backward, setup_context=_suppression_second_setup
)
torch.library.register_autograd(
    "sophon_ext::inverse_cross_entropy_reference", _ice_reference_backward, setup_context=_ice_reference_setup
)
torch.library.register_autograd(
    "sophon_ext::inverse_cross_entropy_reference_backward",
    _ice_reference_second_backward,
    setup_context=_ice_reference_second_setup,
)


# torch.func.grad does not accept the autograd.Function that register_autograd
# generates (it lacks setup_context), so under torch.func transforms the
# public losses call the ops through these Functions: the same setup/backward,
# plus a vmap rule generated from the ops' own (register_vmap below).
# Otherwise they call the ops directly (less Python overhead; the form
# torch.compile handles best).


class _SuppressionLossBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, logits, target, stats, ice_weight, klu_weight, ignore_index):
        return _suppression_backward_op(grad_loss, logits, target, stats, ice_weight, klu_weight, ignore_index)

    setup_context = staticmethod(_suppression_second_setup)
    backward = staticmethod(_suppression_second_backward)


class _SuppressionLoss(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, ice_weight, klu_weight, ignore_index):
        return _suppression_op(logits, target, ice_weight, klu_weight, ignore_index)

    setup_context = staticmethod(_suppression_setup)

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        return _suppression_backward(ctx, grad_loss, grad_stats, _SuppressionLossBackward.apply)


class _IceReferenceBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad_loss, logits, target, stats, ignore_index):
        return _ice_reference_backward_op(grad_loss, logits, target, stats, ignore_index)

    setup_context = staticmethod(_ice_reference_second_setup)
    backward = staticmethod(_ice_reference_second_backward)


class _IceReference(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, target, ignore_index):
        return _ice_reference_op(logits, target, ignore_index)

    setup_context = staticmethod(_ice_reference_setup)

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        return _ice_reference_backward(ctx, grad_loss, grad_stats, _IceReferenceBackward.apply)


def _suppression_rows(rows, target, ice_weight, klu_weight, ignore_index):
    if torch._C._are_functorch_transforms_active():
        return _SuppressionLoss.apply(rows, target, ice_weight, klu_weight, ignore_index)[0]
    return _suppression_op(rows, target, ice_weight, klu_weight, ignore_index)[0]


def _ice_reference_rows(rows, target, ignore_index):
    if torch._C._are_functorch_transforms_active():
        return _IceReference.apply(rows, target, ignore_index)[0]
    return _ice_reference_op(rows, target, ignore_index)[0]


# --- vmap: every tensor argument is indexed by row, so a batch of problems is
# one bigger problem with B * N rows ---


def _make_rowwise_vmap(op):
    def rowwise_vmap(info, in_dims, *args):
        batch = info.batch_size
        flat = []
        for arg, dim in zip(args, in_dims):
            if isinstance(arg, Tensor):
                arg = arg.movedim(dim, 0) if dim is not None else arg.expand(batch, *arg.shape)
                arg = arg.reshape(batch * arg.shape[1], *arg.shape[2:])
            flat.append(arg)
        out = op(*flat)
        if isinstance(out, Tensor):
            return out.reshape(batch, -1, *out.shape[1:]), 0
        return tuple(o.reshape(batch, -1, *o.shape[1:]) for o in out), (0,) * len(out)

    return rowwise_vmap


for _op in (_suppression_op, _suppression_backward_op, _ice_reference_op, _ice_reference_backward_op):
    torch.library.register_vmap(_op, _make_rowwise_vmap(_op))
