"""The attack harness: end to end, against a plain training loop, every method and
optimizer, resume, shards, bad input."""

import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sophon_ext.attack as attack_module
import sophon_ext.attack.cli as attack_cli
import sophon_ext.attack.run as attack_run
from sophon_ext import checkpoint, surgery
from sophon_ext.attack import (
    ATTACK_METHODS, GRID_PRESETS, AttackSpec, add_attack_arguments, expand_grid, fine_tune, load_grid,
    prepare_attack_model, run_attack_cli, run_attacks,
)
from sophon_ext.attack.finetune import _train_loop
from sophon_ext.attack.spec import schedule_factor
from sophon_ext.data import ArrayDataset, domain_splits, load_builtin
from sophon_ext.models import SmallCNN
from sophon_ext.optim.presets import PRESETS
from sophon_ext.tasks import ClassificationTask

TASK = ClassificationTask()


@pytest.fixture(scope="module")
def digits():
    splits = domain_splits(load_builtin("digits", image_size=8), seed=0)
    return splits.train.subset(torch.arange(96)), splits.test.subset(torch.arange(48))


@pytest.fixture(scope="module")
def other_domain():
    """Stands in for the original domain (MNIST takes seconds to load): digits upside down."""
    splits = domain_splits(load_builtin("digits", image_size=8), seed=1)
    test = splits.test.subset(torch.arange(40))
    return ArrayDataset(test.x.flip(-2), test.y)


def tiny_model(seed: int, **kwargs) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(width=4, depth=2, **kwargs)


def tiny_grid(**overrides) -> dict:
    grid = {"methods": ["full", "head_only"], "optimizers": ["adam"], "lrs": [1e-2], "batch_sizes": [32], "epochs": [2]}
    grid.update(overrides)
    return grid


# ---------------------------------------------------------------- end to end

