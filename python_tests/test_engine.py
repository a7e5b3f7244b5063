"""The SOPHON loop: it suppresses, keeps the original task, resumes exactly, guards, rejects bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from sophon_ext import Sophon, protect
from sophon_ext.checkpoint import CheckpointError
from sophon_ext.config import Config, StrategyConfig
from sophon_ext.data import ArrayDataset, domain_splits
from sophon_ext.models import SmallCNN
from sophon_ext.pretrain import pretrain
from sophon_ext.config import PretrainConfig
from sophon_ext.tasks import ClassificationTask

IMAGE = 12  # small images and an MLP keep every run here well under a second per iteration


class TinyClassifier(nn.Module):
    """An MLP with a ``head``."""

    def __init__(self, side: int = IMAGE, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(side * side, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


def synthetic_domain(seed: int, n: int = 600, classes: int = 10) -> ArrayDataset:
    """Images = one fixed random pattern per class + noise: learnable in a second, no data loading."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(classes, 1, IMAGE, IMAGE, generator=g)
    y = torch.randint(classes, (n,), generator=g)
    x = prototypes[y] + 1.5 * torch.randn(n, 1, IMAGE, IMAGE, generator=g)
    return ArrayDataset(x, y)


@pytest.fixture(scope="module")
def domains():
    return domain_splits(synthetic_domain(1), seed=0), domain_splits(synthetic_domain(2), seed=0)


@pytest.fixture(scope="module")
def pretrained(domains):
    torch.manual_seed(0)
    model = TinyClassifier()
    pretrain(model, domains[0].train, ClassificationTask(), PretrainConfig(epochs=8, lr=1e-2, batch_size=32), seed=0)
    return model


def small_config(**protect) -> Config:
    base = {
        "iterations": 4,
        "inner_steps": 3,
        "query_size": 16,
        "pool_size": 128,
        "ntr_batch_size": 32,
        "checkpoint_every": 2,
        "simulate_path": "loop",
        "strategies": [
            {"optimizer": "sgd_momentum", "lr": 1e-2, "batch_size": 16},
            {"optimizer": "adam", "lr": 1e-3, "batch_size": 16, "method": "reinit_head"},
        ],
        "guard": {"every": 2},
    }
    base.update(protect)
    return Config.from_dict({"seed": 3, "protect": base})


def accuracy(model, data) -> float:
    return ClassificationTask().evaluate(model, data.x, data.y)["accuracy"]


def clone(model):
    import copy

    return copy.deepcopy(model)


def test_suppression_loss_after_simulated_fine_tuning_goes_down_and_original_accuracy_holds(domains, pretrained):
    original, restricted = domains
    config = small_config(iterations=30, alpha=3e-3, guard={"enabled": False})
    engine = Sophon(clone(pretrained), original, restricted, config)
    result = engine.run()
    losses = [r["sup_loss_last"] for r in result.history]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    start = accuracy(pretrained, original.test)
    assert start > 0.6  # the fixture is a real pre-trained model
    assert accuracy(result.model, original.test) >= start - 0.1
    assert result.iterations == 30 and not result.stopped


def test_resume_after_stop_equals_uninterrupted_run(domains, pretrained, tmp_path):
    original, restricted = domains
    config = small_config(iterations=5, checkpoint_every=2)
    full = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "full")
    full.run()

    first = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "cut")
    first.run(stop_after=3)  # "killed" after iteration 3: the last checkpoint is iteration 2
    with open(first.log_path, "a") as fh:
        fh.write('{"iteration": 4, "trunc')  # a line cut by the kill
    torch.manual_seed(12345)  # the global RNG state must come from the checkpoint, not from here
    resumed = Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path / "cut").resume()
    assert resumed.iteration == 2
    resumed.run()

    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    log_full = [json.loads(line) for line in full.log_path.read_text().splitlines()]
    log_resumed = [json.loads(line) for line in resumed.log_path.read_text().splitlines()]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in log_full] == [
        {k: v for k, v in r.items() if k not in drop} for r in log_resumed
    ]


