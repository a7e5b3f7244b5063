"""Simulated fine-tuning strategies (the environments phi_i of SOPHON's FTS step).

A :class:`FineTuneStrategy` says how one simulated attacker fine-tunes: which
optimizer preset and hyperparameters, learning rate, batch size, number of
steps, and which parameters it trains or re-initialises first (``method``).
:class:`sophon_ext.families.StrategySampler` draws N of them from an attack family with a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import UserInputError, UserInputTypeError
from .methods import method_names
from .optim.functional import validate_hparams
from .optim.presets import resolve_preset
from .recipe import Recipe

#: ``method`` values: the built-in simulated methods of :mod:`sophon_ext.methods`, plus "custom"
#: (user surgery); methods registered later are accepted too.
STRATEGY_METHODS = method_names(simulated=True) + ("custom",)

Surgery = Callable[[dict, torch.Generator], dict]


@dataclass
class FineTuneStrategy(Recipe):
    """One simulated fine-tuning run: a :class:`~sophon_ext.recipe.Recipe` simulated for ``steps`` steps.

    - ``optimizer``: a preset name of :mod:`sophon_ext.optim.presets`
      (sgd, sgd_momentum, nesterov, adam, adamw, rmsprop, adagrad, adadelta, lion);
      ``hparams`` override the preset's hyperparameters (torch.optim names,
      e.g. ``{"weight_decay": 1e-4, "momentum": 0.5}``).
    - ``lr`` > 0, ``batch_size`` >= 1 samples per step, ``steps`` >= 1.
    - ``method``: a simulated method of the registry (:mod:`sophon_ext.methods`:
      ``"full"``, ``"reinit_head"``, ``"reinit_layers"``, ``"reinit_head_layers"``,
      ``"head_only"``, ``"freeze_first"``, ``"renorm"``, ``"standardise"``, or
      one registered with :func:`sophon_ext.register_method`), or ``"custom"``.
    - ``layers``: a count of first parametrised layers or module name(s), for
      the methods that read it (default: the method's, 1 layer).
    - ``seed``: seeds the re-initialisation (and the custom surgery's generator).
    - ``surgery`` (method ``"custom"``): ``surgery(params, generator) -> dict``
      receives the parameters by name and returns new values for the ones it
      re-initialises or transforms (any subset). Values computed from
      ``params`` keep their meta-gradient (it flows back through the
      function); fresh values get none.
    - ``input_transform``: ``f(model_inputs: tuple) -> tuple`` applied to every
      adaptation and query batch of the trajectory (e.g. a fixed input
      permutation or colour shift an attacker would apply).

    The shared fields are checked by :class:`~sophon_ext.recipe.Recipe`;
    ``FineTuneStrategy.from_recipe(attack_spec, steps=...)`` builds one from
    another recipe (its ``weight_decay`` goes into ``hparams``).
    """

    optimizer: str = "sgd"
    lr: float = 1e-2
    batch_size: int = 32
    steps: int = 10
    method: str = "full"
    hparams: dict = field(default_factory=dict)
    layers: int | str | Sequence[str] | None = None
    seed: int = 0
    surgery: Surgery | None = None
    input_transform: Callable | None = None

    @classmethod
    def _methods(cls) -> tuple[str, ...]:
        return method_names(simulated=True) + ("custom",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise UserInputTypeError(f"steps: must be an int >= 1, got {self.steps!r}")
        if self.steps < 1:
            raise UserInputError(f"steps: must be an int >= 1, got {self.steps!r}")
        # names and ranges as torch.optim checks them (hp['beta1']: must be in [0, 1) ...)
        validate_hparams(*resolve_preset(self.optimizer, {**self.hparams, "lr": float(self.lr)}))
        if self.method == "custom" and not callable(self.surgery):
            raise UserInputError("surgery: method 'custom' needs a callable surgery(params, generator) -> dict")
        if self.method != "custom" and self.surgery is not None:
            raise UserInputError(f"surgery: only used with method 'custom', got method {self.method!r}")
        if self.input_transform is not None and not callable(self.input_transform):
            raise UserInputTypeError(f"input_transform: expected a callable or None, got {type(self.input_transform).__name__}")
