"""The stacked path (sophon_ext.simulation.stacked): every supported op against
vmap(functional_call), float64; both convolution ways; what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_simulate import DTYPE, assert_matches_reference, cross_entropy, kl_uniform, pool, tiny_cnn
from torch import nn
from torch.func import functional_call, grad, vmap

from sophon_ext import FineTuneStrategy, simulate
from sophon_ext.simulation import autotune, batch_statistics
from sophon_ext.simulation import stacked as stacked_module
from sophon_ext.simulation.stacked import _CONV_CHOICE, _CONV_WAYS, NotStackable, stacked_model, trajectory_output

N = 3


class EveryOp(nn.Module):
    """One of each supported module, function and method, in shapes that make a wrong layout show."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=(1, 2))
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.pool = nn.MaxPool2d((2, 1))
        self.up = nn.Upsample(scale_factor=(2, 1), mode="nearest")
        self.scale = nn.Parameter(torch.randn(4, 1, 1))
        self.register_buffer("shift", torch.randn(4, 1, 1))
        self.conv1d = nn.Conv1d(4, 3, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(3)
        self.ln = nn.LayerNorm(6)
        self.mix = nn.Linear(6, 5)
        self.drop = nn.Dropout(0.0)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(36, 7)
        self.head_bias = nn.Parameter(torch.randn(1, 7))
        self.register_buffer("per_sample", torch.rand(5, 1) + 0.5)  # spans the batch dim (B = 5)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))  # (B, 4, 6, 3)
        h = torch.tanh(self.gn(self.grouped(h))) * self.scale + self.shift
        h = h + self.up(self.pool(h))  # (B, 4, 6, 3)
        h = F.avg_pool2d(h, (1, 1)) + F.adaptive_avg_pool2d(h, (6, 3)).sigmoid()
        h = h.view(h.size(0), 4, -1)  # (B, 4, 18)
        h = self.bn1d(self.conv1d(h)).relu()  # (B, 3, 18)
        h = F.max_pool1d(h, 3)  # (B, 3, 6)
        h = self.drop(self.mix(self.ln(h)))  # (B, 3, 5): a linear layer on a 3-d activation
        h = torch.cat([h, h.mean(dim=2, keepdim=True)], dim=2)  # (B, 3, 6)
        h = self.flatten(torch.cat([h, h * 2 - 1], dim=1))  # (B, 36)
        h = F.gelu(h) + h.sum(dim=1, keepdim=True) / 36
        h = (h - h.mean(dim=0, keepdim=True)) * self.per_sample  # over the batch: within each trajectory
        return self.head(h.reshape(h.shape[0], 36)) + self.head_bias


def stacked_parameters(model, generator):
    return {n: (p.detach() + 0.1 * torch.randn((N, *p.shape), generator=generator, dtype=p.dtype)) for n, p in model.named_parameters()}


def vmapped_gradients(model, params, x, y):
    def loss(p, xb, yb):
        return kl_uniform(functional_call(model, p, (xb,)), yb) + cross_entropy(functional_call(model, p, (xb,)), yb)

    return vmap(grad(loss))(params, x, y)


def stacked_gradients(model, params, x, y):
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    out = stacked_model(model)(leaves, (x,))
    total = sum(kl_uniform(trajectory_output(out, j), y[j]) + cross_entropy(trajectory_output(out, j), y[j]) for j in range(N))
    return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


def test_every_supported_op_matches_vmap_in_float64():
    torch.manual_seed(0)
    model = EveryOp().to(DTYPE).train()
    g = torch.Generator().manual_seed(1)
    params = stacked_parameters(model, g)
    x = torch.randn(N, 5, 2, 6, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 7, (N, 5), generator=g)
    with batch_statistics(model):  # as simulate runs it: BatchNorm by batch statistics
        expected = vmapped_gradients(model, params, x, y)
        got = stacked_gradients(model, params, x, y)
        out = stacked_model(model)(params, (x,))
        per_trajectory = [functional_call(model, {n: p[j] for n, p in params.items()}, (x[j],)) for j in range(N)]
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    for j in range(N):  # and the outputs themselves
        torch.testing.assert_close(out[:, j], per_trajectory[j])


def test_both_convolution_ways_agree_with_torch():
    g = torch.Generator().manual_seed(2)
    cases = [(nn.Conv2d(3, 4, 3, padding=1), (2, N, 3, 7, 7)), (nn.Conv2d(4, 6, (3, 2), stride=2, dilation=(1, 2), groups=2), (2, N, 4, 9, 8)),
             (nn.Conv1d(1, 5, 4, padding=2), (3, N, 1, 11)), (nn.Conv3d(2, 2, 2, bias=False), (2, N, 2, 4, 4, 4))]
    for module, shape in cases:
        conv = {4: F.conv1d, 5: F.conv2d, 6: F.conv3d}[len(shape)]
        x = torch.randn(shape, generator=g, dtype=DTYPE, requires_grad=True)
        weight = torch.randn((N, *module.weight.shape), generator=g, dtype=DTYPE, requires_grad=True)
        bias = None if module.bias is None else torch.randn((N, *module.bias.shape), generator=g, dtype=DTYPE, requires_grad=True)
        expected = torch.stack([conv(x[:, j], weight[j], None if bias is None else bias[j], module.stride, module.padding,
                                     module.dilation, module.groups) for j in range(N)], dim=1)
        cotangent = torch.randn(expected.shape, generator=g, dtype=DTYPE)
        leaves = [t for t in (x, weight, bias) if t is not None]
        expected_grads = torch.autograd.grad(expected, leaves, cotangent)
        for way, run in _CONV_WAYS.items():
            out = run(conv, x, weight, bias, module)
            torch.testing.assert_close(out, expected, msg=lambda m: f"{way} {module}: {m}")
            for got, want in zip(torch.autograd.grad(out, leaves, cotangent), expected_grads):
                torch.testing.assert_close(got, want, msg=lambda m: f"{way} {module} gradient: {m}")


@pytest.mark.parametrize("way", list(_CONV_WAYS))
def test_simulate_stacked_matches_the_sequential_loop_with_either_convolution(way, monkeypatch):
    model, data = tiny_cnn(), pool()  # BatchNorm: equal batch sizes run together
    strategies = [FineTuneStrategy("sgd_momentum", 0.05, 5, 3, seed=1), FineTuneStrategy("adam", 1e-2, 5, 3, "reinit_head", seed=2),
                  FineTuneStrategy("rmsprop", 1e-2, 5, 3, "freeze_first", layers=1, seed=3), FineTuneStrategy("sgd", 0.1, 4, 3, seed=4)]

    class Always(dict):
        def __contains__(self, key):
            return True

        def __getitem__(self, key):
            return way

    monkeypatch.setattr(stacked_module, "_CONV_CHOICE", Always())
    result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path="stacked",
                      generator=torch.Generator().manual_seed(5), return_params=True)
    assert result.path == "stacked"
    assert_matches_reference(model, strategies, data, result, 4, seed=5)


