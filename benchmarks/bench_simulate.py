"""simulate(): N=8 trajectories x K=10 steps, batched paths vs the sequential deepcopy loop.

    python -m pytest benchmarks/bench_simulate.py --benchmark-only -s

Cases (4-conv SmallCNN, 28x28 inputs, query 15):
- ``overhead_bound``: width 4, batch 16 (Python/dispatch overhead dominates);
- ``compute_bound``: width 32, batch 135 (convolutions dominate);
- ``engine``: what the SOPHON engine runs: 3 convs of width 16 at 16x16, batch 64,
  6 trajectories x 15 steps, SGD/Adam/momentum mixed.

``test_ratios`` interleaves the implementations in one run (the CPU is shared
and noisy) and prints steps/s, the speed-up over the loop and, for the
compute-bound case, GFLOP/s against a plain matmul on this machine.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, synchronized
from torch.utils.flop_counter import FlopCounterMode

from sophon_ext import FineTuneStrategy, simulate
from sophon_ext.simulation import autotune
from sophon_ext.simulation.reference import simulate_sequential
from sophon_ext.models import SmallCNN
from sophon_ext.tasks.base import weighted_mean

QUERY = 15
CASES = {
    "overhead_bound": dict(width=4, size=28, batch=16, depth=4, n=8, steps=10, optimizers=("sgd",)),
    "compute_bound": dict(width=32, size=28, batch=135, depth=4, n=8, steps=10, optimizers=("sgd",), rounds=2),
    "engine": dict(width=16, size=16, batch=64, depth=3, n=6, steps=15, optimizers=("sgd", "adam", "sgd_momentum")),
}
IMPLEMENTATIONS = ("sequential", "auto", "vmap", "stacked", "loop")


def cross_entropy(output, targets, weight=None):
    return weighted_mean(F.cross_entropy(output, targets, reduction="none"), weight)


def kl_uniform(output, targets, weight=None):
    return weighted_mean(torch.logsumexp(output, dim=-1) - output.mean(dim=-1), weight)


def setup_case(name, device="cpu"):
    c = CASES[name]
    torch.manual_seed(0)
    model = SmallCNN(width=c["width"], depth=c["depth"]).to(device)
    x = torch.randn(4 * c["batch"] + 64, 1, c["size"], c["size"]).to(device)
    y = torch.randint(0, 10, (x.shape[0],)).to(device)
    strategies = [FineTuneStrategy(c["optimizers"][i % len(c["optimizers"])], 1e-2, c["batch"], c["steps"], seed=i)
                  for i in range(c["n"])]
    return model, ((x,), y), strategies


def runner(name, implementation, device="cpu"):
    model, data, strategies = setup_case(name, device)
    if implementation == "sequential":
        run = lambda: simulate_sequential(model, strategies, data, cross_entropy, kl_uniform, query_size=QUERY)  # noqa: E731
    else:
        run = lambda: simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=QUERY, path=implementation)  # noqa: E731
    return synchronized(run, device)


def warm_up(run, most_calls: int = 6) -> None:
    """Calls ``run`` until the auto path has finished timing its candidates
    (a one-time cost per model signature, up to 42 steps over the first calls), so
    that the timed rounds measure its steady state, as the other paths'."""
    for _ in range(most_calls):
        run()
        if not autotune._TIMINGS:
            return


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_simulate(benchmark, case, implementation, device):
    run = runner(case, implementation, device)
    warm_up(run)
    benchmark.pedantic(run, rounds=3, iterations=1)


def _matmul_gflops(device, repeats=5) -> float:
    size = 4096 if device == "cuda" else 1024
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    mm = synchronized(lambda: torch.mm(a, b), device)
    mm()
    best = min(_timed(mm) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _flops_per_run(name) -> int:
    """FLOPs of the sequential loop's work: adaptation forward/backward + query forward/backward."""
    model, data, strategies = setup_case(name)
    one = [FineTuneStrategy(s.optimizer, s.lr, s.batch_size, 1, seed=s.seed) for s in strategies[:1]]
    with FlopCounterMode(display=False) as counter:
        simulate_sequential(model, one, data, cross_entropy, kl_uniform, query_size=QUERY)
    return counter.get_total_flops() * len(strategies) * strategies[0].steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_ratios(benchmark, case, device):
    rounds = CASES[case].get("rounds", 5)
    runs = {impl: runner(case, impl, device) for impl in IMPLEMENTATIONS}
    for run in runs.values():
        warm_up(run)
    times = {impl: [] for impl in IMPLEMENTATIONS}
    for _ in range(rounds):  # interleaved, so load from other processes hits every path alike
        for impl, run in runs.items():
            times[impl].append(_timed(run))
    median = {impl: statistics.median(t) for impl, t in times.items()}
    c = CASES[case]
    steps = c["n"] * c["steps"]
    info = {f"{impl}_steps_per_s": steps / median[impl] for impl in IMPLEMENTATIONS}
    info.update({f"speedup_{impl}": median["sequential"] / median[impl] for impl in IMPLEMENTATIONS if impl != "sequential"})
    if case == "compute_bound":
        flops = _flops_per_run(case)
        info["gflops_auto"] = flops / median["auto"] / 1e9
        info["gflops_sequential"] = flops / median["sequential"] / 1e9
        info["gflops_matmul"] = _matmul_gflops(device)
    info["threads"] = torch.get_num_threads()
    benchmark.extra_info.update(info)
    print(f"\n{case} {device}: " + ", ".join(f"{k}={v:.3g}" for k, v in info.items()))
    benchmark.pedantic(runs["auto"], rounds=1, iterations=1)
