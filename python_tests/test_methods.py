"""The method registry: one definition, a simulated form and a real form that agree."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from sophon_ext.attack import AttackSpec, prepare_attack_model
from sophon_ext.data import ArrayDataset
from sophon_ext.methods import (DATA_CHANGE_SAMPLES, FineTuneMethod, InputChanged, get_method, method_names,
                                recycle_dormant_units, register_method, standardise_inputs)
from sophon_ext.models import SmallCNN
from sophon_ext.simulation import simulate
from sophon_ext.strategies import FineTuneStrategy
from sophon_ext.tasks import ClassificationTask

TASK = ClassificationTask()


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(n) % 10)


def model(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(width=4, depth=3).double()


def assert_simulated_start_is_the_harness_model(net, train, name: str, seed: int):
    """Method ``name``'s simulated start on ``net`` equals, value for value and in its frozen set, the
    model the attack harness builds for ``seed``; returns (harness model, its inner model, re-initialised names)."""
    method = get_method(name)
    spec = AttackSpec(method=name, optimizer="adam", lr=1e-3, layers=2 if method.needs_layers else None, seed=seed)
    real, params = prepare_attack_model(net, spec, TASK, train, train, generator=torch.Generator().manual_seed(seed))
    inner = real.model if isinstance(real, InputChanged) else real
    theta = {n: p.detach().clone() for n, p in net.named_parameters()}
    reinit, frozen = method.targets(net, spec.layers)
    inputs = train.x[:DATA_CHANGE_SAMPLES] if method.needs_inputs else None  # what the harness's data change saw
    start = method.simulated_start(net, theta, reinit, torch.Generator().manual_seed(seed), inputs)
    for n, p in inner.named_parameters():
        torch.testing.assert_close(start[n], p.detach(), rtol=0, atol=0, msg=f"{name}: {n}")
        assert p.requires_grad == (n not in frozen), (name, n)
    assert {id(p) for p in params} == {id(p) for p in inner.parameters() if p.requires_grad}
    return real, inner, reinit


@pytest.mark.parametrize("name", method_names(simulated=True))
def test_simulated_start_equals_the_harness_surgery(name):
    """For every simulated method: the trajectory's start in the simulator is the model the
    attack harness builds for the same seed (same values, same frozen set)."""
    net, train = model(1), data()
    method, seed = get_method(name), 1234
    real, inner, _ = assert_simulated_start_is_the_harness_model(net, train, name, seed)
    # the input change is the same on both sides
    x = train.x[:5]
    change = method.input_change_for(seed)
    expected = net.__class__.forward(inner, change(x) if change else x)
    torch.testing.assert_close(real(x), expected, rtol=0, atol=0)
    transform = method.simulated_input_transform(seed)
    assert (transform is None) == (change is None)
    if transform is not None:
        torch.testing.assert_close(transform((x,))[0], change(x), rtol=0, atol=0)


def test_param_change_keeps_its_meta_gradient_and_renorm_scales_like_a_fresh_layer():
    net = model(2)
    with torch.no_grad():
        net.features[0].weight.mul_(5.0)
        net.features[0].bias.fill_(-3.0)
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    start = get_method("renorm").simulated_start(net, theta, [], torch.Generator())
    assert start["features.0.bias"].abs().max() == 0
    fresh = SmallCNN(width=4, depth=3).double()
    for name in ("features.0.weight", "features.3.weight", "head.weight"):
        ratio = float(start[name].detach().norm() / fresh.get_parameter(name).detach().norm())
        assert 0.6 < ratio < 1.6, (name, ratio)
        # the direction is kept
        cos = torch.nn.functional.cosine_similarity(start[name].flatten(), theta[name].flatten(), dim=0)
        assert float(cos.detach()) > 1 - 1e-12
    # gradient flows through the change (a meta-gradient reaches theta)
    start["features.0.weight"].sum().backward()
    assert theta["features.0.weight"].grad is not None and theta["features.0.weight"].grad.abs().sum() > 0


def test_standardise_inputs_per_sample():
    x = torch.randn(7, 1, 5, 5, dtype=torch.float64) * 3 + 2
    y = standardise_inputs(x)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(7, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std(dim=(1, 2, 3), unbiased=False), torch.ones(7, dtype=torch.float64))
    assert torch.isfinite(standardise_inputs(torch.zeros(2, 1, 3, 3))).all()  # constant images do not divide by 0


def test_random_reframing_is_fixed_by_its_seed_and_keeps_shapes():
    from sophon_ext.methods import random_reframing

    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    a, b, c = random_reframing(1)(x), random_reframing(1)(x), random_reframing(2)(x)
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(random_reframing(3)(torch.zeros(2, 1, 4, 4))).all()  # flat images
    changes = {round(float((random_reframing(s)(x) - x).abs().mean()), 6) for s in range(20)}
    assert len(changes) == 20  # twenty seeds, twenty different preprocessings


def test_a_user_method_is_simulated_and_run_by_the_harness():
    def halve_head(params, model):
        return {"head.weight": params["head.weight"] * 0.5}

    method = register_method(FineTuneMethod("test_halve_head", "head weights halved, then full", param_change=halve_head,
                                            input_change=lambda x: x.flip(-1)), replace=True)
    net, train = model(3), data()
    strategies = [FineTuneStrategy("sgd", 1e-2, 8, 2, method="test_halve_head", seed=5)]
    result = simulate(net, strategies, ((train.x,), train.y), TASK.adaptation_loss, TASK.suppression_loss,
                      query_size=8, path="loop", return_params=True, generator=torch.Generator().manual_seed(0))
    assert result.meta_grad["head.weight"].abs().sum() > 0
    real, _ = prepare_attack_model(net, AttackSpec(method="test_halve_head"), TASK, train, train)
    torch.testing.assert_close(real.model.head.weight, net.head.weight * 0.5)
    assert method.continuable and not method.needs_head


@pytest.mark.parametrize("kwargs, error, message", [
    ({"name": "bad name"}, ValueError, "name: must be an identifier"),
    ({"name": "x", "reinit": "everything"}, ValueError, "reinit: must be one of"),
    ({"name": "x", "freeze": "most"}, ValueError, "freeze: must be one of"),
    ({"name": "x", "param_change": 3}, TypeError, "param_change: expected a callable"),
])
def test_bad_method_definitions_name_the_field(kwargs, error, message):
    with pytest.raises(error, match=message):
        FineTuneMethod(summary="", **kwargs)


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register_method(FineTuneMethod("full", "again"))
    with pytest.raises(ValueError, match="'custom' is reserved"):
        register_method(FineTuneMethod("custom", ""))
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(ValueError, match=r"returned 'nope', not a parameter"):
        FineTuneMethod("y", "", param_change=lambda p, m: {"nope": torch.zeros(1)}).simulated_start(
            model(), dict(model().named_parameters()), [], torch.Generator())


class _ScaledLinear(nn.Module):
    """A custom layer with its own initialisation (what a generic rule would get wrong)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 5))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, mean=2.0, std=0.1)


