"""A broken (non-finite) model is never kept or written as protected."""

from __future__ import annotations

import math

import pytest
import torch

from sophon_ext import Sophon
from sophon_ext.engine import ProtectionFailed
from sophon_ext.simulation import simulate

from test_engine import clone, domains, pretrained, small_config  # noqa: F401  (fixtures)


def nan_simulate(*args, **kwargs):
    """simulate, with a NaN meta-gradient: the FTS step turns every weight into NaN."""
    result = simulate(*args, **kwargs)
    result.meta_grad = {n: torch.full_like(g, float("nan")) for n, g in result.meta_grad.items()}
    return result


def test_guard_rolls_back_a_nan_model_even_when_its_metric_looks_acceptable(domains, pretrained):  # noqa: F811
    original, restricted = domains
    # max_drop 1.0: any accuracy passes; only the non-finite weights can fail the check
    config = small_config(iterations=4, meta_clip=None, guard={"every": 2, "max_drop": 1.0, "action": "stop"})
    engine = Sophon(clone(pretrained), original, restricted, config, simulate_fn=nan_simulate)
    result = engine.run()
    assert result.stopped and result.stop_reason.startswith("non-finite values") and result.diverged
    assert engine.history[0]["non_finite"] is True
    assert all(torch.isfinite(p).all() for p in engine.model.parameters())  # rolled back to the start
    for a, b in zip(engine.model.parameters(), pretrained.parameters()):
        assert torch.equal(a, b)


def test_a_run_that_ends_non_finite_writes_no_protected_model(domains, pretrained, tmp_path, monkeypatch):  # noqa: F811
    from sophon_ext import workflow
    from sophon_ext.config import Config

    original, restricted = domains
    config = Config.from_dict({**small_config(iterations=2, meta_clip=None, guard={"enabled": False}).to_dict()})
    import sys

    monkeypatch.setattr(sys.modules["sophon_ext.simulation"], "simulate", nan_simulate)  # what the engine calls
    with pytest.raises(ProtectionFailed, match="nothing was written"):
        workflow.run_protect(config, clone(pretrained), None, tmp_path, domains=(original, restricted), progress=False)
    assert not (tmp_path / workflow.PROTECTED_FILE).exists()


# ----------------------------------------------------------------------------- shared small CLI runs

import errno  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from sophon_ext import checkpoint as ckpt  # noqa: E402
from sophon_ext import config as sophon_config  # noqa: E402
from sophon_ext.cli import main  # noqa: E402
from sophon_ext.errors import UserInputError  # noqa: E402

from test_cli import write_small_domains  # noqa: E402


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Tiny .npz domains, their config file and a pre-trained model file (made once)."""
    directory = tmp_path_factory.mktemp("small")
    files = write_small_domains(directory)
    assert main(["pretrain", "--config", files["config"], "--no-progress", "--out", str(directory / "pre")]) == 0
    return {"dir": directory, "config": files["config"], "weights": str(directory / "pre" / "pretrained.safetensors")}


def protect_argv(small_run, out, *extra) -> list[str]:
    return ["protect", "--config", small_run["config"], "--weights", small_run["weights"], "--no-progress",
            "--out", str(out), *extra]


def one_line_error(capsys) -> str:
    """The single stderr line of a refused command."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- item 2: one rule for output directories


