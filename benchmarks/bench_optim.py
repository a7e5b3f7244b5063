"""Fused multi-trajectory update vs N torch.optim optimizers (foreach=True).

N copies of a SmallCNN (the loop path of the simulator, or N attack runs),
each with its own optimizer and hyperparameters. Baseline: N torch.optim
optimizers with ``foreach=True``, stepped one after the other. Fused: one
:class:`FusedMultiTrajectoryOptimizer` bound to the N copies (one op call).
Only the optimizer step is timed; gradients are fixed random tensors.

    python -m pytest benchmarks/bench_optim.py --benchmark-only
    PYTHONPATH=. python benchmarks/bench_optim.py   # plain table of the same figures, plus bandwidth

pytest-benchmark shows both ways side by side in one group per (preset,
model); the script prints the speedup (baseline median / fused median).
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
from conftest import DEVICES, synchronized

from sophon_ext.models import SmallCNN
from sophon_ext.optim import FusedMultiTrajectoryOptimizer, make_torch_optimizer, resolve_preset, torch_optimizer_kwargs

N_TRAJECTORIES = 8
# model width -> about 168k and 665k parameters
WIDTHS = {"cnn168k": 96, "cnn665k": 192}
PRESETS = ["sgd_momentum", "adam", "adamw"]


def _setup(preset: str, width: int, n: int = N_TRAJECTORIES, device: str = "cpu"):
    torch.manual_seed(0)
    base_model = SmallCNN(width=width, depth=3).to(device)
    rows = [{"lr": 1e-3 * (i + 1), "weight_decay": 1e-4 * i} for i in range(n)]
    baseline_models = [copy.deepcopy(base_model) for _ in range(n)]
    fused_models = [copy.deepcopy(base_model) for _ in range(n)]
    for a, b in zip(baseline_models, fused_models):
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
    baseline = []
    for model, row in zip(baseline_models, rows):
        base, merged = resolve_preset(preset, row)
        kwargs = torch_optimizer_kwargs(base, merged)
        lr = kwargs.pop("lr")
        baseline.append(make_torch_optimizer(preset, model.parameters(), lr=lr, hparams={**kwargs, "foreach": True}))
    fused = FusedMultiTrajectoryOptimizer.from_modules(fused_models, preset, rows)

    def step_baseline():
        for opt in baseline:
            opt.step()

    # both ways must agree before they are timed
    step_baseline()
    fused.step()
    for a, b in zip(baseline_models, fused_models):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    size = sum(p.numel() for p in base_model.parameters())
    return synchronized(step_baseline, device), synchronized(fused.step, device), size


def _median_seconds(fn, rounds: int = 30, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# tensors the fused update reads + writes per element (params, grads, state): sgd momentum p g buf / p buf
STREAMS = {"sgd_momentum": 5, "adam": 7, "adamw": 7}


def compare(preset: str, width: int) -> dict:
    """Median step time of both ways (seconds), the speedup, and the fused update's
    memory traffic in GB/s next to a plain ``torch.add(a, b, out=c)`` over as many
    float32 elements (a bandwidth-bound op: what the machine's memory allows)."""
    step_baseline, step_fused, size = _setup(preset, width)
    baseline = _median_seconds(step_baseline)
    fused = _median_seconds(step_fused)
    elements = size * N_TRAJECTORIES
    a, b, c = torch.randn(elements), torch.randn(elements), torch.empty(elements)
    add = _median_seconds(lambda: torch.add(a, b, out=c))
    return {"params_per_model": size, "torch_foreach_s": baseline, "fused_s": fused, "speedup": baseline / fused,
            "fused_GBps": STREAMS[preset] * 4 * elements / fused / 1e9, "add_GBps": 3 * 4 * elements / add / 1e9}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["torch_foreach", "fused"])
@pytest.mark.parametrize("model", list(WIDTHS))
@pytest.mark.parametrize("preset", PRESETS)
def test_optimizer_step(benchmark, preset, model, impl, device):
    """Both ways in one group per (preset, model, device): the ratio of the medians is the speedup."""
    step_baseline, step_fused, size = _setup(preset, WIDTHS[model], device=device)
    benchmark.group = f"optimizer step {device}, N={N_TRAJECTORIES} x {size} params: {preset}"
    benchmark.extra_info["params_per_model"] = size
    benchmark(step_fused if impl == "fused" else step_baseline)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={N_TRAJECTORIES}")
    print(f"{'preset':14s} {'model':9s} {'params':>8s} {'torch foreach':>14s} {'fused':>10s} {'speedup':>8s}"
          f" {'fused GB/s':>11s} {'add GB/s':>9s}")
    for preset in PRESETS:
        for model, width in WIDTHS.items():
            r = compare(preset, width)
            print(
                f"{preset:14s} {model:9s} {r['params_per_model']:8d} {r['torch_foreach_s'] * 1e3:11.2f} ms"
                f" {r['fused_s'] * 1e3:7.2f} ms {r['speedup']:7.2f}x {r['fused_GBps']:11.1f} {r['add_GBps']:9.1f}"
            )
