"""A fine-tuning recipe: the fields a simulated strategy and a real attack share, checked in one place.

:class:`Recipe` is the base of what every fine-tuning run names: the ``method`` of the
registry (:mod:`sophon_ext.methods`), the ``optimizer`` preset
(:mod:`sophon_ext.optim.presets`), its learning rate ``lr``, the
``batch_size``, the ``layers`` the method reads, the ``seed`` and extra
optimizer ``hparams``. Its check is the one check of these fields; a wrong
value raises :class:`~sophon_ext.errors.UserInputError` (a ``ValueError``)
or :class:`~sophon_ext.errors.UserInputTypeError` (also a ``TypeError``)
whose message starts with the field's name.

Two recipes extend it:

- :class:`sophon_ext.strategies.FineTuneStrategy`: a simulated trajectory
  (adds ``steps``, ``surgery``, ``input_transform``); it accepts the simulated
  methods and ``"custom"``, and keeps the weight decay in
  ``hparams["weight_decay"]``.
- :class:`sophon_ext.attack.spec.AttackSpec`: a real attack of the harness
  (adds ``epochs``, ``weight_decay``, ``schedule`` and the LoRA fields); it
  accepts every registered method, and the weight decay is its
  ``weight_decay`` field, never in ``hparams``.

:meth:`Recipe.from_recipe` turns one kind into another (``AttackSpec.from_recipe(strategy,
epochs=2)``): it carries the shared fields and moves the weight decay between
``hparams["weight_decay"]`` and the ``weight_decay`` field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TypeVar

from .errors import UserInputError, UserInputTypeError
from .methods import method_names
from .optim.presets import PRESETS

#: the fields every recipe kind declares (each in its own positional order)
RECIPE_FIELDS = ("method", "optimizer", "lr", "batch_size", "layers", "seed", "hparams")

R = TypeVar("R", bound="Recipe")


class Recipe:
    """The base of every fine-tuning recipe: the one check of the shared fields, and the conversion.

    A recipe kind is a dataclass that subclasses ``Recipe``, declares the
    fields of :data:`RECIPE_FIELDS` in its own order (its constructor's
    positional order) next to its own, and calls ``super().__post_init__()``
    before checking its own fields:

    - ``method``: a method of the registry (:mod:`sophon_ext.methods`; each
      kind says which, :meth:`_methods`).
    - ``optimizer``: a preset name of :mod:`sophon_ext.optim.presets`;
      ``hparams`` (a dict, torch.optim names) override the preset's
      hyperparameters, except the learning rate, which is ``lr``.
    - ``lr``: a finite number > 0; ``batch_size``: an int >= 1 samples per step.
    - ``layers``: a count of first parametrised layers or module name(s), for
      the methods that read it (a tuple of names is kept as a list).
    - ``seed``: an int.
    """

    method: str
    optimizer: str
    lr: float
    batch_size: int
    layers: int | str | list[str] | None
    seed: int
    hparams: dict

    #: how the method check calls a method ("unknown method 'x'")
    _method_word = "method"

    @classmethod
    def _methods(cls) -> tuple[str, ...]:
        """The ``method`` values this kind of recipe accepts."""
        return method_names()

    def __post_init__(self) -> None:
        methods = self._methods()
        if self.method not in methods:
            raise UserInputError(f"method: unknown {self._method_word} {self.method!r}; choose one of {methods}")
        if self.optimizer not in PRESETS:
            raise UserInputError(f"optimizer: unknown name {self.optimizer!r}; choose one of {sorted(PRESETS)}")
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise UserInputTypeError(f"lr: must be a finite number > 0, got {lr!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise UserInputError(f"lr: must be a finite number > 0, got {lr!r}")
        size = self.batch_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise UserInputTypeError(f"batch_size: must be an int >= 1, got {size!r}")
        if size < 1:
            raise UserInputError(f"batch_size: must be an int >= 1, got {size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UserInputTypeError(f"seed: expected an int, got {self.seed!r}")
        if not isinstance(self.hparams, dict):
            raise UserInputTypeError(f"hparams: expected a dict of optimizer hyperparameters, got {type(self.hparams).__name__}")
        if "lr" in self.hparams:
            raise UserInputError("hparams: set the learning rate with the lr field, not hparams['lr']")
        if isinstance(self.layers, tuple):
            self.layers = list(self.layers)

    @classmethod
    def from_recipe(cls: type[R], recipe: Recipe, **fields) -> R:
        """A ``cls`` with ``recipe``'s shared fields (:data:`RECIPE_FIELDS`), ``fields`` on top.

        ``fields`` set the fields only ``cls`` has (an attack's ``epochs``, a
        strategy's ``steps``) or override shared ones; the fields only
        ``recipe``'s kind has are not carried. The weight decay moves with the
        recipe: from ``hparams["weight_decay"]`` into the ``weight_decay``
        field (0.0 when absent) when ``cls`` has that field and ``recipe``
        does not, and from the field into ``hparams["weight_decay"]`` (left
        out when 0) the other way.
        """
        if not isinstance(recipe, Recipe):
            raise UserInputTypeError(f"recipe: expected a Recipe (a FineTuneStrategy, an AttackSpec, ...), "
                                     f"got {type(recipe).__name__}")
        values = {name: getattr(recipe, name) for name in RECIPE_FIELDS}
        values["hparams"] = hparams = dict(recipe.hparams)
        if isinstance(values["layers"], list):
            values["layers"] = list(values["layers"])
        source_field, target_field = _has_weight_decay_field(type(recipe)), _has_weight_decay_field(cls)
        if target_field and not source_field:
            values["weight_decay"] = float(hparams.pop("weight_decay", 0.0))
        elif source_field and not target_field and recipe.weight_decay != 0:
            hparams["weight_decay"] = recipe.weight_decay
        elif source_field and target_field:
            values["weight_decay"] = recipe.weight_decay
        return cls(**{**values, **fields})


def _has_weight_decay_field(cls: type) -> bool:
    return "weight_decay" in {f.name for f in dataclasses.fields(cls)}


__all__ = ["RECIPE_FIELDS", "Recipe"]
