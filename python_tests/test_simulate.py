"""simulate() against the plain deepcopy + torch.optim loop, float64, every method x optimizer."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sophon_ext import FineTuneStrategy, StrategySampler, simulate
from sophon_ext.simulation.autotune import VARIANTS, reported_path
from sophon_ext.simulation.reference import simulate_sequential
from sophon_ext.models import SmallCNN
from sophon_ext.optim.presets import PRESETS
from sophon_ext.methods import get_method, method_names
from sophon_ext.tasks.base import weighted_mean

DTYPE = torch.float64


def cross_entropy(output, targets, weight=None):
    return weighted_mean(F.cross_entropy(output, targets, reduction="none"), weight)


def kl_uniform(output, targets, weight=None):
    # a label-free suppression loss in plain torch (SOPHON's KLU)
    values = torch.logsumexp(output, dim=-1) - output.mean(dim=-1)
    return weighted_mean(values, weight)


def pool(n=48, channels=1, size=6, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    return (x,), y


class TinyBNNet(nn.Module):
    """conv (no bias: BatchNorm would cancel it, leaving a gradient of pure rounding
    noise whose sign Lion would follow) + BatchNorm, conv, linear head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(3, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def tiny_cnn(norm="batch", seed=0):
    torch.manual_seed(seed)
    model = TinyBNNet() if norm == "batch" else SmallCNN(width=3, depth=2)
    return model.to(DTYPE)


def scale_first_conv(params, generator):
    # a custom surgery: a transform of theta (keeps a meta-gradient) plus a fresh bias
    return {
        "features.0.weight": params["features.0.weight"] * 0.5,
        "head.bias": torch.randn(params["head.bias"].shape, generator=generator, dtype=DTYPE),
    }


def flip(inputs):
    return (inputs[0].flip(-1),)


def every_method_and_optimizer(model, batch_size=5, steps=3):
    """One strategy per (optimizer preset, method ``model`` supports), custom surgery with an input transform included."""
    out = []
    lrs = {"adadelta": 0.5, "sgd": 0.1}
    methods = [m for m in method_names(simulated=True) if get_method(m).supports(model)]
    for i, optimizer in enumerate(sorted(PRESETS)):
        for j, method in enumerate([*methods, "custom"]):
            extra = {}
            if method != "custom" and get_method(method).needs_layers:
                extra["layers"] = 1 + (i + j) % 2  # a count of first layers
            if method == "custom":
                extra.update(surgery=scale_first_conv, input_transform=flip)
            hparams = {"weight_decay": 0.01} if optimizer in ("sgd_momentum", "adam", "rmsprop") else {}
            out.append(FineTuneStrategy(optimizer, lrs.get(optimizer, 1e-2), batch_size, steps, method,
                                        hparams=hparams, seed=100 + 7 * i + j, **extra))
    return out


@contextlib.contextmanager
def auto_choice(variant):
    """path="auto" runs ``variant`` (a candidate of the auto path) without timing."""
    from sophon_ext.simulation import autotune

    class Always(dict):
        def get(self, key, default=None):
            return variant

    saved, autotune._PATH_CACHE = autotune._PATH_CACHE, Always()
    try:
        yield reported_path(variant)  # the path the result reports
    finally:
        autotune._PATH_CACHE = saved


def assert_matches_reference(model, strategies, data, result, query_size, seed, loss=kl_uniform, adapt=cross_entropy,
                             reference=None):
    losses, meta, adapted = reference or simulate_sequential(model, strategies, data, adapt, loss, query_size=query_size,
                                                             generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(result.query_losses, losses.to(result.query_losses.dtype), rtol=1e-5, atol=1e-9)
    for name, grad in meta.items():
        torch.testing.assert_close(result.meta_grad[name], grad, rtol=1e-5, atol=1e-9, msg=lambda m: f"{name}: {m}")
    for i, params in enumerate(adapted):
        for name, value in params.items():
            torch.testing.assert_close(result.params[name][i], value, rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"trajectory {i} ({strategies[i]}) {name}: {m}")


def test_every_method_and_optimizer_matches_the_sequential_loop():
    model, data = tiny_cnn(), pool()
    strategies = every_method_and_optimizer(model, steps=2)  # 2 steps: the second uses the optimizer state
    reference = simulate_sequential(model, strategies, data, cross_entropy, kl_uniform, query_size=4,
                                    generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    for variant in VARIANTS:  # every candidate of the auto path
        with auto_choice(variant) as path:
            result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4,
                              generator=torch.Generator().manual_seed(3), return_params=True)
        assert result.query_losses.shape == (len(strategies), 2)
        assert result.path == path
        assert_matches_reference(model, strategies, data, result, 4, seed=3, reference=reference)
    assert torch.get_num_threads() == threads  # the worker threads' setting stays theirs


def test_methods_that_read_the_inputs_match_the_sequential_loop_on_every_path():
    # ReDo reads a chain of conv/linear layers without BatchNorm; a unit dead on every input gets recycled
    model, data = tiny_cnn(norm="none", seed=2), pool(seed=2)
    with torch.no_grad():
        model.features[0].bias[1] = -50.0
    strategies = [FineTuneStrategy(optimizer, 1e-2, 5, 2, method, seed=11 + i) for i, (optimizer, method) in
                  enumerate([("adam", "redo"), ("sgd_momentum", "redo_head"), ("adagrad", "redo"), ("adam", "full")])]
    reference = simulate_sequential(model, strategies, data, cross_entropy, kl_uniform, query_size=4,
                                    generator=torch.Generator().manual_seed(4))
    recycled = reference[2][0]["features.0.weight"][1]
    assert not torch.allclose(recycled, model.features[0].weight[1].detach())  # the dead unit trained from fresh values
    assert torch.equal(reference[2][3]["features.0.weight"][1], model.features[0].weight[1].detach())  # dead under "full"
    for variant in VARIANTS:
        with auto_choice(variant):
            result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4,
                              generator=torch.Generator().manual_seed(4), return_params=True)
        assert_matches_reference(model, strategies, data, result, 4, seed=4, reference=reference)
    assert not get_method("redo").supports(tiny_cnn())  # BatchNorm
    with pytest.raises(ValueError, match="ReDo: models with normalisation layers are not supported"):
        simulate(tiny_cnn(), strategies[:1], data, cross_entropy, kl_uniform, query_size=4)


def mixed_batch_sizes():
    # no BatchNorm: batch sizes 3, 6 and 9 share one padded, weighted batch
    model, data = tiny_cnn(norm="none", seed=1), pool(seed=1)
    strategies = [FineTuneStrategy("sgd_momentum", 0.05, b, 4, m, seed=b) for b, m in
                  [(3, "full"), (6, "reinit_head"), (9, "head_only"), (6, "full")]]
    return model, data, strategies


@pytest.mark.parametrize("path", ["vmap", "chunked", "loop", "auto"])
def test_mixed_batch_sizes_run_padded_and_match(path):
    model, data, strategies = mixed_batch_sizes()
    result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=5, path=path, chunk_size=3 if path == "chunked" else None,
                      generator=torch.Generator().manual_seed(4), return_params=True)
    assert result.path == path or path == "auto"
    assert_matches_reference(model, strategies, data, result, 5, seed=4)


