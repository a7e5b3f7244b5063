"""Continued simulated trajectories (protect.horizon): a continuation is the same trajectory run on."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sophon_ext import FineTuneStrategy, Sophon, simulate
from sophon_ext.chains import TrajectoryChains
from sophon_ext.tasks import ClassificationTask

from test_engine import clone, domains, pretrained, small_config  # noqa: F401 - fixtures


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g, dtype=torch.float64),), torch.randint(3, (n,), generator=g)


def _run(model, strategies, data, seed, **kw):
    task = ClassificationTask(suppression="klu")
    return simulate(model, strategies, data, task.adaptation_loss, task.suppression_loss, query_size=8,
                    path="loop", generator=torch.Generator().manual_seed(seed), return_params=True, **kw)


@pytest.mark.parametrize("method", ["full", "reinit_head"])
def test_a_continued_trajectory_starts_where_the_last_part_stopped(method):
    torch.manual_seed(0)
    model = Tiny().double()
    data = _data()
    chains = TrajectoryChains(horizon=9)
    strategy = FineTuneStrategy(optimizer="sgd", lr=0.1, batch_size=8, steps=3, method=method, seed=5)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = _run(model, [strategy], data, 1)
    chains.record(model, [0], [strategy], theta, first.params)
    assert chains.depths([0], [strategy]) == [3]

    # theta moves (a meta step); the continuation starts at new theta + the attacker's displacement
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = chains.strategies_to_run([0], [strategy])
    assert run[0].method == "custom"
    start = run[0].surgery({n: v for n, v in moved.items()}, torch.Generator())
    reinit = {"head.weight", "head.bias"} if method == "reinit_head" else set()
    for name in moved:
        expected = first.params[name][0] if name in reinit else moved[name] + first.params[name][0] - theta[name]
        torch.testing.assert_close(start[name], expected, rtol=0, atol=1e-12)

    # the continued part trains from that point exactly as a fresh full trajectory started there would
    second = _run(model, run, data, 2)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(start[name])
    plain = FineTuneStrategy(optimizer="sgd", lr=0.1, batch_size=8, steps=3, method="full", seed=5)
    expected = _run(reference, [plain], data, 2)
    for name in moved:
        torch.testing.assert_close(second.params[name], expected.params[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second.query_losses, expected.query_losses)
    # first-order meta-gradient: identity through the offset, nothing for re-initialised parameters
    for name in moved:
        if name in reinit:
            assert name not in second.meta_grad or torch.count_nonzero(second.meta_grad[name]) == 0
        else:
            torch.testing.assert_close(second.meta_grad[name], expected.meta_grad[name])


def test_chains_end_at_the_horizon_and_duplicates_run_fresh():
    model = Tiny().double()
    data = _data()
    chains = TrajectoryChains(horizon=6)
    s = FineTuneStrategy(optimizer="adam", lr=1e-2, batch_size=8, steps=3, seed=1)
    head_only = FineTuneStrategy(optimizer="adam", lr=1e-2, batch_size=8, steps=3, method="head_only", seed=1)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    depths = []
    for seed in range(4):
        slots, strategies = [0, 0, 1], [s, s, head_only]
        depths.append(chains.depths(slots, strategies))
        run = chains.strategies_to_run(slots, strategies)
        assert run[1] is s and run[2] is head_only  # the duplicate and head_only start fresh
        result = _run(model, run, data, seed)
        chains.record(model, slots, strategies, theta, result.params)
    assert depths == [[0, 0, 0], [3, 0, 0], [0, 0, 0], [3, 0, 0]]  # 3 + 3 = 6 steps: the chain ends


def test_horizon_is_validated_and_saved():
    from sophon_ext.config import Config, ConfigError

    with pytest.raises(ConfigError, match="protect.horizon"):
        Config.from_dict({"protect": {"horizon": 0}})
    with pytest.raises(ValueError, match="horizon"):
        TrajectoryChains(0)
    chains = TrajectoryChains(4)
    with pytest.raises(ValueError, match="horizon 9"):
        chains.load_state_dict({"horizon": 9, "chains": {}})


def test_resume_with_chains_equals_uninterrupted_run(domains, pretrained, tmp_path):  # noqa: F811
    original, restricted = domains
    config = small_config(iterations=6, checkpoint_every=2, horizon=9)
    full = Sophon(copy.deepcopy(pretrained), original, restricted, config, out_dir=tmp_path / "full")
    full.run()
    assert max(max(r["chain_depths"]) for r in full.history) == 6  # chains ran on to depth 6 of 9
    cut = Sophon(copy.deepcopy(pretrained), original, restricted, config, out_dir=tmp_path / "cut")
    cut.run(stop_after=3)
    resumed = Sophon(copy.deepcopy(pretrained), original, restricted, config, out_dir=tmp_path / "cut").resume()
    assert resumed.iteration == 2 and resumed.chains.chains  # the chains came back from the checkpoint
    resumed.run()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_simulate_fn_that_drops_the_adapted_parameters_is_named(domains, pretrained):  # noqa: F811
    original, restricted = domains

    def no_params(model, strategies, return_params=False, **kwargs):
        import dataclasses

        return dataclasses.replace(simulate(model, strategies, **kwargs), params=None)

    engine = Sophon(copy.deepcopy(pretrained), original, restricted, small_config(horizon=9), simulate_fn=no_params)
    with pytest.raises(TypeError, match="simulate_fn: must return the adapted params"):
        engine.step()
    plain = Sophon(copy.deepcopy(pretrained), original, restricted, small_config(horizon=None), simulate_fn=no_params)
    assert "chain_depths" not in plain.step()  # without a horizon nothing is continued or asked for


def test_a_diverging_simulated_attacker_is_dropped_and_its_chain_ends(domains, pretrained):  # noqa: F811
    original, restricted = domains
    config = small_config(iterations=3, num_strategies=0, guard={"enabled": True, "every": 1}, strategies=[
        {"optimizer": "sgd", "lr": 1e12, "batch_size": 16},  # fine-tuning at this rate overflows
        {"optimizer": "adam", "lr": 1e-3, "batch_size": 16},
    ])
    engine = Sophon(clone(pretrained), original, restricted, config)
    engine.run()
    assert all(r.get("diverged") == ["strategy 0"] for r in engine.history)
    assert all(math.isfinite(r["sup_loss"]) and "rollback_to" not in r for r in engine.history)
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())
    assert not engine.chains.has_chain(0) and engine.chains.has_chain(1)
