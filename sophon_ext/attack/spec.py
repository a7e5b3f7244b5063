"""One attack: :class:`AttackSpec` (a real fine-tuning recipe: method, optimizer,
learning rate and schedule, batch size, epochs, seed) and the learning-rate
schedules (:func:`schedule_factor`)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import UserInputError, UserInputTypeError
from ..methods import get_method, method_names
from ..recipe import Recipe

#: the built-in attack methods (:mod:`sophon_ext.methods`; methods registered later are accepted too)
ATTACK_METHODS = method_names()
#: learning-rate schedules, as a factor of the base lr at optimizer step t of T
SCHEDULES = ("constant", "cosine", "linear", "step")
#: how the lora method adds its adapters: the built-in ones (:mod:`sophon_ext.attack.lora`) or peft's
LORA_ADAPTERS = ("builtin", "peft")
#: lora-only fields, left out of :meth:`AttackSpec.to_dict` (and so of run keys and reports) at their defaults
_LORA_DEFAULTS = {"lora_alpha": None, "target_modules": None, "adapter": "builtin"}


@dataclass
class AttackSpec(Recipe):
    """One attack: what is trained, with which optimizer, for how long, from which seed.

    A :class:`~sophon_ext.recipe.Recipe` (its fields and their check) run by
    the harness for ``epochs`` epochs, with any registered method. ``lr`` and
    ``weight_decay`` may be given as numeric strings (YAML reads ``1e-3`` as
    one). ``weight_decay`` is this field, never ``hparams["weight_decay"]``;
    ``AttackSpec.from_recipe(strategy, epochs=...)`` moves a strategy's there.

    ``layers`` is read by ``reinit_layers`` / ``freeze_first`` (a count of
    first parametrised layers, or module names; default 1) and ``probe`` (the
    module whose output is probed, or a count k meaning the k-th parametrised
    layer; default the middle one). ``rank``, ``lora_alpha`` (the update is
    scaled by ``lora_alpha / rank``; default ``rank``), ``target_modules`` (module
    names or one regular expression, as in peft; default every Linear, Conv2d
    and nn.MultiheadAttention) and ``adapter`` (``builtin`` or ``peft``) are
    read by ``lora``. ``hparams`` are extra optimizer hyperparameters
    (torch.optim names) on top of the preset's.
    """

    method: str = "full"
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 10
    weight_decay: float = 0.0
    schedule: str = "constant"
    layers: int | str | list[str] | None = None
    rank: int = 4
    seed: int = 0
    hparams: dict = field(default_factory=dict)
    lora_alpha: float | None = None
    target_modules: list[str] | str | None = None
    adapter: str = "builtin"

    _method_word = "attack method"

    def __post_init__(self) -> None:
        self.lr = _read_float(self.lr)
        self.weight_decay = _read_float(self.weight_decay)
        super().__post_init__()
        if self.schedule not in SCHEDULES:
            raise UserInputError(f"schedule: unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        for name in ("epochs", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserInputTypeError(f"{name}: expected an int, got {value!r}")
        if self.epochs < 1 or self.rank < 1:
            raise UserInputError(f"epochs, rank: must be >= 1, got {self.epochs}, {self.rank}")
        decay = self.weight_decay
        if isinstance(decay, bool) or not isinstance(decay, float):
            raise UserInputTypeError(f"weight_decay: must be a number >= 0, got {decay!r}")
        if not (math.isfinite(decay) and decay >= 0):
            raise UserInputError(f"weight_decay: must be >= 0, got {decay}")
        if "weight_decay" in self.hparams:
            raise UserInputError("hparams: set the weight decay with the weight_decay field, not hparams['weight_decay']")
        self._check_lora_fields()

    def _check_lora_fields(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        set_here = [k for k, default in _LORA_DEFAULTS.items() if getattr(self, k) != default]
        if set_here and self.method != "lora":
            raise UserInputError(f"{', '.join(set_here)}: only the lora method reads them, got method {self.method!r}")
        if self.adapter not in LORA_ADAPTERS:
            raise UserInputError(f"adapter: unknown LoRA adapter {self.adapter!r}; choose one of {LORA_ADAPTERS}")
        if self.lora_alpha is not None:
            if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
                raise UserInputTypeError(f"lora_alpha: expected a number or None, got {self.lora_alpha!r}")
            self.lora_alpha = float(self.lora_alpha)
            if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
                raise UserInputError(f"lora_alpha: must be a positive number, got {self.lora_alpha}")
        targets = self.target_modules
        if targets is not None and not isinstance(targets, str) and not (
                isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
            raise UserInputTypeError(f"target_modules: expected a non-empty list of module names or one regular expression, "
                            f"got {targets!r}")

    @property
    def name(self) -> str:
        """A readable, file-name-safe id that differs whenever the attack differs."""
        parts = [self.method, self.optimizer, f"lr{self.lr:g}", f"bs{self.batch_size}", f"ep{self.epochs}",
                 f"wd{self.weight_decay:g}", self.schedule]
        if (self.method == "probe" or get_method(self.method).needs_layers) and self.layers is not None:
            layers = self.layers if not isinstance(self.layers, list) else "+".join(self.layers)
            parts.append(f"L{layers}")
        if self.method == "lora":
            parts.append(f"r{self.rank}")
            if self.lora_alpha is not None:
                parts.append(f"a{self.lora_alpha:g}")
            if self.target_modules is not None:
                targets = self.target_modules if isinstance(self.target_modules, str) else "+".join(self.target_modules)
                parts.append(f"T{targets}")
            if self.adapter != "builtin":
                parts.append(self.adapter)
        for key in sorted(self.hparams):
            parts.append(f"{key}{self.hparams[key]}")
        parts.append(f"s{self.seed}")
        return re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join(str(p) for p in parts))

    def to_dict(self) -> dict:
        fields = asdict(self)
        for key, default in _LORA_DEFAULTS.items():
            if fields[key] == default:
                del fields[key]
        return fields


def schedule_factor(name: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``t`` (0-based) of ``total_steps``.

    ``cosine``: half a cosine down to 0; ``linear``: straight down to 0;
    ``step``: x0.1 after half and again after three quarters of the steps.
    """
    total = max(int(total_steps), 1)
    if name == "constant":
        return lambda t: 1.0
    if name == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if name == "linear":
        return lambda t: max(0.0, 1.0 - t / total)
    if name == "step":
        return lambda t: 1.0 if t < total // 2 else (0.1 if t < (3 * total) // 4 else 0.01)
    raise UserInputError(f"schedule: unknown schedule {name!r}; choose one of {SCHEDULES}")


def _read_float(value):
    """``value`` as a float where ``float`` reads it (a number, or a numeric string as YAML gives
    ``1e-3``); anything else unchanged, for the field's check to name."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value
