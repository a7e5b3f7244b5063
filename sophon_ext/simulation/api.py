"""Simulated fine-tuning (SOPHON's FTS inner loop): N trajectories x K steps, batched."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..methods import check_param_values, get_method
from ..optim.functional import get_functional_optimizer, validate_hparams
from ..optim.presets import resolve_preset
from ..strategies import FineTuneStrategy
from .autotune import VARIANTS, run_chunk
from .batches import apply_transform, check_data, compose_transforms, draw_batches, method_inputs, stacked_batch
from .memory import activation_bytes_per_sample, auto_chunk_size, is_out_of_memory, trajectory_bytes
from .paths import Chunk, UpdateGroup

PATHS = ("auto", "vmap", "stacked", "chunked", "loop")
ORDERS = ("first", "second")


@dataclass
class SimulationResult:
    """``query_losses`` (N, K): suppression loss on step k's query batch after
    step k of trajectory i (detached). ``meta_grad``: parameter
    name -> mean over trajectories and steps of the query-loss gradient with
    respect to the ORIGINAL parameter. ``path``: what ran ("vmap", "stacked",
    "chunked", "loop", or several joined by "+" when groups differed). ``params``:
    adapted parameters, name -> (N, ...), when ``return_params=True``.
    ``chunk_size``: the most trajectories that ran together."""

    query_losses: Tensor
    meta_grad: dict[str, Tensor]
    path: str
    params: dict[str, Tensor] | None = None
    chunk_size: int | None = None


@dataclass
class _Plan:
    """How trajectory ``index`` starts and updates."""

    index: int
    strategy: FineTuneStrategy
    base: str
    hp: dict  # every hyperparameter of the base optimizer, lr included
    static: tuple  # (name, value) of the static hyperparameters: they split vmapped groups
    frozen: frozenset
    reinit: list  # module names to re-initialise
    input_transform: Callable | None  # the method's input change, then the strategy's own


def _plan(model: nn.Module, index: int, strategy: FineTuneStrategy, head: str | None) -> _Plan:
    base, preset_hp = resolve_preset(strategy.optimizer, strategy.hparams)
    try:
        hp = validate_hparams(base, {**preset_hp, "lr": float(strategy.lr)})
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"strategies[{index}]: {exc}") from None
    opt = get_functional_optimizer(base)
    static = tuple(sorted((k, hp[k]) for k in opt.static_names))
    reinit, frozen, transform = [], [], strategy.input_transform
    if strategy.method != "custom":
        method = get_method(strategy.method)
        reinit, frozen = method.targets(model, strategy.layers, head)
        transform = compose_transforms(method.simulated_input_transform(strategy.seed), transform)
    return _Plan(index, strategy, base, hp, static, frozenset(frozen), list(reinit), transform)


def _start_parameters(model: nn.Module, plan: _Plan, theta: dict[str, Tensor], inputs: tuple) -> dict[str, Tensor]:
    """The trajectory's starting point as a function of ``theta`` (autograd sees through it)."""
    generator = torch.Generator().manual_seed(plan.strategy.seed)
    if plan.strategy.method != "custom":
        method = get_method(plan.strategy.method)
        return method.simulated_start(model, theta, plan.reinit, generator, method_inputs(method, inputs, theta))
    out = check_param_values(plan.strategy.surgery(dict(theta), generator), theta, "surgery")
    return {**theta, **{n: v.to(dtype=theta[n].dtype, device=theta[n].device) for n, v in out.items()}}


@contextlib.contextmanager
def batch_statistics(model: nn.Module, decompose: bool = False):
    """Train mode, with BatchNorm normalising by batch statistics and never
    touching its running statistics; every flag is restored afterwards.

    ``decompose=True`` computes batch norm from elementary ops instead of the
    fused kernel: torch's double backward of the fused kernel under vmap is
    wrong (measured here: 3e-3 off on a 5-unit layer), which second-order
    meta-gradients need.
    """
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.train()
    for m in norms:
        m.track_running_stats = False  # F.batch_norm then gets no running buffers
        if decompose:
            m.forward = functools.partial(_decomposed_batch_norm, m)
    try:
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            if track is not None:
                m.track_running_stats = track
        for m in norms:
            m.__dict__.pop("forward", None)


