"""Fused optimizer updates vs torch.optim.

``test_optimizer_step``: N copies of a SmallCNN (the loop path of the
simulator, or N attack runs), each with its own optimizer and
hyperparameters. Baseline: N torch.optim optimizers with ``foreach=True``,
stepped one after the other. Fused: one :class:`FusedMultiTrajectoryOptimizer`
bound to the N copies (one op call).

``test_dropin_step``: one SmallCNN, the drop-in ``FusedSGD`` / ``FusedAdam`` /
``FusedAdamW`` against torch.optim's ``foreach=True`` and ``fused=True``
(skipped where torch lacks it). ``sophon_fused`` gets new gradient tensors
before every step, so it pays the copy into its flat buffer (a loop with
``zero_grad(set_to_none=True)``); ``sophon_fused_bound`` keeps them bound (a
loop with ``zero_grad(set_to_none=False)``). Every way gets the same gradient
reassignment before its step.

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
from sophon_ext.optim import (
    FusedAdam,
    FusedAdamW,
    FusedMultiTrajectoryOptimizer,
    FusedSGD,
    make_torch_optimizer,
    resolve_preset,
    torch_optimizer_kwargs,
)

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


# preset -> (drop-in class, torch.optim class, shared arguments)
DROPIN = {
    "sgd_momentum": (FusedSGD, torch.optim.SGD, {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}),
    "adam": (FusedAdam, torch.optim.Adam, {"lr": 1e-3, "weight_decay": 1e-4}),
    "adamw": (FusedAdamW, torch.optim.AdamW, {"lr": 1e-3}),
}
DROPIN_IMPLS = ["torch_foreach", "torch_fused", "sophon_fused", "sophon_fused_bound"]


def _make_dropin(preset: str, impl: str, params):
    fused_cls, torch_cls, kwargs = DROPIN[preset]
    if impl.startswith("sophon"):
        return fused_cls(params, **kwargs)
    flag = impl.removeprefix("torch_")
    try:
        return torch_cls(params, **kwargs, **{flag: True})
    except (RuntimeError, ValueError) as exc:  # e.g. no fused kernel for this device in this torch
        pytest.skip(f"torch.optim.{torch_cls.__name__}({flag}=True): {exc}")


def _setup_dropin(preset: str, width: int, impl: str, device: str = "cpu"):
    """The timed step of one way, after checking that one step of it equals torch.optim's foreach step."""
    torch.manual_seed(0)
    model = SmallCNN(width=width, depth=3).to(device)
    reference = copy.deepcopy(model)
    grads = [torch.randn_like(p) for p in model.parameters()]
    opt = _make_dropin(preset, impl, model.parameters())
    ref_opt = _make_dropin(preset, "torch_foreach", reference.parameters())
    bound = impl == "sophon_fused_bound"

    def step():
        if not bound:  # every way but the bound one gets new gradient tensors, as after zero_grad(set_to_none=True)
            for p, g in zip(model.parameters(), grads):
                p.grad = g
        opt.step()

    for p, q, g in zip(model.parameters(), reference.parameters(), grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if bound:
        for p, g in zip(model.parameters(), grads):
            p.grad.copy_(g)  # the flat buffer's views, filled once
    return synchronized(step, device), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "impl", [pytest.param(i, marks=pytest.mark.compiled_op) if i.startswith("sophon") else i for i in DROPIN_IMPLS]
)
@pytest.mark.parametrize("model", list(WIDTHS))
@pytest.mark.parametrize("preset", list(DROPIN))
def test_dropin_step(benchmark, preset, model, impl, device):
    """Every way in one group per (preset, model, device): ratios of the medians are the speed-ups."""
    step, size = _setup_dropin(preset, WIDTHS[model], impl, device)
    benchmark.group = f"drop-in optimizer step {device}, one model of {size} params: {preset}"
    benchmark.extra_info["params"] = size
    benchmark(step)


def compare_dropin(preset: str, width: int) -> dict:
    """Median step time of every way (seconds), interleaved round by round."""
    steps = {}
    for impl in DROPIN_IMPLS:
        try:
            steps[impl] = _setup_dropin(preset, width, impl)[0]
        except pytest.skip.Exception:
            pass
    times = {impl: [] for impl in steps}
    for fn in steps.values():
        _median_seconds(fn, rounds=3)
    for _ in range(30):
        for impl, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - start)
    return {impl: statistics.median(t) for impl, t in times.items()}


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
    print(f"\ndrop-in, one model: median ms (speed-up of sophon_fused over each torch way)")
    for preset in DROPIN:
        for model, width in WIDTHS.items():
            r = compare_dropin(preset, width)
            cells = "  ".join(f"{impl} {t * 1e3:.3f}" for impl, t in r.items())
            ratios = "  ".join(
                f"vs {impl}: {t / r['sophon_fused']:.2f}x" for impl, t in r.items() if impl.startswith("torch")
            )
            print(f"{preset:14s} {model:9s} {cells}  |  {ratios}")
