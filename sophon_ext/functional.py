"""SOPHON's suppression losses as functions, following ``torch.nn.functional`` conventions.

Classification losses take logits ``(N, C)``, ``(N, C, d1, ...)`` or ``(C,)``
(like :func:`torch.nn.functional.cross_entropy`), an integer ``target`` of
shape ``(N,)``, ``(N, d1, ...)`` or ``()``, an optional class ``weight`` (C,),
``ignore_index`` and ``reduction='none'|'mean'|'sum'``:

- with ``weight``, each element's loss is multiplied by ``weight[target]`` and
  ``reduction='mean'`` divides by the sum of those target-class weights over
  non-ignored elements (as ``F.cross_entropy`` does); without ``weight`` it
  divides by the number of non-ignored elements;
- elements whose target equals ``ignore_index`` contribute 0 to the loss and
  to the gradient, and are left out of the mean (for KLU too).

The per-row work runs in compiled kernels (``torch.ops.sophon_ext.*``, see
csrc/cpu/suppression_loss.cpp and csrc/cuda/suppression_loss.cu): one pass
over the logits forward, one backward, no full-size temporary except the
gradient. The pure-PyTorch references below answer when the library is
missing (``SOPHON_EXT_DISABLE=1``) or for devices without kernels. All ops
work under autograd (to any order), ``torch.compile(fullgraph=True)`` and
``torch.func`` transforms (``vmap``, ``grad``, ``vmap(grad(...))``).

float16/bfloat16 logits are accumulated in float32; the loss and gradient are
returned in the logits' dtype.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops

__all__ = [
    "inverse_cross_entropy",
    "inverse_cross_entropy_reference",
    "kl_uniform",
    "suppression_loss",
    "denial_of_service_loss",
    "negated_mse",
]

_REDUCTIONS = ("none", "mean", "sum")


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


def _logsumexp_float64(z: Tensor) -> tuple[Tensor, Tensor]:
    """Row logsumexp as the kernels compute it: (float64 result, shift in z's dtype).

    The shift is the row max, or 0 when that is infinite (as torch.logsumexp).
    """
    m = z.amax(1)
    shift = torch.where(m.isinf(), 0, m)
    total = torch.exp(z - shift[:, None]).sum(1)
    return shift.double() + total.double().log(), shift


def _exp_minus(z: Tensor, lse: Tensor) -> Tensor:
    """exp(z - lse) for a float64 lse, exact to z's precision: lse = hi + remainder."""
    hi = lse.to(z.dtype)
    scale = torch.where(lse.isfinite(), torch.exp(hi.double() - lse), 1.0).to(z.dtype)
    return torch.exp(z - hi[:, None]) * scale[:, None]


def _suppression_reference(logits, target, ice_weight, klu_weight, ignore_index):
    """Reference for sophon_ext::suppression_loss; same outputs as the kernels.

    Per row: ``loss = ice_weight * ICE + klu_weight * KLU`` (0 for ignored rows)
    and float64 ``stats = (L, d)`` with L = logsumexp over the non-target
    classes and d = z_y - L (without target: L = logsumexp over all classes,
    d = -inf). Then ICE = softplus(d), p_y = sigmoid(d),
    logsumexp(z) = L + softplus(d).
    """
    _check_rows("suppression_loss", logits, target, ice_weight != 0)
    z = logits.to(_accumulation_dtype(logits.dtype))
    c = z.shape[1]
    if target is not None:
        _check_target_range("suppression_loss", target, c, ignore_index)
    valid, is_y = _row_masks(target, ignore_index, z)
    lse_rest, _ = _logsumexp_float64(z.masked_fill(is_y, float("-inf")))
    if target is None:
        d = torch.full_like(lse_rest, float("-inf"))
    else:
        d = _target_logit(z, target, ignore_index).double() - lse_rest
    ice = torch.logaddexp(d, torch.zeros_like(d))  # softplus without overflow
    loss = torch.zeros_like(d)
    # A zero weight must not turn an infinite term into NaN (0 * inf).
    if ice_weight != 0:
        loss = loss + ice_weight * ice
    if klu_weight != 0:
        loss = loss + klu_weight * (lse_rest + ice - z.sum(1).double() / c - math.log(c))
    stats = _zero_invalid(valid, torch.stack([lse_rest, d], 1))
    return _zero_invalid(valid, loss).to(logits.dtype), stats


def _suppression_backward_reference(grad_loss, logits, target, stats, ice_weight, klu_weight, ignore_index):
    """Reference for sophon_ext::suppression_loss_backward.

    With q = softmax over the non-target classes (q_y = 0) and p = softmax(z):
    dICE/dz = p_y (e_y - q) and dKLU/dz = p - 1/C, where p_j = (1 - p_y) q_j
    for j != y. So grad_j = g (a q_j + b) off the target with
    a = klu_weight (1 - p_y) - ice_weight p_y, b = -klu_weight / C, and
    grad_y = g (ice_weight p_y + klu_weight (p_y - 1/C)).
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
    lse_rest, d = stats.double().unbind(1)
    p_y, rest = torch.sigmoid(d), torch.sigmoid(-d)
    a = (g * (klu_weight * rest - ice_weight * p_y)).to(z.dtype)
    b = (g * (-klu_weight / c)).to(z.dtype)
    grad_y = (g * (ice_weight * p_y + klu_weight * (p_y - 1.0 / c))).to(z.dtype)
    grad = torch.where(is_y, grad_y[:, None], a[:, None] * _exp_minus(z, lse_rest) + b[:, None])
    return _zero_invalid(valid, grad).to(logits.dtype)


def _ice_reference_reference(logits, target, ignore_index):
    """Reference for sophon_ext::inverse_cross_entropy_reference.

    Per row: loss = CE(1 - z, y) = z_y + logsumexp(-z); float64 stats = logsumexp(-z).
    """
    _check_rows("inverse_cross_entropy_reference", logits, target, True)
    z = logits.to(_accumulation_dtype(logits.dtype))
    _check_target_range("inverse_cross_entropy_reference", target, z.shape[1], ignore_index)
    valid, is_y = _row_masks(target, ignore_index, z)
    lse_neg, shift = _logsumexp_float64(-z)
    # z_y + shift first: both large and close when y is the lowest logit
    loss = (_target_logit(z, target, ignore_index) + shift).double() + (lse_neg - shift.double())
    return _zero_invalid(valid, loss).to(logits.dtype), _zero_invalid(valid, lse_neg)


def _ice_reference_backward_reference(grad_loss, logits, target, stats, ignore_index):
    """Reference for sophon_ext::inverse_cross_entropy_reference_backward: g (e_y - softmax(-z))."""
    _check_rows("inverse_cross_entropy_reference_backward", logits, target, True)
    _check_row_input("inverse_cross_entropy_reference_backward", "grad_loss", grad_loss, logits, ())
    _check_row_input("inverse_cross_entropy_reference_backward", "stats", stats, logits, ())
    z = logits.to(_accumulation_dtype(logits.dtype))
    _check_target_range("inverse_cross_entropy_reference_backward", target, z.shape[1], ignore_index)
    valid, is_y = _row_masks(target, ignore_index, z)
    g = grad_loss.double()
    lse_neg = stats.double()
    # g (1 - r_y) from float64 values: r_y can be within rounding of 1
    grad_y = (g * -torch.expm1(-_target_logit(z, target, ignore_index).double() - lse_neg)).to(z.dtype)
    grad = torch.where(is_y, grad_y[:, None], -g.to(z.dtype)[:, None] * _exp_minus(-z, lse_neg))
    return _zero_invalid(valid, grad).to(logits.dtype)


_suppression_op = _ops.define_op("suppression_loss", _SUPPRESSION_SCHEMA, _suppression_reference)
_suppression_backward_op = _ops.define_op("suppression_loss_backward", _SUPPRESSION_BACKWARD_SCHEMA, _suppression_backward_reference)
_ice_reference_op = _ops.define_op("inverse_cross_entropy_reference", _ICE_REFERENCE_SCHEMA, _ice_reference_reference)
_ice_reference_backward_op = _ops.define_op(
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
    return _fake_rows(logits, ())


@torch.library.register_fake("sophon_ext::inverse_cross_entropy_reference_backward")
def _(grad_loss, logits, target, stats, ignore_index):
    return logits.new_empty(logits.shape)


# --- autograd. First derivatives by the compiled backward ops. The stats
# outputs are differentiable too (they are functions of the logits), and the
# backward ops' derivatives are the partial ones with respect to each input
# (grad_loss, logits, stats), written as PyTorch formulas: every op is right
# on its own, so gradients of any order of the composition are right. ---


def _suppression_stats_vjp(grad_stats: Tensor, logits: Tensor, target, ignore_index: int) -> Tensor:
    """d/dz of <grad_stats, (L, d)>: dL/dz = q (softmax over the non-target classes), dd/dz = e_y - q."""
    z = logits.double()
    valid, is_y = _row_masks(target, ignore_index, z)
    grad_l, grad_d = grad_stats.double().unbind(1)
    q = torch.softmax(z.masked_fill(is_y, float("-inf")), 1)
    grad = (grad_l - grad_d)[:, None] * q + grad_d[:, None] * is_y.double()
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
    """Partial derivatives of G = suppression_loss_backward(g, z, target, (L, d)).

    Off the target, G_j = g (a(d) E_j + b) with E_j = exp(z_j - L); G_y does
    not depend on z or L. a'(d) = -(ice_weight + klu_weight) s(d) s(-d), and
    G_y's derivative in d is (ice_weight + klu_weight) s(d) s(-d).
    """
    grad_loss, logits, target, stats = ctx.saved_tensors
    ice_weight, klu_weight, ignore_index = ctx.constants
    z, v, g = logits.double(), v.double(), grad_loss.double()
    c = z.shape[1]
    valid, is_y = _row_masks(target, ignore_index, z)
    lse_rest, d = stats.double().unbind(1)
    p_y, rest = torch.sigmoid(d), torch.sigmoid(-d)
    a = klu_weight * rest - ice_weight * p_y
    # masking z (not E) keeps E_y = 0 without inf * 0 in higher derivatives
    e = torch.exp(z.masked_fill(is_y, float("-inf")) - lse_rest[:, None])
    g_y = ice_weight * p_y + klu_weight * (p_y - 1.0 / c)
    u = torch.where(is_y, g_y[:, None], a[:, None] * e - klu_weight / c)
    v_e = (v * e).sum(1)
    v_y = (v * is_y.double()).sum(1)
    grad_g = (v * u).sum(1)
    grad_z = (g * a)[:, None] * v * e
    grad_l = -grad_z.sum(1)
    grad_d = g * (ice_weight + klu_weight) * p_y * rest * (v_y - v_e)
    return (
        _zero_invalid(valid, grad_g).to(grad_loss.dtype),
        _zero_invalid(valid, grad_z).to(logits.dtype),
        None,
        _zero_invalid(valid, torch.stack([grad_l, grad_d], 1)).to(stats.dtype),
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
    if grad_stats is not None:  # stats = logsumexp(-z): d/dz = -softmax(-z)
        valid, _ = _row_masks(target, ctx.ignore_index, logits)
        extra = _zero_invalid(valid, -grad_stats.double()[:, None] * torch.softmax(-logits.double(), 1)).to(logits.dtype)
        grad = extra if grad is None else grad + extra
    return grad, None, None


def _ice_reference_second_setup(ctx, inputs, output):
    grad_loss, logits, target, stats, ignore_index = inputs
    ctx.save_for_backward(grad_loss, logits, target, stats)
    ctx.ignore_index = ignore_index


def _ice_reference_second_backward(ctx, v):
    """Partial derivatives of G = g (e_y - R), R_j = exp(-z_j - S), S the stats."""
    grad_loss, logits, target, stats = ctx.saved_tensors
    z, v, g = logits.double(), v.double(), grad_loss.double()
    valid, is_y = _row_masks(target, ctx.ignore_index, z)
    r = torch.exp(-z - stats.double()[:, None])
    grad_g = (v * (is_y.double() - r)).sum(1)
    grad_z = g[:, None] * v * r
    return (
        _zero_invalid(valid, grad_g).to(grad_loss.dtype),
        _zero_invalid(valid, grad_z).to(logits.dtype),
        None,
        _zero_invalid(valid, grad_z.sum(1)).to(stats.dtype),
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


# ---------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_logits(logits) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits: must be a Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits: must be a floating-point tensor, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("logits: must have shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"logits: need C >= 2 classes (dim {0 if logits.dim() == 1 else 1}), got shape {tuple(logits.shape)}")


def _check_target(logits: Tensor, target) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target: must be an integer Tensor of class indices, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target: must hold integer class indices, got dtype {target.dtype}")
    expected = logits.shape[:1] + logits.shape[2:] if logits.dim() >= 2 else torch.Size([])
    if target.shape != expected:
        raise ValueError(
            f"target: expected shape {tuple(expected)} for logits of shape {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if target.device != logits.device:
        raise ValueError(f"target: is on {target.device} but logits are on {logits.device}")
    return target.long()


def _check_weight(logits: Tensor, weight) -> None:
    if weight is None:
        return
    num_classes = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight: must be a floating-point Tensor of shape ({num_classes},), got {type(weight).__name__}")
    if weight.shape != (num_classes,):
        raise ValueError(f"weight: expected shape ({num_classes},), got {tuple(weight.shape)}")
    if weight.device != logits.device:
        raise ValueError(f"weight: is on {weight.device} but logits are on {logits.device}")


def _check_loss_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name}: must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return float(value)


def _as_rows(logits: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(N, C, d1, ...) -> (N * d1 * ..., C) rows, class dimension last."""
    if logits.dim() == 1:
        rows = logits[None]
    else:
        rows = logits.movedim(1, -1).reshape(-1, logits.shape[1]) if logits.dim() > 2 else logits
    return rows, (None if target is None else target.reshape(-1))


def _reduce(values: Tensor, logits: Tensor, target: Tensor | None, weight: Tensor | None, ignore_index: int, reduction: str) -> Tensor:
    """Apply class weights and the reduction to per-row losses (0 on ignored rows)."""
    if target is None:
        count = values.new_tensor(values.numel())
    else:
        valid = target != ignore_index
        if weight is None:
            count = valid.sum().to(values.dtype)
        else:
            row_weight = torch.where(valid, weight.to(values.dtype)[torch.where(valid, target, 0)], 0.0)
            values = values * row_weight
            count = row_weight.sum()
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / count
    if logits.dim() == 1:
        return values.reshape(())
    return values.reshape(logits.shape[:1] + logits.shape[2:])


def _prepare(logits, target, weight, reduction, target_required=True):
    _check_reduction(reduction)
    _check_logits(logits)
    if target is None:
        if target_required:
            raise TypeError("target: is required")
        if weight is not None:
            raise ValueError("weight: class weights need a target")
    else:
        target = _check_target(logits, target)
    _check_weight(logits, weight)
    return target


def suppression_loss(
    logits: Tensor,
    target: Tensor,
    ice_weight: float = 1.0,
    klu_weight: float = 1.0,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """SOPHON's fused classification suppression loss: ``ice_weight * ICE + klu_weight * KLU``.

    ICE is the paper's inverse cross-entropy ``-log(1 - p_y)`` and KLU is
    ``KL(U || softmax(z))`` (see :func:`inverse_cross_entropy` and
    :func:`kl_uniform`); one kernel computes both, and their gradient, in one
    pass over the logits. Rows whose target is ``ignore_index`` are left out
    of both terms. ``weight`` multiplies each element's combined loss by
    ``weight[target]``.
    """
    target = _prepare(logits, target, weight, reduction)
    ice_weight = _check_loss_weight("ice_weight", ice_weight)
    klu_weight = _check_loss_weight("klu_weight", klu_weight)
    rows, row_target = _as_rows(logits, target)
    values = _suppression_rows(rows, row_target, ice_weight, klu_weight, int(ignore_index))
    return _reduce(values, logits, row_target, weight, ignore_index, reduction)


def inverse_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Inverse cross-entropy, the SOPHON paper's form: ``-log(1 - softmax(logits)[target])``.

    Computed as ``logsumexp(z) - logsumexp_{j != y}(z_j) = softplus(z_y - logsumexp_{j != y} z_j)``,
    so it stays finite when p_y rounds to 1 (a target logit 1e4 above the
    others gives ICE ~ 1e4). Its gradient is ``p_y (e_y - q)`` with q the
    softmax over the non-target classes: bounded, and vanishing as p_y -> 0.
    """
    return suppression_loss(logits, target, 1.0, 0.0, weight, ignore_index, reduction)


def kl_uniform(
    logits: Tensor,
    target: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """``KL(U || softmax(logits)) = logsumexp(z) - mean_j z_j - log C`` per element.

    Label-free: ``target`` is optional and only used to leave out elements
    whose target is ``ignore_index`` and to apply class ``weight``.
    Zero exactly when the logits of an element are all equal.
    """
    target = _prepare(logits, target, weight, reduction, target_required=False)
    rows, row_target = _as_rows(logits, target)
    values = _suppression_rows(rows, row_target, 0.0, 1.0, int(ignore_index))
    return _reduce(values, logits, row_target, weight, ignore_index, reduction)


def inverse_cross_entropy_reference(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """The SOPHON reference code's "inverse cross-entropy": ``CE(1 - logits, target)``.

    Equals ``z_y + logsumexp(-z)``, which is >= 0 and tends to 0 as the
    target logit falls far below all others: a different function from the
    paper's :func:`inverse_cross_entropy` (it is minimised by making the
    target the lowest logit, not by making p_y small). Offered under its own
    name to reproduce the reference runs; its gradient is
    ``e_y - softmax(-z)``.
    """
    target = _prepare(logits, target, weight, reduction)
    rows, row_target = _as_rows(logits, target)
    values = _ice_reference_rows(rows, row_target, int(ignore_index))
    return _reduce(values, logits, row_target, weight, ignore_index, reduction)


def _per_sample_mean(values: Tensor, reduction: str) -> Tensor:
    per_sample = values.reshape(values.shape[0], -1).mean(1) if values.dim() > 1 else values
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _check_noise(name: str, value) -> None:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{name}: must be a floating-point Tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    if value.dim() == 0:
        raise ValueError(f"{name}: must have a batch dimension (B, ...), got a scalar")


def denial_of_service_loss(eps_hat: Tensor, reduction: str = "mean") -> Tensor:
    """Denial-of-service loss for diffusion noise predictions: ``mean ||eps_hat||^2``.

    Pushes the predicted noise to zero. Per sample it is the mean of
    ``eps_hat**2`` over the non-batch dimensions; ``reduction='none'`` returns
    those (B,) values, ``'mean'`` their mean (= the mean over all elements),
    ``'sum'`` their sum.
    """
    _check_reduction(reduction)
    _check_noise("eps_hat", eps_hat)
    return _per_sample_mean(eps_hat.square(), reduction)


def negated_mse(eps_hat: Tensor, eps: Tensor, reduction: str = "mean") -> Tensor:
    """Negated denoising loss ``-MSE(eps_hat, eps)``; unbounded below (do not clamp it: that zeroes gradients).

    Per sample the mean over the non-batch dimensions; reductions as in
    :func:`denial_of_service_loss`.
    """
    _check_reduction(reduction)
    _check_noise("eps_hat", eps_hat)
    _check_noise("eps", eps)
    if eps.shape != eps_hat.shape:
        raise ValueError(f"eps: expected the shape of eps_hat {tuple(eps_hat.shape)}, got {tuple(eps.shape)}")
    if eps.device != eps_hat.device:
        raise ValueError(f"eps: is on {eps.device} but eps_hat on {eps_hat.device}")
    return -_per_sample_mean((eps_hat - eps).square(), reduction)