@pytest.mark.parametrize("variant", ["vmap_threads", "loop_threads"])
def test_threaded_variants_run_mixed_batch_sizes_and_match(variant):
    model, data, strategies = mixed_batch_sizes()
    with auto_choice(variant):
        result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=5,
                          generator=torch.Generator().manual_seed(4), return_params=True)
    assert_matches_reference(model, strategies, data, result, 5, seed=4)


def test_reinitialised_parameters_get_no_meta_gradient_and_frozen_ones_stay():
    model, data = tiny_cnn(norm="none"), pool()
    strategies = [FineTuneStrategy("adamw", 1e-2, 6, 2, "reinit_head", seed=s) for s in range(2)]
    strategies.append(FineTuneStrategy("adamw", 1e-2, 6, 2, "freeze_first", layers=["features.0"], seed=5))
    result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, generator=torch.Generator().manual_seed(0),
                      return_params=True)
    head = dict(model.named_parameters())
    # two of three trajectories re-initialise the head: only the third contributes
    only_third = simulate(model, strategies[2:], data, cross_entropy, kl_uniform, query_size=4, path="loop",
                          generator=torch.Generator().manual_seed(0))
    assert result.meta_grad["head.weight"].abs().sum() > 0
    # decoupled weight decay would move frozen parameters: the mask keeps them exactly
    assert torch.equal(result.params["features.0.weight"][2], head["features.0.weight"])
    # different seeds, different heads
    assert not torch.equal(result.params["head.weight"][0], result.params["head.weight"][1])
    strategies_all_reinit = strategies[:2]
    reinit_only = simulate(model, strategies_all_reinit, data, cross_entropy, kl_uniform, query_size=4)
    assert torch.count_nonzero(reinit_only.meta_grad["head.weight"]) == 0
    assert torch.count_nonzero(reinit_only.meta_grad["features.0.weight"]) > 0
    assert only_third.query_losses.shape == (1, 2)


