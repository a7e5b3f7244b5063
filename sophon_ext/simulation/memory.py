"""How many trajectories fit in memory at once (the automatic ``chunk_size``)."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor, nn

# (model signature, per-sample input shapes, dtype, device) -> bytes saved for backward per sample
_PER_SAMPLE_CACHE: dict[tuple, float] = {}
# Share of the free memory a chunk may plan to use (the rest: fragmentation, the caller's tensors).
MEMORY_FRACTION = 0.5


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def activation_bytes_per_sample(model: nn.Module, inputs: tuple[Tensor, ...], targets: Tensor, loss: Callable) -> float:
    """Bytes autograd saves per sample for one forward/backward (measured once on 2 samples, cached)."""
    params = list(model.parameters())
    key = (type(model).__qualname__, tuple((tuple(p.shape), p.dtype) for p in params),
           tuple((tuple(t.shape[1:]), t.dtype) for t in inputs), str(params[0].device))
    if key not in _PER_SAMPLE_CACHE:
        saved = [0]

        def pack(t: Tensor):
            saved[0] += t.numel() * t.element_size()
            return t

        probe = min(2, targets.shape[0])  # 2: BatchNorm in train mode needs more than one sample
        device = params[0].device
        # tensors are saved during the forward pass: no backward needed to count them
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(model(*(t[:probe].to(device) for t in inputs)), targets[:probe].to(device))
        _PER_SAMPLE_CACHE[key] = saved[0] / probe
    return _PER_SAMPLE_CACHE[key]


def trajectory_bytes(param_bytes: int, state_buffers: int, per_sample: float, batch: int, query: int,
                     steps: int, second_order: bool) -> float:
    """Rough peak memory of one trajectory in a vmapped chunk.

    First order: parameters, gradients, optimizer state, and the activations of
    one step. Second order keeps every step's graph: K x (activations of the
    adaptation and query passes, counted twice for the double backward) plus K
    copies of parameters and optimizer state.
    """
    copies = 3 + state_buffers
    if second_order:
        return steps * (2 * per_sample * (batch + query) + copies * param_bytes)
    return per_sample * batch + copies * param_bytes


def auto_chunk_size(n: int, per_trajectory: float, device: torch.device) -> int:
    """Trajectories per chunk so that a chunk uses at most MEMORY_FRACTION of the free memory."""
    budget = MEMORY_FRACTION * available_bytes(device)
    return max(1, min(n, int(budget // max(per_trajectory, 1.0))))


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA OOM and the CPU allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