def test_a_fresh_run_into_another_runs_directory_is_refused_then_overwritten(small_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(protect_argv(small_run, out)) == 0
    (out / "notes.txt").write_text("mine")  # a user's file next to the run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(protect_argv(small_run, out, "--set", "protect.alpha=5e-3")) == 2
    line = one_line_error(capsys)
    assert str(out) in line and "--resume" in line and "--overwrite" in line and "protect/checkpoint" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched

    assert main(protect_argv(small_run, out, "--set", "protect.alpha=5e-3", "--overwrite")) == 0
    log = [json.loads(line) for line in (out / "protect/log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2] and {r["alpha"] for r in log} == {5e-3}  # the new run only
    _, metadata = ckpt.load_checkpoint(out / "protect/checkpoint")
    assert metadata["config"]["protect"]["alpha"] == 5e-3
    assert (out / "notes.txt").read_text() == "mine"  # not a file the product writes
    assert yaml.safe_load((out / "config.yaml").read_text())["protect"]["alpha"] == 5e-3


def test_pretrain_and_demo_follow_the_same_rule(small_run, tmp_path, capsys):
    out = tmp_path / "pre"
    argv = ["pretrain", "--config", small_run["config"], "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    assert "holds another run's files (pretrained.safetensors)" in one_line_error(capsys)
    assert main([*argv, "--overwrite"]) == 0
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.json").write_text("{}")  # refused before any data is loaded
    assert main(["demo", "--quick", "--no-progress", "--out", str(demo)]) == 2
    assert "report.json" in one_line_error(capsys)


def test_only_config_yaml_does_not_count_as_another_run(small_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    assert main(protect_argv(small_run, out)) == 0


@pytest.mark.parametrize("layout, message", [
    ("out_is_file", "is a file, not a directory"),
    ("protect_is_file", "protect is a file"),
    ("checkpoint_is_file", "protect/checkpoint is a file, but the run writes a directory there"),
    ("model_is_dir", "protected.safetensors is a directory"),
])
def test_output_paths_are_checked_before_any_work(layout, message, small_run, tmp_path, capsys):
    out = tmp_path / "run"
    if layout == "out_is_file":
        out.write_text("x")
    elif layout == "protect_is_file":
        out.mkdir()
        (out / "protect").write_text("x")
    elif layout == "checkpoint_is_file":
        (out / "protect").mkdir(parents=True)
        (out / "protect" / "checkpoint").write_text("x")
    else:
        (out / "protected.safetensors").mkdir(parents=True)
    # an absent model file: the output check must come first, so it is the error shown
    argv = ["protect", "--config", small_run["config"], "--weights", str(tmp_path / "absent.safetensors"),
            "--no-progress", "--out", str(out)]
    assert main(argv) == 2
    line = one_line_error(capsys)
    assert message in line and "--out" in line and "absent.safetensors" not in line


def test_a_read_only_output_directory_is_one_clear_error(small_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
    else:  # root writes anywhere: make the write probe meet what a read-only mount answers
        real_open = open

        def read_only_open(path, *args, **kwargs):
            if Path(path).name.startswith(".sophon-write-test"):
                raise PermissionError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(ckpt, "open", read_only_open, raising=False)
    try:
        assert main(protect_argv(small_run, out)) == 2
        line = one_line_error(capsys)
        assert f"cannot write in {out}" in line
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)


def test_a_failed_fresh_run_leaves_config_yaml_alone(small_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("mine: true\n")
    missing = str(tmp_path / "missing.npz")
    assert main(protect_argv(small_run, out, "--set", f"data.restricted.path={missing}")) == 2
    assert "missing.npz" in one_line_error(capsys)
    assert (out / "config.yaml").read_text() == "mine: true\n"


def test_the_python_api_follows_the_output_directory_rule(domains, pretrained, tmp_path):  # noqa: F811
    from sophon_ext import protect

    original, restricted = domains
    config = small_config(iterations=2)
    first = protect(pretrained, original, restricted, config, out_dir=tmp_path)
    with pytest.raises(ValueError, match=f"out_dir: {tmp_path} holds another run's files .*resume=True.*overwrite=True"):
        protect(pretrained, original, restricted, config, out_dir=tmp_path)
    with pytest.raises(ValueError, match="holds another run's files"):  # the object form too
        Sophon(clone(pretrained), original, restricted, config, out_dir=tmp_path).run()
    assert [json.loads(line)["iteration"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    again = protect(pretrained, original, restricted, config, out_dir=tmp_path, overwrite=True)
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert [json.loads(line)["iteration"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    longer = protect(pretrained, original, restricted, small_config(iterations=4), out_dir=tmp_path, resume=True)
    assert not any(torch.equal(a, b) for a, b in zip(first.parameters(), longer.parameters()))
    assert [json.loads(line)["iteration"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- item 2: user errors vs bugs


def test_an_internal_error_exits_1_with_the_traceback_and_a_bug_report_request(small_run, tmp_path, capsys, monkeypatch):
    from sophon_ext import workflow

    def broken(*args, **kwargs):
        raise ValueError("an index went wrong")  # a plain ValueError from inside: a bug, not the user's input

    monkeypatch.setattr(workflow, "run_pretrain", broken)
    assert main(["pretrain", "--config", small_run["config"], "--no-progress", "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an index went wrong" in err
    assert "internal error" in err and "bug" in err and "report" in err


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def full_disk(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(sophon_config, "atomic_write_bytes", full_disk)  # what `sophon config -o` writes with
    target = tmp_path / "c.yaml"
    assert main(["config", "-o", str(target)]) == 2
    line = one_line_error(capsys)
    assert str(target) in line and "No space left on device" in line


def cpu_only_device() -> str:
    """A CUDA device this machine does not have."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda:0"


@pytest.mark.parametrize("argv, field", [
    (["config", "--seed", str(10**20)], "seed: must be in [0, 4294967295]"),
    (["config", "--set", "seed=100000000000000000000"], "seed: must be in"),
    (["config", "--set", "data.split_seed=-1"], "data.split_seed: must be in"),
    (["config", "--set", "model.kwargs.width=1000000"], "model.kwargs.width: expected an int in [1, 4096]"),
    (["config", "--set", "model.kwargs.width=-4"], "model.kwargs.width: expected an int in [1, 4096]"),
    (["config", "--set", "model.kwargs.width='16'"], "model.kwargs.width: expected an int in [1, 4096], got str '16'"),
    (["config", "--set", "model.kwargs.depth=70", "--set", "model.kwargs.width=4096"], "model.kwargs.depth"),
    (["config", "--set", "model.kwargs.colour=1"], "model.kwargs.colour: not an argument of small_cnn"),
    (["config", "--mode", "generation", "--set", "model.kwargs.image_size=0"], "model.kwargs.image_size"),
    (["config", "--set", "data.original.image_size=0"], "data.original.image_size: must be in [1, 4096]"),
    (["config", "--set", "data.original.image_size=100000"], "data.original.image_size: must be in [1, 4096]"),
    (["config", "--set", "attack.attacks=5"], "attack.attacks: expected a list"),
    (["pretrain", "--quick", "--device", "DEVICE", "--out", "OUT"], "device: DEVICE is not available here"),
])
def test_bad_values_are_one_line_naming_the_field(argv, field, tmp_path, capsys):
    device = cpu_only_device()
    argv = [a.replace("DEVICE", device).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 2
    assert field.replace("DEVICE", device) in one_line_error(capsys)


def test_an_attack_grid_with_a_number_for_attacks_names_attacks():
    from sophon_ext.attack import load_grid

    with pytest.raises(ValueError, match=r"grid attacks: expected a list of attacks .* got int 5"):
        load_grid({"attacks": 5})


# ----------------------------------------------------------------------------- items 6-9: files and data


def test_a_tampered_model_file_is_refused_naming_it(tmp_path):
    from sophon_ext.models import SmallCNN

    path = ckpt.save_model(tmp_path / "m.safetensors", SmallCNN(width=4, depth=2), {"name": "small_cnn", "kwargs": {"width": 4, "depth": 2}})
    ckpt.load_model(path)  # intact: loads
    blob = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(blob[:8], "little")
    rng = np.random.default_rng(0)
    for i in rng.choice(np.arange(data_start, len(blob)), size=100, replace=False):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ckpt.CheckpointError, match=f"model file: {path} is corrupt"):
        ckpt.load_model(path)


def test_a_model_file_with_an_impossible_spec_is_refused_before_building(tmp_path):
    from safetensors.torch import save

    header = {"format": ckpt.MODEL_FORMAT, "version": "1", "spec": json.dumps({"name": "small_cnn", "kwargs": {"width": 10**6}}),
              "metadata": "{}"}
    path = tmp_path / "huge.safetensors"
    path.write_bytes(save({"w": torch.zeros(1)}, metadata=header))
    with pytest.raises(ckpt.CheckpointError, match=r"huge.safetensors: its model spec is invalid: model.kwargs.width"):
        ckpt.load_model(path)


def test_model_specs_are_checked_before_anything_is_allocated():
    from sophon_ext.models import build_model

    for kwargs, field in [({"width": 10**6}, "width"), ({"width": "8"}, "width"), ({"depth": 0}, "depth"),
                          ({"num_classes": -1}, "num_classes"), ({"width": 4096, "depth": 64}, "parameters")]:
        with pytest.raises(UserInputError, match=field):
            build_model("small_cnn", **kwargs)
    for size in (0, 100000, 15):
        with pytest.raises(UserInputError, match="image_size"):
            build_model("tiny_unet", image_size=size)


def test_a_one_dimensional_x_in_an_npz_names_the_file_and_the_shape(small_run, tmp_path, capsys):
    bad = tmp_path / "flat.npz"
    np.savez(bad, x=np.zeros(50, np.float64), y=np.arange(50) % 4)
    assert main(protect_argv(small_run, tmp_path / "run", "--set", f"data.original.path={bad}")) == 2
    line = one_line_error(capsys)
    assert "data.original.path" in line and str(bad) in line and "(N, C, H, W)" in line and "(50,)" in line


def test_a_garbage_image_in_an_image_folder_names_the_file(tmp_path):
    from PIL import Image

    from sophon_ext.config import DatasetConfig
    from sophon_ext.workflow import load_dataset

    for label in ("a", "b"):
        (tmp_path / "folder" / label).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "folder" / label / "0.png")
    garbage = tmp_path / "folder" / "b" / "1.png"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(UserInputError, match=f"{garbage} is not a readable image"):
        load_dataset(DatasetConfig(source="image_folder", path=str(tmp_path / "folder"), image_size=4))


def test_a_limit_that_leaves_the_guard_split_empty_names_the_field(small_run, tmp_path, capsys):
    assert main(protect_argv(small_run, tmp_path / "run", "--set", "data.original.limit=2")) == 2
    line = one_line_error(capsys)
    assert "data.original.limit: 2 samples leave the val split empty" in line and "use at least" in line
    needed = int(line.rsplit("use at least ", 1)[1])
    assert main(protect_argv(small_run, tmp_path / "run2", "--set", f"data.original.limit={needed}")) == 0


@pytest.fixture()
def finished_run(small_run, tmp_path):
    out = tmp_path / "run"
    assert main(protect_argv(small_run, out)) == 0
    return out


def rewrite_index(out: Path, change) -> None:
    index_path = out / "protect/checkpoint/checkpoint.json"
    index = json.loads(index_path.read_text())
    change(index)
    index_path.write_text(json.dumps(index))


def test_resume_from_a_checkpoint_whose_model_spec_changed_is_one_line(finished_run, capsys):
    def wider(index):
        index["metadata"]["model_spec"]["kwargs"]["width"] = 6

    rewrite_index(finished_run, wider)
    capsys.readouterr()
    assert main(["protect", "--resume", "--no-progress", "--out", str(finished_run)]) == 2
    line = one_line_error(capsys)
    assert "checkpoint:" in line and "does not fit the model" in line and "has shape" in line


def test_resume_from_a_checkpoint_without_metadata_is_one_line(finished_run, capsys):
    rewrite_index(finished_run, lambda index: index.pop("metadata"))
    capsys.readouterr()
    assert main(["protect", "--resume", "--no-progress", "--out", str(finished_run)]) == 2
    assert "has no config in its metadata" in one_line_error(capsys)


def test_a_checkpoint_iteration_beyond_its_run_is_refused(finished_run, capsys):
    def far(index):
        index["state"]["__dict__"] = [[k, 10**6 if k == "iteration" else v] for k, v in index["state"]["__dict__"]]
        index["metadata"]["iteration"] = 10**6

    rewrite_index(finished_run, far)
    with pytest.raises(ckpt.CheckpointError, match="iteration 1000000, beyond its run's protect.iterations 2"):
        ckpt.load_checkpoint(finished_run / "protect/checkpoint")
    capsys.readouterr()
    assert main(["protect", "--resume", "--no-progress", "--out", str(finished_run)]) == 2
    assert "altered" in one_line_error(capsys)


@pytest.mark.parametrize("compiled", [True, False], ids=["op", "reference"])
@pytest.mark.parametrize("name, value", [("step", -1.0), ("step", float("nan")), ("lr", float("inf")), ("lr", float("nan"))])
def test_the_fused_update_refuses_values_that_would_write_nan(name, value, compiled):
    from sophon_ext.ops import multi_step as fused

    params, grads = torch.zeros(2, 3), torch.ones(2, 3)
    state1, state2 = torch.zeros(2, 3), torch.zeros(2, 3)
    hps = {k: torch.zeros(2) for k in fused._HP_ARGS}
    hps.update(lr=torch.full((2,), 0.1), beta1=torch.full((2,), 0.9), beta2=torch.full((2,), 0.99), eps=torch.full((2,), 1e-8))
    step = torch.zeros(2)
    (step if name == "step" else hps[name])[1] = value
    update = fused.multi_step_update_op if compiled else fused._reference  # the op answers with the kernel when built
    with pytest.raises(ValueError, match=f"{name} must be finite and >= 0 for every trajectory, got .* at trajectory 1"):
        update(params, grads, state1, state2, step, *(hps[k] for k in fused._HP_ARGS), "adam", False)
    assert torch.equal(params, torch.zeros(2, 3))  # refused before anything was written


def test_config_and_png_writes_are_atomic(tmp_path, monkeypatch):
    from sophon_ext.config import Config, save_config
    from sophon_ext.report import plot_curves
    from sophon_ext.tasks.generation.metrics import save_sample_grid

    config_path, png_path, curves_path = tmp_path / "c.yaml", tmp_path / "g.png", tmp_path / "curves.png"
    save_config(Config(), config_path)
    save_sample_grid(torch.zeros(4, 1, 4, 4), png_path)
    old = {p: p.read_bytes() for p in (config_path, png_path)}

    def dies(fd):  # the machine dies after the bytes are written, before they are durable
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", dies)
    with pytest.raises(OSError):
        save_config(Config().replace({"seed": 5}), config_path)
    with pytest.raises(OSError):
        save_sample_grid(torch.ones(4, 1, 4, 4), png_path)
    report = {"metric": "accuracy", "higher_is_better": True,
              "attacks": [{"name": "a", "method": "full", "optimizer": "adam", "lr": 1e-3, "curves": {"protected": {"metric": [0.1, 0.2]}, "scratch": {"metric": [0.1, 0.3]}}}]}
    with pytest.raises(OSError):
        plot_curves(report, curves_path)
    assert {p: p.read_bytes() for p in old} == old and not curves_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "g.png"]  # no temporary file left


# ----------------------------------------------------------------------------- fuzz: config overrides and loss inputs

import contextlib  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    """Every key path of a config tree, sections included."""
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys += dotted_keys(value, path + ".")
    return keys


def _config_keys() -> list[str]:
    from sophon_ext.config import Config

    keys = dotted_keys(Config().to_dict())
    return sorted(keys + ["protect.nope", "model.kwargs.width", "model.kwargs.depth", "task.suppression",
                          "attack.attacks", "protect.probes.attacks", "unknown", "data.original.x.y"])


def yaml_text(value) -> str:
    """``value`` as YAML text for ``--set KEY=VALUE``."""
    if isinstance(value, float) and value != value:
        return ".nan"
    if value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    return json.dumps(value)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2),
                    st.sampled_from(["adam", "sgd", "full", "auto", "cpu", "cuda:0", "ice", "stop", "generation", ""]))
VALUES = st.one_of(
    SCALARS.map(yaml_text),
    st.lists(SCALARS, max_size=3).map(yaml_text),
    st.dictionaries(st.sampled_from(["lr", "every", "optimizer", "method", "width", "a"]), SCALARS, max_size=2).map(yaml_text),
    st.text(max_size=12),  # raw text: whatever YAML makes of it
)
OVERRIDES = st.lists(st.tuples(st.sampled_from(_config_keys()), VALUES), min_size=1, max_size=3)
ERROR_LINE = re.compile(r"^sophon config: error: (--set|[A-Za-z_][\w]*)([\w.\[\]]*): ")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_fuzz_config_overrides_never_crash_and_name_the_field(overrides):
    argv = ["config"]
    for key, value in overrides:
        argv += ["--set", f"{key}={value}"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code in (0, 2), err.getvalue()
    if code == 0:
        return
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], err.getvalue()
    match = ERROR_LINE.match(lines[0])
    assert match, lines[0]
    named = match.group(1)
    # the field named is one of those set (or a section / sibling field they were checked against)
    assert named == "--set" or named in {key.split(".")[0] for key, _ in overrides}, (lines[0], overrides)


LOSS_ARGUMENTS = ("logits", "target", "weight", "ignore_index", "reduction", "ice_weight", "klu_weight",
                  "label_smoothing", "suppression_loss", "inverse_cross_entropy", "kl_uniform")
EXTREMES = [0.0, 1.0, -1.0, 1e4, -1e4, 1e16, -1e16, 1e37, -1e37, 3e38, float("inf"), float("-inf"), float("nan")]


@st.composite
def loss_inputs(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64]))
    n, c = draw(st.integers(0, 4)), draw(st.integers(1, 5))
    shape = draw(st.sampled_from([(n, c), (n, c, 2), (c,), (n,)]))
    values = draw(st.lists(st.one_of(st.sampled_from(EXTREMES), st.floats(-50, 50)), min_size=1, max_size=1))
    logits = torch.randn(shape, dtype=torch.float64) * draw(st.sampled_from([1.0, 1e3, 1e20]))
    if logits.numel():
        logits.view(-1)[0] = values[0]
    logits = logits.to(dtype)
    target_kind = draw(st.sampled_from(["int", "int_out_of_range", "float_probs", "bool", "wrong_shape"]))
    rows = shape[:1] + shape[2:] if len(shape) >= 2 else shape[:0]
    if target_kind == "int":
        target = torch.randint(0, c, rows)
    elif target_kind == "int_out_of_range":
        target = torch.full(rows, draw(st.sampled_from([-1, c, 10**6, -100])), dtype=torch.long)
    elif target_kind == "float_probs":
        target = torch.softmax(torch.randn(shape, dtype=torch.float64), dim=1 if len(shape) > 1 else 0).to(
            torch.float64 if dtype == torch.int64 else dtype)
    elif target_kind == "bool":
        target = torch.zeros(rows, dtype=torch.bool)
    else:
        target = torch.zeros((n + 1,), dtype=torch.long)
    weight = draw(st.sampled_from([None, "ones", "negative", "wrong_size", "nan"]))
    weight = {None: None, "ones": torch.ones(c), "negative": -torch.ones(c), "wrong_size": torch.ones(c + 1),
              "nan": torch.full((c,), float("nan"))}[weight]
    if isinstance(weight, torch.Tensor) and dtype in (torch.float32, torch.float64):
        weight = weight.to(dtype)
    ignore_index = draw(st.sampled_from([-100, 0, 1, 1.5, True, "0", None]))
    reduction = draw(st.sampled_from(["mean", "sum", "none", "avg"]))
    return logits, target, weight, ignore_index, reduction


@settings(max_examples=100, deadline=None)
@given(loss_inputs(), st.sampled_from(["suppression_loss", "inverse_cross_entropy", "kl_uniform"]))
def test_fuzz_loss_inputs_give_a_loss_or_one_line_naming_the_argument(inputs, name):
    from sophon_ext import functional

    logits, target, weight, ignore_index, reduction = inputs
    loss_fn = getattr(functional, name)
    try:
        loss = loss_fn(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    except (ValueError, TypeError, IndexError) as exc:  # IndexError: a class index out of range, as in torch
        message = str(exc)
        assert "\n" not in message, message
        named = re.match(r"^(?:sophon_ext::\w+: )?'?(\w+)", message)
        assert named and named.group(1) in LOSS_ARGUMENTS, message
        return
    assert isinstance(loss, torch.Tensor)
    finite_input = (logits.dtype in (torch.float32, torch.float64) and logits.numel() > 0
                    and bool(torch.isfinite(logits).all()) and float(logits.abs().max()) < 1e30)
    clean_weight = weight is None or bool((weight >= 0).all() and (weight > 0).any())
    counted = (target.dtype == torch.long and target.numel() > 0 and bool((target >= 0).all())
               and not bool((target == ignore_index).any()))
    if finite_input and clean_weight and counted:
        assert bool(torch.isfinite(loss).all()), (name, logits, target, weight, ignore_index, reduction, loss)


# ----------------------------------------------------------------------------- fault: kill -9, then --resume

import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from test_cli import ROOT  # noqa: E402

FAULT_ITERATIONS = 30
KILLS = 10  # each costs a process start (a few seconds)


def start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "sophon_ext", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_iterations(out: Path) -> int:
    try:
        return (out / "protect/log.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def writing_checkpoint(out: Path) -> bool:
    """True while a checkpoint save has a temporary file open."""
    directory = out / "protect/checkpoint"
    return directory.is_dir() and any(p.name.endswith(".tmp") for p in directory.iterdir())


def kill_when(proc: subprocess.Popen, out: Path, point: tuple[str, float]) -> bool:
    """SIGKILL ``proc`` at ``point``: ("iterations", k) once k lines are logged, ("checkpoint", _) while
    a checkpoint is being written, ("seconds", s) after s seconds. False when it finished first."""
    kind, value = point
    started = time.perf_counter()
    while proc.poll() is None:
        if ((kind == "iterations" and logged_iterations(out) >= value)
                or (kind == "checkpoint" and writing_checkpoint(out))
                or (kind == "seconds" and time.perf_counter() - started >= value)
                or time.perf_counter() - started > 60):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    return False


def model_tensors(path: Path) -> dict:
    tensors, _, _ = ckpt.read_model_file(path)
    return tensors


def log_without_timings(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "protect/log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_equals_an_uninterrupted_run(small_run, tmp_path):
    config = yaml.safe_load(Path(small_run["config"]).read_text())
    config["protect"].update(iterations=FAULT_ITERATIONS, checkpoint_every=3)
    config_path = tmp_path / "fault.yaml"
    config_path.write_text(yaml.safe_dump(config))
    fresh = ["protect", "--config", str(config_path), "--weights", small_run["weights"], "--no-progress"]

    reference = tmp_path / "reference"
    proc = start_cli(*fresh, "--out", str(reference))
    assert proc.wait() == 0, proc.stderr.read()

    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    points = [("checkpoint", 0), ("iterations", 1)] + [
        rng.choice([("iterations", rng.randint(1, FAULT_ITERATIONS - 1)), ("seconds", rng.uniform(0.0, 4.0))])
        for _ in range(KILLS - 2)]
    out = tmp_path / "killed"

    def restart() -> subprocess.Popen:
        # continue from the checkpoint; a run killed before its first one starts over
        resumable = ckpt.has_checkpoint(out / "protect/checkpoint")
        argv = ["protect", "--resume", "--no-progress"] if resumable else [*fresh, "--overwrite"]
        return start_cli(*argv, "--out", str(out))

    kills, finished = [], False
    for point in points:
        proc = restart()
        if not kill_when(proc, out, point):
            assert proc.returncode == 0, (seed, point, proc.stderr.read())
            finished = True
            break
        kills.append((point, logged_iterations(out), writing_checkpoint(out)))
    if not finished:
        proc = restart()
        assert proc.wait() == 0, (seed, kills, proc.stderr.read())

    assert kills, "no kill landed before the run finished"
    want, got = model_tensors(reference / "protected.safetensors"), model_tensors(out / "protected.safetensors")
    assert set(want) == set(got)
    for name in want:
        assert torch.equal(want[name], got[name]), (seed, kills, name)
    assert log_without_timings(out) == log_without_timings(reference), (seed, kills)
