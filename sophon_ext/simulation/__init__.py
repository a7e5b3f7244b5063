"""Simulated fine-tuning (SOPHON's FTS inner loop): N trajectories x K steps, batched.

- :mod:`.api`: :func:`simulate` itself: plans the trajectories, groups and chunks them, picks the path
- :mod:`.paths`: the step engine (vmap, stacked, loop gradients; first/second order updates)
- :mod:`.autotune`: which variant of the step engine runs (the ``auto`` path times them, cached)
- :mod:`.stacked`: the stacked path's model (torch.fx graph run on (B, N, ...) activations)
- :mod:`.batches`: drawing, padding and transforming per-trajectory batches
- :mod:`.memory`: chunk sizing and out-of-memory splitting
- :mod:`.reference`: the plain deepcopy + torch.optim loop (test oracle, benchmark baseline)
"""

from .api import ORDERS, PATHS, SimulationResult, batch_statistics, simulate

__all__ = ["ORDERS", "PATHS", "SimulationResult", "batch_statistics", "simulate"]
