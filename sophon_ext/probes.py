"""Real attacks in the protection loop: short fine-tuning runs with the attack harness.

The simulated attackers are the protection's model of the adversary; a probe
checks that model against the real thing. Every ``protect.probes.every``
iterations the engine fine-tunes a copy of the current model with a few real
recipes (:func:`sophon_ext.attack.fine_tune`) on a held-out part of the
restricted training data, and compares each with training a fresh model of
the same architecture with the same recipe (computed once per recipe: it
does not depend on the protected model). The product's escape rule
(:func:`sophon_ext.report.escapes`) decides; an escape raises the weight of
the recipe's family member in the worst-case sampler.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attack import AttackSpec, fine_tune
from .data import ArrayDataset, split
from .recipe import Recipe
from .report import area_under_curve, chance_level, escapes
from .surgery import fresh_model


class AttackProbes:
    """Runs probe recipes against a model and remembers the scratch reference of each recipe."""

    def __init__(self, config, task, restricted: ArrayDataset, seed: int, device, head: str | None = None) -> None:
        if len(restricted) < 4:
            raise ValueError(f"probes: the restricted domain needs at least 4 samples, got {len(restricted)}")
        self.config = config
        self.task = task
        self.train, self.test = split(restricted, [config.train_fraction, 1.0 - config.train_fraction], seed=seed)
        self.seed = seed
        self.device = device
        self.head = head
        self.chance = chance_level(task, self.test)
        self._scratch: dict[str, list] = {}

    def spec(self, fields: dict) -> AttackSpec:
        """A probe attack from a dict of :class:`AttackSpec` fields (the probes' epochs, batch size and seed unless set)."""
        return AttackSpec(**{"epochs": self.config.epochs, "batch_size": self.config.batch_size, "seed": self.seed, **fields})

    def spec_for(self, recipe: Recipe) -> AttackSpec:
        """The probe attack of a recipe (a drawn strategy): its method, optimizer, lr, layers, hparams
        and weight decay, run with the probes' epochs, batch size and seed."""
        return AttackSpec.from_recipe(recipe, epochs=self.config.epochs, batch_size=self.config.batch_size, seed=self.seed)

    def run(self, model: nn.Module, specs: list[AttackSpec]) -> list[dict]:
        """One record per recipe: its name, final and area of protected and scratch, and ``escape``."""
        records = []
        for spec in specs:
            protected = fine_tune(model, spec, self.task, self.train, self.test, device=self.device, head=self.head)["metric"]
            if spec.name not in self._scratch:
                scratch_model = fresh_model(model, torch.Generator().manual_seed(spec.seed))
                self._scratch[spec.name] = fine_tune(scratch_model, spec, self.task, self.train, self.test,
                                                     device=self.device, head=self.head)["metric"]
            scratch = self._scratch[spec.name]
            records.append({
                "attack": spec.name, "method": spec.method, "optimizer": spec.optimizer, "lr": spec.lr,
                "protected_final": _last(protected), "scratch_final": _last(scratch),
                "protected_area": area_under_curve(protected), "scratch_area": area_under_curve(scratch),
                "escape": escapes(protected, scratch, self.task.higher_is_better, self.chance),
            })
        return records


def _last(curve: list) -> float | None:
    value = curve[-1]
    return None if value is None or not math.isfinite(value) else float(value)


__all__ = ["AttackProbes"]
