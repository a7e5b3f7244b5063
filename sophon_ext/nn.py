"""SOPHON's losses as ``torch.nn.Module`` drop-ins (see :mod:`sophon_ext.functional`).

Constructor arguments follow ``torch.nn.CrossEntropyLoss``, in its order:
``weight`` (C,) first (a buffer: it moves with ``.to()`` and is saved in
``state_dict``), then ``ignore_index``, ``reduction`` and, where it has a
meaning, ``label_smoothing``. :class:`SuppressionLoss` takes ``ice_weight``
and ``klu_weight`` by keyword only, so ``SuppressionLoss(weight)`` binds the
class weight as ``nn.CrossEntropyLoss(weight)`` does.
"""

from __future__ import annotations

from numbers import Real

from torch import Tensor, nn

from . import _soft_target_losses as soft
from . import functional as SF

__all__ = [
    "InverseCrossEntropyLoss",
    "InverseCrossEntropyReferenceLoss",
    "KLUniformLoss",
    "SuppressionLoss",
    "DenialOfServiceLoss",
    "NegatedMSELoss",
]


class _ClassLoss(nn.Module):
    """Holds ``weight`` / ``ignore_index`` / ``reduction``, checked at construction."""

    weight: Tensor | None

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        SF._check_reduction(reduction)
        if isinstance(weight, Real):
            raise TypeError(
                f"weight: must be a 1-D floating-point Tensor of class weights, got the number {weight!r} "
                "(the first argument is the class weight, as in nn.CrossEntropyLoss; "
                "pass ice_weight= / klu_weight= by keyword)"
            )
        if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1 or not weight.is_floating_point()):
            raise ValueError(f"weight: must be a 1-D floating-point Tensor of class weights, got {weight!r}")
        self.register_buffer("weight", weight)
        self.ignore_index = SF._check_ignore_index(ignore_index)  # an int, as nn.CrossEntropyLoss; 1.5 is a TypeError
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class _SmoothedClassLoss(_ClassLoss):
    """A class loss that also takes ``label_smoothing`` in [0, 1), checked at construction."""

    def __init__(self, weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__(weight, ignore_index, reduction)
        self.label_smoothing = soft.check_label_smoothing(label_smoothing)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", label_smoothing={self.label_smoothing}"


class InverseCrossEntropyLoss(_SmoothedClassLoss):
    """Module form of :func:`sophon_ext.functional.inverse_cross_entropy` (``-log(1 - p_y)``);
    ``target`` holds class indices or probabilities."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return SF.inverse_cross_entropy(
            logits, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing
        )


class InverseCrossEntropyReferenceLoss(_ClassLoss):
    """Module form of :func:`sophon_ext.functional.inverse_cross_entropy_reference` (``CE(1 - z, y)``)."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return SF.inverse_cross_entropy_reference(logits, target, self.weight, self.ignore_index, self.reduction)


class KLUniformLoss(_ClassLoss):
    """Module form of :func:`sophon_ext.functional.kl_uniform`; ``target`` (indices or probabilities)
    is optional. Label-free, so no ``label_smoothing``."""

    def forward(self, logits: Tensor, target: Tensor | None = None) -> Tensor:
        return SF.kl_uniform(logits, target, self.weight, self.ignore_index, self.reduction)


class SuppressionLoss(_SmoothedClassLoss):
    """Module form of :func:`sophon_ext.functional.suppression_loss`: ``ice_weight * ICE + klu_weight * KLU``.

    ``SuppressionLoss(weight)`` binds the class weight, as ``nn.CrossEntropyLoss(weight)``;
    ``ice_weight`` and ``klu_weight`` are keyword-only.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        ice_weight: float = 1.0,
        klu_weight: float = 1.0,
    ) -> None:
        super().__init__(weight, ignore_index, reduction, label_smoothing)
        self.ice_weight = SF._check_loss_weight("ice_weight", ice_weight)
        self.klu_weight = SF._check_loss_weight("klu_weight", klu_weight)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return SF.suppression_loss(
            logits, target, self.ice_weight, self.klu_weight, self.weight, self.ignore_index, self.reduction,
            self.label_smoothing,
        )

    def extra_repr(self) -> str:
        return f"ice_weight={self.ice_weight}, klu_weight={self.klu_weight}, " + super().extra_repr()


class _NoiseLoss(nn.Module):
    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        SF._check_reduction(reduction)
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class DenialOfServiceLoss(_NoiseLoss):
    """Module form of :func:`sophon_ext.functional.denial_of_service_loss` (``mean ||eps_hat||^2``)."""

    def forward(self, eps_hat: Tensor) -> Tensor:
        return SF.denial_of_service_loss(eps_hat, self.reduction)


class NegatedMSELoss(_NoiseLoss):
    """Module form of :func:`sophon_ext.functional.negated_mse` (``-MSE(eps_hat, eps)``)."""

    def forward(self, eps_hat: Tensor, eps: Tensor) -> Tensor:
        return SF.negated_mse(eps_hat, eps, self.reduction)
