"""The ResNet scenario: the model, every method on it, simulate against the plain loop, BatchNorm statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sophon_ext import FineTuneStrategy, Sophon, simulate
from sophon_ext.simulation.reference import simulate_sequential
from sophon_ext.config import Config
from sophon_ext.data import ArrayDataset, domain_splits
from sophon_ext.errors import UserInputError
from sophon_ext.attack import AttackSpec, prepare_attack_model
from sophon_ext.methods import get_method, method_names
from sophon_ext.models import build_model
from sophon_ext.presets import preset_names, preset_overrides
from sophon_ext.resnet import ResNet
from sophon_ext import surgery
from sophon_ext.tasks import ClassificationTask

from test_methods import assert_simulated_start_is_the_harness_model
from test_simulate import DTYPE, assert_matches_reference, cross_entropy, kl_uniform, pool

TASK = ClassificationTask()


def resnet(seed=0, width=4, blocks=1):
    torch.manual_seed(seed)
    return ResNet(in_channels=1, num_classes=10, width=width, blocks_per_stage=blocks).to(DTYPE)


def with_running_stats(model, seed=0):
    """Non-trivial running statistics, so that keeping or changing them shows."""
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    with torch.no_grad():
        model.train()(x)
    return model


def buffers(model):
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("width, blocks, channels, classes, side",
                         [(4, 1, 1, 10, 16), (8, 2, 3, 7, 8), (2, 1, 1, 2, 5)])
def test_forward_shapes_and_layout(width, blocks, channels, classes, side):
    model = ResNet(channels, classes, width, blocks)
    assert model(torch.randn(3, channels, side, side)).shape == (3, classes)
    # 6n + 2 weight layers: stem conv, 2 per block, the head (+ two projection shortcuts)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 6 * blocks + 2
    assert [m.out_channels for m in (model.stages[0][0].conv1, model.stages[1][0].conv1, model.stages[2][0].conv1)] == \
        [width, 2 * width, 4 * width]
    # the fine-tuning methods' "first layers" follow the data: stem conv, stem BatchNorm, first block
    assert surgery.parametrised_layers(model)[:3] == ["stem.0", "stem.1", "stages.0.0.conv1"]
    assert surgery.find_head(model) == "head"


def test_registry_builds_it_and_checks_its_sizes():
    model = build_model("resnet", in_channels=1, num_classes=10, width=4, blocks_per_stage=2)
    assert isinstance(model, ResNet) and len(model.stages[0]) == 2
    with pytest.raises(UserInputError, match="model.kwargs.blocks_per_stage: expected an int in"):
        build_model("resnet", blocks_per_stage=0)
    with pytest.raises(UserInputError, match="model.kwargs.depth: not an argument of resnet"):
        build_model("resnet", depth=3)


def test_the_preset_selects_the_resnet():
    assert "resnet" in preset_names()
    config = Config().replace(preset_overrides("resnet"))
    assert config.model.name == "resnet"
    assert set(config.model.kwargs) == {"width", "blocks_per_stage"}  # the default's small_cnn kwargs are replaced
    build_model(config.model.name, in_channels=1, num_classes=10, **config.model.kwargs)
    from sophon_ext.cli import build_config, build_parser

    assert build_config(build_parser().parse_args(["demo", "--preset", "resnet"])) == config


@pytest.mark.parametrize("name", method_names(simulated=True))
def test_every_simulated_method_starts_where_the_harness_does(name):
    """The simulated trajectory's start is the model the attack harness builds for the same seed."""
    net = with_running_stats(resnet(1))
    train = ArrayDataset(torch.randn(32, 1, 8, 8, dtype=DTYPE), torch.arange(32) % 10)
    if not get_method(name).supports(net):  # ReDo: no normalisation layers; the harness says so
        with pytest.raises(ValueError, match="ReDo: models with normalisation layers are not supported"):
            prepare_attack_model(net, AttackSpec(method=name, seed=3), TASK, train, train)
        return
    _, inner, reinit = assert_simulated_start_is_the_harness_model(net, train, name, seed=77)
    # a re-initialised BatchNorm (layers=2: the stem's) starts its running statistics afresh; the rest are kept
    stem_bn = inner.stem[1]
    if "stem.1" in reinit:
        assert torch.equal(stem_bn.running_mean, torch.zeros_like(stem_bn.running_mean))
        assert torch.equal(stem_bn.running_var, torch.ones_like(stem_bn.running_var))
    else:
        assert torch.equal(stem_bn.running_mean, net.stem[1].running_mean)
    assert torch.equal(inner.stages[1][0].bn1.running_var, net.stages[1][0].bn1.running_var)


