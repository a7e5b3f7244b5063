"""Attack families: distributions over simulated fine-tuning strategies, and how members are drawn.

A family (:class:`sophon_ext.config.FamilyConfig`) spans optimizers x methods
(each pair is a *member*) with learning rates, batch sizes, layers and
optimizer hyperparameters drawn from ranges. :class:`FamilySampler` draws
strategies from it, uniformly or worst-case first: each member carries a
running estimate of how far its simulated attackers escape (their
suppression loss after fine-tuning: the higher, the closer the attacker is
to a useful model), and draws are proportional to it (to its ``sharpness``-th power), with a ``floor`` share
spread uniformly so no member is ever left out. Escaping real attack probes
raise a member's estimate (:meth:`FamilySampler.boost`).

Every random choice comes from the caller's ``torch.Generator``, and the
estimates are part of :meth:`FamilySampler.state_dict`, so a run resumed from
a checkpoint draws what the uninterrupted run would have.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .config import FamilyConfig
from .methods import get_method
from .optim.functional import validate_hparams
from .optim.presets import ATTACK_LR_RANGES, resolve_preset
from .strategies import FineTuneStrategy

#: Default learning-rate range of each optimizer in a family (log-uniform)
DEFAULT_LR_RANGES = ATTACK_LR_RANGES


@dataclass(frozen=True)
class Member:
    """One cell of a family: an optimizer preset, a fine-tuning method and a learning-rate band
    (``lr_bin`` of ``lr_bins`` equal log-width bands of the optimizer's range)."""

    optimizer: str
    method: str
    lr_bin: int = 0
    lr_bins: int = 1

    @property
    def name(self) -> str:
        band = f"/lr{self.lr_bin + 1}of{self.lr_bins}" if self.lr_bins > 1 else ""
        return f"{self.method}/{self.optimizer}{band}"


def lr_range(family, optimizer: str) -> tuple[float, float]:
    bounds = family.lr_ranges.get(optimizer)
    return tuple(bounds) if bounds is not None else DEFAULT_LR_RANGES[optimizer]


def _candidates(spec) -> list:
    """The values of a hyperparameter spec that bound what it can draw: a range's ends, every choice, the value."""
    if isinstance(spec, list):
        return list(spec)
    if isinstance(spec, dict):
        return list(spec["choices"])
    return [spec]


def _draw_hparam(spec, generator: torch.Generator):
    """One draw of a spec: ``[low, high]`` uniform, ``{"choices": [...]}`` one of them, else the value itself."""
    if isinstance(spec, list):
        return spec[0] + _uniform(generator) * (spec[1] - spec[0])
    if isinstance(spec, dict):
        choices = spec["choices"]
        return choices[_choice(len(choices), generator)]
    return spec


def check_family(family) -> None:
    """Raise ``ValueError`` naming the field when a member could not make a valid strategy."""
    for optimizer in family.optimizers:
        specs = family.hparams.get(optimizer, {})
        names = list(specs)
        # every combination of the bounding values (a range's ends, each choice) with each end of the lr range
        for lr in lr_range(family, optimizer):
            for values in itertools.product(*(_candidates(specs[n]) for n in names)):
                try:
                    validate_hparams(*resolve_preset(optimizer, {**dict(zip(names, values)), "lr": float(lr)}))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"hparams.{optimizer}: {exc}") from None


