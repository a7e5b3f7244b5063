"""Simulated fine-tuning strategies (the environments phi_i of SOPHON's FTS step).

A :class:`FineTuneStrategy` says how one simulated attacker fine-tunes: which
optimizer preset and hyperparameters, learning rate, batch size, number of
steps, and which parameters it trains or re-initialises first (``method``).
:class:`StrategySampler` draws N of them from configurable ranges with a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .errors import UserInputError, UserInputTypeError
from .methods import get_method, method_names
from .optim.functional import validate_hparams
from .optim.presets import ATTACK_LR_RANGES, PRESETS, resolve_preset
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


#: Default learning-rate ranges (log-uniform) per preset (shared with attack families)
DEFAULT_LR_RANGES = ATTACK_LR_RANGES


@dataclass
class StrategySampler:
    """Draws strategies from ranges, reproducibly from ``seed``.

    ``optimizers``: preset names to choose from (uniformly); ``lr_ranges``:
    ``{preset: (low, high)}`` log-uniform ranges (defaults from
    :data:`DEFAULT_LR_RANGES`); ``methods``, ``batch_sizes``: choices;
    ``layers``: choices of ``layers`` for the layer methods; ``hparams``:
    ``{preset: {name: (low, high) or [choices] or value}}`` (ranges uniform);
    ``steps``: K, the same for all (simulate runs them together).
    """

    optimizers: Sequence[str] = ("sgd", "sgd_momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad")
    lr_ranges: dict = field(default_factory=dict)
    methods: Sequence[str] = ("full", "reinit_head", "head_only")
    batch_sizes: Sequence[int] = (32,)
    steps: int = 10
    layers: Sequence = (1,)
    hparams: dict = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in PRESETS]
        if not self.optimizers or unknown:
            raise ValueError(f"optimizers: unknown or empty {list(unknown) or list(self.optimizers)}; choose from {sorted(PRESETS)}")
        simulated = method_names(simulated=True)
        bad_methods = [m for m in self.methods if m not in simulated]
        if not self.methods or bad_methods:
            raise ValueError(f"methods: unknown or empty {bad_methods or list(self.methods)}; choose from {simulated}")
        for name, (low, high) in self.lr_ranges.items():
            if name not in PRESETS:
                raise ValueError(f"lr_ranges: unknown optimizer {name!r}; choose from {sorted(PRESETS)}")
            if not 0 < low <= high:
                raise ValueError(f"lr_ranges[{name!r}]: need 0 < low <= high, got ({low}, {high})")
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes: need ints >= 1, got {list(self.batch_sizes)}")
        if any(get_method(m).needs_layers for m in self.methods) and not self.layers:
            raise ValueError("layers: the layer methods need at least one choice of layers")
        self._rng = random.Random(self.seed)

    def _lr(self, optimizer: str) -> float:
        low, high = self.lr_ranges.get(optimizer, DEFAULT_LR_RANGES[optimizer])
        return math.exp(self._rng.uniform(math.log(low), math.log(high)))

    def _hparams(self, optimizer: str) -> dict:
        out = {}
        for name, spec in self.hparams.get(optimizer, {}).items():
            if isinstance(spec, tuple) and len(spec) == 2:
                out[name] = self._rng.uniform(*spec)
            elif isinstance(spec, list):
                out[name] = self._rng.choice(spec)
            else:
                out[name] = spec
        return out

    def sample(self, n: int) -> list[FineTuneStrategy]:
        """``n`` strategies; successive calls continue the same random stream."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be an int >= 1, got {n!r}")
        out = []
        for _ in range(n):
            optimizer = self._rng.choice(list(self.optimizers))
            method = self._rng.choice(list(self.methods))
            out.append(
                FineTuneStrategy(
                    optimizer=optimizer,
                    lr=self._lr(optimizer),
                    batch_size=self._rng.choice(list(self.batch_sizes)),
                    steps=self.steps,
                    method=method,
                    hparams=self._hparams(optimizer),
                    layers=self._rng.choice(list(self.layers)) if get_method(method).needs_layers else None,
                    seed=self._rng.randrange(2**31),
                )
            )
        return out
