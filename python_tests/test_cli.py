"""The `sophon` command: smoke runs through a subprocess, options and errors in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sophon_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if (ROOT / "sophon_ext").is_dir() and Path.cwd() == ROOT:
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "sophon_ext", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = run_cli("demo", "--quick", "--no-progress", "--out", str(out))
    return out, proc


def test_demo_quick_writes_report_models_and_log(quick_demo):
    out, proc = quick_demo
    assert proc.returncode == 0, proc.stderr
    assert "protection check:" in proc.stdout and "original-domain accuracy" in proc.stdout
    assert f"sophon demo: outputs in {out}/" in proc.stdout  # the user is told where to look
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["task"] == "classification" and report["metric"] == "accuracy"
    attack = report["attacks"][0]
    assert set(attack["curves"]) == {"protected", "unprotected", "scratch"}
    assert len(attack["curves"]["protected"]["metric"]) == attack["epochs"] + 1
    assert {"protected", "unprotected", "scratch"} <= set(report["original_domain"])
    assert report["protection"]["iterations"] == 3 and "checks" in report and "timings" in report
    for name in ("curves.png", "pretrained.safetensors", "protected.safetensors", "config.yaml", "protect/log.jsonl"):
        assert (out / name).is_file(), name
    assert len((out / "protect/log.jsonl").read_text().splitlines()) == 3


def write_small_domains(directory: Path) -> dict:
    """Two tiny synthetic .npz domains and a config using them (no built-in data to load)."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name in ("original", "restricted"):
        prototypes = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 4, size=200)
        np.savez(directory / f"{name}.npz", x=prototypes[y] + rng.normal(size=(200, 1, 8, 8)).astype(np.float32), y=y)
    config = {
        "data": {side: {"source": "arrays", "path": str(directory / f"{side}.npz"), "image_size": 8}
                 for side in ("original", "restricted")},
        "model": {"kwargs": {"width": 4, "depth": 2}},
        "pretrain": {"epochs": 1},
        "protect": {"iterations": 2, "inner_steps": 2, "pool_size": 64, "query_size": 8, "checkpoint_every": 1,
                    "simulate_path": "loop", "strategies": [{"optimizer": "adam", "batch_size": 8},
                                                            {"optimizer": "sgd", "batch_size": 8, "method": "reinit_head"}]},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"config": str(path)}