def test_resume_rejects_a_different_config_and_a_missing_checkpoint(domains, pretrained, tmp_path):
    original, restricted = domains
    engine = Sophon(clone(pretrained), original, restricted, small_config(iterations=2), out_dir=tmp_path)
    engine.run()
    other = small_config(iterations=2, alpha=5e-3)
    with pytest.raises(CheckpointError, match="different config"):
        Sophon(clone(pretrained), original, restricted, other, out_dir=tmp_path).resume()
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Sophon(clone(pretrained), original, restricted, other, out_dir=tmp_path / "empty").resume()


def test_guard_rolls_back_and_stops(domains, pretrained):
    original, restricted = domains
    # An unreachable floor: the first check fails, the model returns to its start and the run stops.
    config = small_config(iterations=6, guard={"every": 2, "floor": 1.01, "max_drop": None, "action": "stop"})
    model = clone(pretrained)
    engine = Sophon(model, original, restricted, config)
    result = engine.run()
    assert result.stopped and "stopped" in result.stop_reason and result.iterations == 2
    assert result.history[-1]["rollback_to"] == 0
    for (name, a), b in zip(pretrained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match="stopped"):
        engine.step()


def test_guard_lowers_the_rates_then_gives_up(domains, pretrained):
    original, restricted = domains
    config = small_config(iterations=8, guard={"every": 2, "floor": 1.01, "max_drop": None, "action": "lower_lr",
                                               "lr_factor": 0.5, "max_rollbacks": 2})
    engine = Sophon(clone(pretrained), original, restricted, config)
    result = engine.run()
    scaled = [r for r in result.history if "rates_scaled_by" in r]
    assert len(scaled) == 2 and result.rollbacks == 3 and result.stopped
    assert result.history[-1]["alpha"] == pytest.approx(config.protect.alpha * 0.25)
    assert result.history[-1]["beta"] == pytest.approx(config.protect.beta * 0.25)


def test_guard_floor_relative_to_the_start(domains, pretrained):
    original, restricted = domains
    config = small_config(guard={"every": 1, "max_drop": 0.2, "drop_is_fraction": True})
    engine = Sophon(clone(pretrained), original, restricted, config)
    engine.step()
    assert engine._bound() == pytest.approx(0.8 * engine.start_metric)


def test_batchnorm_statistics_are_untouched_by_fine_tuning_suppression(domains):
    original, restricted = domains
    torch.manual_seed(0)
    model = SmallCNN(width=8, depth=2, norm="batch")
    before = {n: b.clone() for n, b in model.named_buffers()}
    engine = Sophon(model, original, restricted, small_config(iterations=1, ntr_steps=0, guard={"enabled": False}))
    engine.step()
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    # NTR does update them (in train mode, on the original domain)
    engine.pc = engine.config.replace({"protect": {"ntr_steps": 1}}).protect
    engine.step()
    assert not torch.equal(model.features[1].running_mean, before["features.1.running_mean"])


def test_protect_returns_a_copy_and_sampling_strategies(domains, pretrained):
    original, restricted = domains
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    config = small_config(iterations=2, num_strategies=3)
    protected = protect(pretrained, original, restricted, config)
    assert protected is not pretrained
    for name, value in pretrained.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(protected.state_dict().values(), before.values()))


def test_fixed_strategy_objects_and_log(domains, pretrained, tmp_path):
    from sophon_ext import FineTuneStrategy

    original, restricted = domains
    strategies = [FineTuneStrategy(optimizer="adam", lr=1e-3, batch_size=16, steps=3)]
    engine = Sophon(clone(pretrained), original, restricted, small_config(iterations=2), strategies=strategies,
                    out_dir=tmp_path)
    engine.run()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert len(records[0]["sup_loss_per_strategy"]) == 1
    assert {"sup_loss", "sup_loss_first", "sup_loss_last", "ntr_loss", "meta_grad_norm", "original_accuracy"} <= set(records[1])


# ----------------------------------------------------------------------------- bad input


class NotAClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_bad_input_is_named(domains, pretrained):
    original, restricted = domains
    config = small_config(iterations=1)
    bad_labels = ArrayDataset(restricted.train.x, restricted.train.y + 5)
    with pytest.raises(ValueError, match=r"restricted: dataset labels: must lie in \[0, 10\)"):
        Sophon(clone(pretrained), original, bad_labels, config)
    empty = ArrayDataset(original.train.x[:0], original.train.y[:0])
    with pytest.raises(ValueError, match="restricted: dataset is empty"):
        Sophon(clone(pretrained), original, empty, config)
    with pytest.raises(ValueError, match=r"model: a classifier must return logits of shape \(N, C\)"):
        Sophon(NotAClassifier(), original, restricted, config)
    with pytest.raises(ValueError, match="model: is on meta but device is cpu"):
        Sophon(clone(pretrained).to("meta"), original, restricted, config, device="cpu")
    with pytest.raises(ValueError, match="model: is on cpu but config.device is meta"):
        Sophon(clone(pretrained), original, restricted, config.replace({"device": "meta"}))
    with pytest.raises(TypeError, match="original: expected an ArrayDataset"):
        Sophon(clone(pretrained), "mnist", restricted, config)
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        Sophon(lambda x: x, original, restricted, config)


def test_config_forms(domains, pretrained, tmp_path):
    from sophon_ext.config import ProtectConfig, save_config

    original, restricted = domains
    config = small_config(iterations=1)
    path = tmp_path / "c.yaml"
    save_config(config, path)
    for form in (config, config.to_dict(), str(path), path):
        assert Sophon(clone(pretrained), original, restricted, form).config == config
    assert Sophon(clone(pretrained), original, restricted, ProtectConfig(iterations=1)).pc.iterations == 1
    with pytest.raises(TypeError, match="config: expected a Config"):
        Sophon(clone(pretrained), original, restricted, 3)
    # (x, y) pairs are accepted for the domains
    engine = Sophon(clone(pretrained), (original.train.x, original.train.y), (restricted.train.x, restricted.train.y), config)
    assert len(engine.original_val) > 0 and len(engine.original_train) + len(engine.original_val) == len(original.train)


def test_alpha_warms_up_linearly_and_the_guard_scales_it(domains, pretrained):
    original, restricted = domains
    config = small_config(iterations=6, alpha=1e-2, alpha_warmup=4, guard={"enabled": False})
    engine = Sophon(clone(pretrained), original, restricted, config)
    result = engine.run()
    assert [r["alpha"] for r in result.history] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2])
    engine._scale_rates(0.5)  # what a guard rollback does: the warm-up then ramps to the lowered rate
    assert engine.fts_optimizer.param_groups[0]["base_lr"] == pytest.approx(5e-3)
    assert engine.step()["alpha"] == pytest.approx(5e-3)
    with pytest.raises(Exception, match="protect.alpha_warmup"):
        small_config(alpha_warmup=-1)


def test_device_follows_the_model_unless_given_and_progress_follows_the_terminal(domains, pretrained, monkeypatch):
    from sophon_ext.engine import resolve_device, show_progress

    meta = clone(pretrained).to("meta")
    assert resolve_device(meta, None) == torch.device("meta")  # config.device's default does not move it
    assert resolve_device(meta, "meta", "cpu") == torch.device("meta")
    with pytest.raises(ValueError, match="model: is on meta but device is cpu"):
        resolve_device(meta, "cpu")
    original, restricted = domains
    assert Sophon(clone(pretrained), original, restricted, small_config(iterations=1)).device == torch.device("cpu")

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    monkeypatch.setattr("sys.stderr", Stream(True))
    assert show_progress(None) is True and show_progress(False) is False
    assert Sophon(clone(pretrained), original, restricted, small_config(iterations=1)).progress is True
    monkeypatch.setattr("sys.stderr", Stream(False))
    assert show_progress(None) is False and show_progress(True) is True
    assert Sophon(clone(pretrained), original, restricted, small_config(iterations=1)).progress is False


def test_a_checkpoint_config_written_before_a_key_existed_compares_equal(tmp_path):
    from sophon_ext.engine import _normalised_config

    current = Config().to_dict()
    older = copy.deepcopy(current)
    del older["model"]["output_key"]  # a key added after the checkpoint was written
    assert older != current
    assert _normalised_config(older, tmp_path) == current
    older["protect"]["alpha"] = "not a number"
    with pytest.raises(CheckpointError, match="protect.alpha"):
        _normalised_config(older, tmp_path)
