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
  to the gradient, and are left out of the mean (for KLU too); ``ignore_index``
  must be an int (a float or a bool raises TypeError, as in ``F.cross_entropy``).

Every per-row quantity is computed relative to the row's max logit, never as
max + (something small): logits far from 0 (1e16 in float64, 1e37 in float32)
lose no precision, as in ``F.cross_entropy``.

The per-row work runs in compiled kernels (``torch.ops.sophon_ext.*``, see
csrc/cpu/suppression_loss.cpp and csrc/cuda/suppression_loss.cu): one pass
over the logits forward, one backward, no full-size temporary except the
gradient. The ops, with their pure-PyTorch references (which answer when
the library is missing, ``SOPHON_EXT_DISABLE=1``, or for devices without
kernels), are registered by :mod:`sophon_ext.ops.losses`. All ops
work under autograd (to any order), ``torch.compile(fullgraph=True)`` and
``torch.func`` transforms (``vmap``, ``grad``, ``vmap(grad(...))``).

float16/bfloat16 logits are accumulated in float32; the loss and gradient are
returned in the logits' dtype.
"""

from __future__ import annotations

import math
import operator
from numbers import Real

import torch
from torch import Tensor

from . import _soft_target_losses as _soft
# Importing ops.losses registers the loss ops (torch.ops.sophon_ext.*): their
# references, fake kernels, autograd and vmap rules.
from .ops.losses import _accumulation_dtype, _check_target_range, _ice_reference_rows, _suppression_rows

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


def _check_target(logits: Tensor, target, allow_probabilities: bool = False) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target: must be an integer Tensor of class indices, got {type(target).__name__}")
    if allow_probabilities and target.is_floating_point():
        _soft.check_probabilities(logits, target)
        return target
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


def _check_ignore_index(value) -> int:
    """ignore_index as an int; like F.cross_entropy, anything else (a float, even 1.0, or a bool) is a TypeError."""
    if not _is_bool(value):
        try:
            return operator.index(value)  # int, numpy integers, integer one-element tensors
        except TypeError:
            pass
    raise TypeError(f"ignore_index: must be an int, got {type(value).__name__} ({value!r})")


def _is_bool(value) -> bool:
    """Python, numpy and torch booleans (all of which operator.index would take as 0 or 1)."""
    if isinstance(value, (bool, Tensor)):
        return isinstance(value, bool) or value.dtype == torch.bool
    return type(value).__name__ == "bool_" and type(value).__module__ == "numpy"


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


def _prepare(logits, target, weight, ignore_index, reduction, target_required=True, allow_probabilities=False):
    """Checks the common arguments; returns (int64 target, probabilities or None, ignore_index as an int)."""
    _check_reduction(reduction)
    ignore_index = _check_ignore_index(ignore_index)
    _check_logits(logits)
    if target is None:
        if target_required:
            raise TypeError("target: is required")
        if weight is not None:
            raise ValueError("weight: class weights need a target")
    else:
        target = _check_target(logits, target, allow_probabilities)
    _check_weight(logits, weight)
    return target, ignore_index


def _is_probabilities(target: Tensor | None) -> bool:
    return target is not None and target.is_floating_point()


def _composite_loss(logits, target, ice_weight, klu_weight, weight, ignore_index, reduction, label_smoothing):
    """Probability targets or label smoothing: the pure-PyTorch path of :mod:`sophon_ext._soft_target_losses`."""
    probabilities = _is_probabilities(target)
    if probabilities and ignore_index != -100:
        raise ValueError(f"ignore_index: applies to class-index targets only, got {ignore_index} with probability targets")
    c = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    rows, _ = _as_rows(logits, None)
    if probabilities:
        row_target = _as_rows(target, None)[0]
    else:
        row_target = target.reshape(-1)
        _check_target_range("suppression_loss", row_target, c, ignore_index)
    z = rows.to(_accumulation_dtype(logits.dtype))
    values, denominator = _soft.composite_rows(
        z, row_target, probabilities, weight, ice_weight, klu_weight, label_smoothing, ignore_index
    )
    values = values.to(logits.dtype)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.sum() / denominator.to(logits.dtype)
    return values.reshape(()) if logits.dim() == 1 else values.reshape(logits.shape[:1] + logits.shape[2:])


def suppression_loss(
    logits: Tensor,
    target: Tensor,
    ice_weight: float = 1.0,
    klu_weight: float = 1.0,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """SOPHON's fused classification suppression loss: ``ice_weight * ICE + klu_weight * KLU``.

    ICE is the paper's inverse cross-entropy ``-log(1 - p_y)`` and KLU is
    ``KL(U || softmax(z))`` (see :func:`inverse_cross_entropy` and
    :func:`kl_uniform`); one kernel computes both, and their gradient, in one
    pass over the logits. Rows whose target is ``ignore_index`` are left out
    of both terms. ``weight`` multiplies each element's combined loss by
    ``weight[target]``.

    ``target`` may also hold probabilities (a floating-point tensor of the
    logits' shape), and ``label_smoothing`` in [0, 1) smooths the ICE term;
    both as :func:`inverse_cross_entropy` defines them, while KLU, being
    label-free, is unchanged (its element weight is then ``sum_j w_j q_j``).
    These options run a pure-PyTorch composite instead of the kernel.
    """
    target, ignore_index = _prepare(logits, target, weight, ignore_index, reduction, allow_probabilities=True)
    ice_weight = _check_loss_weight("ice_weight", ice_weight)
    klu_weight = _check_loss_weight("klu_weight", klu_weight)
    label_smoothing = _soft.check_label_smoothing(label_smoothing)
    if _is_probabilities(target) or (label_smoothing and ice_weight != 0):
        return _composite_loss(logits, target, ice_weight, klu_weight, weight, ignore_index, reduction, label_smoothing)
    rows, row_target = _as_rows(logits, target)
    values = _suppression_rows(rows, row_target, ice_weight, klu_weight, ignore_index)
    return _reduce(values, logits, row_target, weight, ignore_index, reduction)


def inverse_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Inverse cross-entropy, the SOPHON paper's form: ``-log(1 - softmax(logits)[target])``.

    Computed as ``logsumexp(z) - logsumexp_{j != y}(z_j) = softplus(z_y - logsumexp_{j != y} z_j)``,
    so it stays finite when p_y rounds to 1 (a target logit 1e4 above the
    others gives ICE ~ 1e4). Its gradient is ``p_y (e_y - q)`` with q the
    softmax over the non-target classes: bounded, and vanishing as p_y -> 0.

    With ``l_j = -log(1 - p_j)`` and class weights ``w`` (1 without
    ``weight``), following ``F.cross_entropy``'s conventions:

    - probability targets ``q`` (a floating-point ``target`` of the logits'
      shape, >= 0, summing to 1 over the classes): ``sum_j w_j q_j l_j``;
      ``reduction='mean'`` divides by the number of elements, and
      ``ignore_index`` does not apply;
    - ``label_smoothing`` e in [0, 1): targets ``(1 - e) onehot(y) + e / C``,
      i.e. ``(1 - e) w_y l_y + (e / C) sum_j w_j l_j`` (``q`` becomes
      ``(1 - e) q + e / C`` for probability targets); ``'mean'`` divides by the
      summed ``w_y`` as without smoothing.

    These options run a pure-PyTorch composite instead of the kernel.
    """
    return suppression_loss(logits, target, 1.0, 0.0, weight, ignore_index, reduction, label_smoothing)


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
    ``target`` may hold probabilities ``q`` (the logits' shape); then an
    element's weight is ``sum_j w_j q_j`` and ``'mean'`` divides by the
    number of elements. Label smoothing would not change KLU, so there is no
    such argument.
    Zero exactly when the logits of an element are all equal, and never
    negative (KL >= 0; a rounding error below 0 is clamped to 0). Computed
    relative to the row max, so logits of any magnitude (1e16 in float64,
    1e37 in float32) keep their differences.
    """
    target, ignore_index = _prepare(
        logits, target, weight, ignore_index, reduction, target_required=False, allow_probabilities=True
    )
    if _is_probabilities(target):
        return _composite_loss(logits, target, 0.0, 1.0, weight, ignore_index, reduction, 0.0)
    rows, row_target = _as_rows(logits, target)
    values = _suppression_rows(rows, row_target, 0.0, 1.0, ignore_index)
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
    target, ignore_index = _prepare(logits, target, weight, ignore_index, reduction)
    rows, row_target = _as_rows(logits, target)
    values = _ice_reference_rows(rows, row_target, ignore_index)
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