def test_pretrain_protect_then_resume_through_the_cli(tmp_path, capsys):
    files = write_small_domains(tmp_path)
    assert main(["pretrain", "--config", files["config"], "--no-progress", "--out", str(tmp_path / "pre")]) == 0
    assert "sophon pretrain: test accuracy" in capsys.readouterr().out
    out = tmp_path / "prot"
    assert main(["protect", "--config", files["config"], "--no-progress", "--out", str(out),
                 "--weights", str(tmp_path / "pre" / "pretrained.safetensors")]) == 0
    assert "2 iterations" in capsys.readouterr().out
    proc = run_cli("protect", "--resume", "--no-progress", "--out", str(out), "--iterations", "4")
    assert proc.returncode == 0, proc.stderr
    assert "4 iterations" in proc.stdout
    log = [json.loads(line) for line in (out / "protect/log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3, 4]
    assert (out / "protected.safetensors").is_file()


def test_help_of_every_command(capsys):
    for command in ([], ["demo"], ["pretrain"], ["protect"], ["attack"], ["config"]):
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "usage: sophon" in text
    proc = run_cli("--help", timeout=120)
    assert proc.returncode == 0 and "demo" in proc.stdout and "protect" in proc.stdout


def test_config_command_prints_and_writes(capsys, tmp_path):
    assert main(["config", "--set", "protect.alpha=2e-3", "--seed", "9"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["protect"]["alpha"] == 2e-3 and printed["seed"] == 9
    assert main(["config", "--output", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["mode"] == "classification"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["config", "--set", "protect.alpha=-1"], "protect.alpha: must be > 0"),
        (["config", "--set", "protect.nope=1"], "protect.nope: unknown key"),
        (["config", "--config", "absent.yaml"], "no file"),
        (["protect", "--no-progress"], "model.weights: protect needs a pre-trained model"),
        (["protect", "--resume", "--out", "nowhere"], "nothing to resume"),
        (["protect", "--weights", "absent.safetensors"], "model file: no file"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_corrupt_checkpoint_is_reported_and_kept(tmp_path, capsys):
    from sophon_ext import checkpoint as ckpt

    directory = tmp_path / "protect" / "checkpoint"
    ckpt.save_checkpoint(directory, {"x": ckpt.torch.ones(3)}, {"config": {}})
    index = json.loads((directory / "checkpoint.json").read_text())
    tensor_file = directory / index["tensor_file"]
    tensor_file.write_bytes(tensor_file.read_bytes()[:-4])
    before = tensor_file.read_bytes()
    assert main(["protect", "--resume", "--out", str(tmp_path)]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert tensor_file.read_bytes() == before  # nothing overwrote it


def curves(protected, unprotected, scratch):
    return {"protected": {"metric": protected}, "unprotected": {"metric": unprotected}, "scratch": {"metric": scratch}}


def fake_report(protected_curve, original_protected=0.95):
    from sophon_ext.report import summarise_attack

    c = curves(protected_curve, [0.3, 0.8, 0.9], [0.1, 0.4, 0.8])
    return {"higher_is_better": True, "original_domain": {"protected": original_protected, "unprotected": 0.96},
            "attacks": [{"name": "a", "summary": summarise_attack(c, True)}]}


def test_check_criteria_uses_the_escape_rule():
    from sophon_ext.workflow import check_criteria

    good = check_criteria(fake_report([0.1, 0.2, 0.5]))
    assert good["protected_passes"] and good["meaningful"] and good["original_intact"]
    final_ahead = check_criteria(fake_report([0.1, 0.5, 0.83]))  # ends 3 points above scratch
    assert final_ahead["attacks"]["a"]["escape"] and not final_ahead["protected_passes"]
    more_area = check_criteria(fake_report([0.1, 0.5, 0.8]))  # same end, 5 points more area
    assert more_area["attacks"]["a"]["escape"] and not more_area["protected_passes"]
    within = check_criteria(fake_report([0.1, 0.41, 0.81]))  # 1 point ahead: within both margins
    assert not within["attacks"]["a"]["escape"] and within["protected_passes"]
    assert abs(within["attacks"]["a"]["max_gap_vs_scratch"] - 0.01) < 1e-9
    broken = check_criteria(fake_report([0.1, 0.2, 0.5], original_protected=0.9))
    assert not broken["original_intact"] and not broken["protected_passes"]
    report = fake_report([0.1, 0.2, 0.5], original_protected=0.889)
    report["original_domain"]["unprotected"] = 0.919  # 3.0 points, 0.030000000000000027 in floats
    assert 0.919 - 0.889 > 0.03 and check_criteria(report)["original_intact"]


def test_escape_rule_margins_and_ties_at_chance():
    from sophon_ext.data import ArrayDataset
    from sophon_ext.report import Chance, chance_level, escapes
    from sophon_ext.tasks import ClassificationTask

    chance = Chance(0.1, 0.02)
    scratch = [0.1, 0.1, 0.1]
    near_chance = [0.1, 0.12, 0.12]  # final +0.02 (not more), area +0.015: ahead by area
    assert escapes(near_chance, scratch, True)
    assert not escapes(near_chance, scratch, True, chance=chance)  # a tie at chance is not an escape
    assert escapes([0.1, 0.2, 0.2], scratch, True, chance=chance)  # clearly above chance
    assert escapes([0.1, 0.1, 0.13], scratch, True, chance=chance)  # outside this band
    assert not escapes([0.1, 0.1, 0.13], scratch, True, chance=Chance(0.1, 0.0317))  # inside a wider one
    assert not escapes([0.1, 0.1, 0.121], [0.1, 0.1, 0.1 + 0.001], True)
    # lower is better (a loss): the protected model escapes by being lower
    assert escapes([1.0, 0.5, 0.4], [1.0, 0.6, 0.5], False) and not escapes([1.0, 0.7, 0.6], [1.0, 0.6, 0.5], False)
    assert not escapes([0.1, None, None], [0.1, 0.1, 0.1], True)  # diverged: no progress from entry 0
    # the band: two binomial standard errors of 1/C over the test set, at least 0.02
    small = chance_level(ClassificationTask(), ArrayDataset(torch.zeros(359, 1), torch.arange(359) % 10))
    assert small.level == 0.1 and abs(small.band - 2 * (0.1 * 0.9 / 359) ** 0.5) < 1e-12
    large = chance_level(ClassificationTask(), ArrayDataset(torch.zeros(100000, 1), torch.arange(100000) % 10))
    assert large.band == 0.02


def test_user_data_sources(tmp_path):
    import numpy as np
    from PIL import Image

    from sophon_ext.config import DatasetConfig
    from sophon_ext.workflow import load_dataset

    for label in ("cat", "dog"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((5, 7, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "folder" / label / f"{i}.png")
    data = load_dataset(DatasetConfig(source="image_folder", path=str(tmp_path / "folder"), image_size=4))
    assert data.x.shape == (6, 3, 4, 4) and data.y.tolist() == [0, 0, 0, 1, 1, 1]
    np.savez(tmp_path / "a.npz", x=np.zeros((5, 1, 4, 4), np.float32), y=np.arange(5))
    data = load_dataset(DatasetConfig(source="arrays", path=str(tmp_path / "a.npz"), limit=3))
    assert data.x.shape == (3, 1, 4, 4)
    with pytest.raises(FileNotFoundError, match="not an .npz file"):
        load_dataset(DatasetConfig(source="arrays", path=str(tmp_path / "missing.npz")))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset(DatasetConfig(source="image_folder", path=str(tmp_path / "nowhere")))


def test_resume_refuses_options_that_contradict_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--quick", "--no-progress", "--out", str(tmp_path / "pre")]) == 0
    weights = str(tmp_path / "pre" / "pretrained.safetensors")
    assert main(["protect", "--quick", "--no-progress", "--weights", weights, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["protect", "--resume", "--no-progress", "--out", str(out), "--set", "protect.alpha=0.5", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "protect.alpha" in err and "seed" in err and "--resume" in err
    # options that agree with the checkpoint, and --iterations, are fine
    assert main(["protect", "--resume", "--no-progress", "--out", str(out), "--seed", "0", "--iterations", "4"]) == 0
