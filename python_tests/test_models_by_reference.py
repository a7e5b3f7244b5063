"""Models by reference (``package.module:callable``, ``torchvision:NAME``, ``timm:NAME``), plain
state dicts as weights, and model outputs that are mappings or objects holding the logits.

The tiny models used by reference live in this module (``test_models_by_reference:make_net``);
the command-line test runs with this directory on PYTHONPATH so the subprocess imports them.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from sophon_ext import checkpoint as ckpt
from sophon_ext.attack import add_attack_arguments, run_attack_cli
from sophon_ext.attack.cli import _load_model_and_spec
from sophon_ext.cli import main
from sophon_ext.config import Config, ConfigError
from sophon_ext.data import ArrayDataset, domain_splits
from sophon_ext.errors import UserInputError
from sophon_ext.models import (LogitsOutput, ModelOutputError, build_model, data_arguments, is_reference,
                               logits_output, model_from_spec)
from sophon_ext.tasks import ClassificationTask
from sophon_ext.workflow import load_pretrained, model_spec
from test_cli import write_small_domains

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODULE = Path(__file__).stem
NET = f"{MODULE}:make_net"


# ----------------------------------------------------------------------------- the models named by reference


@dataclasses.dataclass
class Output:
    """What a Hugging Face style model returns: an object with ``logits``."""

    logits: torch.Tensor
    features: torch.Tensor | None = None


class TinyNet(nn.Module):
    """conv -> pool -> linear; returns a tensor, a dict or an :class:`Output` by ``output``."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int, output: str, key: str):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(hidden, num_classes)
        self.output, self.key = output, key

    def forward(self, x):
        features = torch.flatten(self.pool(torch.relu(self.conv(x))), 1)
        logits = self.fc(features)
        if self.output == "dict":
            return {self.key: logits, "features": features}
        if self.output == "object":
            return Output(logits, features)
        return logits


def make_net(in_channels: int = 1, num_classes: int = 10, hidden: int = 8, output: str = "tensor",
             key: str = "logits") -> nn.Module:
    return TinyNet(in_channels, num_classes, hidden, output, key)


def make_not_a_module(hidden: int = 8):
    return {"hidden": hidden}


def make_failing(hidden: int = 8):
    raise RuntimeError("no GPU found")


NOT_CALLABLE = 3


class Factory:
    @staticmethod
    def build(hidden: int = 4) -> nn.Module:
        return make_net(hidden=hidden)