def _decomposed_batch_norm(module: nn.Module, x: Tensor) -> Tensor:
    """Training-mode batch norm over every dim but the channel dim 1, from elementary ops."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    out = (x - mean) * torch.rsqrt(var + module.eps)
    if module.affine:
        shape = [1, -1] + [1] * (x.dim() - 2)
        out = out * module.weight.view(shape) + module.bias.view(shape)
    return out


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _check_arguments(model, strategies, query_size, order, path, chunk_size):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not any(True for _ in model.parameters()):
        raise ValueError("model: has no parameters to fine-tune")
    if isinstance(strategies, FineTuneStrategy) or not isinstance(strategies, (list, tuple)) or not strategies:
        raise ValueError("strategies: expected a non-empty list of FineTuneStrategy")
    for i, s in enumerate(strategies):
        if not isinstance(s, FineTuneStrategy):
            raise TypeError(f"strategies[{i}]: expected a FineTuneStrategy, got {type(s).__name__}")
    steps = {s.steps for s in strategies}
    if len(steps) != 1:
        raise ValueError(f"strategies: all must have the same number of steps K (they run together), got {sorted(steps)}")
    if isinstance(query_size, bool) or not isinstance(query_size, int) or query_size < 1:
        raise ValueError(f"query_size: must be an int >= 1, got {query_size!r}")
    if order not in ORDERS:
        raise ValueError(f"order: must be one of {ORDERS}, got {order!r}")
    if path not in PATHS and path not in VARIANTS:
        raise ValueError(f"path: must be one of {PATHS} (or a variant of auto: {sorted(VARIANTS)}), got {path!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: must be None or an int >= 1, got {chunk_size!r}")
    return steps.pop()


def _forward_key(plan: _Plan, model_has_bn: bool, inputs) -> tuple:
    """Trajectories with equal keys can share one (padded) batched forward pass."""
    # BatchNorm's batch statistics would see padding: with it, batch sizes do not mix
    size = plan.strategy.batch_size if model_has_bn else None
    return (size, _transformed_signature(plan.input_transform, inputs))


def _update_key(plan: _Plan) -> tuple:
    """Trajectories with equal keys can share one vmapped optimizer update."""
    return (plan.base, plan.static)


def _transformed_signature(transform, inputs) -> tuple | None:
    if transform is None:
        return None
    out = apply_transform(transform, tuple(t[:1] for t in inputs))  # one sample probes the output shapes
    return tuple((tuple(t.shape[1:]), t.dtype) for t in out)


@torch.enable_grad()  # it computes gradients whatever the caller's mode (under no_grad they would be silently lost)
def simulate(model: nn.Module, strategies: Sequence[FineTuneStrategy], data, adaptation_loss: Callable,
             suppression_loss: Callable, *, query_size: int, order: str = "first", path: str = "auto",
             chunk_size: int | None = None, head: str | None = None, generator: torch.Generator | None = None,
             return_params: bool = False, batch_seeds: Sequence[int] | None = None) -> SimulationResult:
    """Simulate N fine-tuning trajectories of K steps from ``model``'s parameters, batched.

    ``data = (model_inputs, targets)``: the restricted-domain pool (inputs a
    tuple of tensors, e.g. ``(x,)`` or ``(x_t, t)``). At each step k,
    trajectory i draws ``strategies[i].batch_size`` adaptation samples and
    ``query_size`` disjoint query samples (reproducibly from ``generator``),
    takes one optimizer step on ``adaptation_loss`` and evaluates
    ``suppression_loss`` on the query samples at the new point. Losses are
    ``loss(output, targets, weight=None)`` (weighted means), which lets
    trajectories with different batch sizes run over one padded batch.

    ``batch_seeds``: one batch seed per strategy instead of drawing them from
    ``generator`` (:func:`sophon_ext.distributed.simulate_sharded` passes each
    rank the seeds its trajectories would get in one process).

    ``order="first"``: the meta-gradient is the mean over (i, k) of the
    query-loss gradient at each adapted point, carried back to the original
    parameters as if d theta_i^k / d theta were the identity (the SOPHON
    reference); parameters a trajectory re-initialises get nothing from it.
    ``order="second"``: the exact gradient of ``query_losses.mean()``
    through every inner update. Its memory grows as K x (activations of one
    step) x (trajectories per chunk) plus K copies of parameters and
    optimizer state per trajectory: use it for small models, or lower
    ``chunk_size``.

    ``path``: "vmap" (one vmapped call per step), "stacked" (the model traced
    with torch.fx and run once per step on all trajectories with plain
    autograd, activations as (B, N, ...), convolutions grouped or per
    trajectory: under "auto" whichever times faster per shape, otherwise by a
    fixed rule so a run does not depend on timings; refuses, naming it, an op
    it cannot keep per trajectory), a variant name of "auto" (e.g.
    "stacked_channels_last", what the protection engine settles "auto" on), "chunked" (vmap over ``chunk_size``
    trajectories at a time), "loop" (trajectory by trajectory forward/backward
    with the ordinary kernels, one batched optimizer update), "auto" (times
    vmap, stacked when the model allows it, stacked and loop with channels-last
    image inputs, and with several intra-op threads vmap and loop over blocks
    of trajectories on worker threads, on the first steps (across calls when
    needed) and keeps the lowest median step time, vmap or stacked when within 10%,
    cached per model signature, shapes, device and threads; falls back to
    loop if the losses cannot run under vmap). First-order updates run in place, with the fused
    multi-trajectory op for sgd, adam, adamw and lion. All
    trajectories share the forward/backward passes; optimizers with
    different bases or static hyperparameters update in separate groups.
    BatchNorm models run different batch sizes in separate groups (padding
    would change the batch statistics); the others pad to the largest batch.
    With ``chunk_size=None``, "auto", "chunked" and second-order runs size
    chunks from a measured activation footprint and the free memory; any
    path halves a chunk that runs out of memory and retries it.

    BatchNorm layers use batch statistics; the model's buffers, parameters
    and train/eval flags are unchanged on return.
    """
    steps = _check_arguments(model, strategies, query_size, order, path, chunk_size)
    inputs, targets = check_data(data)
    # leaves the meta-gradient is taken with respect to (through each trajectory's surgery)
    theta = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    device = next(iter(theta.values())).device
    plans = [_plan(model, i, s, head) for i, s in enumerate(strategies)]
    batches = draw_batches(targets.shape[0], [s.batch_size for s in strategies], query_size, steps, generator, batch_seeds)
    has_bn = _has_batch_norm(model)
    groups: dict[tuple, list[_Plan]] = {}
    for plan in plans:
        groups.setdefault(_forward_key(plan, has_bn, inputs), []).append(plan)
    # same optimizer next to each other: an update group is then a contiguous row range
    order_of = {key: i for i, key in enumerate(dict.fromkeys(_update_key(p) for p in plans))}
    groups = {key: sorted(members, key=lambda p: order_of[_update_key(p)]) for key, members in groups.items()}

    n_total = len(strategies)
    losses = torch.zeros(n_total, steps, dtype=next(iter(theta.values())).dtype, device=device)
    meta = {n: torch.zeros_like(p) for n, p in theta.items()}
    adapted = {n: torch.zeros((n_total, *p.shape), dtype=p.dtype, device=device) for n, p in theta.items()} if return_params else None
    paths_used, largest_chunk = [], 0
    with batch_statistics(model, decompose=order == "second"):
        for members in groups.values():
            size = chunk_size
            if size is None:
                size = len(members) if path not in ("auto", "chunked") and order == "first" else _memory_chunk_size(
                    model, members, inputs, targets, adaptation_loss, order, steps, query_size, device)
            queue = [members[first : first + size] for first in range(0, len(members), size)]
            while queue:
                part = queue.pop(0)
                try:
                    used = _run_part(model, part, theta, batches, inputs, targets, adaptation_loss, suppression_loss,
                                     order, path, device, losses, meta, adapted)
                except RuntimeError as exc:  # a part writes its results only when it completes
                    if chunk_size is not None or len(part) == 1 or not is_out_of_memory(exc):
                        raise
                    queue[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                    continue
                largest_chunk = max(largest_chunk, len(part))
                chunked = path == "chunked" or len(part) < len(members)
                paths_used.append("chunked" if chunked and used == "vmap" else used)
    scale = 1.0 / (n_total * steps)
    return SimulationResult(
        query_losses=losses,
        meta_grad={n: g * scale for n, g in meta.items()},
        path="+".join(dict.fromkeys(paths_used)),
        params=adapted,
        chunk_size=largest_chunk,
    )


def _run_part(model, part, theta, batches, inputs, targets, adaptation_loss, suppression_loss, order, path,
              device, losses, meta, adapted) -> str:
    """Run one chunk of a group; writes its losses, meta-gradient and adapted parameters."""
    names = list(theta)
    starts = [_start_parameters(model, plan, theta, inputs) for plan in part]
    start = {n: torch.stack([s[n] for s in starts]) for n in names}
    update_groups, first = [], 0
    for key in dict.fromkeys(_update_key(p) for p in part):  # contiguous: part is sorted by key
        members = [p for p in part if _update_key(p) == key]
        rows = slice(first, first + len(members))
        first += len(members)
        update_groups.append(_update_group(rows, members, names, device))
    chunk = Chunk(model, update_groups, adaptation_loss, suppression_loss, order, start,
                  [plan.strategy.batch_size for plan in part])
    transforms = [plan.input_transform for plan in part]

    def batch_at(k):
        def make():
            x, y, w = stacked_batch(inputs, targets, [batches[p.index].adapt[k] for p in part], transforms, device)
            qx, qy, _ = stacked_batch(inputs, targets, [batches[p.index].query[k] for p in part], transforms, device)
            return x, y, w, qx, qy

        return make

    steps = batches[0].adapt.shape[0]
    signature = _signature(model, part, inputs, order, device)
    runner, used = run_chunk(chunk, [batch_at(k) for k in range(steps)], path if path != "chunked" else "vmap", signature)
    index = torch.tensor([p.index for p in part], device=device)
    step_losses = torch.stack(runner.losses, dim=1)  # (n, K)
    params = [theta[n] for n in names]
    if order == "second":
        total = step_losses.sum()
        grads = torch.autograd.grad(total, params, allow_unused=True)
    else:
        outputs = [(start[n], runner.query_grad_sum[n]) for n in names if start[n].requires_grad]
        grads = torch.autograd.grad([o for o, _ in outputs], params, [g for _, g in outputs], allow_unused=True) if outputs else [None] * len(names)
    for n, g in zip(names, grads):
        if g is not None:
            meta[n] += g.detach()
    losses[index] = step_losses.detach().to(losses.dtype)
    if adapted is not None:
        for n in names:
            adapted[n][index] = runner.params[n].detach()
    return used


def _memory_chunk_size(model, members, inputs, targets, adaptation_loss, order, steps, query_size, device) -> int:
    per_sample = activation_bytes_per_sample(model, inputs, targets, adaptation_loss)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = max(len(get_functional_optimizer(p.base).buffers) for p in members)
    batch = max(p.strategy.batch_size for p in members)
    need = trajectory_bytes(param_bytes, buffers, per_sample, batch, query_size, steps, order == "second")
    return auto_chunk_size(len(members), need, device)


def _update_group(rows: slice, members: list, names: list, device) -> UpdateGroup:
    hp_const, hp_varying = {}, {}
    for name in members[0].hp:
        values = [plan.hp[name] for plan in members]
        if isinstance(values[0], bool) or all(v == values[0] for v in values):
            hp_const[name] = values[0]  # a Python number keeps the optimizer's shortcuts (momentum 0, ...)
        else:
            hp_varying[name] = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    masks = {}
    for name in names:
        trains = [name not in plan.frozen for plan in members]
        if not all(trains):
            masks[name] = torch.tensor(trains, device=device)
    return UpdateGroup(rows, get_functional_optimizer(members[0].base), hp_const, hp_varying, masks)


def _signature(model, part, inputs, order, device) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters())
    shapes = tuple((tuple(t.shape[1:]), t.dtype) for t in inputs)
    sizes = tuple(sorted(p.strategy.batch_size for p in part))
    return (type(model).__qualname__, params, shapes, sizes, order, str(device), os.environ.get("OMP_NUM_THREADS"))
