"""The config: round trips through YAML/JSON, and every error names its field."""

from __future__ import annotations

import pytest

from sophon_ext.cli import overrides_from_sets
from sophon_ext.config import Config, ConfigError, ConfigTypeError, ProtectConfig, load_config, save_config


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip(tmp_path, suffix):
    config = Config().replace({"seed": 4, "protect": {"alpha": 2.5e-3, "strategies": [{"optimizer": "adamw", "lr": 1e-4,
                                                                                        "method": "freeze_first", "layers": ["features.0"]}]},
                               "task": {"suppression": "klu"}})
    path = tmp_path / f"c{suffix}"
    save_config(config, path)
    assert load_config(path) == config
    assert Config.from_dict(config.to_dict()) == config


def test_partial_files_keep_defaults_and_yaml_floats_parse(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("protect:\n  alpha: 3e-3\n  guard:\n    floor: 0.9\n")  # YAML 1.1 reads 3e-3 as a string
    config = load_config(path)
    assert config.protect.alpha == 3e-3 and config.protect.guard.floor == 0.9
    assert config.protect.beta == ProtectConfig().beta
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()


@pytest.mark.parametrize(
    "overrides, error, field",
    [
        ({"protect": {"alhpa": 1e-3}}, ConfigError, "protect.alhpa: unknown key"),
        ({"bogus": 1}, ConfigError, "bogus: unknown key"),
        ({"protect": {"iterations": "many"}}, ConfigTypeError, "protect.iterations: expected int"),
        ({"protect": {"iterations": 2.0}}, ConfigTypeError, "protect.iterations: expected int"),
        ({"seed": True}, ConfigTypeError, "seed: expected int"),
        ({"protect": {"alpha": "fast"}}, ConfigTypeError, "protect.alpha: expected float"),
        ({"protect": {"alpha": -1.0}}, ConfigError, "protect.alpha: must be > 0"),
        ({"protect": {"alpha": float("nan")}}, ConfigError, "protect.alpha: must be finite"),
        ({"protect": {"iterations": 0}}, ConfigError, "protect.iterations: must be >= 1"),
        ({"protect": {"order": "third"}}, ConfigError, "protect.order: must be one of"),
        ({"protect": {"strategies": []}}, ConfigError, "protect.strategies: must list at least one"),
        ({"protect": {"strategies": [{"method": "reinit_layers", "layers": 0}]}}, ConfigError, r"protect.strategies\[0\].layers: must be >= 1"),
        ({"protect": {"strategies": [{"method": "lora"}]}}, ConfigError, r"protect.strategies\[0\].method: unknown method 'lora'"),
        ({"protect": {"strategies": [{"optimizer": "sgdd"}]}}, ConfigError, r"protect.strategies\[0\].optimizer: unknown optimizer"),
        ({"protect": {"strategies": "adam"}}, ConfigTypeError, "protect.strategies: expected FamilyConfig or list"),
        ({"protect": {"pool_size": 8}}, ConfigError, "protect.pool_size: must be >= the largest strategy batch_size"),
        ({"protect": {"guard": {"lr_factor": 2.0}}}, ConfigError, r"protect.guard.lr_factor: must be in \(0, 1\)"),
        ({"protect": {"guard": {"action": "panic"}}}, ConfigError, "protect.guard.action: must be one of"),
        ({"protect": {"guard": 3}}, ConfigTypeError, "protect.guard: expected a mapping"),
        ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, ConfigError, "data.val_fraction"),
        ({"data": {"original": {"name": "cifar"}}}, ConfigError, "data.original.name: unknown built-in dataset"),
        ({"data": {"restricted": {"source": "image_folder"}}}, ConfigError, "data.restricted.path: is required"),
        ({"model": {"name": "resnet9000"}}, ConfigError, "model.name: unknown model"),
        ({"task": {"suppression": "ice++"}}, ConfigError, "task.suppression: unknown loss"),
        ({"task": {"temperature": 2}}, ConfigTypeError, "task: .*temperature"),
        ({"mode": "segmentation"}, ConfigError, "mode: unknown mode .segmentation.; choose one of"),
        ({"device": "tpu9"}, ConfigError, "device:"),
        ({"attack": {"attacks": [{"method": "melt"}]}}, ConfigError, r"attack.attacks\[0\].method"),
        ({"attack": {"attacks": [{"method": "full", "epochs": 3}]}}, ConfigError, r"attack.attacks\[0\].epochs: is set for all"),
        ({"pretrain": {"optimizer": "adamm"}}, ConfigError, "pretrain.optimizer: unknown optimizer"),
    ],
)
def test_errors_name_the_field(overrides, error, field):
    with pytest.raises(error, match=field):
        Config().replace(overrides)


