"""scripts/red_team.py, end to end: the red team is how the docs measure held-out attacks, so the
script must run at HEAD. One attack, one epoch and a tiny model keep it short."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sophon_ext.checkpoint import save_model
from sophon_ext.models import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def red_team():
    spec = importlib.util.spec_from_file_location("red_team", ROOT / "scripts" / "red_team.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_red_team_run_writes_its_report(red_team, tmp_path):
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=4, depth=2)
    spec = {"name": "small_cnn", "kwargs": {"in_channels": 1, "num_classes": 10, "width": 4, "depth": 2}}
    save_model(tmp_path / "p.safetensors", model, spec=spec)
    save_model(tmp_path / "u.safetensors", model, spec=spec)
    code = red_team.main(["--protected", str(tmp_path / "p.safetensors"), "--unprotected", str(tmp_path / "u.safetensors"),
                          "--out", str(tmp_path / "out"), "--only", "redo:redo + adam", "--epochs", "1", "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "red_team.json").read_text())
    assert [row["name"] for row in report["rows"]] == ["redo:redo + adam 1e-3"]
    assert len(report["attacks"]["redo:redo + adam 1e-3"]["curves"]["protected"]["0"]["metric"]) == 2
    assert (tmp_path / "out" / "red_team.md").exists()
