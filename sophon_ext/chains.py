"""Long simulated fine-tuning at the price of short trajectories.

A real attacker fine-tunes for hundreds of steps; simulating K = 10 steps per
FTS step teaches the model to resist only the start of fine-tuning, and real
fine-tuning then escapes after a few epochs (docs/DESIGN_NOTES.md). Running K
= 200 steps per FTS step costs 20x. :class:`TrajectoryChains` gets the long
horizon at the short price: the trajectory a strategy ran at one FTS step is
*continued* the next time that strategy is drawn, from the current parameters
plus the displacement the attacker had reached, for another K steps, until it
has run ``horizon`` steps; then a fresh trajectory starts from the current
parameters. Over the run the suppression loss is evaluated at every depth of
fine-tuning up to ``horizon``.

Meta-gradient: a continued trajectory starts at ``theta + offset``, so the
first-order meta-gradient (SOPHON's, dtheta_k/dtheta taken as the identity)
reaches ``theta`` exactly as for a fresh trajectory. Parameters the strategy
re-initialised keep the attacker's own values (they do not follow ``theta``)
and get no meta-gradient, as in a fresh trajectory. The optimizer state
(momentum, Adam moments) starts anew at each continuation, as if the attacker
restarted the optimizer.

Methods continued: every registered method that freezes nothing
(:attr:`sophon_ext.methods.FineTuneMethod.continuable`: the continuation
trains every parameter, as they do; an input change goes on applying).
Freezing methods and ``custom`` strategies always start fresh.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .surgery import parameter_names
from .methods import get_method
from .strategies import FineTuneStrategy


def is_continued(strategy: FineTuneStrategy) -> bool:
    """Whether a trajectory of ``strategy`` may be continued at a later FTS step."""
    return strategy.method != "custom" and get_method(strategy.method).continuable


@dataclass
class Chain:
    """Where one strategy's attacker stands after ``steps`` simulated steps."""

    steps: int
    #: adapted minus theta, for the parameters that follow theta
    offset: dict[str, Tensor]
    #: adapted values of the parameters the strategy re-initialised
    absolute: dict[str, Tensor]

    def start_surgery(self):
        """The ``custom`` surgery that puts a trajectory where this chain stopped."""
        offset, absolute = self.offset, self.absolute

        def surgery(params: dict, generator: torch.Generator) -> dict:
            start = {n: params[n] + offset[n] for n in offset}
            start.update({n: v.clone() for n, v in absolute.items()})
            return start

        return surgery


class TrajectoryChains:
    """Continues each strategy slot's simulated trajectory across FTS steps up to ``horizon`` steps.

    A slot is the strategy's position in the engine's strategy list; the same
    slot drawn twice in one FTS step continues once and runs fresh otherwise.
    """

    def __init__(self, horizon: int, head: str | None = None) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
            raise ValueError(f"horizon: must be an int >= 1, got {horizon!r}")
        self.horizon = horizon
        self.head = head
        self.chains: dict[int, Chain] = {}

    def _reinitialised(self, model: nn.Module, strategy: FineTuneStrategy) -> set[str]:
        modules, _ = get_method(strategy.method).targets(model, strategy.layers, self.head)
        return set(parameter_names(model, modules))

    def has_chain(self, slot: int) -> bool:
        """Whether ``slot``'s simulated attacker will be continued when it is next drawn."""
        return slot in self.chains

    def _continued_slots(self, slots: Sequence[int], strategies: Sequence[FineTuneStrategy]) -> list[bool]:
        return [first and is_continued(s) and slot in self.chains
                for slot, s, first in zip(slots, strategies, _first_of_slot(slots))]

    def depths(self, slots: Sequence[int], strategies: Sequence[FineTuneStrategy]) -> list[int]:
        """Steps already behind each trajectory of this FTS step (0: fresh)."""
        flags = self._continued_slots(slots, strategies)
        return [self.chains[s].steps if f else 0 for s, f in zip(slots, flags)]

    def strategies_to_run(self, slots: Sequence[int], strategies: Sequence[FineTuneStrategy]) -> list[FineTuneStrategy]:
        """``strategies`` with every continued one turned into a surgery that starts where its chain stopped."""
        flags = self._continued_slots(slots, strategies)
        return [
            dataclasses.replace(s, method="custom", surgery=self.chains[slot].start_surgery(), layers=None) if flag else s
            for slot, s, flag in zip(slots, strategies, flags)
        ]

    @torch.no_grad()
    def record(self, model: nn.Module, slots: Sequence[int], strategies: Sequence[FineTuneStrategy],
               theta: dict[str, Tensor], adapted: dict[str, Tensor]) -> None:
        """Advance the chains after ``simulate(..., return_params=True)``.

        ``theta``: the parameters the trajectories started from (before the
        meta step); ``adapted``: ``SimulationResult.params`` (name -> (N, ...)).
        """
        for i, (slot, strategy, first) in enumerate(zip(slots, strategies, _first_of_slot(slots))):
            if not first or not is_continued(strategy):
                continue
            chain = self.chains.get(slot)
            if chain is not None:
                steps, absolute_names = chain.steps + strategy.steps, set(chain.absolute)
            else:
                steps, absolute_names = strategy.steps, self._reinitialised(model, strategy)
            if steps >= self.horizon:
                self.chains.pop(slot, None)  # this attacker has run its course: the next one starts fresh
                continue
            self.chains[slot] = Chain(
                steps=steps,
                offset={n: adapted[n][i] - theta[n] for n in theta if n not in absolute_names},
                absolute={n: adapted[n][i].clone() for n in absolute_names},
            )

    def drop(self, slots: Sequence[int]) -> None:
        """End these slots' trajectories (e.g. diverged ones): their next draws start fresh."""
        for slot in slots:
            self.chains.pop(slot, None)

    def state_dict(self) -> dict:
        return {
            "horizon": self.horizon,
            "chains": {str(slot): {"steps": c.steps, "offset": dict(c.offset), "absolute": dict(c.absolute)}
                       for slot, c in self.chains.items()},
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        if int(state["horizon"]) != self.horizon:
            raise ValueError(f"chains: saved with horizon {state['horizon']}, this run has {self.horizon}")
        self.chains = {
            int(slot): Chain(
                steps=int(c["steps"]),
                offset={n: v.to(device) for n, v in c["offset"].items()},
                absolute={n: v.to(device) for n, v in c["absolute"].items()},
            )
            for slot, c in state["chains"].items()
        }


def _first_of_slot(slots: Sequence[int]) -> list[bool]:
    """Whether each entry is its slot's first in this FTS step (only that one continues the chain)."""
    seen, out = set(), []
    for slot in slots:
        out.append(slot not in seen)
        seen.add(slot)
    return out
