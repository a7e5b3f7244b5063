"""Which variant of the step engine (:mod:`.paths`) runs a chunk: the one asked
for, or the ``auto`` path's choice by timing.

The variants (:data:`VARIANTS`) are :meth:`.paths.ChunkRunner.step`'s vmap,
stacked and loop gradients, with channels-last image inputs or over blocks of
trajectories on worker threads. ``auto`` times these variants on the first
steps and keeps the one with the lowest median step time, vmap or stacked when
within 10% of it (cached per signature: model, shapes, batch sizes, device, threads).
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings

import torch
from torch import nn

from .memory import is_out_of_memory
from .paths import Chunk, ChunkRunner
from .stacked import TIMED_CHOICES, NotStackable, mark_not_stackable, stacked_model

# (signature) -> a name in VARIANTS; filled by timing the first steps of a run.
_PATH_CACHE: dict[tuple, str] = {}
# (signature) -> candidate -> step times so far; calibration may span several calls.
_TIMINGS: dict[tuple, dict[str, list[float]]] = {}
# The candidates of the auto path: name -> ChunkRunner.step options.
VARIANTS = {
    "vmap": {},
    "vmap_threads": dict(threads=True),
    "stacked": dict(gradients="stacked"),
    "stacked_channels_last": dict(gradients="stacked", channels_last=True),
    "loop": dict(gradients="loop"),
    "loop_channels_last": dict(gradients="loop", channels_last=True),
    "loop_threads": dict(gradients="loop", threads=True),
    "loop_threads_channels_last": dict(gradients="loop", channels_last=True, threads=True),
}
# Steps timed per candidate before choosing by the median: one step is noisy
# on a shared CPU. Each candidate's first step is run but not counted: it pays
# one-off costs (functorch's first vmap of a function took 1.1 s against 28 ms
# for the next steps, oneDNN prepares kernels per shape).
_CALIBRATION_STEPS = 5


def _candidates(image_inputs: bool, threads: bool, stackable: bool) -> list[str]:
    """The variants the auto path times: vmap, stacked (when the model traces
    into supported ops) and loop; for image inputs stacked and the loop with
    channels-last activations too (oneDNN's convolutions and ATen's pooling
    often run faster); with several intra-op threads, vmap and loop over
    blocks of trajectories on worker threads (small kernels scale better so
    than split over threads), the channels-last loop then only threaded (at
    most 7 candidates: 42 steps to time them)."""
    stacked = (["stacked", "stacked_channels_last"] if image_inputs else ["stacked"]) if stackable else []
    if not threads:
        return ["vmap", *stacked, "loop"] + (["loop_channels_last"] if image_inputs else [])
    return ["vmap", "vmap_threads", *stacked, "loop", "loop_threads"] + (["loop_threads_channels_last"] if image_inputs else [])


def _is_stackable(model: nn.Module) -> bool:
    try:
        stacked_model(model)
    except NotStackable:
        return False
    return True


def reported_path(variant: str) -> str:
    """What a result says ran: "vmap", "stacked" or "loop"."""
    return next((p for p in ("vmap", "stacked") if variant.startswith(p)), "loop")


def _fastest(timings: dict[str, list[float]]) -> str:
    """The candidate with the lowest median step time (the warm-up step left out);
    the faster of vmap and stacked when within 10% of it: their per-call costs
    outside the timed steps are lower than the loops' (the demo's protection ran
    0.32 s an iteration on vmap, 0.39-0.44 s on loops whose steps timed alike)."""
    median = {v: statistics.median(t[1:]) for v, t in timings.items()}
    best = min(median, key=median.get)
    batched = min((v for v in ("vmap", "stacked") if v in median), key=median.get)
    return batched if median[batched] <= 1.1 * median[best] else best


def untimed_variant(model: nn.Module, inputs: tuple) -> str:
    """The path for reproducible runs, chosen without timing: stacked (channels-last for image
    inputs, what ``auto`` picked on the built-in model) when the model traces into supported ops,
    otherwise "auto" (timed: vmap or a loop)."""
    if not _is_stackable(model):
        return "auto"
    image = any(t.dim() == 4 and t.is_floating_point() for t in inputs)
    return "stacked_channels_last" if image else "stacked"


def run_chunk(chunk: Chunk, batches, path: str, signature: tuple) -> tuple[ChunkRunner, str]:
    """Run every step; ``batches[k]()`` gives step k's stacked batch. Returns the runner and the path used.

    ``path="auto"`` with no cached choice: steps go round the candidates
    (:func:`_candidates`), over as many calls with the same signature as it
    takes to time each ``_CALIBRATION_STEPS`` times after one warm-up step; the
    one with the lowest median wins (see :func:`_fastest`) and is cached.
    """
    token = TIMED_CHOICES.set(path == "auto")
    try:
        return _run_steps(chunk, batches, path, signature)
    finally:
        TIMED_CHOICES.reset(token)


def _run_steps(chunk: Chunk, batches, path: str, signature: tuple) -> tuple[ChunkRunner, str]:
    runner = ChunkRunner(chunk)
    variants = {name: functools.partial(runner.step, **options) for name, options in VARIANTS.items()}
    chosen = path if path != "auto" else _PATH_CACHE.get(signature)
    last = chosen
    for k in range(len(batches)):
        batch = batches[k]()
        if chosen is not None:
            try:
                variants[chosen](batch)
            except NotStackable as exc:
                raise ValueError(f"path: 'stacked' cannot run this model: {exc}") from exc
            continue
        if signature not in _TIMINGS:
            image_inputs = any(t.dim() == 5 and t.is_floating_point() for t in batch[0])  # (n, B, C, H, W)
            candidates = _candidates(image_inputs, torch.get_num_threads() > 1 and len(chunk.batch_sizes) > 1,
                                     _is_stackable(chunk.model))
            _TIMINGS[signature] = {v: [] for v in candidates}
        timings = _TIMINGS[signature]
        last = trial = min(timings, key=lambda v: len(timings[v]))  # the least timed, in list order
        start = time.perf_counter()
        try:
            variants[trial](batch)
        except NotStackable as exc:  # found while running (e.g. a reshape that merges the batch dim)
            mark_not_stackable(chunk.model, exc)
            timings.pop(trial)
            last = "vmap"
            variants["vmap"](batch)  # the step resumes where the stacked one stopped
            continue
        except (RuntimeError, NotImplementedError) as exc:
            if not trial.startswith("vmap") or is_out_of_memory(exc):
                raise
            # e.g. a loss built on an autograd.Function without functorch support
            warnings.warn(f"simulate: the vmap path failed ({exc}); using the loop path", RuntimeWarning, stacklevel=2)
            chosen = last = _PATH_CACHE[signature] = "loop"
            _TIMINGS.pop(signature)
            variants["loop"](batch)
            continue
        timings[trial].append(time.perf_counter() - start)
        if all(len(t) > _CALIBRATION_STEPS for t in timings.values()):  # + the warm-up step
            chosen = last = _PATH_CACHE[signature] = _fastest(timings)
            _TIMINGS.pop(signature)
    return runner, reported_path(last)
