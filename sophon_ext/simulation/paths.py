"""Running one chunk of trajectories, step by step.

State: N copies of parameters and optimizer state, one module. First order
keeps the parameters in one flat (n, P) buffer updated in place; second
order keeps one stacked tensor per parameter (n, ...), new at every step (the
meta-gradient differentiates through the updates). Forward/backward passes
run over the whole chunk whatever the optimizers; only the update runs per
:class:`UpdateGroup` (a contiguous row range sharing an optimizer base and
static hyperparameters): first order with the fused multi-trajectory op
where the base has one (sgd, adam, adamw, lion), otherwise with one vmapped
call of the functional optimizer.

Three ways to compute the gradients, interchangeable at any step because they
read and write the same stacked state:

- ``vmap``: one ``torch.func.vmap`` call for the adaptation gradients of all
  trajectories, one for the query losses/gradients. Few Python calls, but
  batched convolution weights become grouped convolutions, slow on CPU for
  compute-bound models, and the batch rules copy activations between layouts.
- ``stacked``: the model traced once (:mod:`.stacked`) and run on all
  trajectories with plain autograd, activations kept as (B, N, ...): no
  functorch wrapping, no layout copies (models made of supported ops only).
- ``loop``: forward/backward trajectory by trajectory with the ordinary
  kernels (no padding).

vmap and loop can run over blocks of trajectories on worker threads. Which
variant runs is chosen in :mod:`.autotune`.
"""

from __future__ import annotations

import copy
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, vmap

from ..optim.fused import FUSED_KINDS, FusedMultiTrajectoryOptimizer, flat_views, flatten_rows
from ..optim.functional import FunctionalOptimizer
from .stacked import stacked_model, trajectory_output

# (workers, pool) of the threaded variants.
_POOL: tuple[int, ThreadPoolExecutor] | None = None


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


class _FunctionalUpdate:
    """A group's update by its vmapped functional optimizer (differentiable: second
    order, and first order for bases with no fused op). ``in_place``: write the new
    values into the parameter tensors given (views of the chunk's flat buffer)."""

    def __init__(self, group: UpdateGroup, params: dict, in_place: bool):
        self.group, self.in_place = group, in_place
        self.state = vmap(group.optimizer.init)(params)
        self._update = _update_function(group)

    def __call__(self, params: dict, grads: dict) -> dict:
        new_params, self.state = self._update(params, grads, self.state, self.group.hp_varying, self.group.masks)
        if not self.in_place:
            return new_params
        for name, value in new_params.items():
            params[name].copy_(value)
        return params


class _FusedUpdate:
    """A group's first-order update in place on its rows of the chunk's flat
    parameter and gradient buffers: one fused op call (sgd, adam, adamw, lion)."""

    def __init__(self, group: UpdateGroup, params: dict, flat: Tensor, flat_grads: Tensor):
        hparams = {**group.hp_const, **group.hp_varying}
        self.optimizer = FusedMultiTrajectoryOptimizer(params, group.optimizer.name, hparams,
                                                       buffers=(flat[group.rows], flat_grads[group.rows]))
        self.frozen = {name: ~trains for name, trains in group.masks.items()}

    def __call__(self, params: dict, grads: dict) -> dict:
        kept = {name: params[name][frozen] for name, frozen in self.frozen.items()}  # copies
        self.optimizer.step()  # ``grads`` are already in the flat gradient buffer
        for name, value in kept.items():
            params[name][self.frozen[name]] = value  # frozen: keep the exact old value
        return params


def _channels_last(inputs: tuple) -> tuple:
    """(n, B, C, H, W) float inputs laid out so each trajectory's (B, C, H, W) slice is channels-last."""
    return tuple(t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) if t.dim() == 5 and t.is_floating_point() else t
                 for t in inputs)


def _stacked_channels_last(inputs: tuple) -> tuple:
    """(n, B, C, H, W) float inputs laid out as (B, H, W, n, C) in memory: the stacked
    path's (B, n * C, H, W) view of them is then channels-last, and so is every
    grouped convolution and pooling after it (vectorised kernels in oneDNN and ATen)."""
    return tuple(t.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2) if t.dim() == 5 and t.is_floating_point() else t
                 for t in inputs)


