"""protect.liveness: the penalty against a plain float64 computation, its gradient, the layers it
watches, that it revives dead units, its config check, and an engine run that resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sophon_ext import Sophon
from sophon_ext.config import Config, ConfigError
from sophon_ext.liveness import LivenessPenalty, hidden_layers

from test_engine import clone, domains, pretrained, small_config  # noqa: F401  (fixtures)


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 4)).double()


def plain_penalty(model: nn.Sequential, reference: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The same quantity written out layer by layer, no hooks."""

    def stats(net):
        conv = net[0](x)
        linear = net[3](net[2](net[1](conv)))
        return [(conv.mean((0, 2, 3)), conv.std((0, 2, 3))), (linear.mean(0), linear.std(0))]

    terms = []
    for (mu, sd), (mu0, sd0) in zip(stats(model), stats(reference)):
        sd0 = sd0.detach().clamp_min(1e-3)
        terms.append((((mu - mu0.detach()) / sd0) ** 2 + ((sd - sd0) / sd0) ** 2).mean())
    return torch.stack(terms).mean()


def test_penalty_matches_a_plain_float64_computation_and_is_zero_at_the_reference():
    torch.manual_seed(0)
    reference = conv_net()
    x = torch.randn(20, 1, 6, 6, dtype=torch.float64)
    penalty = LivenessPenalty(reference, (x,), weight=0.7)
    assert penalty.layers == ["0", "3"]  # the head (the last linear) is not watched
    assert penalty(reference, (x,)).item() == pytest.approx(0.0, abs=1e-12)
    model = conv_net()  # other weights: a clearly non-zero penalty
    value = penalty(model, (x,))
    assert value.item() > 0.1
    torch.testing.assert_close(value, 0.7 * plain_penalty(model, reference, x))
    # the penalty does not hold on to the inputs it was made from
    x.add_(1.0)
    torch.testing.assert_close(penalty(model, (x - 1.0,)), value)


def test_penalty_gradient_passes_gradcheck():
    torch.manual_seed(1)
    reference = conv_net()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    penalty = LivenessPenalty(reference, (x,), weight=1.0)
    model = conv_net()
    names = ["0.weight", "0.bias", "3.weight"]
    start = tuple(model.get_parameter(n).detach().clone().requires_grad_() for n in names)

    def of_params(*tensors):
        params = dict(model.named_parameters()) | dict(zip(names, tensors))
        return penalty(_Proxy(model, params), (x,))

    assert torch.autograd.gradcheck(of_params, start)


class _Proxy(nn.Module):
    """``model`` run with ``params``, exposing the model's submodules to the penalty's hooks."""

    def __init__(self, model: nn.Module, params: dict) -> None:
        super().__init__()
        self.model = model
        self.params = params

    def get_submodule(self, target: str) -> nn.Module:
        return self.model.get_submodule(target)

    def forward(self, x):
        return torch.func.functional_call(self.model, self.params, (x,))


def test_hidden_layers_leave_out_the_named_head_or_the_last_layer():
    class Headed(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4))

        def forward(self, x):
            return self.head(self.body(x))

    model = Headed()
    assert [n for n, _ in hidden_layers(model, "head")] == ["body.0", "body.2"]
    assert [n for n, _ in hidden_layers(model)] == ["head", "body.0"]  # registration order: head first
    with pytest.raises(ValueError, match="no hidden conv/linear layer"):
        LivenessPenalty(nn.Linear(3, 2), (torch.randn(4, 3),), 1.0)
    with pytest.raises(ValueError, match="weight: must be > 0"):
        LivenessPenalty(model, (torch.randn(4, 3),), 0.0)


def test_minimising_the_penalty_revives_units_killed_by_a_negative_bias():
    torch.manual_seed(2)
    model = conv_net()
    x = torch.randn(64, 1, 6, 6, dtype=torch.float64)
    penalty = LivenessPenalty(model, (x,), 1.0)
    with torch.no_grad():
        model[0].bias.sub_(20.0)  # every conv unit dead: what the protection's trap looks like
        model[0].weight.mul_(3.0)
    dead = lambda: float((model[1](model[0](x)) == 0).all(dim=(0, 2, 3)).double().mean())  # noqa: E731
    assert dead() == 1.0
    before = penalty(model, (x,)).item()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        penalty(model, (x,)).backward()
        optimizer.step()
    assert penalty(model, (x,)).item() < 0.05 * before
    assert dead() == 0.0


def test_config_rejects_a_non_positive_weight():
    assert Config.from_dict({"protect": {"liveness": 0.5}}).protect.liveness == 0.5
    with pytest.raises(ConfigError, match="protect.liveness: must be > 0 or null"):
        Config.from_dict({"protect": {"liveness": 0.0}})


def test_engine_logs_the_penalty_and_resumes_exactly(domains, pretrained, tmp_path):  # noqa: F811
    original, restricted = domains
    config = small_config(iterations=4, checkpoint_every=2, liveness=1.0)
    full = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "full")
    full.run()
    log = [json.loads(line) for line in full.log_path.read_text().splitlines()]
    assert all(r["liveness_loss"] >= 0 for r in log) and any(r["liveness_loss"] > 0 for r in log)

    first = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "cut")
    first.run(stop_after=2)
    # a different model at resume: the reference must come from the checkpoint, not from it
    other = clone(pretrained)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2.0)
    resumed = Sophon(other, original, restricted, config, out_dir=tmp_path / "cut").resume()
    resumed.run()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