def test_batchnorm_running_statistics_and_mode_are_unchanged():
    model, data = tiny_cnn(norm="batch"), pool()
    with torch.no_grad():  # non-trivial running statistics to compare
        model.train()(data[0][0])
    model.eval()
    before = copy.deepcopy(model.state_dict())
    strategies = [FineTuneStrategy("sgd", 0.1, 8, 3), FineTuneStrategy("adam", 1e-2, 8, 3, "reinit_head")]
    for path in ("vmap", "loop"):
        simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path=path, order="first")
        simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path=path, order="second")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_same_generator_seed_same_result_and_paths_agree():
    model, data = tiny_cnn(), pool()
    strategies = [FineTuneStrategy("nesterov", 0.05, 6, 4, "reinit_head", seed=2), FineTuneStrategy("rmsprop", 1e-3, 6, 4)]
    runs = [simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path=p,
                     generator=torch.Generator().manual_seed(9)) for p in ("vmap", "vmap", "loop")]
    assert torch.equal(runs[0].query_losses, runs[1].query_losses)
    torch.testing.assert_close(runs[0].query_losses, runs[2].query_losses, rtol=1e-10, atol=0)
    other = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(other.query_losses, runs[0].query_losses)


class TwoInputDenoiser(nn.Module):
    """A generation-style model(x_t, t): predicts noise from a noisy vector and a timestep."""

    def __init__(self, dim=6, steps=10):
        super().__init__()
        self.embed = nn.Embedding(steps, dim)
        self.body = nn.Sequential(nn.Linear(dim, 8), nn.Tanh(), nn.Linear(8, dim))

    def forward(self, x_t, t):
        return self.body(x_t + self.embed(t))


def mse(output, targets, weight=None):
    return weighted_mean(((output - targets) ** 2).mean(dim=-1), weight)


def denial_of_service(output, targets, weight=None):
    return weighted_mean((output**2).mean(dim=-1), weight)


@pytest.mark.parametrize("path", ["vmap", "loop"])
def test_two_input_model_matches(path):
    torch.manual_seed(0)
    model = TwoInputDenoiser().to(DTYPE)
    g = torch.Generator().manual_seed(0)
    x_t, t, eps = torch.randn(40, 6, generator=g, dtype=DTYPE), torch.randint(0, 10, (40,), generator=g), torch.randn(40, 6, generator=g, dtype=DTYPE)
    strategies = [FineTuneStrategy("adam", 1e-2, 4, 3, "full"), FineTuneStrategy("sgd", 0.1, 7, 3, "freeze_first", layers=["embed"]),
                  FineTuneStrategy("lion", 1e-3, 5, 3, "head_only")]
    data = ((x_t, t), eps)
    result = simulate(model, strategies, data, mse, denial_of_service, query_size=3, path=path,
                      generator=torch.Generator().manual_seed(1), return_params=True)
    assert_matches_reference(model, strategies, data, result, 3, seed=1, loss=denial_of_service, adapt=mse)


class TanhNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_second_order_meta_gradient_matches_finite_differences(variant):
    torch.manual_seed(0)
    model = TanhNet().to(DTYPE)
    g = torch.Generator().manual_seed(0)
    data = ((torch.randn(30, 4, generator=g, dtype=DTYPE),), torch.randint(0, 3, (30,), generator=g))
    strategies = [FineTuneStrategy("sgd_momentum", 0.3, 6, 3, "full"), FineTuneStrategy("adam", 0.05, 6, 3, "reinit_head", seed=4),
                  FineTuneStrategy("rmsprop", 0.01, 6, 3, "freeze_first", layers=1, hparams={"weight_decay": 0.1})]
    with auto_choice(variant):
        result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=5, order="second",
                          generator=torch.Generator().manual_seed(2))
        first = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(result.query_losses, first.query_losses)
    direction = {n: torch.randn(p.shape, generator=g, dtype=DTYPE) for n, p in model.named_parameters()}

    def objective(scale):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                p.add_(scale * direction[n])
        losses, _, _ = simulate_sequential(moved, strategies, data, cross_entropy, kl_uniform, query_size=5,
                                           generator=torch.Generator().manual_seed(2))
        return losses.mean()

    h = 1e-6
    numeric = (objective(h) - objective(-h)) / (2 * h)
    analytic = sum((result.meta_grad[n] * direction[n]).sum() for n in direction)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)
    # the first-order approximation is a different number
    first_order = sum((first.meta_grad[n] * direction[n]).sum() for n in direction)
    assert abs(float(first_order - analytic)) > 1e-6


def test_bad_input_raises_clear_errors():
    model, data = tiny_cnn(), pool(n=20)
    ok = FineTuneStrategy("sgd", 0.1, 4, 2)
    run = lambda strategies, **kw: simulate(model, strategies, data, cross_entropy, kl_uniform, **{"query_size": 4, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="optimizer: unknown name 'adamax'.*choose one of"):
        FineTuneStrategy("adamax")
    with pytest.raises(ValueError, match="lr: must be"):
        FineTuneStrategy("sgd", lr=-1e-3)
    with pytest.raises(ValueError, match="steps: must be an int >= 1"):
        FineTuneStrategy("sgd", steps=0)
    with pytest.raises(ValueError, match=r"batch_size \+ query_size must be <= the number of samples in data \(20\)"):
        run([FineTuneStrategy("sgd", 0.1, 17, 2)])
    with pytest.raises(ValueError, match="same number of steps"):
        run([ok, FineTuneStrategy("sgd", 0.1, 4, 3)])
    with pytest.raises(ValueError, match="path: must be one of"):
        run([ok], path="fast")
    with pytest.raises(ValueError, match="order: must be one of"):
        run([ok], order="third")
    with pytest.raises(ValueError, match="query_size"):
        run([ok], query_size=0)
    with pytest.raises(ValueError, match="strategies: expected a non-empty list"):
        run([])
    with pytest.raises(TypeError, match=r"strategies\[1\]: expected a FineTuneStrategy, got str"):
        run([ok, "adam"])
    headless = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()).to(DTYPE)
    with pytest.raises(ValueError, match="head: could not find the classifier head"):
        simulate(headless, [FineTuneStrategy("sgd", 0.1, 4, 2, "head_only")], data, cross_entropy, kl_uniform, query_size=4)
    with pytest.raises(ValueError, match="surgery: returned 'nope'"):
        run([FineTuneStrategy("sgd", 0.1, 4, 2, "custom", surgery=lambda p, g: {"nope": p["head.bias"]})])
    with pytest.raises(ValueError, match="data: every input and the targets must have the same first dimension"):
        simulate(model, [ok], ((data[0][0],), data[1][:5]), cross_entropy, kl_uniform, query_size=4)