def _reset_with_seed(module: nn.Module, seed: int) -> dict:
    """What ``module.reset_parameters()`` draws when the global RNG is seeded with ``seed``."""
    fresh = copy.deepcopy(module).float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        (getattr(fresh, "reset_parameters", None) or fresh._reset_parameters)()
    return {n: p.detach() for n, p in fresh.named_parameters(recurse=False)}


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(3, 6, 3), lambda: nn.Linear(7, 4), lambda: nn.Embedding(11, 5),
                                  lambda: nn.LayerNorm(6), lambda: nn.MultiheadAttention(8, 2), _ScaledLinear],
                         ids=["conv", "linear", "embedding", "layernorm", "multihead_attention", "custom"])
def test_fresh_parameters_are_the_layers_own_reset_parameters(make):
    from sophon_ext.surgery import fresh_parameters

    seed = int(torch.randint(0, 2**31, ()))
    module = make().double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p))  # "trained": far from any initialisation
    before = {n: p.clone() for n, p in module.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    fresh = fresh_parameters(module, generator)
    expected = _reset_with_seed(module, seed)
    assert set(fresh) == {n for n, _ in module.named_parameters(recurse=False)}
    for name, value in fresh.items():
        assert value.dtype == torch.float64  # the module's dtype, values drawn in float32 whatever it is
        assert torch.equal(value, expected[name].double()), name
        assert not torch.equal(value, before[name])
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())  # the module is untouched
    # the same generator state gives the same values
    again = fresh_parameters(module, torch.Generator().manual_seed(seed))
    assert all(torch.equal(again[n], fresh[n]) for n in fresh)
    if not isinstance(module, nn.LayerNorm):  # (ones and zeros: nothing drawn)
        # the generator moved past the draws: the next values differ
        assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(seed).get_state())
        following = fresh_parameters(module, generator)
        assert any(not torch.equal(following[n], fresh[n]) for n in fresh)


def test_fresh_parameters_of_a_layer_without_reset_use_the_default_rule_and_refuse_a_cuda_generator():
    from sophon_ext.surgery import fresh_parameters

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.full((4, 9), 5.0))
            self.bias = nn.Parameter(torch.full((4,), 5.0))

    fresh = fresh_parameters(Bare(), torch.Generator().manual_seed(0))
    assert fresh["weight"].abs().max() <= 1 / 3 and fresh["bias"].abs().max() <= 1 / 3  # +-1/sqrt(fan_in = 9)
    assert fresh["weight"].std() > 0.05
    with pytest.raises(ValueError, match="generator: must be a CPU"):
        # (a stand-in: no CUDA generator can be built without a GPU)
        fresh_parameters(nn.Linear(2, 2), types.SimpleNamespace(device=torch.device("cuda", 0)))


