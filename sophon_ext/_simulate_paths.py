"""Running one chunk of trajectories, step by step.

State is one stacked tensor per parameter (n, ...) plus each optimizer
group's stacked functional-optimizer state: N copies of parameters and
optimizer state, one module. Forward/backward passes run over the whole chunk
whatever the optimizers; only the update runs per :class:`UpdateGroup` (a
contiguous row range sharing an optimizer base and static hyperparameters).

Two ways to compute the gradients, interchangeable at any step because they
read and write the same stacked state:

- ``vmap``: one ``torch.func.vmap`` call for the adaptation gradients of all
  trajectories, one for the query losses/gradients. Few Python calls, but
  batched convolution weights become grouped convolutions, slow on CPU for
  compute-bound models.
- ``loop``: forward/backward trajectory by trajectory with the ordinary
  kernels (no padding).

Both then update every group with one vmapped call. ``auto`` times both on
the first steps and keeps the faster (cached per signature).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from .optim.functional import FunctionalOptimizer

# (signature) -> "vmap" | "loop"; filled by timing the first steps of a run.
_PATH_CACHE: dict[tuple, str] = {}
# Steps timed per path before choosing (the first of each is a warm-up).
_CALIBRATION_STEPS = 2


@dataclass
class UpdateGroup:
    """Rows ``rows`` of the chunk, updated by one optimizer."""

    rows: slice
    optimizer: FunctionalOptimizer
    hp_const: dict  # hyperparameters equal across the group (static ones included)
    hp_varying: dict  # name -> (rows,) tensor
    masks: dict  # parameter name -> (rows,) bool, True where the trajectory trains it


@dataclass
class Chunk:
    """Everything a chunk of ``n`` trajectories needs to run its K steps."""

    model: nn.Module
    groups: list
    adaptation_loss: Callable
    suppression_loss: Callable
    order: str
    start: dict  # name -> (n, ...) starting parameters (graph to theta when second order)
    batch_sizes: list


def _objective(model: nn.Module, loss: Callable):
    def objective(params, inputs, targets, weight):
        output = functional_call(model, params, inputs)
        return loss(output, targets) if weight is None else loss(output, targets, weight)

    return objective


def _update_function(group: UpdateGroup):
    def update(params, grads, state, hp, masks):
        new_params, new_state = group.optimizer.step(params, grads, state, {**group.hp_const, **hp})
        for name, trains in masks.items():
            # frozen: keep the exact old value (weight decay or momentum would move it)
            new_params[name] = torch.where(trains, new_params[name], params[name])
        return new_params, new_state

    return vmap(update, randomness="different")


class ChunkRunner:
    """Steps a :class:`Chunk` with the vmap or loop path; accumulates query losses and gradients."""

    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.second_order = chunk.order == "second"
        if self.second_order:
            # a parameter every trajectory re-initialises has no graph to theta; it
            # still needs one for the inner gradients (a leaf nobody asks about)
            self.params = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in chunk.start.items()}
        else:
            self.params = {n: p.detach() for n, p in chunk.start.items()}
        self.states = [vmap(g.optimizer.init)(self._rows(self.params, g.rows)) for g in chunk.groups]
        self.updates = [_update_function(g) for g in chunk.groups]
        self.adapt = _objective(chunk.model, chunk.adaptation_loss)
        self.query = _objective(chunk.model, chunk.suppression_loss)
        self.losses: list[Tensor] = []  # per step, (n,)
        self.query_grad_sum = None if self.second_order else {n: torch.zeros_like(p) for n, p in self.params.items()}
        # the padding weight is None when every batch of the chunk has the same size
        self._adapt_grads = {
            padded: vmap(grad(self.adapt), in_dims=(0, 0, 0, 0 if padded else None), randomness="different")
            for padded in (False, True)
        }
        query = self.query if self.second_order else grad_and_value(self.query)
        self._query_vmapped = vmap(query, in_dims=(0, 0, 0, None), randomness="different")

    @staticmethod
    def _rows(tensors: dict, rows: slice) -> dict:
        return {n: t[rows] for n, t in tensors.items()}

    def _update(self, grads: dict) -> None:
        pieces = []
        for i, (group, update) in enumerate(zip(self.chunk.groups, self.updates)):
            new_params, self.states[i] = update(self._rows(self.params, group.rows), self._rows(grads, group.rows),
                                                self.states[i], group.hp_varying, group.masks)
            pieces.append(new_params)
        if len(pieces) == 1:
            self.params = pieces[0]
        else:
            self.params = {n: torch.cat([p[n] for p in pieces]) for n in self.params}

    # -- the two paths -------------------------------------------------------------
    def step_vmap(self, batch) -> None:
        x, y, w, qx, qy = batch
        self._update(self._adapt_grads[w is not None](self.params, x, y, w))
        if self.second_order:
            self._record(None, self._query_vmapped(self.params, qx, qy, None))
        else:
            self._record(*self._query_vmapped(self.params, qx, qy, None))

    def step_loop(self, batch) -> None:
        x, y, w, qx, qy = batch
        grads = {n: [] for n in self.params}
        for j, size in enumerate(self.chunk.batch_sizes):
            # unpadded: the ordinary kernels on this trajectory's real batch
            g, _ = self._autograd(self.adapt, j, tuple(t[j, :size] for t in x), y[j, :size])
            for n in grads:
                grads[n].append(g[n])
        self._update({n: torch.stack(g) for n, g in grads.items()})
        query_grads = {n: [] for n in self.params}
        losses = []
        for j in range(len(self.chunk.batch_sizes)):
            g, loss = self._autograd(self.query, j, tuple(t[j] for t in qx), qy[j], need_grad=not self.second_order)
            losses.append(loss)
            for n in query_grads if g is not None else ():
                query_grads[n].append(g[n])
        stacked_query = None if self.second_order else {n: torch.stack(g) for n, g in query_grads.items()}
        self._record(stacked_query, torch.stack(losses))

    def _autograd(self, objective, j, inputs, targets, need_grad=True):
        """Plain-autograd gradient of trajectory j's objective (no functorch: any op works)."""
        if self.second_order:
            params = {n: p[j] for n, p in self.params.items()}  # views inside the meta graph
        else:
            params = {n: p[j].detach().requires_grad_(True) for n, p in self.params.items()}
        loss = objective(params, inputs, targets, None)
        if not need_grad:
            return None, loss
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=self.second_order, allow_unused=True)
        out = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(params, grads)}
        return out, loss if self.second_order else loss.detach()

    def _record(self, query_grads, loss) -> None:
        self.losses.append(loss)
        if query_grads is not None:
            for n, g in query_grads.items():
                self.query_grad_sum[n] += g


def run_chunk(chunk: Chunk, batches, path: str, signature: tuple) -> tuple[ChunkRunner, str]:
    """Run every step; ``batches[k]()`` gives step k's stacked batch. Returns the runner and the path used."""
    runner = ChunkRunner(chunk)
    steps = len(batches)
    chosen = path if path != "auto" else _PATH_CACHE.get(signature)
    timings: dict[str, list[float]] = {"vmap": [], "loop": []}
    for k in range(steps):
        batch = batches[k]()
        if chosen is None and k < 2 * _CALIBRATION_STEPS and steps >= 2 * _CALIBRATION_STEPS:
            trial = "vmap" if k % 2 == 0 else "loop"
            start = time.perf_counter()
            getattr(runner, "step_" + trial)(batch)
            timings[trial].append(time.perf_counter() - start)
            if k == 2 * _CALIBRATION_STEPS - 1:
                # the first call of each includes one-off costs: compare the later ones
                chosen = min(timings, key=lambda p: min(timings[p][1:]))
                _PATH_CACHE[signature] = chosen
            continue
        if chosen is None:
            chosen = "loop"  # too few steps to time: the path that is never much slower
        getattr(runner, "step_" + chosen)(batch)
    return runner, chosen or "loop"