class _Worker:
    """A model (the chunk's, or a copy for a worker thread) and the vmapped gradients through it."""

    def __init__(self, model: nn.Module, chunk: Chunk, second_order: bool):
        self.model = model
        self._stacked = None
        adapt, query = _objective(model, chunk.adaptation_loss), _objective(model, chunk.suppression_loss)
        # the padding weight is None when every batch of the chunk has the same size
        self.adapt_vmapped = {
            padded: vmap(grad(adapt), in_dims=(0, 0, 0, 0 if padded else None), randomness="different")
            for padded in (False, True)
        }
        self.query_vmapped = vmap(query if second_order else grad_and_value(query), in_dims=(0, 0, 0, None),
                                  randomness="different")

    @property
    def stacked(self):
        """The model traced for the stacked path (raises NotStackable)."""
        if self._stacked is None:
            self._stacked = stacked_model(self.model)
        return self._stacked


class ChunkRunner:
    """Steps a :class:`Chunk` with the vmap, stacked or loop gradients; accumulates query losses and gradients.

    First order keeps the parameters in one flat (n, P) buffer (``self.params``
    are views of it) updated in place, by the fused op where the group's
    optimizer has one; second order keeps a new stacked dict per step (the graph).
    """

    def __init__(self, chunk: Chunk):
        self.chunk = chunk
        self.second_order = chunk.order == "second"
        if self.second_order:
            # a parameter every trajectory re-initialises has no graph to theta; it
            # still needs one for the inner gradients (a leaf nobody asks about)
            self.params = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in chunk.start.items()}
        else:
            shapes = {name: p.shape[1:] for name, p in chunk.start.items()}
            self.flat = flatten_rows(chunk.start)
            self.flat_grads = torch.zeros_like(self.flat)
            self.params, self.grads = flat_views(self.flat, shapes), flat_views(self.flat_grads, shapes)
        self.updates = [self._group_update(g) for g in chunk.groups]
        self.losses: list[Tensor] = []  # per step, (n,)
        self._updates_done = 0
        self.query_grad_sum = None if self.second_order else {n: torch.zeros_like(p) for n, p in self.params.items()}
        self._workers = [_Worker(chunk.model, chunk, self.second_order)]  # + model copies for worker threads

    def _group_update(self, group: UpdateGroup):
        params = self._rows(self.params, group.rows)
        if self.second_order or group.optimizer.name not in FUSED_KINDS:
            return _FunctionalUpdate(group, params, in_place=not self.second_order)
        return _FusedUpdate(group, params, self.flat, self.flat_grads)

    @staticmethod
    def _rows(tensors: dict, rows: slice) -> dict:
        return {n: t[rows] for n, t in tensors.items()}

    def _update(self, grads: dict) -> None:
        """One update of every group."""
        if not self.second_order:
            n = self.flat.shape[0]
            torch.cat([g.reshape(n, -1) for g in grads.values()], dim=1, out=self.flat_grads)
            grads = self.grads
        pieces = [update(self._rows(self.params, group.rows), self._rows(grads, group.rows))
                  for group, update in zip(self.chunk.groups, self.updates)]
        if self.second_order:
            self.params = pieces[0] if len(pieces) == 1 else {n: torch.cat([p[n] for p in pieces]) for n in self.params}

    def step(self, batch, gradients: str = "vmap", channels_last: bool = False, threads: bool = False) -> None:
        """One step, with the "vmap", "stacked" or "loop" gradients (``threads``: blocks of
        trajectories on worker threads). The update is done (and kept) before
        the query: a step redone after its query failed resumes there."""
        x, y, w, qx, qy = batch
        if channels_last:
            layout = _stacked_channels_last if gradients == "stacked" else _channels_last
            x, qx = layout(x), layout(qx)
        adapt, query = {"vmap": (self._vmap_adapt, self._vmap_query), "loop": (self._loop_adapt, self._loop_query),
                        "stacked": (self._stacked_adapt, self._stacked_query)}[gradients]
        if self._updates_done == len(self.losses):
            self._update(self._blocks(functools.partial(adapt, x, y, w), threads)[0])
            self._updates_done += 1
        query_grads, loss = self._blocks(functools.partial(query, qx, qy), threads)
        self.losses.append(loss)
        for n, g in (query_grads or {}).items():
            self.query_grad_sum[n] += g

    # -- the gradients of a block of rows: (stacked grads or None, losses or None) --
    def _vmap_adapt(self, x, y, w, rows: slice, worker: _Worker):
        padded = w is not None
        params, inputs = self._rows(self.params, rows), tuple(t[rows] for t in x)
        return worker.adapt_vmapped[padded](params, inputs, y[rows], w[rows] if padded else None), None

    def _vmap_query(self, qx, qy, rows: slice, worker: _Worker):
        out = worker.query_vmapped(self._rows(self.params, rows), tuple(t[rows] for t in qx), qy[rows], None)
        return (None, out) if self.second_order else out

    def _loop_adapt(self, x, y, w, rows: slice, worker: _Worker):
        sizes = self.chunk.batch_sizes  # unpadded: the ordinary kernels on each trajectory's real batch
        grads = [self._autograd(self.chunk.adaptation_loss, worker.model, j, tuple(t[j, :sizes[j]] for t in x), y[j, :sizes[j]])[0]
                 for j in range(rows.start, rows.stop)]
        return self._stack_rows(grads), None

    def _loop_query(self, qx, qy, rows: slice, worker: _Worker):
        out = [self._autograd(self.chunk.suppression_loss, worker.model, j, tuple(t[j] for t in qx), qy[j], need_grad=not self.second_order)
               for j in range(rows.start, rows.stop)]
        return None if self.second_order else self._stack_rows([g for g, _ in out]), torch.stack([loss for _, loss in out])

    def _stacked_adapt(self, x, y, w, rows: slice, worker: _Worker):
        return self._stacked_gradients(self.chunk.adaptation_loss, worker, rows, x, y, w)[0], None

    def _stacked_query(self, qx, qy, rows: slice, worker: _Worker):
        return self._stacked_gradients(self.chunk.suppression_loss, worker, rows, qx, qy, None, need_grad=not self.second_order)

    def _stacked_gradients(self, loss_fn, worker: _Worker, rows: slice, inputs, targets, weight, need_grad=True):
        """One ordinary forward/backward of every trajectory of ``rows`` (see .stacked)."""
        model = worker.stacked
        if self.second_order:
            params = self._rows(self.params, rows)  # inside the meta graph
        else:
            params = {n: p[rows].detach().requires_grad_(True) for n, p in self.params.items()}
        out = model(params, tuple(t[rows] for t in inputs))
        losses = []
        for j in range(rows.stop - rows.start):
            output, row_targets = trajectory_output(out, j), targets[rows.start + j]
            losses.append(loss_fn(output, row_targets) if weight is None else loss_fn(output, row_targets, weight[rows.start + j]))
        losses = torch.stack(losses)
        if not need_grad:
            return None, losses
        grads = torch.autograd.grad(losses.sum(), list(params.values()), create_graph=self.second_order, allow_unused=True)
        grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(params, grads)}
        return grads, losses if self.second_order else losses.detach()

    @staticmethod
    def _stack_rows(per_trajectory: list) -> dict:
        return {n: torch.stack([g[n] for g in per_trajectory]) for n in per_trajectory[0]}

    def _blocks(self, task, threads: bool):
        """``task(rows, worker)`` over the whole chunk; ``threads``: over contiguous
        blocks of rows, one per worker thread, each with its own model copy
        (``functional_call`` swaps a module's parameters while it runs) and its
        share of the intra-op threads. Results are concatenated in row order."""
        n = len(self.chunk.batch_sizes)
        if not threads:
            return task(slice(0, n), self._workers[0])
        total = torch.get_num_threads()
        count = min(n, total)
        while len(self._workers) < count:
            self._workers.append(_Worker(copy.deepcopy(self.chunk.model), self.chunk, self.second_order))
        bounds = [n * i // count for i in range(count + 1)]

        def run(rows, worker):
            torch.set_num_threads(max(1, total // count))  # this thread's own setting
            return task(rows, worker)

        parts = list(_thread_pool(count).map(run, [slice(a, b) for a, b in zip(bounds, bounds[1:])], self._workers))
        grads, losses = zip(*parts)
        return (None if grads[0] is None else {name: torch.cat([g[name] for g in grads]) for name in grads[0]},
                None if losses[0] is None else torch.cat(losses))

    def _autograd(self, loss_fn, model, j, inputs, targets, need_grad=True):
        """Plain-autograd gradient of trajectory j's objective (no functorch: any op works)."""
        if self.second_order:
            params = {n: p[j] for n, p in self.params.items()}  # views inside the meta graph
        else:
            params = {n: p[j].detach().requires_grad_(True) for n, p in self.params.items()}
        loss = _objective(model, loss_fn)(params, inputs, targets, None)
        if not need_grad:
            return None, loss
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=self.second_order, allow_unused=True)
        out = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(params, grads)}
        return out, loss if self.second_order else loss.detach()


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` worker threads (kept between calls)."""
    global _POOL
    if _POOL is None or _POOL[0] != workers:
        _POOL = (workers, ThreadPoolExecutor(workers, "sophon-simulate"))
    return _POOL[1]
