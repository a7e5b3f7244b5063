"""Optimizer names shared by the simulator and the attack harness.

A preset is a base optimizer plus default hyperparameters, so ``"nesterov"``
means SGD with momentum 0.9 and Nesterov on. Base names are those of
:mod:`torch.optim`, lower-cased.
"""

from __future__ import annotations

import torch

BASE_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
    "adadelta": torch.optim.Adadelta,
}

PRESETS: dict[str, tuple[str, dict]] = {
    "sgd": ("sgd", {}),
    "sgd_momentum": ("sgd", {"momentum": 0.9}),
    "nesterov": ("sgd", {"momentum": 0.9, "nesterov": True}),
    "adam": ("adam", {}),
    "adamw": ("adamw", {}),
    "rmsprop": ("rmsprop", {}),
    "adagrad": ("adagrad", {}),
    "adadelta": ("adadelta", {}),
    "lion": ("lion", {}),
}

#: Learning-rate ranges (log-uniform) an attacker would try with each preset: wide enough to hold
#: the rates that fine-tune well from scratch and the high ones that escape a protection trained on
#: small steps (e.g. RMSprop 1e-2, Adagrad 1e-1). Used by attack families and StrategySampler.
ATTACK_LR_RANGES: dict[str, tuple[float, float]] = {
    "sgd": (1e-3, 3e-1),
    "sgd_momentum": (1e-3, 1e-1),
    "nesterov": (1e-3, 1e-1),
    "adam": (1e-4, 1e-2),
    "adamw": (1e-4, 1e-2),
    "rmsprop": (1e-4, 1e-2),
    "adagrad": (1e-3, 2e-1),
    "adadelta": (1e-1, 1.0),
    "lion": (1e-5, 1e-3),
}


def resolve_preset(name: str, hparams: dict | None = None) -> tuple[str, dict]:
    """(base optimizer name, merged hyperparameters) for a preset name."""
    if name not in PRESETS:
        raise ValueError(f"optimizer: unknown name {name!r}; choose one of {sorted(PRESETS)}")
    base, defaults = PRESETS[name]
    return base, {**defaults, **(hparams or {})}


def make_torch_optimizer(name: str, params, lr: float, hparams: dict | None = None) -> torch.optim.Optimizer:
    """A torch.optim optimizer for a preset (Lion comes from sophon_ext.optim)."""
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr}")
    from .functional import get_functional_optimizer, torch_optimizer_kwargs

    base, hp = resolve_preset(name, hparams)
    # Names the functional optimizers know are checked and respelled (beta1/beta2
    # -> betas); torch.optim's own options (betas, foreach, ...) pass through.
    known = get_functional_optimizer(base).defaults
    torch_only = {k: hp.pop(k) for k in list(hp) if k not in known}
    kwargs = {**torch_optimizer_kwargs(base, hp), **torch_only}
    if base == "lion":
        from . import Lion  # the package's own torch.optim-style class

        return Lion(params, lr=lr, **kwargs)
    return BASE_OPTIMIZERS[base](params, lr=lr, **kwargs)