def net(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_model(NET, **kwargs)


def images(n: int = 6, channels: int = 1, side: int = 8) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- resolving references


def test_a_module_callable_is_built_with_its_kwargs():
    model = build_model(NET, in_channels=3, num_classes=5, hidden=4)
    assert isinstance(model, TinyNet) and model.fc.out_features == 5 and model.conv.in_channels == 3
    assert is_reference(NET) and not is_reference("small_cnn") and not is_reference("no_colon")
    assert data_arguments(NET) == {"in_channels": "in_channels", "num_classes": "num_classes"}
    assert data_arguments("small_cnn") == {"in_channels": "in_channels", "num_classes": "num_classes"}
    # a class, or an attribute path to a factory
    assert isinstance(build_model(f"{MODULE}:TinyNet", in_channels=1, num_classes=2, hidden=3, output="tensor",
                                  key="logits"), TinyNet)
    assert build_model(f"{MODULE}:Factory.build", hidden=5).conv.out_channels == 5
    assert data_arguments(f"{MODULE}:Factory.build") == {}


def test_the_config_takes_a_reference_and_checks_its_kwargs():
    config = Config().replace({"model": {"name": NET, "kwargs": {"hidden": 4}, "output_key": "scores"}})
    assert config.model.name == NET and config.model.output_key == "scores"
    with pytest.raises(ConfigError, match=r"model.kwargs: .*make_net does not take these arguments.*width"):
        Config().replace({"model": {"name": NET, "kwargs": {"width": 4}}})
    with pytest.raises(ConfigError, match="model.output_key: must be a non-empty string"):
        Config().replace({"model": {"name": NET, "kwargs": {}, "output_key": ""}})


def test_the_spec_fills_channels_and_classes_from_the_data():
    x = torch.randn(40, 3, 8, 8)
    splits = domain_splits(ArrayDataset(x, torch.arange(40) % 6), val=0.1, test=0.2, seed=0)
    config = Config().replace({"model": {"name": NET, "kwargs": {"hidden": 4}}})
    assert model_spec(config, splits, splits) == {"name": NET, "kwargs": {"hidden": 4, "in_channels": 3, "num_classes": 6}}
    keyed = config.replace({"model": {"output_key": "scores"}})
    assert model_spec(keyed, splits, splits)["output_key"] == "scores"
    # the registry's spec is as before: no output key
    assert "output_key" not in model_spec(Config(), splits, splits)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """A stand-in ``torchvision.models`` with torchvision's builder signature."""
    calls = []

    def resnet18(*, weights=None, progress=True, **kwargs):
        calls.append({"weights": weights, **kwargs})
        return TinyNet(3, kwargs.get("num_classes", 1000), 4, "tensor", "logits")

    package = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.resnet18, models.__version__ = resnet18, "0"
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    return calls


def test_torchvision_names_a_builder_of_torchvision_models(fake_torchvision):
    model = build_model("torchvision:resnet18", num_classes=7)
    assert model.fc.out_features == 7 and fake_torchvision == [{"weights": None, "num_classes": 7}]
    # torchvision's builders take num_classes through **kwargs: filled from the data all the same
    assert data_arguments("torchvision:resnet18") == {"num_classes": "num_classes"}
    x = torch.randn(20, 3, 8, 8)
    splits = domain_splits(ArrayDataset(x, torch.arange(20) % 4), val=0.1, test=0.2, seed=0)
    config = Config().replace({"model": {"name": "torchvision:resnet18", "kwargs": {}}})
    assert model_spec(config, splits, splits)["kwargs"] == {"num_classes": 4}
    with pytest.raises(UserInputError, match="module 'torchvision.models' has no attribute 'resnet9000'"):
        build_model("torchvision:resnet9000")


def test_timm_names_a_model_of_timm_create_model(monkeypatch):
    created = []

    def create_model(name, pretrained=False, **kwargs):
        created.append((name, kwargs))
        return TinyNet(kwargs.get("in_chans", 3), kwargs.get("num_classes", 1000), 4, "tensor", "logits")

    timm = types.ModuleType("timm")
    timm.create_model, timm.is_model = create_model, lambda name: name == "vit_tiny"
    monkeypatch.setitem(sys.modules, "timm", timm)
    model = build_model("timm:vit_tiny", in_chans=1, num_classes=3)
    assert created == [("vit_tiny", {"in_chans": 1, "num_classes": 3})] and model.conv.in_channels == 1
    assert data_arguments("timm:vit_tiny") == {"in_channels": "in_chans", "num_classes": "num_classes"}
    with pytest.raises(UserInputError, match="timm has no model 'vit_huge'"):
        build_model("timm:vit_huge")


@pytest.mark.parametrize("hub", ["torchvision", "timm"])
def test_a_missing_model_hub_says_what_to_install(hub, monkeypatch, capsys):
    for name in (hub, f"{hub}.models"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    with pytest.raises(UserInputError, match=f"model.name: {hub}:resnet18 needs {hub}: pip install {hub}$"):
        build_model(f"{hub}:resnet18")
    assert main(["config", "--set", f"model.name={hub}:resnet18", "--set", "model.kwargs={}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sophon config: error: model.name: {hub}:resnet18 needs {hub}: pip install {hub}"]


@pytest.mark.parametrize("name, message", [
    ("no_such_model", "model.name: unknown model 'no_such_model'; choose one of .* or give a reference"),
    ("no_such_pkg_xyz.models:make", "cannot import module 'no_such_pkg_xyz.models' .*no module named 'no_such_pkg_xyz'"),
    (f"{MODULE}:missing_fn", f"module '{MODULE}' has no attribute 'missing_fn'"),
    (f"{MODULE}:NOT_CALLABLE", f"{MODULE}.NOT_CALLABLE is a int, not a callable"),
])
def test_a_bad_reference_is_one_clear_error_naming_it(name, message, capsys):
    with pytest.raises(UserInputError, match=message):
        build_model(name)
    with pytest.raises(ConfigError, match=message):
        Config().replace({"model": {"name": name, "kwargs": {}}})
    assert main(["config", "--set", f"model.name={name}", "--set", "model.kwargs={}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and name in err[0]


def test_a_callable_returning_no_module_or_failing_is_a_clear_error():
    with pytest.raises(UserInputError, match=f"'{MODULE}:make_not_a_module' returned a dict, not a torch.nn.Module"):
        build_model(f"{MODULE}:make_not_a_module")
    with pytest.raises(UserInputError, match=r"make_failing with kwargs \{'hidden': 2\} raised RuntimeError: no GPU"):
        build_model(f"{MODULE}:make_failing", hidden=2)
    with pytest.raises(UserInputError, match="model.kwargs: expected a mapping"):
        model_from_spec({"name": NET, "kwargs": [1]})


# ----------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("output", ["dict", "object"])
def test_a_model_returning_a_mapping_or_an_object_gives_its_logits_everywhere(output):
    plain, wrapped = net(output="tensor"), net(output=output)
    assert list(wrapped.state_dict()) == list(plain.state_dict())  # the adapter renames nothing
    x = images()
    assert torch.equal(wrapped(x), plain(x))
    params = dict(wrapped.named_parameters())
    assert torch.equal(torch.func.functional_call(wrapped, params, (x,)), plain(x))
    batched = torch.func.vmap(lambda p: torch.func.functional_call(wrapped, p, (x,)))(
        {n: torch.stack([p, p]) for n, p in params.items()})
    assert batched.shape == (2, 6, 10)
    task = ClassificationTask()
    y = torch.arange(6) % 10
    task.check_model(wrapped, x, y)
    assert task.evaluate(wrapped, x, y) == task.evaluate(plain, x, y)


def test_every_simulation_path_sees_the_logits():
    from sophon_ext.simulation import simulate
    from sophon_ext.strategies import FineTuneStrategy

    task = ClassificationTask()
    x, y = images(32), torch.arange(32) % 10
    strategies = [FineTuneStrategy(optimizer="sgd", lr=0.1, batch_size=4, steps=2)] * 2

    def run(model, path):
        return simulate(model, strategies, ((x,), y), task.adaptation_loss, task.suppression_loss, query_size=4,
                        path=path, generator=torch.Generator().manual_seed(0))

    for path in ("vmap", "loop", "stacked"):
        expected, got = run(net(output="tensor"), path), run(net(output="dict"), path)
        torch.testing.assert_close(got.query_losses, expected.query_losses)
        assert got.meta_grad.keys() == expected.meta_grad.keys()
    for output in ("dict", "object"):  # the stacked path's trace sees the adapter too
        torch.testing.assert_close(run(net(output=output), "stacked").query_losses,
                                   run(net(output="tensor"), "stacked").query_losses)


@pytest.mark.parametrize("output", ["dict", "object"])
def test_the_adapter_survives_copies_and_pickling(output):
    import copy
    import pickle

    model = net(output=output)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(twin) is type(model) and twin is not model
        assert torch.equal(twin(images()), model(images()))
        assert twin.conv.weight is not model.conv.weight


def test_the_output_key_is_configurable_and_a_wrong_one_is_named():
    model = model_from_spec({"name": NET, "kwargs": {"output": "dict", "key": "scores"}, "output_key": "scores"})
    assert model(images()).shape == (6, 10)
    wrong = build_model(NET, output="dict", key="scores")
    with pytest.raises(ModelOutputError, match=r"without key 'logits' \(its keys: \['scores', 'features'\]\); set model.output_key"):
        wrong(images())
    logits_output(wrong, "scores")  # again on the same model: changes the key, adapts it once
    assert type(wrong).__mro__.count(LogitsOutput) == 1 and isinstance(wrong, TinyNet)
    assert wrong(images()).shape == (6, 10)


def test_a_python_model_returning_a_mapping_is_told_to_use_the_adapter():
    model = make_net(output="dict")
    with pytest.raises(ValueError, match=r"got a dict; .*sophon_ext.models.logits_output"):
        ClassificationTask().check_model(model, images(), torch.zeros(6, dtype=torch.long))
    ClassificationTask().check_model(logits_output(model), images(), torch.zeros(6, dtype=torch.long))


# ----------------------------------------------------------------------------- model files and plain state dicts


def test_a_model_file_records_the_reference_and_rebuilds_it(tmp_path):
    spec = {"name": NET, "kwargs": {"hidden": 4, "output": "dict", "key": "scores"}, "output_key": "scores"}
    model = model_from_spec(spec)
    path = ckpt.save_model(tmp_path / "m.safetensors", model, spec)
    _, read_spec, _ = ckpt.read_model_file(path)
    assert read_spec == spec
    rebuilt = ckpt.load_model(path)
    assert torch.equal(rebuilt(images()), model(images()))


def small_config(tmp_path: Path, **model) -> Config:
    rng = np.random.default_rng(0)
    for side in ("original", "restricted"):
        y = rng.integers(0, 4, size=60)
        np.savez(tmp_path / f"{side}.npz", x=rng.normal(size=(60, 1, 8, 8)).astype(np.float32), y=y)
    return Config().replace({
        "data": {side: {"source": "arrays", "path": str(tmp_path / f"{side}.npz"), "image_size": 8}
                 for side in ("original", "restricted")},
        "model": {"name": NET, "kwargs": {"hidden": 4}, **model}})


def test_pretrain_writes_a_model_file_that_rebuilds_the_reference(tmp_path, capsys):
    config = small_config(tmp_path, kwargs={"hidden": 4, "output": "dict", "key": "scores"}, output_key="scores")
    config = config.replace({"pretrain": {"epochs": 1}})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert main(["pretrain", "--config", str(tmp_path / "config.yaml"), "--out", str(tmp_path / "pre"),
                 "--no-progress"]) == 0
    path = tmp_path / "pre" / "pretrained.safetensors"
    _, spec, _ = ckpt.read_model_file(path)
    assert spec == {"name": NET, "kwargs": {"hidden": 4, "output": "dict", "key": "scores", "in_channels": 1,
                                            "num_classes": 4}, "output_key": "scores"}
    assert ckpt.load_model(path)(images()).shape == (6, 4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
def test_weights_may_be_a_plain_state_dict(suffix, tmp_path):
    source = make_net(in_channels=1, num_classes=4, hidden=4)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))  # no sophon metadata
    else:
        torch.save(source.state_dict(), path)
    config = small_config(tmp_path, weights=str(path))
    model, spec, domains = load_pretrained(config)
    assert spec == {"name": NET, "kwargs": {"hidden": 4, "in_channels": 1, "num_classes": 4}}
    assert domains is not None  # loaded to fill the shapes; reused by the run
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    # the attack command's loader takes the same files with --model
    attacked, _ = _load_model_and_spec(path, NET, {"in_channels": 1, "num_classes": 4, "hidden": 4})
    assert torch.equal(attacked(images()), source(images()))


def test_a_torch_file_that_is_not_a_plain_state_dict_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(make_net(), path)  # a pickled module: weights_only refuses to run its code
    with pytest.raises(ckpt.CheckpointError, match=r"whole_model.pt is not a state dict torch.load\(weights_only=True\) can read"):
        ckpt.read_weights_file(path)
    torch.save({"epoch": 3, "net": make_net().state_dict()}, tmp_path / "nested.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"not a plain state dict: entries \['epoch', 'net'\]"):
        ckpt.read_weights_file(tmp_path / "nested.pth")
    torch.save({"state_dict": make_net().state_dict()}, tmp_path / "lightning.pt")
    assert set(ckpt.read_weights_file(tmp_path / "lightning.pt")[0]) == set(make_net().state_dict())


def test_weights_that_do_not_fit_name_every_kind_of_mismatch(tmp_path):
    state = make_net(in_channels=1, num_classes=4, hidden=4).state_dict()
    state.pop("fc.bias")
    state["conv.weight"] = torch.zeros(4, 1, 5, 5)
    for i in range(7):
        state[f"extra.{i}"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    config = small_config(tmp_path, weights=str(path))
    with pytest.raises(ckpt.CheckpointError) as raised:
        load_pretrained(config)
    message = str(raised.value)
    assert "bad.pt (a plain state dict, loaded into model" in message and "\n" not in message
    assert "missing keys ['fc.bias']" in message
    assert "unexpected keys ['extra.0', 'extra.1', 'extra.2', 'extra.3', 'extra.4'] and 2 more" in message
    assert "conv.weight has shape (4, 1, 5, 5), the model expects (4, 1, 3, 3)" in message


# ----------------------------------------------------------------------------- the attack command


def _attack_args(*argv: str):
    import argparse

    return add_attack_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_attack_cli_reports_wrong_input_in_one_line_and_lets_bugs_through(tmp_path, capsys, monkeypatch):
    path = tmp_path / "w.pth"
    torch.save(make_net(hidden=4).state_dict(), path)  # 10 classes, as the default --restricted
    bad = _attack_args("--protected", str(path), "--model", f"{MODULE}:missing_fn", "--out", str(tmp_path / "a"))
    assert run_attack_cli(bad) == 2
    assert "has no attribute 'missing_fn'" in capsys.readouterr().err
    wrong_size = _attack_args("--protected", str(path), "--model", NET, "--model-kwargs", '{"hidden": 6}')
    assert run_attack_cli(wrong_size) == 2
    assert "shape mismatches: conv.weight has shape (4, 1, 3, 3), the model expects (6, 1, 3, 3)" in capsys.readouterr().err
    grid = tmp_path / "grid.yaml"
    grid.write_text("methods: [full]\noptimizers: [adam]\nlrs: [-1]\n")
    args = _attack_args("--protected", str(path), "--model", NET, "--model-kwargs", '{"hidden": 4}',
                        "--grid", str(grid), "--image-size", "8", "--out", str(tmp_path / "a"))
    assert run_attack_cli(args) == 2
    assert "lr: must be a finite number > 0" in capsys.readouterr().err

    import sophon_ext.attack.cli as attack_module  # run_attack_cli calls run_attacks there

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(attack_module, "run_attacks", broken)
    grid.write_text("methods: [full]\noptimizers: [adam]\nlrs: [0.001]\nepochs: [1]\n")
    with pytest.raises(RuntimeError, match="a bug"):  # a bug is not reported as wrong input
        run_attack_cli(args)


# ----------------------------------------------------------------------------- end to end through the command line


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "sophon_ext", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_protect_resume_and_attack_a_model_given_by_reference(tmp_path):
    """`sophon protect` on a module:callable model from a YAML config (plain .pt weights), a resume of
    it, and `sophon attack` on the result, each in its own process."""
    config_path = Path(write_small_domains(tmp_path)["config"])  # the two tiny .npz domains of test_cli
    config = yaml.safe_load(config_path.read_text())
    config["model"] = {"name": NET, "kwargs": {"hidden": 4, "output": "object"}}
    config["protect"] = {"iterations": 3, "inner_steps": 2, "pool_size": 64, "query_size": 8, "checkpoint_every": 2,
                         "guard": {"every": 2}, "strategies": [{"optimizer": "adam", "batch_size": 8}]}
    config_path.write_text(yaml.safe_dump(config))
    torch.save(make_net(in_channels=1, num_classes=4, hidden=4, output="object").state_dict(), tmp_path / "pre.pt")

    protect = run_cli("protect", "--config", "config.yaml", "--weights", "pre.pt", "--out", "prot", "--no-progress",
                      cwd=tmp_path)
    assert protect.returncode == 0, protect.stderr
    _, spec, _ = ckpt.read_model_file(tmp_path / "prot" / "protected.safetensors")
    assert spec == {"name": NET, "kwargs": {"hidden": 4, "output": "object", "in_channels": 1, "num_classes": 4}}

    resume = run_cli("protect", "--resume", "--out", "prot", "--iterations", "4", "--no-progress", cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    assert "4 iterations" in resume.stdout
    assert len((tmp_path / "prot" / "protect" / "log.jsonl").read_text().splitlines()) == 4

    (tmp_path / "grid.yaml").write_text("methods: [full]\noptimizers: [adam]\nlrs: [0.001]\nbatch_sizes: [32]\n"
                                        "epochs: [1]\n")
    attack = run_cli("attack", "--protected", "prot/protected.safetensors", "--unprotected", "pre.pt",
                     "--model", NET, "--model-kwargs", '{"hidden": 4, "output": "object", "num_classes": 4}',
                     "--restricted", "restricted.npz", "--grid", "grid.yaml", "--image-size", "8", "--out", "att",
                     "--no-plots", "--no-progress", cwd=tmp_path)
    assert attack.returncode == 0, attack.stderr
    report = yaml.safe_load((tmp_path / "att" / "report.json").read_text())
    assert set(report["attacks"][0]["curves"]) == {"protected", "unprotected", "scratch"}
