"""ICE and KLU with probability targets or label smoothing: pure-PyTorch composites.

The hard-target losses run in the compiled kernels (:mod:`sophon_ext.functional`);
these options change the per-row formula, so they take this path instead.
Definitions follow ``nn.CrossEntropyLoss``'s, with the per-class term
``l_j = -log(1 - p_j)`` in place of ``-log p_j`` (p = softmax(z), C classes,
class weights ``w``, all 1 without ``weight``):

- probability targets q (rows summing to 1): ``ICE = sum_j w_j q_j l_j``;
- label smoothing e: q becomes ``(1 - e) q + e / C``; for an index target y,
  ``ICE = (1 - e) w_y l_y + (e / C) sum_j w_j l_j``;
- KLU is label-free, so neither option changes it; its row weight is the
  target's class weight: ``w_y`` for an index target, ``sum_j w_j q_j`` for
  probabilities (unsmoothed);
- ``reduction='mean'`` divides by the summed ``w_y`` of the non-ignored rows
  for index targets and by the number of rows for probabilities (as
  ``F.cross_entropy``); ``ignore_index`` applies to index targets only.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor


def check_label_smoothing(value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"label_smoothing: must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing: must be in [0, 1), got {value!r}")
    return float(value)


def _checks_values() -> bool:
    # value checks need the data: not possible while tracing or under torch.func transforms
    return not (torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling())


def check_probabilities(logits: Tensor, target: Tensor) -> None:
    """A probability target: the logits' shape, >= 0, summing to 1 over the class dimension."""
    if target.shape != logits.shape:
        raise ValueError(
            f"target: probability targets (a floating-point target) must have the logits' shape {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}; pass class indices as an integer tensor"
        )
    if target.device != logits.device:
        raise ValueError(f"target: is on {target.device} but logits are on {logits.device}")
    if not _checks_values() or target.numel() == 0:
        return
    t = target.detach()
    if bool((t < 0).any()) or bool(t.isnan().any()):
        raise ValueError("target: probabilities must be >= 0 (and not NaN)")
    class_dim = 0 if logits.dim() == 1 else 1
    sums = t.sum(class_dim, dtype=torch.float64)
    tolerance = max(1e-6, 8 * torch.finfo(t.dtype).eps * logits.shape[class_dim])
    if bool(((sums - 1).abs() > tolerance).any()):
        raise ValueError(
            f"target: probabilities must sum to 1 over the class dimension (dim {class_dim}), "
            f"got sums from {sums.min().item():.6g} to {sums.max().item():.6g}"
        )


def per_class_ice(z: Tensor) -> Tensor:
    """``-log(1 - p_j)`` for every class of rows z (R, C), as ``softplus(z_j - logsumexp_{k != j} z_k)``.

    For j other than the row's argmax, ``sum_{k != j} exp(z_k - max)`` includes the
    argmax's 1, so it is at least half the full sum: no cancellation. The
    argmax's own term uses a logsumexp over the other logits, finite where
    ``1 - p_j`` rounds to 0.
    """
    c = z.shape[1]
    shift = z.detach().amax(1, keepdim=True)
    shift = torch.where(shift.isfinite(), shift, 0)
    e = torch.exp(z - shift)
    is_top = F.one_hot(z.detach().argmax(1), c).bool()
    others_sum = torch.where(is_top, 1.0, e.sum(1, keepdim=True) - e)  # placeholder at the argmax: never log(0)
    lse_others = torch.where(is_top, z.masked_fill(is_top, float("-inf")).logsumexp(1, keepdim=True),
                             shift + others_sum.log())
    d = z - lse_others
    return torch.logaddexp(d, torch.zeros_like(d))  # softplus without its linear cut-off


def kl_uniform_rows(z: Tensor) -> Tensor:
    """``KL(U || softmax(z)) = logsumexp(z) - mean_j z_j - log C`` per row, clamped at 0 (KL >= 0)."""
    shift = z.detach().amax(1, keepdim=True)
    shift = torch.where(shift.isfinite(), shift, 0)
    dev = z - shift
    return (dev.exp().sum(1).log() - dev.mean(1) - math.log(z.shape[1])).clamp_min(0)


def composite_rows(
    z: Tensor,
    target: Tensor,
    probabilities: bool,
    weight: Tensor | None,
    ice_weight: float,
    klu_weight: float,
    label_smoothing: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor]:
    """Weighted per-row losses (R,) of rows z (R, C) and the denominator of ``reduction='mean'``.

    ``target``: class indices (R,) (in range or ``ignore_index``, checked by
    the caller) or probabilities (R, C).
    """
    c = z.shape[1]
    w = None if weight is None else weight.to(z.dtype)
    values = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    ice = per_class_ice(z) if ice_weight != 0 else None
    klu = kl_uniform_rows(z) if klu_weight != 0 else None
    if probabilities:
        q = target.to(z.dtype)
        smoothed = q * (1 - label_smoothing) + label_smoothing / c if label_smoothing else q
        if ice is not None:
            values = values + ice_weight * ((smoothed if w is None else smoothed * w) * ice).sum(1)
        if klu is not None:
            values = values + klu_weight * (klu if w is None else (q * w).sum(1) * klu)
        return values, values.new_tensor(z.shape[0])
    valid = target != ignore_index
    y = torch.where(valid, target, 0)
    row_weight = torch.ones_like(values) if w is None else w[y]
    if ice is not None:
        ice_y = ice.gather(1, y[:, None]).squeeze(1)
        spread = (ice if w is None else ice * w).sum(1)
        values = values + ice_weight * ((1 - label_smoothing) * row_weight * ice_y + label_smoothing / c * spread)
    if klu is not None:
        values = values + klu_weight * row_weight * klu
    return torch.where(valid, values, 0), torch.where(valid, row_weight, 0).sum()