def test_mixed_batch_sizes_run_padded_on_the_stacked_path():
    model, data = tiny_cnn(norm="none"), pool()
    strategies = [FineTuneStrategy("sgd", 0.1, size, 3, seed=size) for size in (3, 6, 4)]
    result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path="stacked",
                      generator=torch.Generator().manual_seed(6), return_params=True)
    assert result.path == "stacked" and result.chunk_size == 3  # one padded chunk
    assert_matches_reference(model, strategies, data, result, 4, seed=6)


class Permuting(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(36, 10)

    def forward(self, x):
        return self.linear(x.permute(0, 1, 3, 2).flatten(1))


class MergesBatch(nn.Module):
    """Traces, but its reshape mixes the batch dim: found only when it runs."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 10)

    def forward(self, x):
        rows = self.linear(x.reshape(-1, 6))  # (B * 6, 10)
        return rows.view(x.shape[0], 6, 10).mean(1)


@pytest.mark.parametrize("model_class, reason", [(Permuting, "method .permute"), (MergesBatch, "keep the batch dim first")])
def test_unsupported_models_are_refused_by_name_and_auto_goes_around_them(model_class, reason):
    torch.manual_seed(0)
    model, data = model_class().to(DTYPE), pool()
    strategies = [FineTuneStrategy("sgd", 0.1, 4, 2, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match=f"path: 'stacked' cannot run this model.*{reason}"):
        simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path="stacked")
    autotune._PATH_CACHE.clear()
    autotune._TIMINGS.clear()
    for _ in range(4):  # through calibration, whichever candidates it times
        result = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4,
                          generator=torch.Generator().manual_seed(7), return_params=True)
        assert result.path in ("vmap", "loop")
        assert_matches_reference(model, strategies, data, result, 4, seed=7)


def test_untraceable_model_is_not_stackable():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(36, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) if x.sum() > 0 else -self.linear(x.flatten(1))

    with pytest.raises(NotStackable, match="torch.fx cannot trace Branching"):
        stacked_model(Branching())


def test_convolution_choice_is_timed_once_per_shape_under_auto_and_fixed_otherwise():
    from test_simulate import auto_choice

    model, data = tiny_cnn(norm="none", seed=1), pool()
    strategies = [FineTuneStrategy("sgd", 0.1, 5, 2, seed=i) for i in range(2)]
    _CONV_CHOICE.clear()
    # an explicit path times nothing: a fixed rule picks the way (per trajectory for one input channel)
    first = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path="stacked",
                     generator=torch.Generator().manual_seed(0))
    assert _CONV_CHOICE == {}
    again = simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path="stacked",
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.query_losses, again.query_losses)
    # under "auto" each shape is timed once and cached
    with auto_choice("stacked"):
        simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path="auto")
        chosen = dict(_CONV_CHOICE)
        # two convolutions x (adaptation batch, query batch) shapes
        assert len(chosen) == 4 and set(chosen.values()) <= set(_CONV_WAYS)
        simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path="auto")
        assert _CONV_CHOICE == chosen


@pytest.mark.parametrize("path", ["vmap", "stacked", "loop"])
def test_a_caller_in_no_grad_mode_gets_the_same_result(path):
    model, data = tiny_cnn(norm="none", seed=4), pool()
    strategies = [FineTuneStrategy("adam", 1e-2, 4, 2, seed=i) for i in range(2)]
    run = lambda: simulate(model, strategies, data, cross_entropy, kl_uniform, query_size=4, path=path,  # noqa: E731
                           generator=torch.Generator().manual_seed(8))
    expected = run()
    with torch.no_grad():
        got = run()
    assert any(g.abs().sum() > 0 for g in got.meta_grad.values())
    for name, grad_ in expected.meta_grad.items():
        torch.testing.assert_close(got.meta_grad[name], grad_)


def test_the_trace_cache_does_not_keep_models_alive():
    import gc
    import weakref

    model = tiny_cnn(norm="none", seed=5)
    stacked_model(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_the_engines_fused_suppression_loss_gives_the_same_result_on_stacked_and_vmap():
    from sophon_ext.tasks.classification import ClassificationTask

    task = ClassificationTask()  # ICE + KLU through the compiled op (or its reference): strided rows on stacked
    model, data = tiny_cnn(norm="none", seed=6), pool()
    strategies = [FineTuneStrategy("sgd_momentum", 0.05, 6, 3, seed=1), FineTuneStrategy("adam", 1e-2, 4, 3, "reinit_layers", layers=1, seed=2)]
    results = [simulate(model, strategies, data, task.adaptation_loss, task.suppression_loss, query_size=4, path=path,
                        generator=torch.Generator().manual_seed(9), return_params=True) for path in ("vmap", "stacked")]
    torch.testing.assert_close(results[1].query_losses, results[0].query_losses, rtol=1e-10, atol=1e-12)
    for name in results[0].meta_grad:
        torch.testing.assert_close(results[1].meta_grad[name], results[0].meta_grad[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(results[1].params[name], results[0].params[name], rtol=1e-9, atol=1e-12)


def test_auto_leaves_out_the_warm_up_step_and_prefers_a_batched_path_within_ten_percent():
    from sophon_ext.simulation.autotune import _fastest

    warm_up = [9.0]  # a first step that pays one-off costs
    assert _fastest({"vmap": warm_up + [1.0] * 5, "stacked": [0.1] + [1.2] * 5, "loop": [0.1] + [1.5] * 5}) == "vmap"
    # stacked faster than vmap: the faster batched path wins even when vmap is within 10% of it
    assert _fastest({"vmap": [0.1] + [1.05] * 5, "stacked": warm_up + [1.0] * 5, "loop": [0.1] + [1.2] * 5}) == "stacked"
    # a loop within 10% of the batched paths loses to them; more than 10% faster, it wins
    assert _fastest({"vmap": [0.1] + [1.2] * 5, "stacked": [0.1] + [1.08] * 5, "loop": warm_up + [1.0] * 5}) == "stacked"
    assert _fastest({"vmap": [0.1] + [1.2] * 5, "stacked": [0.1] + [1.15] * 5, "loop_threads": [0.1] + [1.0] * 5}) == "loop_threads"
    assert _fastest({"vmap": [0.1] + [1.2] * 5, "loop": [0.1] + [1.0] * 5}) == "loop"  # a model stacked cannot run