def test_fresh_model_draws_every_layer_in_turn_from_the_global_rng_when_asked():
    from sophon_ext.surgery import fresh_model

    net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6))
    net[3].running_mean.fill_(3.0)
    torch.manual_seed(0)
    fresh = fresh_model(net, torch.default_generator)
    after = torch.random.get_rng_state()
    torch.manual_seed(0)
    expected = [nn.Linear(6, 6), nn.Linear(6, 6)]  # what building the layers in turn draws
    assert torch.equal(after, torch.random.get_rng_state())  # the global RNG advanced past the draws
    for got, want in zip((fresh[0], fresh[2]), expected):
        assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)
    assert not torch.equal(fresh[0].weight, fresh[2].weight)
    assert torch.equal(fresh[3].running_mean, torch.zeros(6)) and torch.equal(net[3].running_mean, torch.full((6,), 3.0))


def _net_with_dead_units(seed: int) -> SmallCNN:
    """A float64 SmallCNN whose first conv has three units no input in [-1, 1] can switch on."""
    net = model(seed)
    with torch.no_grad():
        net.features[0].bias[[0, 2, 3]] = -100.0  # |w . x| <= 9 * 1/3 for a default-initialised 3x3 conv on [-1, 1]
    return net


def _first_layer_activity(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(net.features[0](x)).mean(dim=(0, 2, 3))


def test_redo_recycles_exactly_the_dead_units_and_keeps_the_outputs():
    net = _net_with_dead_units(4)
    x = torch.rand(40, 1, 8, 8, dtype=torch.float64) * 2 - 1
    theta = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    changed = recycle_dormant_units(dict(theta), net, x, torch.Generator().manual_seed(3))
    start = {**theta, **changed}
    dead = _first_layer_activity(net, x) == 0
    assert dead.tolist() == [True, False, True, True]
    out = torch.func.functional_call(net, start, (x,))
    torch.testing.assert_close(out, net(x), rtol=0, atol=1e-12)  # recycled units' outgoing weights are zero
    w0, b0 = start["features.0.weight"], start["features.0.bias"]
    assert torch.equal(w0[~dead], theta["features.0.weight"][~dead]) and torch.equal(b0[~dead], theta["features.0.bias"][~dead])
    assert (b0[dead].abs() < 1.0).all()  # fresh values, not the trap
    assert (start["features.3.weight"][:, dead] == 0).all()
    assert torch.equal(start["features.3.weight"][:, ~dead], theta["features.3.weight"][:, ~dead])
    # the kept values stay functions of theta: a meta-gradient reaches them, not the recycled ones
    (w0.sum() + start["features.3.weight"].sum()).backward()
    assert (theta["features.0.weight"].grad[~dead] == 1).all() and (theta["features.0.weight"].grad[dead] == 0).all()
    assert (theta["features.3.weight"].grad[:, dead] == 0).all()
    again = recycle_dormant_units(dict(theta), net, x, torch.Generator().manual_seed(3))
    assert all(torch.equal(again[n], changed[n]) for n in changed)


def test_redo_threshold_also_recycles_barely_active_units():
    net = _net_with_dead_units(5)
    x = torch.rand(40, 1, 8, 8, dtype=torch.float64) * 2 - 1
    activity = _first_layer_activity(net, x).detach()
    threshold = float(activity.max() / activity.mean()) + 1e-6  # every first-layer unit is dormant at this threshold
    theta = {n: p.detach() for n, p in net.named_parameters()}
    changed = recycle_dormant_units(theta, net, x, torch.Generator().manual_seed(0), threshold=threshold)
    assert (changed["features.0.weight"] != theta["features.0.weight"]).flatten(1).any(dim=1).all()


@pytest.mark.parametrize("name", ["redo", "redo_head"])
def test_redo_starts_where_the_harness_does_on_a_model_with_dead_units(name):
    net = _net_with_dead_units(6)
    train = ArrayDataset(torch.rand(300, 1, 8, 8, dtype=torch.float64) * 2 - 1, torch.arange(300) % 10)
    real, inner, _ = assert_simulated_start_is_the_harness_model(net, train, name, seed=9)
    assert not torch.equal(inner.features[0].bias, net.features[0].bias)  # something was recycled
    if name == "redo":  # the function is kept (a new head changes it)
        torch.testing.assert_close(real(train.x[:8]), net(train.x[:8]), rtol=0, atol=1e-12)


def test_redo_refuses_models_it_cannot_read_naming_why():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 6, 3), nn.Linear(10, 10)

    with pytest.raises(ValueError, match="ReDo: needs conv/linear layers that feed each other in order; 'a' has 4 outputs "
                                         "but the next one, 'b', takes 1"):
        get_method("redo").targets(Branching())
    assert not get_method("redo").supports(Branching()) and get_method("full").supports(Branching())
    with pytest.raises(ValueError, match="method 'redo': needs restricted inputs for its data_change"):
        get_method("redo").simulated_start(model(), {n: p for n, p in model().named_parameters()}, [], torch.Generator())
