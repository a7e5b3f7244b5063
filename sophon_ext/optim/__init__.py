"""Optimizers: preset names, functional (vmappable) optimizers, Lion, the
fused multi-trajectory update, and torch.optim drop-ins on the fused kernel
(FusedSGD, FusedAdam, FusedAdamW, FusedLion)."""

from .functional import (
    FUNCTIONAL_OPTIMIZERS,
    FunctionalOptimizer,
    defaults,
    get_functional_optimizer,
    torch_optimizer_kwargs,
    validate_hparams,
)
from .dropin import FusedAdam, FusedAdamW, FusedLion, FusedSGD
from .fused import FUSED_KINDS, FusedMultiTrajectoryOptimizer, multi_step_update_
from .lion import Lion
from .presets import PRESETS, make_torch_optimizer, resolve_preset

__all__ = [
    "FUNCTIONAL_OPTIMIZERS",
    "FUSED_KINDS",
    "FunctionalOptimizer",
    "FusedAdam",
    "FusedAdamW",
    "FusedLion",
    "FusedSGD",
    "FusedMultiTrajectoryOptimizer",
    "Lion",
    "PRESETS",
    "defaults",
    "get_functional_optimizer",
    "make_torch_optimizer",
    "multi_step_update_",
    "resolve_preset",
    "torch_optimizer_kwargs",
    "validate_hparams",
]