class FamilySampler:
    """Draws :class:`FineTuneStrategy` s from a family (``FamilyConfig``) with K = ``steps``."""

    def __init__(self, family, steps: int) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be an int >= 1, got {steps!r}")
        check_family(family)
        self.family = family
        self.steps = steps
        bins = family.lr_bins
        self.members = [Member(o, m, b, bins) for o in family.optimizers for m in family.methods for b in range(bins)]
        self.estimates: list[float | None] = [None] * len(self.members)
        self.draws = [0] * len(self.members)

    # -- probabilities ---------------------------------------------------------------------
    def probabilities(self) -> list[float]:
        """Each member's chance of being drawn next."""
        m = len(self.members)
        if self.family.sampler == "uniform":
            return [1.0 / m] * m
        known = [e for e in self.estimates if e is not None]
        # a member never observed counts as the worst seen so far: it gets drawn soon
        unknown = max(known) if known else 1.0
        power = self.family.sharpness
        weights = [max(unknown if e is None else e, 0.0) ** power + 1e-12 for e in self.estimates]
        total = sum(weights)
        floor = self.family.floor
        return [floor / m + (1.0 - floor) * w / total for w in weights]

    # -- drawing ----------------------------------------------------------------------------
    def draw_member(self, generator: torch.Generator) -> int:
        probs = torch.tensor(self.probabilities(), dtype=torch.float64)
        return int(torch.multinomial(probs, 1, generator=generator).item())

    def draw(self, generator: torch.Generator) -> tuple[int, FineTuneStrategy]:
        """(member index, a strategy of that member with its other fields drawn from the ranges)."""
        index = self.draw_member(generator)
        self.draws[index] += 1
        return index, self.strategy_for(index, generator)

    def strategy_for(self, index: int, generator: torch.Generator) -> FineTuneStrategy:
        member = self.members[index]
        low, high = (math.log(b) for b in lr_range(self.family, member.optimizer))
        u = (member.lr_bin + _uniform(generator)) / member.lr_bins  # log-uniform within the member's band
        lr = math.exp(low + u * (high - low))
        hparams = {name: _draw_hparam(spec, generator) for name, spec in self.family.hparams.get(member.optimizer, {}).items()}
        batch = self.family.batch_sizes[_choice(len(self.family.batch_sizes), generator)]
        layers = self.family.layers[_choice(len(self.family.layers), generator)] if get_method(member.method).needs_layers else None
        seed = int(torch.randint(2**31, (1,), generator=generator).item())
        return FineTuneStrategy(optimizer=member.optimizer, lr=lr, batch_size=batch, steps=self.steps,
                                method=member.method, hparams=hparams, layers=layers, seed=seed)

    # -- feedback ---------------------------------------------------------------------------
    def observe(self, index: int, escape: float) -> None:
        """Fold one observation of member ``index`` (its post-fine-tuning suppression loss) in."""
        if not math.isfinite(escape):
            return
        old = self.estimates[index]
        rate = self.family.smoothing
        self.estimates[index] = escape if old is None else (1.0 - rate) * old + rate * escape

    def boost(self, index: int, factor: float = 2.0) -> None:
        """A real probe of member ``index`` escaped: make it the worst member by ``factor``."""
        known = [e for e in self.estimates if e is not None] or [1.0]
        self.estimates[index] = factor * max(max(known), 1e-6)

    def member_of(self, optimizer: str, method: str, lr: float | None = None) -> int | None:
        """The member a recipe belongs to (its lr band by ``lr``; the lowest band when None), or None."""
        bins = self.family.lr_bins
        band = 0
        if lr is not None and bins > 1 and optimizer in self.family.optimizers:
            low, high = (math.log(b) for b in lr_range(self.family, optimizer))
            position = (math.log(lr) - low) / (high - low) if high > low else 0.0
            band = min(max(int(position * bins), 0), bins - 1)
        try:
            return self.members.index(Member(optimizer, method, band, bins))
        except ValueError:
            return None

    def summary(self) -> list[dict]:
        """Per member: name, draws, estimate, current probability (for logs and reports)."""
        probs = self.probabilities()
        return [{"member": m.name, "draws": d, "estimate": e, "probability": p}
                for m, d, e, p in zip(self.members, self.draws, self.estimates, probs)]

    def state_dict(self) -> dict:
        return {"members": [m.name for m in self.members], "estimates": list(self.estimates), "draws": list(self.draws)}

    def load_state_dict(self, state: dict) -> None:
        if state["members"] != [m.name for m in self.members]:
            raise ValueError("family: the checkpoint's members differ from this run's family")
        self.estimates = [None if e is None else float(e) for e in state["estimates"]]
        self.draws = [int(d) for d in state["draws"]]


@dataclass
class StrategySampler:
    """Draws strategies uniformly from an attack family, reproducibly from ``seed``.

    The arguments are a :class:`~sophon_ext.config.FamilyConfig`'s, with the
    same checks: ``optimizers`` and ``methods`` to choose from (uniformly),
    ``lr_ranges`` ``{optimizer: (low, high)}`` log-uniform (defaults from
    :data:`DEFAULT_LR_RANGES`), ``batch_sizes`` and ``layers`` (for the layer
    methods) to choose from, ``hparams`` ``{optimizer: {name: spec}}`` with a
    spec ``(low, high)`` (uniform), ``{"choices": [...]}`` or a value;
    ``steps``: K, the same for all (simulate runs them together). It is a
    :class:`FamilySampler` with the uniform sampler, so it draws exactly as a
    protection run's family does.
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
        family = FamilyConfig.from_dict({
            "optimizers": list(self.optimizers), "methods": list(self.methods),
            "lr_ranges": {name: list(bounds) for name, bounds in self.lr_ranges.items()},
            "batch_sizes": list(self.batch_sizes), "layers": list(self.layers),
            "hparams": {opt: {name: list(spec) if isinstance(spec, tuple) else spec for name, spec in specs.items()}
                        for opt, specs in self.hparams.items()},
            "sampler": "uniform",
        })
        self._family = FamilySampler(family, self.steps)
        self._generator = torch.Generator().manual_seed(self.seed)

    def sample(self, n: int) -> list[FineTuneStrategy]:
        """``n`` strategies; successive calls continue the same random stream."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be an int >= 1, got {n!r}")
        return [self._family.draw(self._generator)[1] for _ in range(n)]


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _choice(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=generator).item())


def strategy_to_dict(strategy: FineTuneStrategy) -> dict:
    """The JSON-ready fields of a family-drawn strategy (it has no callables)."""
    return {"optimizer": strategy.optimizer, "lr": strategy.lr, "batch_size": strategy.batch_size,
            "steps": strategy.steps, "method": strategy.method, "hparams": dict(strategy.hparams),
            "layers": strategy.layers, "seed": strategy.seed}


__all__ = ["DEFAULT_LR_RANGES", "FamilySampler", "Member", "StrategySampler", "check_family", "strategy_to_dict"]
