"""Which samples each simulated trajectory sees, and how they are stacked.

Shared by :func:`sophon_ext.simulate` and its sequential reference, so both
see exactly the same batches: at every step ``k`` trajectory ``i`` draws
``batch_size`` adaptation samples and ``query_size`` disjoint query samples
from the pool, from its own generator seeded once per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..methods import DATA_CHANGE_SAMPLES


@dataclass
class TrajectoryBatches:
    """Pool indices of one trajectory: ``adapt`` (K, batch_size), ``query`` (K, query_size)."""

    adapt: Tensor
    query: Tensor


def check_data(data) -> tuple[tuple[Tensor, ...], Tensor]:
    """``data`` must be ``(model_inputs: tuple of tensors, targets: tensor)`` with one pool size."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError("data: expected (model_inputs: tuple of tensors, targets: tensor)")
    inputs, targets = data
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("data: model_inputs must be a non-empty tuple of tensors")
    if not isinstance(targets, Tensor):
        raise TypeError(f"data: targets must be a tensor, got {type(targets).__name__}")
    sizes = {t.shape[0] if t.dim() else None for t in (*inputs, targets)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"data: every input and the targets must have the same first dimension, got sizes {sorted(map(str, sizes))}")
    return tuple(inputs), targets


def draw_seeds(count: int, generator: torch.Generator | None = None) -> list[int]:
    """The per-trajectory batch seeds :func:`draw_batches` draws from ``generator``."""
    return torch.randint(0, 2**62, (count,), generator=generator).tolist()


def draw_batches(pool_size: int, batch_sizes: Sequence[int], query_size: int, steps: int,
                 generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> list[TrajectoryBatches]:
    """Indices for every trajectory and step, reproducible from ``generator``
    (the global RNG when None): one seed per trajectory is drawn from it.
    ``seeds`` gives those seeds instead (``generator`` is then not used): a
    process simulating part of a larger set passes the seeds of its trajectories."""
    too_big = [b for b in batch_sizes if b + query_size > pool_size]
    if too_big:
        raise ValueError(
            f"batch_size: batch_size + query_size must be <= the number of samples in data ({pool_size}); "
            f"got batch sizes {sorted(set(too_big))} with query_size {query_size}"
        )
    if seeds is None:
        seeds = draw_seeds(len(batch_sizes), generator)
    elif len(seeds) != len(batch_sizes):
        raise ValueError(f"batch_seeds: expected one seed per strategy ({len(batch_sizes)}), got {len(seeds)}")
    out = []
    for seed, batch_size in zip(seeds, batch_sizes):
        local = torch.Generator().manual_seed(seed)
        perms = [torch.randperm(pool_size, generator=local)[: batch_size + query_size] for _ in range(steps)]
        chosen = torch.stack(perms)
        out.append(TrajectoryBatches(adapt=chosen[:, :batch_size], query=chosen[:, batch_size:]))
    return out


def apply_transform(transform: Callable | None, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``transform(inputs)`` as a tuple (a single tensor result is wrapped)."""
    if transform is None:
        return inputs
    out = transform(inputs)
    if isinstance(out, Tensor):
        out = (out,)
    if not isinstance(out, (tuple, list)) or not all(isinstance(t, Tensor) for t in out):
        raise TypeError("input_transform: must return a tensor or a tuple of tensors")
    return tuple(out)


def compose_transforms(first: Callable | None, then: Callable | None) -> Callable | None:
    """``then`` applied after ``first`` (either may be None)."""
    if first is None or then is None:
        return first or then
    return lambda inputs: apply_transform(then, apply_transform(first, inputs))


def take(inputs: tuple[Tensor, ...], targets: Tensor, index: Tensor, device) -> tuple[tuple[Tensor, ...], Tensor]:
    """Rows ``index`` of every input and of the targets, on ``device``."""
    return tuple(t[index.to(t.device)].to(device) for t in inputs), targets[index.to(targets.device)].to(device)


def stacked_batch(inputs, targets, indices: Sequence[Tensor], transforms: Sequence[Callable | None], device):
    """Batches of several trajectories stacked to (n, B_max, ...), shorter ones padded.

    Padding repeats a trajectory's own samples and gets weight 0, so a
    weighted-mean loss over the padded batch equals the loss over the real
    one. Returns ``(inputs, targets, weight)``; ``weight`` is None when no
    batch needed padding.
    """
    sizes = [int(i.numel()) for i in indices]
    longest = max(sizes)
    flat = torch.stack([i if size == longest else i.repeat(-(-longest // size))[:longest] for i, size in zip(indices, sizes)])
    x, y = take(inputs, targets, flat.reshape(-1), device)
    x = tuple(t.reshape(len(indices), longest, *t.shape[1:]) for t in x)
    y = y.reshape(len(indices), longest, *y.shape[1:])
    if any(t is not None for t in transforms):
        per_trajectory = [apply_transform(f, tuple(t[j] for t in x)) for j, f in enumerate(transforms)]
        x = tuple(torch.stack(parts) for parts in zip(*per_trajectory))
    if min(sizes) == longest:
        return x, y, None
    weight = (torch.arange(longest) < torch.tensor(sizes)[:, None]).to(device=device, dtype=_float_dtype(x))
    return x, y, weight


def _float_dtype(inputs: tuple[Tensor, ...]) -> torch.dtype:
    for t in inputs:
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def method_inputs(method, inputs: tuple, theta: dict[str, Tensor]) -> Tensor | None:
    """The restricted inputs a method's ``data_change`` sees in the simulator: the pool's first
    ``DATA_CHANGE_SAMPLES``, on the parameters' device (the harness takes its training data's first)."""
    if not method.needs_inputs:
        return None
    return inputs[0][:DATA_CHANGE_SAMPLES].to(next(iter(theta.values())).device)
