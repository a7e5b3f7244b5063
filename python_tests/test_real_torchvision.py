"""A real torchvision model named in a YAML config, end to end through the command line.

The other reference tests stand torchvision in with a fake module so they run everywhere; this one
needs torchvision itself (skipped where it is absent or does not load beside this torch):
``sophon pretrain``, ``sophon protect`` and its resume, and ``sophon attack`` on a
``torchvision:resnet18`` built with the data's class count, each in its own process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from sophon_ext import checkpoint as ckpt
from test_models_by_reference import run_cli


def _torchvision():
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - absent, or a build whose operators do not load with this torch
        pytest.skip(f"torchvision does not import here: {type(exc).__name__}: {exc}")
    return torchvision


def _write_rgb_domains(directory: Path, classes: int = 3, size: int = 16) -> None:
    """Two tiny three-channel .npz domains of class prototypes plus noise."""
    rng = np.random.default_rng(0)
    for name in ("original", "restricted"):
        prototypes = rng.normal(size=(classes, 3, size, size)).astype(np.float32)
        y = rng.integers(0, classes, size=96)
        x = prototypes[y] + 0.5 * rng.normal(size=(96, 3, size, size)).astype(np.float32)
        np.savez(directory / f"{name}.npz", x=x, y=y)


def test_a_torchvision_resnet_from_a_config_pretrains_protects_resumes_and_is_attacked(tmp_path):
    torchvision = _torchvision()
    _write_rgb_domains(tmp_path)
    config = {
        "data": {side: {"source": "arrays", "path": f"{side}.npz", "image_size": 16} for side in ("original", "restricted")},
        "model": {"name": "torchvision:resnet18", "kwargs": {}},
        "pretrain": {"epochs": 1, "batch_size": 32},
        "protect": {"iterations": 2, "inner_steps": 1, "pool_size": 32, "query_size": 8, "checkpoint_every": 1,
                    "simulate_path": "loop", "guard": {"every": 1, "max_drop": 1.0},
                    "strategies": [{"optimizer": "adam", "batch_size": 8, "method": "reinit_head"}]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))

    pretrain = run_cli("pretrain", "--config", "config.yaml", "--out", "pre", "--no-progress", cwd=tmp_path)
    assert pretrain.returncode == 0, pretrain.stderr
    protect = run_cli("protect", "--config", "config.yaml", "--weights", "pre/pretrained.safetensors", "--out", "prot",
                      "--no-progress", cwd=tmp_path)
    assert protect.returncode == 0, protect.stderr
    _, spec, _ = ckpt.read_model_file(tmp_path / "prot" / "protected.safetensors")
    assert spec["name"] == "torchvision:resnet18" and spec["kwargs"]["num_classes"] == 3
    model = ckpt.load_model(tmp_path / "prot" / "protected.safetensors")  # rebuilt from the recorded reference
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 3

    resume = run_cli("protect", "--resume", "--out", "prot", "--iterations", "3", "--no-progress", cwd=tmp_path)
    assert resume.returncode == 0, resume.stderr
    assert len((tmp_path / "prot" / "protect" / "log.jsonl").read_text().splitlines()) == 3

    (tmp_path / "grid.yaml").write_text("methods: [reinit_head]\noptimizers: [adam]\nlrs: [0.001]\n"
                                        "batch_sizes: [32]\nepochs: [1]\n")
    attack = run_cli("attack", "--protected", "prot/protected.safetensors", "--unprotected", "pre/pretrained.safetensors",
                     "--restricted", "restricted.npz", "--grid", "grid.yaml", "--image-size", "16", "--out", "att",
                     "--no-plots", "--no-progress", cwd=tmp_path)
    assert attack.returncode == 0, attack.stderr
    report = yaml.safe_load((tmp_path / "att" / "report.json").read_text())
    assert set(report["attacks"][0]["curves"]) == {"protected", "unprotected", "scratch"}