def test_tiny_grid_writes_every_output(digits, other_domain, tmp_path):
    train, test = digits
    original = other_domain
    report = run_attacks(tiny_model(1), tiny_model(2), None, train, test, TASK, tiny_grid(), original_test=original,
                         out_dir=tmp_path, progress=False)
    assert report["complete"] and report["task"] == "classification" and report["metric"] == "accuracy"
    for name in ("report.json", "curves.csv", "summary.md", "curves.png", "heatmap.png", "diagnostics.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["attacks"] == json.loads(json.dumps(report["attacks"]))
    assert [a["method"] for a in on_disk["attacks"]] == ["full", "head_only"]
    for attack in on_disk["attacks"]:
        assert set(attack["curves"]) == {"protected", "unprotected", "scratch"}
        for curve in attack["curves"].values():
            assert len(curve["metric"]) == len(curve["loss"]) == attack["epochs"] + 1
            assert not curve["diverged"]
        assert set(attack["summary"]) >= {"overhead_ratio", "auc_ratio", "max_gap_vs_scratch"}
    assert set(on_disk["original_domain"]) == {"protected", "unprotected", "scratch"}
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["seeds"] == [0]
    assert on_disk["config"]["attacks"][0]["method"] == "full"
    zero = on_disk["diagnostics"]["zero_fraction"]
    assert set(zero) == {"protected", "unprotected"} and set(zero["protected"]) == {"original", "restricted"}
    assert len((tmp_path / "curves.csv").read_text().splitlines()) == 1 + 2 * 3 * 3
    assert (tmp_path / "runs").is_dir() and len(list((tmp_path / "runs").glob("*.json"))) == 2


def test_a_grid_with_several_seeds_summarises_each_recipe_across_them(digits, tmp_path):
    train, test = digits
    report = run_attacks(tiny_model(1), None, None, train, test, TASK, tiny_grid(methods=["full"], epochs=[1],
                         seeds=[0, 1]), out_dir=tmp_path, progress=False, diagnostics=False, plots=False)
    [recipe] = report["across_seeds"]
    by_seed = {a["seed"]: a for a in report["attacks"]}
    assert recipe["seeds"] == [0, 1] and set(recipe["finals"]) == {"protected", "scratch"}
    for start in ("protected", "scratch"):
        finals = [by_seed[s]["curves"][start]["metric"][-1] for s in (0, 1)]
        assert recipe["finals"][start] == finals
        assert recipe["mean_final"][start] == pytest.approx(sum(finals) / 2)
        assert recipe["best_final"][start] == max(finals)
    assert recipe["seed_escapes"] == sum(a["summary"]["escape"] for a in report["attacks"])
    assert "## Across seeds" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["across_seeds"] == json.loads(json.dumps([recipe]))


def test_report_numbers_equal_a_plain_training_loop(digits):
    """One attack recomputed by hand: SGD + momentum + weight decay, cosine schedule."""
    train, test = digits
    protected = tiny_model(3)
    spec = AttackSpec(method="full", optimizer="sgd_momentum", lr=0.05, batch_size=20, epochs=2,
                      weight_decay=1e-3, schedule="cosine", seed=7)
    report = run_attacks(protected, None, None, train, test, TASK, [spec], progress=False, diagnostics=False)
    curve = report["attacks"][0]["curves"]["protected"]

    model = copy.deepcopy(protected)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    steps_per_epoch, total, step = math.ceil(len(train) / 20), math.ceil(len(train) / 20) * 2, 0
    generator = torch.Generator().manual_seed(7)

    def evaluate():
        model.eval()
        with torch.no_grad():
            logits = model(test.x)
        model.train()
        return (logits.argmax(1) == test.y).sum().item() / len(test), F.cross_entropy(logits, test.y).item()

    accuracy, losses = [evaluate()[0]], [evaluate()[1]]
    for _ in range(2):
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), 20):
            for group in optimizer.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / total))
            index = order[start : start + 20]
            loss = F.cross_entropy(model(train.x[index]), train.y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        acc, test_loss = evaluate()
        accuracy.append(acc)
        losses.append(test_loss)
    assert step == steps_per_epoch * 2
    assert curve["metric"] == pytest.approx(accuracy, abs=1e-12)
    assert curve["loss"] == pytest.approx(losses, rel=1e-5)
    assert losses[-1] < losses[0]  # the loop did train


def test_reinit_head_then_full_equals_a_plain_loop(digits):
    """Re-initialised head: drawn from Generator(seed) with torch's default init, then Adam on everything."""
    train, test = digits
    protected = tiny_model(4)
    spec = AttackSpec(method="reinit_head", optimizer="adam", lr=1e-2, batch_size=32, epochs=1, seed=3)
    curve = fine_tune(protected, spec, TASK, train, test)

    model = copy.deepcopy(protected)
    generator = torch.Generator().manual_seed(3)
    bound = 1 / math.sqrt(model.head.in_features)
    with torch.no_grad():
        model.head.weight.copy_((torch.rand(model.head.weight.shape, generator=generator) * 2 - 1) * bound)
        model.head.bias.copy_((torch.rand(model.head.bias.shape, generator=generator) * 2 - 1) * bound)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data_gen = torch.Generator().manual_seed(3)
    start_acc = (model(test.x).argmax(1) == test.y).sum().item() / len(test)
    order = torch.randperm(len(train), generator=data_gen)
    for start in range(0, len(train), 32):
        index = order[start : start + 32]
        loss = F.cross_entropy(model(train.x[index]), train.y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end_acc = (model(test.x).argmax(1) == test.y).sum().item() / len(test)
    assert curve["metric"] == pytest.approx([start_acc, end_acc], abs=1e-12)


# ---------------------------------------------------------------- every method and optimizer

def _changed(before: nn.Module, after: nn.Module) -> set[str]:
    b = dict(before.named_parameters())
    return {n for n, p in after.named_parameters() if n in b and not torch.equal(p, b[n])}


@pytest.mark.parametrize("method", ATTACK_METHODS)
def test_every_method_trains_exactly_its_parameters(method, digits):
    train, test = digits
    model = tiny_model(5)
    spec = AttackSpec(method=method, optimizer="adam", lr=1e-2, batch_size=48, epochs=1, layers=1, rank=2)
    attacked, params = prepare_attack_model(model, spec, TASK, train, test, generator=torch.Generator().manual_seed(0))
    start = copy.deepcopy(attacked)
    trainable = {n for n, p in attacked.named_parameters() if p.requires_grad}
    assert {id(p) for p in params} == {id(p) for n, p in attacked.named_parameters() if n in trainable}
    curve = _train_loop(attacked, params, spec, TASK, train, test, torch.Generator().manual_seed(0))
    assert len(curve["metric"]) == 2 and all(math.isfinite(v) for v in curve["metric"])
    assert _changed(start, attacked) == trainable
    layers = surgery.parametrised_layers(model)
    expected = {
        "full": {n for n, _ in model.named_parameters()},
        "reinit_head": {n for n, _ in model.named_parameters()},
        "reinit_layers": {n for n, _ in model.named_parameters()},
        "reinit_head_layers": {n for n, _ in model.named_parameters()},
        "renorm": {n for n, _ in model.named_parameters()},
        "standardise": {f"model.{n}" for n, _ in model.named_parameters()},  # behind the input change
        "reframe": {f"model.{n}" for n, _ in model.named_parameters()},
        "reframe_head": {f"model.{n}" for n, _ in model.named_parameters()},
        "renorm_head": {n for n, _ in model.named_parameters()},
        "redo": {n for n, _ in model.named_parameters()},
        "redo_head": {n for n, _ in model.named_parameters()},
        "head_only": {"head.weight", "head.bias"},
        "freeze_first": set(surgery.parameter_names(model, layers[1:])),
        "probe": {"linear.weight", "linear.bias"},
        "lora": {n for n, _ in attacked.named_parameters() if ".down." in n or ".up." in n},
    }[method]
    assert trainable == expected
    if method == "lora":
        assert len(expected) == 2 * len(layers)  # an adapter (down, up) on every conv and linear
    if method == "reinit_layers":  # the first layer was re-drawn before training
        assert not torch.equal(start.get_submodule(layers[0]).weight, model.get_submodule(layers[0]).weight)


def test_a_grid_skips_the_methods_a_model_cannot_take_and_says_so(digits):
    train, test = digits
    grid = tiny_grid(methods=["full", "redo", "redo_head"], epochs=[1])
    with pytest.warns(UserWarning, match="attacks skipped, their method cannot change this model"):
        report = run_attacks(tiny_model(3, norm="batch"), None, None, train, test, TASK, grid, progress=False,
                             diagnostics=False)
    assert [a["name"] for a in report["attacks"]] == ["full-adam-lr0.01-bs32-ep1-wd0-constant-s0"]
    skipped = report["config"]["skipped"]
    assert sorted(skipped) == ["redo-adam-lr0.01-bs32-ep1-wd0-constant-s0", "redo_head-adam-lr0.01-bs32-ep1-wd0-constant-s0"]
    assert all("ReDo: models with normalisation layers are not supported" in why for why in skipped.values())
    with pytest.raises(ValueError, match="grid: no attack can run on this model"):
        run_attacks(tiny_model(3, norm="batch"), None, None, train, test, TASK, tiny_grid(methods=["redo"]),
                    progress=False, diagnostics=False)


OPTIMIZERS = sorted(PRESETS)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_runs_through_the_harness(optimizer, digits):
    train, test = digits
    spec = AttackSpec(method="full", optimizer=optimizer, lr=1e-2, batch_size=48, epochs=1, weight_decay=1e-4)
    model = tiny_model(6)
    curve = fine_tune(model, spec, TASK, train, test)
    assert not curve["diverged"] and len(curve["metric"]) == 2
    assert curve["train_loss"][1] > 0


def test_every_schedule_runs_and_factors_are_right(digits):
    train, test = digits
    assert [schedule_factor("constant", 4)(t) for t in range(4)] == [1, 1, 1, 1]
    assert [schedule_factor("linear", 4)(t) for t in range(4)] == [1, 0.75, 0.5, 0.25]
    assert [schedule_factor("step", 8)(t) for t in range(8)] == [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]
    assert schedule_factor("cosine", 4)(2) == pytest.approx(0.5)
    for schedule in ("constant", "cosine", "linear", "step"):
        curve = fine_tune(tiny_model(0), AttackSpec(schedule=schedule, epochs=1, batch_size=48), TASK, train, test)
        assert not curve["diverged"]


def test_default_grid_covers_three_methods_five_optimizers_two_lrs():
    specs = expand_grid("default")
    assert len({s.method for s in specs}) >= 3 and len({s.optimizer for s in specs}) >= 5
    assert len(specs) == len({s.name for s in specs}) == 3 * 5 * 2
    for optimizer in {s.optimizer for s in specs}:  # two learning rates per optimizer
        assert len({s.lr for s in specs if s.optimizer == optimizer}) == 2
    paper = expand_grid("paper")
    assert [(s.method, s.optimizer, s.lr, s.batch_size, s.epochs, s.weight_decay) for s in paper] == [
        ("full", "sgd_momentum", 1e-4, 200, 20, 1e-4)]
    assert {s.method for s in expand_grid("methods")} == set(ATTACK_METHODS)


def test_grid_config_overrides_explicit_attacks_and_yaml(tmp_path):
    specs = expand_grid({"preset": "quick", "epochs": 1, "seeds": [0, 1], "attacks": ["lora", {"method": "probe", "layers": 2}]})
    assert [(s.method, s.seed) for s in specs] == [("full", 0), ("full", 1), ("head_only", 0), ("head_only", 1),
                                                  ("lora", 0), ("lora", 1), ("probe", 0), ("probe", 1)]
    assert all(s.epochs == 1 and s.optimizer == "adam" for s in specs) and specs[-1].layers == 2
    # the demo's form: a list of attacks, with epochs, batch size and seeds for all of them
    demo = expand_grid({"epochs": [2], "batch_sizes": [16], "seeds": [0, 1, 2],
                        "attacks": [{"method": "full", "optimizer": "sgd", "lr": 0.1}, {"method": "head_only"}]})
    assert [(s.method, s.seed, s.epochs, s.batch_size) for s in demo] == [
        ("full", 0, 2, 16), ("full", 1, 2, 16), ("full", 2, 2, 16),
        ("head_only", 0, 2, 16), ("head_only", 1, 2, 16), ("head_only", 2, 2, 16)]
    assert expand_grid({"attacks": [{"method": "full", "optimizer": "sgd"}]})[0].optimizer == "sgd"
    path = tmp_path / "grid.yaml"
    path.write_text("method: full\noptimizer: [sgd, nesterov]\nlr: 0.1\nepochs: 1\nschedules: [constant, cosine]\n")
    specs = load_grid(path)
    assert [(s.optimizer, s.schedule) for s in specs] == [
        ("sgd", "constant"), ("sgd", "cosine"), ("nesterov", "constant"), ("nesterov", "cosine")]
    assert len(expand_grid({"methods": ["full", "full"], "optimizers": ["adam"]})) == 1  # duplicates dropped
    per_optimizer = expand_grid({"optimizers": ["sgd", "adam"], "lrs": {"sgd": [0.1, 0.01], "adam": 1e-3},
                                 "attacks": [{"method": "head_only", "optimizer": "adam", "lr": 0.5}]})
    assert [(s.method, s.optimizer, s.lr) for s in per_optimizer] == [
        ("full", "sgd", 0.1), ("full", "sgd", 0.01), ("full", "adam", 1e-3), ("head_only", "adam", 0.5)]
    with pytest.raises(ValueError, match="no learning rates for optimizer 'adam'"):
        expand_grid({"optimizers": ["adam"], "lrs": {"sgd": [0.1]}})
    with pytest.raises(ValueError, match="grid lrs: unknown optimizer 'sgdd'"):
        expand_grid({"optimizers": ["sgd"], "lrs": {"sgdd": [0.1]}})


# ---------------------------------------------------------------- seeds, divergence, resume, shards

def test_same_seed_same_numbers_other_seed_other_numbers(digits):
    train, test = digits
    model = tiny_model(8)
    a = fine_tune(model, AttackSpec(epochs=1, batch_size=16, seed=0), TASK, train, test)
    b = fine_tune(model, AttackSpec(epochs=1, batch_size=16, seed=0), TASK, train, test)
    c = fine_tune(model, AttackSpec(epochs=1, batch_size=16, seed=1), TASK, train, test)
    assert a["loss"] == b["loss"] and a["train_loss"] != c["train_loss"]


def test_divergence_is_recorded_and_the_report_stays_valid_json(digits, tmp_path):
    train, test = digits
    spec = AttackSpec(method="full", optimizer="sgd", lr=1e12, batch_size=16, epochs=3)
    report = run_attacks(tiny_model(9), None, None, train, test, TASK, [spec], out_dir=tmp_path, progress=False,
                         diagnostics=False, plots=False)
    curve = report["attacks"][0]["curves"]["protected"]
    assert curve["diverged"] and curve["diverged_at_epoch"] == 1
    assert curve["metric"][1:] == [None, None, None] and curve["metric"][0] is not None
    json.loads((tmp_path / "report.json").read_text())  # no NaN written
    assert "diverged" in (tmp_path / "summary.md").read_text()


def test_resume_skips_finished_attacks_and_reruns_only_the_protected_column(digits, tmp_path, monkeypatch):
    train, test = digits
    calls = []
    real = attack_run.fine_tune

    def counting(model, spec, *args, **kwargs):
        calls.append(spec.name)
        return real(model, spec, *args, **kwargs)

    monkeypatch.setattr(attack_run, "fine_tune", counting)  # what run_attacks calls
    kwargs = dict(out_dir=tmp_path, progress=False, diagnostics=False, plots=False)
    first = run_attacks(tiny_model(10), tiny_model(11), None, train, test, TASK, tiny_grid(), **kwargs)
    assert len(calls) == 2 * 3
    runs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    calls.clear()
    with pytest.raises(ValueError, match="holds another run's files .*resume=True"):  # a fresh run is not mixed in
        run_attacks(tiny_model(10), tiny_model(11), None, train, test, TASK, tiny_grid(), **kwargs)
    assert calls == []
    second = run_attacks(tiny_model(10), tiny_model(11), None, train, test, TASK, tiny_grid(), resume=True, **kwargs)
    assert calls == [] and second["attacks"] == first["attacks"]
    assert runs == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    # a new protected model: only its column is trained again
    third = run_attacks(tiny_model(12), tiny_model(11), None, train, test, TASK, tiny_grid(), resume=True, **kwargs)
    assert len(calls) == 2
    assert [a["curves"]["scratch"] for a in third["attacks"]] == [a["curves"]["scratch"] for a in first["attacks"]]
    calls.clear()
    (tmp_path / "runs" / "unrelated.json").write_text("{}")  # not this grid's: kept
    run_attacks(tiny_model(12), tiny_model(11), None, train, test, TASK, tiny_grid(), overwrite=True, **kwargs)
    assert len(calls) == 2 * 3 and (tmp_path / "runs" / "unrelated.json").exists()
    with pytest.raises(ValueError, match="give one of them"):
        run_attacks(tiny_model(12), None, None, train, test, TASK, tiny_grid(), resume=True, overwrite=True, **kwargs)


def test_shards_split_the_grid_and_the_last_one_writes_the_report(digits, tmp_path):
    train, test = digits
    grid = tiny_grid(lrs=[1e-2, 1e-3])
    kwargs = dict(out_dir=tmp_path, progress=False, diagnostics=False, plots=False)
    part = run_attacks(tiny_model(13), None, None, train, test, TASK, grid, shard=(1, 2), **kwargs)
    assert not part["complete"] and len(part["attacks"]) == 2 and not (tmp_path / "report.json").exists()
    names = [s.name for s in expand_grid(grid)]
    assert [a["name"] for a in part["attacks"]] == names[1::2]
    whole = run_attacks(tiny_model(13), None, None, train, test, TASK, grid, shard=(0, 2), **kwargs)
    assert whole["complete"] and [a["name"] for a in whole["attacks"]] == names
    alone = run_attacks(tiny_model(13), None, None, train, test, TASK, grid, progress=False, diagnostics=False)
    def numbers(report):
        return [{k: (c["metric"], c["loss"]) for k, c in a["curves"].items()} for a in report["attacks"]]

    assert numbers(alone) == numbers(whole)
    with pytest.raises(ValueError, match="shard"):
        run_attacks(tiny_model(13), None, None, train, test, TASK, grid, shard=(2, 2))


# ---------------------------------------------------------------- bad input

def test_unknown_method_optimizer_schedule_or_grid_key_are_clear_errors():
    with pytest.raises(ValueError, match="method: unknown attack method 'finetune'"):
        expand_grid({"methods": ["finetune"], "optimizers": ["adam"]})
    with pytest.raises(ValueError, match="optimizer: unknown name 'adamax'"):
        expand_grid({"methods": ["full"], "optimizers": ["adamax"]})
    with pytest.raises(ValueError, match="schedule"):
        AttackSpec(schedule="warmup")
    with pytest.raises(ValueError, match="grid: unknown key 'learning_rate'"):
        expand_grid({"learning_rate": [0.1]})
    with pytest.raises(ValueError, match="grid preset"):
        expand_grid("huge")
    with pytest.raises(ValueError, match="lr"):
        AttackSpec(lr=0)
    with pytest.raises(TypeError, match="epochs"):
        AttackSpec(epochs=2.5)


def test_labels_the_kept_head_cannot_take_are_a_clear_error(digits):
    train, test = digits
    five_class = tiny_model(14, num_classes=5)
    with pytest.raises(ValueError, match="keeps the model's head.*labels"):
        fine_tune(five_class, AttackSpec(method="full", epochs=1), TASK, train, test)
    # a new head is sized to the restricted labels
    curve = fine_tune(five_class, AttackSpec(method="reinit_head", epochs=1), TASK, train, test)
    assert not curve["diverged"]


class _NoHeadTask(ClassificationTask):
    has_head = False


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_model(15)

    def forward(self, x):
        return 2 * self.body(x)


@pytest.mark.parametrize("method", ["reinit_head", "head_only", "probe"])
def test_head_methods_need_a_head(method, digits):
    train, test = digits
    with pytest.raises(ValueError, match="needs a classifier head"):
        fine_tune(tiny_model(15), AttackSpec(method=method, epochs=1), _NoHeadTask(), train, test)
    with pytest.raises(ValueError, match="output is the model's output"):
        fine_tune(_Scaled(), AttackSpec(method=method, epochs=1), TASK, train, test)


def test_another_architecture_is_a_clear_error(digits, tmp_path):
    train, test = digits
    with pytest.raises(ValueError, match="unprotected: architecture differs"):
        run_attacks(tiny_model(16), SmallCNN(width=8, depth=2), None, train, test, TASK, tiny_grid(), progress=False)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_model(16).state_dict(), str(plain))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit the architecture small_cnn"):
        attack_module.load_model_file(plain, "small_cnn", {"width": 16})
    assert isinstance(attack_module.load_model_file(plain, "small_cnn", {"width": 4, "depth": 2}), SmallCNN)


# ---------------------------------------------------------------- command line

def _parse(argv):
    return add_attack_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_runs_a_grid_from_model_files(tmp_path, capsys):
    spec = {"name": "small_cnn", "kwargs": {"width": 4, "depth": 2}}
    checkpoint.save_model(tmp_path / "protected.safetensors", tiny_model(17), spec)
    checkpoint.save_model(tmp_path / "unprotected.safetensors", tiny_model(18), spec)
    (tmp_path / "grid.yaml").write_text("attack_grid:\n  methods: [full]\n  optimizers: [adam]\n  lrs: [0.01]\n"
                                        "  batch_sizes: [256]\n  epochs: [1]\n")
    args = _parse(["--protected", str(tmp_path / "protected.safetensors"), "--unprotected",
                   str(tmp_path / "unprotected.safetensors"), "--grid", str(tmp_path / "grid.yaml"),
                   "--image-size", "8", "--out", str(tmp_path / "out"), "--no-progress", "--no-plots"])
    assert run_attack_cli(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["restricted"] == "builtin:digits" and len(report["attacks"]) == 1
    assert set(report["attacks"][0]["curves"]) == {"protected", "unprotected", "scratch"}
    # the scratch model is the spec's architecture built from the attack's seed
    torch.manual_seed(0)
    assert report["config"]["models"]["scratch"]["0"] == attack_module.state_fingerprint(SmallCNN(width=4, depth=2))

    bad = _parse(["--protected", str(tmp_path / "protected.safetensors"), "--preset", "nope", "--out", str(tmp_path / "o2")])
    assert run_attack_cli(bad) == 2
    assert "grid preset: unknown preset 'nope'" in capsys.readouterr().err
    assert run_attack_cli(_parse(["--protected", str(tmp_path / "missing.safetensors")])) == 2
    with pytest.raises(ValueError, match="RANK/WORLD"):
        attack_cli._parse_shard("1of2")


def test_cli_reads_a_run_config_and_follows_the_output_directory_rule(tmp_path, capsys, monkeypatch):
    from sophon_ext.config import Config, save_config

    spec = {"name": "small_cnn", "kwargs": {"width": 4, "depth": 2}}
    checkpoint.save_model(tmp_path / "protected.safetensors", tiny_model(20), spec)
    data = {"original": {"name": "digits", "image_size": 8, "limit": 120},
            "restricted": {"name": "digits", "image_size": 8, "limit": 100}}
    config = Config().replace({"model": spec, "data": data,
                               "attack": {"epochs": 1, "attacks": [{"method": "head_only", "optimizer": "sgd", "lr": 0.05}]}})
    save_config(config, tmp_path / "run.yaml")
    out = tmp_path / "out"
    argv = ["--protected", str(tmp_path / "protected.safetensors"), "--config", str(tmp_path / "run.yaml"),
            "--out", str(out), "--no-progress", "--no-plots"]
    assert run_attack_cli(_parse(argv)) == 0
    report = json.loads((out / "report.json").read_text())
    # the config's attack section is the grid; its domains give the restricted data and the original accuracy
    assert [a["method"] for a in report["attacks"]] == ["head_only"] and report["attacks"][0]["optimizer"] == "sgd"
    assert report["config"]["data"]["restricted_train"] == 70 and report["config"]["data"]["original_test"] == 24
    assert report["original_domain"] is not None and report["config"]["sophon"]["data"]["restricted"]["limit"] == 100

    # a fresh run into the same --out is refused; --resume reuses the results; --overwrite trains again
    capsys.readouterr()
    assert run_attack_cli(_parse(argv)) == 2
    assert "holds another run's files (runs/" in capsys.readouterr().err
    trained = []
    real = attack_run.fine_tune
    monkeypatch.setattr(attack_run, "fine_tune", lambda *a, **k: trained.append(1) or real(*a, **k))
    assert run_attack_cli(_parse(argv + ["--resume"])) == 0 and trained == []
    assert run_attack_cli(_parse(argv + ["--overwrite"])) == 0 and len(trained) == 2

    # --set overrides the config; explicit options win over both
    argv = argv[:-4] + ["--out", str(tmp_path / "o2"), "--no-progress", "--no-plots"]
    assert run_attack_cli(_parse(argv + ["--set", "data.restricted.limit=60", "--set", "attack.epochs=2",
                                         "--preset", "quick", "--epochs", "1"])) == 0
    report = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert report["config"]["data"]["restricted_train"] == 42 and all(a["epochs"] == 1 for a in report["attacks"])
    assert len(report["attacks"]) == len(expand_grid({"preset": "quick", "epochs": [1]}))
    with pytest.raises(SystemExit):  # argparse: --mode takes only the tasks that exist
        _parse(argv + ["--mode", "segmentation"])
    assert run_attack_cli(_parse(argv + ["--mode", "generation", "--overwrite"])) == 2
    assert "--mode: generation contradicts mode 'classification'" in capsys.readouterr().err


def test_paper_and_default_presets_are_well_formed():
    for name in GRID_PRESETS:
        assert expand_grid(name)


def test_task_plugin_with_lower_is_better_metric_runs(digits):
    """The harness asks the task for its metric name and direction (generation plugs in the same way)."""
    pytest.importorskip("sophon_ext.tasks.generation.unet")
    from sophon_ext.tasks import make_task
    from sophon_ext.tasks.generation.unet import TinyUNet

    train, test = digits
    task = make_task("generation", num_timesteps=50, num_samples=4, sample_steps=2)
    images = (ArrayDataset(train.x[:32], train.y[:32]), ArrayDataset(test.x[:16], test.y[:16]))

    def unet():
        return TinyUNet(base_channels=8, channel_mults=(1,), attention_resolutions=(), image_size=8, groups=4)

    torch.manual_seed(0)
    report = run_attacks(unet(), None, unet, *images, task, {"methods": ["full", "lora"], "optimizers": ["adam"],
                         "epochs": 1, "batch_sizes": 16}, progress=False, diagnostics=False)
    assert report["metric"] == "denoising_loss" and report["higher_is_better"] is False
    assert all(math.isfinite(a["curves"]["protected"]["metric"][-1]) for a in report["attacks"])
    with pytest.raises(ValueError, match="needs a classifier head"):
        run_attacks(unet(), None, unet, *images, task, {"methods": ["head_only"], "optimizers": ["adam"], "epochs": 1},
                    progress=False, diagnostics=False)


def test_jobs_run_attacks_in_processes_with_the_same_numbers(digits, tmp_path):
    train, test = digits
    grid = tiny_grid(epochs=[1])
    parallel = run_attacks(tiny_model(19), None, None, train, test, TASK, grid, out_dir=tmp_path, jobs=2,
                           progress=False, diagnostics=False, plots=False)
    serial = run_attacks(tiny_model(19), None, None, train, test, TASK, grid, progress=False, diagnostics=False)
    for a, b in zip(parallel["attacks"], serial["attacks"]):
        assert a["name"] == b["name"]
        assert {k: c["metric"] for k, c in a["curves"].items()} == {k: c["metric"] for k, c in b["curves"].items()}
    with pytest.raises(ValueError, match="needs out_dir"):
        run_attacks(tiny_model(19), None, None, train, test, TASK, grid, jobs=2, progress=False)


def test_unknown_attack_field_is_a_clear_error():
    with pytest.raises(ValueError, match=r"grid attacks: unknown attack fields \['learning_rate'\]"):
        expand_grid({"attacks": [{"method": "full", "learning_rate": 0.1}]})
    with pytest.raises(TypeError, match="grid attacks"):
        expand_grid({"attacks": [3]})


def test_lora_fields_of_an_attack_spec():
    specs = expand_grid({"attacks": [{"method": "lora", "rank": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                                     {"method": "lora", "target_modules": "attn.*"}],
                         "optimizers": ["adam"], "lrs": [1e-3], "epochs": [1]})
    lora = [s for s in specs if s.method == "lora"]
    assert [s.name.split("-")[7:10] for s in lora[:1]] == [["r8", "a16", "Tq_proj+v_proj"]]
    assert lora[0].lora_alpha == 16.0 and lora[1].target_modules == "attn.*"
    # at their defaults the lora-only fields stay out of the record (and so of run keys and reports)
    assert set(AttackSpec().to_dict()) == {"method", "optimizer", "lr", "batch_size", "epochs", "weight_decay",
                                           "schedule", "layers", "rank", "seed", "hparams"}
    assert lora[0].to_dict()["target_modules"] == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="target_modules: only the lora method reads them, got method 'full'"):
        AttackSpec(method="full", target_modules=["q_proj"])
    with pytest.raises(ValueError, match="adapter: unknown LoRA adapter 'loralib'"):
        AttackSpec(method="lora", adapter="loralib")
    with pytest.raises(ValueError, match="lora_alpha: must be a positive number"):
        AttackSpec(method="lora", lora_alpha=0)
    with pytest.raises(TypeError, match="target_modules: expected a non-empty list"):
        AttackSpec(method="lora", target_modules=[])