def test_memory_estimate_chunks_and_out_of_memory_splits(monkeypatch):
    from sophon_ext.simulation import memory
    from sophon_ext.simulation.paths import ChunkRunner

    model, data = tiny_cnn(norm="none"), pool()
    strategies = StrategySampler(optimizers=("sgd", "adam"), batch_sizes=(4, 6), steps=2, seed=3).sample(4)
    run = lambda **kw: simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4,  # noqa: E731
                                generator=torch.Generator().manual_seed(5), return_params=True, **kw)
    whole = run(path="vmap")
    # room for about one trajectory: the automatic chunk size drops to 1
    per_sample = memory.activation_bytes_per_sample(model, data[0], data[1], cross_entropy)
    assert per_sample > 0
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(per_sample * 6 / memory.MEMORY_FRACTION) + 20000)
    small = run(path="chunked")
    assert small.path == "chunked" and small.chunk_size < whole.chunk_size == 4
    torch.testing.assert_close(small.query_losses, whole.query_losses)
    monkeypatch.undo()
    # an out-of-memory error in a chunk of several trajectories splits it in halves and retries
    real_step, sizes = ChunkRunner.step, []

    def failing_step(self, batch, *args, **kwargs):
        sizes.append(len(self.chunk.batch_sizes))
        if len(self.chunk.batch_sizes) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, batch, *args, **kwargs)

    monkeypatch.setattr(ChunkRunner, "step", failing_step)
    split = run(path="vmap")
    assert split.path == "chunked" and split.chunk_size == 1 and sizes[:3] == [4, 2, 1]
    torch.testing.assert_close(split.query_losses, whole.query_losses)
    for name in whole.meta_grad:
        torch.testing.assert_close(split.meta_grad[name], whole.meta_grad[name])
    with pytest.raises(RuntimeError, match="out of memory"):  # a chunk size given by the caller is kept
        run(path="vmap", chunk_size=2)


def test_auto_path_times_every_candidate_and_caches_its_choice():
    from sophon_ext.simulation import autotune

    model, data = tiny_cnn(norm="none", seed=3), pool()
    strategies = [FineTuneStrategy("sgd_momentum", 0.05, 5, 10, seed=i) for i in range(3)]
    autotune._PATH_CACHE.clear()
    autotune._TIMINGS.clear()
    run = lambda: simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4,  # noqa: E731
                           generator=torch.Generator().manual_seed(0), return_params=True)
    # every candidate (vmap, stacked, the loops with and without channels-last
    # inputs and threads) is timed 1 + _CALIBRATION_STEPS times, over as many calls as that takes
    results = []
    while not autotune._PATH_CACHE:
        results.append(run())
        assert len(results) <= 5, "10 steps a call: at most 5 calls to time 7 candidates 1 + 5 times"
        assert results[-1].path in ("vmap", "stacked", "loop")
        assert_matches_reference(model, strategies, data, results[-1], 4, seed=0)
    assert list(autotune._PATH_CACHE.values())[0] in VARIANTS and not autotune._TIMINGS
    again = run()
    assert len(autotune._PATH_CACHE) == 1
    chosen = list(autotune._PATH_CACHE.values())[0]
    assert again.path == reported_path(chosen)
    torch.testing.assert_close(again.query_losses, results[0].query_losses, rtol=1e-10, atol=0)


class _OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def old_style_loss(output, targets, weight=None):
    return weighted_mean(_OldStyleSquare.apply(output).mean(dim=-1), weight)