def test_errors_are_value_and_type_errors():
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigTypeError, TypeError)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("protect: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ConfigError, match="must end in"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigTypeError, match="config: expected a mapping"):
        load_config(tmp_path / "list.json")


def test_set_overrides():
    assert overrides_from_sets(["protect.alpha=3e-3", "protect.guard.floor=0.9", "task.suppression=none",
                                "protect.strategies=[{optimizer: adam}]"]) == {
        "protect": {"alpha": "3e-3", "guard": {"floor": 0.9}, "strategies": [{"optimizer": "adam"}]},
        "task": {"suppression": "none"},
    }
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        overrides_from_sets(["protect.alpha"])
    config = Config().replace(overrides_from_sets(["protect.alpha=3e-3"]))
    assert config.protect.alpha == 3e-3


def test_validate_rechecks_attribute_edits():
    config = Config()
    config.protect.alpha = 0.0
    with pytest.raises(ConfigError, match="protect.alpha"):
        config.validate()


def test_a_registered_task_is_a_mode_everywhere(tmp_path):
    import argparse

    from sophon_ext import tasks
    from sophon_ext.attack import add_attack_arguments
    from sophon_ext.cli import _default_config, build_parser
    from sophon_ext.tasks import ClassificationTask, default_config_overrides, make_task, register_task, task_names

    class Doubled(ClassificationTask):
        """A task plug-in of a user: classification with the suppression weights doubled."""

    assert task_names() == ("classification", "generation")
    with pytest.raises(ConfigError, match="mode: unknown mode 'doubled'; choose one of \\['classification', 'generation'\\]"):
        Config().replace({"mode": "doubled"})
    register_task("doubled", Doubled, {"pretrain": {"epochs": 2}})
    try:
        assert isinstance(make_task("doubled"), Doubled) and "doubled" in task_names()
        config = _default_config("doubled")
        assert config.mode == "doubled" and config.pretrain.epochs == 2 and Config().pretrain.epochs != 2
        assert build_parser().parse_args(["config", "--mode", "doubled"]).mode == "doubled"
        assert add_attack_arguments(argparse.ArgumentParser()).parse_args(["--protected", "p", "--mode", "doubled"]).mode == "doubled"
    finally:
        del tasks._TASKS["doubled"]
    # generation's defaults come from its module, imported only when asked for
    assert default_config_overrides("generation")["model"]["name"] == "tiny_unet"
    assert default_config_overrides("classification") == {}
    with pytest.raises(ValueError, match="mode: unknown mode 'nope'"):
        make_task("nope")


def test_config_is_a_leaf_of_the_package():
    # config.py and what it imports from the package may import no other package module, at any depth
    # of the file (a function-level import counts too): names are checked through config_checks.
    import ast
    from pathlib import Path

    import sophon_ext

    root = Path(sophon_ext.__file__).parent
    allowed = {"errors", "references", "atomic"}

    def package_imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                found.add((node.module or "").split(".")[0] or "(package)")
        return found

    assert package_imports("config") <= allowed
    for leaf in allowed:
        assert package_imports(leaf) <= {"errors"}, leaf
