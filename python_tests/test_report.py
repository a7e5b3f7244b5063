"""Report numbers (overhead, AUC, gaps) on hand-computed curves, and the files written."""

import csv
import io
import json
import os
from types import SimpleNamespace

import pytest

from sophon_ext.report import (
    Chance, _grid_axes, area_under_curve, atomic_write_json, build_report, curves_csv, epochs_to_reach,
    summarise_attack, summarise_seeds, summary_markdown, write_outputs,
)

ACCURACY = SimpleNamespace(name="classification", metric_name="accuracy", higher_is_better=True)
DENOISING = SimpleNamespace(name="generation", metric_name="denoising_loss", higher_is_better=False)


def curves(protected, scratch, unprotected=None):
    out = {"protected": {"metric": protected}, "scratch": {"metric": scratch}}
    if unprotected is not None:
        out["unprotected"] = {"metric": unprotected}
    for c in out.values():
        c["loss"] = [None if v is None else 1.0 - v for v in c["metric"]]
        c["diverged"] = None in c["metric"]
    return out


def test_epochs_to_reach_and_area_under_curve():
    assert epochs_to_reach([0.1, 0.5, 0.7], 0.5, True) == 1
    assert epochs_to_reach([0.1, 0.5, 0.7], 0.8, True) is None
    assert epochs_to_reach([1.0, 0.6, 0.4], 0.6, False) == 1
    assert epochs_to_reach([0.2, None, 0.9], 0.5, True) == 2
    assert area_under_curve([0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert area_under_curve([0.2, 0.4]) == pytest.approx(0.3)
    assert area_under_curve([0.3, None, None]) == pytest.approx(0.3)  # diverged: no progress from entry 0


def test_summary_higher_is_better_by_hand():
    s = summarise_attack(curves([0.1, 0.2, 0.5, 0.7], [0.1, 0.6, 0.6, 0.6], [0.1, 0.7, 0.8, 0.9]), True)
    # scratch reaches its final 0.6 at epoch 1; protected at epoch 3; unprotected at epoch 1
    assert s["overhead_ratio"] == 3.0
    assert s["overhead_ratios"] == {"protected": 3.0, "scratch": 1.0, "unprotected": 1.0}
    assert s["epochs_to_scratch_final"] == {"protected": 3, "scratch": 1, "unprotected": 1}
    protected_auc = (0.15 + 0.35 + 0.6) / 3
    scratch_auc = (0.35 + 0.6 + 0.6) / 3
    assert s["auc_ratio"] == pytest.approx(protected_auc / scratch_auc)
    assert s["max_gap_vs_scratch"] == pytest.approx(0.1)  # epoch 3: 0.7 - 0.6
    assert s["final"] == {"protected": 0.7, "scratch": 0.6, "unprotected": 0.9}


def test_summary_never_and_no_lead():
    s = summarise_attack(curves([0.1, 0.2, 0.3], [0.1, 0.4, 0.5]), True)
    assert s["overhead_ratio"] == "never"
    assert s["max_gap_vs_scratch"] == pytest.approx(0.0)  # only ever level (epoch 0) or behind


def test_summary_lower_is_better_by_hand():
    s = summarise_attack(curves([1.0, 0.3, 0.35], [1.0, 0.5, 0.4]), False)
    # target 0.4: scratch gets there at epoch 2, protected at epoch 1
    assert s["overhead_ratio"] == pytest.approx(0.5)
    assert s["max_gap_vs_scratch"] == pytest.approx(0.2)
    never = summarise_attack(curves([1.0, 0.9, 0.8], [1.0, 0.5, 0.4]), False)
    assert never["overhead_ratio"] == "never" and never["max_gap_vs_scratch"] == pytest.approx(0.0)
    assert never["auc_ratio"] > 1  # more area under a loss curve: worse for the attacker


def test_summary_with_diverged_protected_run_and_flat_scratch():
    s = summarise_attack(curves([0.1, 0.5, None, None], [0.1, 0.1, 0.1, 0.1]), True)
    # scratch's final equals its start: it "needs" 0 epochs, counted as 1; protected is there at epoch 0
    assert s["overhead_ratio"] == 0.0
    assert s["final"]["protected"] is None
    assert s["max_gap_vs_scratch"] == pytest.approx(0.4)
    assert s["auc_ratio"] == pytest.approx(((0.3 + 0.3 + 0.1) / 3) / 0.1)


def fake_report(task=ACCURACY):
    attacks = []
    for i, (optimizer, lr) in enumerate([("adam", 1e-3), ("adam", 1e-2), ("sgd", 1e-3)]):
        c = curves([0.1, 0.2 + 0.1 * i], [0.1, 0.4], [0.1, 0.8 if i else None])
        attacks.append({"name": f"a{i}", "method": "full" if i < 2 else "head_only", "optimizer": optimizer, "lr": lr,
                        "batch_size": 32, "epochs": 1, "weight_decay": 0.0, "schedule": "constant", "seed": 0,
                        "curves": c, "summary": summarise_attack(c, task.higher_is_better)})
    diagnostics = {"layers": ["a", "b"], "zero_fraction": {"protected": {"original": {"a": 0.1, "b": 0.9},
                                                                          "restricted": {"a": 0.2, "b": 1.0}}}}
    return build_report(task, {"grid": "x"}, attacks, {"protected": 0.9, "unprotected": 0.95}, diagnostics,
                        command="sophon attack --preset x")


def test_report_layout_matches_the_contract():
    report = fake_report()
    assert report["schema_version"] == 1 and report["metric"] == "accuracy" and report["higher_is_better"] is True
    assert set(report) >= {"versions", "config", "original_domain", "attacks", "diagnostics"}
    json.dumps(report, allow_nan=False)


def test_csv_has_one_row_per_attack_start_and_epoch():
    rows = list(csv.DictReader(io.StringIO(curves_csv(fake_report()))))
    assert len(rows) == 3 * 3 * 2
    first = rows[0]
    assert (first["attack"], first["start"], first["epoch"], float(first["accuracy"])) == ("a0", "protected", "0", 0.1)
    diverged = [r for r in rows if r["attack"] == "a0" and r["start"] == "unprotected"]
    assert diverged[1]["accuracy"] == "" and diverged[1]["diverged"] == "1"


def test_markdown_table_rows_are_starting_points_and_columns_attacks():
    text = summary_markdown(fake_report())
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| start |"))
    assert header == "| start | A0 | A1 | A2 |"
    protected_row = next(line for line in lines if line.startswith("| protected |"))
    assert protected_row == "| protected | 0.200 | 0.300 | 0.400 |"
    assert "| unprotected | diverged | 0.800 | 0.800 |" in lines
    assert "never" in text and "sophon attack --preset x" in text
    assert "lower is better" in summary_markdown(fake_report(DENOISING))


def test_heatmap_columns_are_the_fields_that_vary():
    rows, labels = _grid_axes(fake_report()["attacks"])
    assert rows == ["full", "head_only"]
    assert labels == ["adam lr=0.001", "adam lr=0.01", "sgd lr=0.001"]


@pytest.mark.parametrize("task", [ACCURACY, DENOISING])
def test_write_outputs_writes_every_file(task, tmp_path):
    paths = write_outputs(fake_report(task), tmp_path)
    assert set(paths) == {"report", "curves_csv", "summary", "curves_png", "heatmap_png", "diagnostics_png"}
    for path in paths.values():
        assert path.stat().st_size > 0
    assert json.loads(paths["report"].read_text())["metric"] == task.metric_name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files left


def test_atomic_json_refuses_nan_and_leaves_no_partial_file(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "r.json", {"a": float("nan")})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


# ---------------------------------------------------------------- several seeds of one recipe

def seeded(name, seed, protected, scratch, method="full"):
    return {"name": f"{name}-s{seed}", "method": method, "optimizer": "adagrad", "lr": 0.1, "batch_size": 64,
            "epochs": len(protected) - 1, "weight_decay": 0.0, "schedule": "constant", "seed": seed,
            "curves": curves(protected, scratch),
            "summary": summarise_attack(curves(protected, scratch), True, CHANCE)}


CHANCE = Chance(0.1, 0.03)


def test_seeds_of_one_recipe_are_judged_on_mean_and_best_curves_by_hand():
    # scratch lands at chance on seed 0 and at 0.8 on seed 1; the protected model at 0.5 both times
    attacks = [seeded("adagrad", 0, [0.1, 0.5], [0.1, 0.1]), seeded("adagrad", 1, [0.1, 0.5], [0.1, 0.8]),
               seeded("other", 0, [0.1, 0.9], [0.1, 0.2], method="head_only")]  # one seed: not summarised
    [recipe] = summarise_seeds(attacks, True, CHANCE)
    assert recipe["name"] == "adagrad" and recipe["seeds"] == [0, 1] and recipe["seed_escapes"] == 1
    assert recipe["finals"]["protected"] == [0.5, 0.5] and recipe["finals"]["scratch"] == [0.1, 0.8]
    assert recipe["mean_final"]["scratch"] == pytest.approx(0.45) and recipe["best_final"]["scratch"] == 0.8
    # mean: final 0.5 vs 0.45 (+0.05 > 0.02) -> escape; best: 0.5 vs 0.8 -> not
    assert recipe["escape_mean"] is True and recipe["escape_best"] is False


def test_seed_summary_is_lower_is_better_aware_and_counts_diverged_runs_as_no_progress():
    attacks = [seeded("x", 0, [1.0, None], [1.0, 0.5]), seeded("x", 1, [1.0, 0.4], [1.0, 0.6])]
    [recipe] = summarise_seeds(attacks, False)
    assert recipe["finals"]["protected"] == [1.0, 0.4]  # diverged: entry 0
    assert recipe["best_final"] == {"protected": 0.4, "scratch": 0.5}
    assert recipe["escape_best"] is True  # 0.4 is more than 0.02 below 0.5
    assert recipe["mean_final"]["protected"] == pytest.approx(0.7) and recipe["escape_mean"] is False


def test_seed_summary_in_the_markdown_only_when_a_recipe_has_several_seeds():
    assert "## Across seeds" not in summary_markdown(fake_report())
    attacks = [seeded("adagrad", 0, [0.1, 0.5], [0.1, 0.1]), seeded("adagrad", 1, [0.1, 0.5], [0.1, 0.8])]
    report = build_report(ACCURACY, {}, attacks, across_seeds=summarise_seeds(attacks, True, CHANCE))
    text = summary_markdown(report)
    assert "| adagrad | 0 1 | 0.500 0.500 | 0.100 0.800 | 0.500 / 0.450 | 0.500 / 0.800 | 1 of 2 | yes | no |" in text
    assert "**1 of 1 recipes escape on the seeds' mean curves, 0 of 1 best seed against best seed**" in text