def test_auto_falls_back_to_the_loop_when_vmap_cannot_run_the_loss():
    from sophon_ext.simulation import autotune

    autotune._PATH_CACHE.clear()
    autotune._TIMINGS.clear()
    model, data = tiny_cnn(norm="none", seed=4), pool()
    strategies = [FineTuneStrategy("sgd", 0.05, 5, 10, seed=i) for i in range(2)]  # 10: room to time every candidate
    run = lambda path: simulate(model, strategies, data, cross_entropy, old_style_loss, query_size=4, path=path,  # noqa: E731
                                generator=torch.Generator().manual_seed(0), return_params=True)
    with pytest.raises(RuntimeError, match="functorch"):
        run("vmap")
    with pytest.warns(RuntimeWarning, match="the vmap path failed"):
        auto = run("auto")
    assert auto.path == "loop"
    assert_matches_reference(model, strategies, data, auto, 4, seed=0, loss=old_style_loss)


def test_batch_seeds_let_a_subset_reproduce_its_share_of_a_larger_run():
    from sophon_ext.simulation.batches import draw_seeds

    model, data = tiny_cnn(norm="none"), pool()
    strategies = [FineTuneStrategy("sgd", 0.05, 5, 2, seed=1), FineTuneStrategy("adam", 1e-2, 6, 2, "reinit_head", seed=2)]
    whole = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, generator=torch.Generator().manual_seed(8))
    seeds = draw_seeds(2, torch.Generator().manual_seed(8))
    parts = [simulate(model, [s], data, cross_entropy, kl_uniform, query_size=4, batch_seeds=[seed]) for s, seed in zip(strategies, seeds)]
    torch.testing.assert_close(torch.cat([p.query_losses for p in parts]), whole.query_losses)
    for name in whole.meta_grad:  # the whole run's mean is the mean of the parts' means
        torch.testing.assert_close((parts[0].meta_grad[name] + parts[1].meta_grad[name]) / 2, whole.meta_grad[name])
    with pytest.raises(ValueError, match="batch_seeds: expected one seed per strategy"):
        simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, batch_seeds=[1])


def test_input_transforms_that_change_shapes_run_in_their_own_group():
    model, data = tiny_cnn(norm="none", seed=2), pool(size=8)
    crop = lambda inputs: inputs[0][..., 1:-1, 1:-1]  # noqa: E731 - 8x8 -> 6x6, returns a bare tensor
    strategies = [FineTuneStrategy("sgd", 0.1, 5, 2, "custom", surgery=lambda p, g: {}, input_transform=crop),
                  FineTuneStrategy("sgd", 0.1, 5, 2), FineTuneStrategy("sgd", 0.1, 7, 2, "custom", surgery=lambda p, g: {}, input_transform=flip)]
    result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=3, path="vmap",
                      generator=torch.Generator().manual_seed(6), return_params=True)
    assert_matches_reference(model, strategies, data, result, 3, seed=6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("path", ["vmap", "stacked", "loop"])
def test_cuda_run_matches_the_cpu_sequential_loop(path):
    # float64 on the GPU against the CPU loop: the fused update and batched paths on device
    model, data = tiny_cnn(), pool()
    strategies = every_method_and_optimizer(model, steps=2)
    reference = simulate_sequential(model, strategies, data, cross_entropy, kl_uniform, query_size=4,
                                    generator=torch.Generator().manual_seed(5))
    (x,), y = data
    result = simulate(copy.deepcopy(model).cuda(), strategies, ((x.cuda(),), y.cuda()), cross_entropy, kl_uniform,
                      query_size=4, path=path, generator=torch.Generator().manual_seed(5), return_params=True)
    assert result.query_losses.device.type == "cuda"
    cpu = type(result)(**{f: _to_cpu(getattr(result, f)) for f in result.__dataclass_fields__})
    assert_matches_reference(model, strategies, data, cpu, 4, seed=5, reference=reference)


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