@pytest.mark.parametrize("name", method_names(simulated=False))
def test_harness_only_methods_run_on_the_resnet(name):
    # float64: new layers (the probe's linear, the adapters) follow the model's dtype
    net, train = resnet(2).double(), ArrayDataset(torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.arange(16) % 10)
    real, params = prepare_attack_model(net, AttackSpec(method=name, seed=3), TASK, train, train,
                                        generator=torch.Generator().manual_seed(3))
    out = real(train.x[:4])
    assert params and out.shape == (4, 10) and out.dtype == torch.float64


def strategies(steps=2, batch_size=6):
    """One batch size: BatchNorm models run each batch size in its own group."""
    return [FineTuneStrategy("sgd_momentum", 0.05, batch_size, steps, "full", seed=1),
            FineTuneStrategy("adam", 1e-2, batch_size, steps, "reinit_head", seed=2),
            FineTuneStrategy("rmsprop", 1e-3, batch_size, steps, "reinit_layers", layers=2, seed=3),
            FineTuneStrategy("adamw", 1e-2, batch_size, steps, "head_only", seed=4)]


@pytest.fixture(scope="module")
def reference():
    model, data = with_running_stats(resnet(3)), pool(n=40, size=8, seed=3)
    expected = simulate_sequential(model, strategies(), data, cross_entropy, kl_uniform, query_size=4,
                                   generator=torch.Generator().manual_seed(5))
    return model, data, expected


@pytest.mark.parametrize("path", ["vmap", "stacked", "loop", "auto"])
def test_simulate_matches_the_sequential_loop_and_keeps_batchnorm_statistics(reference, path):
    """Batch statistics in every trajectory (as the plain train-mode loop has them), on every path;
    the model's running statistics, parameters and eval flag are untouched."""
    model, data, expected = reference
    model.eval()
    before = copy.deepcopy(model.state_dict())
    result = simulate(model, strategies(), data, cross_entropy, kl_uniform, query_size=4, path=path,
                      generator=torch.Generator().manual_seed(5), return_params=True)
    assert path == "auto" or result.path == path
    assert_matches_reference(model, strategies(), data, result, 4, seed=5, reference=expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.track_running_stats and m.running_mean is not None for m in norms)


def test_second_order_keeps_batchnorm_statistics():
    model = with_running_stats(resnet(4))
    before = buffers(model)
    for path in ("vmap", "loop"):
        simulate(model, strategies(steps=1), pool(n=24, size=8), cross_entropy, kl_uniform, query_size=4, path=path,
                 order="second")
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


def domain(seed, n=120):
    g = torch.Generator().manual_seed(seed)
    data = ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g))
    return domain_splits(data, seed=0)


@pytest.mark.parametrize("path", ["auto", "stacked", "vmap", "loop"])
def test_protection_running_statistics_follow_the_original_domain_only(path):
    """FTS leaves the running statistics as they were; NTR (train mode, original-domain batches) moves them."""
    def run(ntr_steps):
        torch.manual_seed(0)
        model = ResNet(1, 10, width=4, blocks_per_stage=1)
        before = buffers(model)
        config = Config.from_dict({"seed": 0, "protect": {
            "iterations": 1, "inner_steps": 2, "num_strategies": 2, "pool_size": 64, "query_size": 8, "horizon": None,
            "ntr_steps": ntr_steps, "ntr_batch_size": 16, "simulate_path": path, "checkpoint_every": 0,
            "guard": {"enabled": False},
            "strategies": [{"optimizer": "adam", "lr": 1e-2, "batch_size": 8},
                           {"optimizer": "sgd_momentum", "lr": 1e-2, "batch_size": 8, "method": "reinit_head"}]}})
        record = Sophon(model, domain(1), domain(2), config, progress=False).step()
        return before, buffers(model), record

    before, after, record = run(ntr_steps=0)
    assert record["sup_loss"] > 0
    assert all(torch.equal(before[n], after[n]) for n in before)
    before, after, _ = run(ntr_steps=1)
    assert int(after["stem.1.num_batches_tracked"]) == 1
    assert not torch.equal(before["stem.1.running_mean"], after["stem.1.running_mean"])

