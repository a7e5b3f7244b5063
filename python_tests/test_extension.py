"""Loading the compiled library: what extension_info reports, and the pure-PyTorch fallback.

The fallback cases run in subprocesses, since the library is loaded once per
process: SOPHON_EXT_DISABLE=1, a package copy without _C.so, and a copy whose
_C.so claims another torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sophon_ext

PACKAGE_DIR = Path(sophon_ext.__file__).resolve().parent
TESTS_DIR = Path(__file__).resolve().parent
COMPILED = sophon_ext.extension_info()["cpu"]

# Runs in a subprocess: imports the package (recording warnings), computes the
# losses and gradients of loss_results(), saves everything to argv[1].
CHILD_SCRIPT = """
import sys, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, sophon_ext
    sys.path.insert(0, sys.argv[2])
    from test_extension import loss_results
    results = loss_results()
    results_again = loss_results()  # a second round of calls must not warn again
messages = [str(w.message) for w in caught if "sophon_ext" in str(w.message)]
torch.save({"info": sophon_ext.extension_info(), "warnings": messages, "results": results}, sys.argv[1])
"""


def loss_results() -> dict[str, torch.Tensor]:
    """Every loss and its gradient on fixed inputs (float64 and float32)."""
    import sophon_ext.functional as SF

    gen = torch.Generator().manual_seed(0)
    out = {}
    for dtype in (torch.float64, torch.float32):
        logits = (torch.randn(16, 7, 3, generator=gen, dtype=torch.float64) * 4).to(dtype)
        target = torch.randint(0, 7, (16, 3), generator=gen)
        target[0, 0] = -100
        weight = torch.rand(7, generator=gen, dtype=torch.float64).to(dtype) + 0.5
        calls = {
            "ice": lambda z: SF.inverse_cross_entropy(z, target, weight, reduction="none"),
            "ice_reference": lambda z: SF.inverse_cross_entropy_reference(z, target, weight),
            "klu": lambda z: SF.kl_uniform(z, reduction="sum"),
            "fused": lambda z: SF.suppression_loss(z, target, 0.5, 2.0, weight),
        }
        for name, call in calls.items():
            z = logits.clone().requires_grad_()
            value = call(z)
            (grad,) = torch.autograd.grad(value.sum(), z)
            out[f"{name}/{dtype}"] = value.detach()
            out[f"{name}/{dtype}/grad"] = grad
    return out


def run_child(tmp_path: Path, python_path: Path, env_extra: dict | None = None) -> dict:
    result_file = tmp_path / "result.pt"
    env = dict(os.environ)
    env.pop("SOPHON_EXT_DISABLE", None)
    env.update(PYTHONPATH=str(python_path), OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT, str(result_file), str(TESTS_DIR)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result_file, weights_only=False)  # our own file


def copy_package(tmp_path: Path, with_library: bool) -> Path:
    root = tmp_path / "site"
    skip = ["__pycache__"] + ([] if with_library else ["_C*.so", "_build_info.json"])
    shutil.copytree(PACKAGE_DIR, root / "sophon_ext", ignore=shutil.ignore_patterns(*skip))
    return root


def test_extension_info_reports_what_was_loaded():
    info = sophon_ext.extension_info()
    assert set(info) == {"cpu", "cuda", "torch", "runtime_torch", "library", "error"}
    assert info["runtime_torch"] == torch.__version__
    if info["cpu"]:
        assert info["error"] is None and info["torch"] == torch.__version__
        assert Path(info["library"]).is_file()
        assert hasattr(torch.ops.sophon_ext, "suppression_loss")
    else:
        assert info["library"] is None and info["cuda"] is False and isinstance(info["error"], str)


@pytest.mark.skipif(not COMPILED, reason="the compiled library is not loaded in this process")
def test_disabled_library_falls_back_to_equal_results(tmp_path):
    child = run_child(tmp_path, PACKAGE_DIR.parent, {"SOPHON_EXT_DISABLE": "1"})
    assert child["info"]["cpu"] is False and "SOPHON_EXT_DISABLE" in child["info"]["error"]
    assert child["warnings"] == []  # disabling on purpose is silent
    compiled = loss_results()
    assert set(child["results"]) == set(compiled)
    for key, expected in compiled.items():
        tol = 1e-12 if "float64" in key else 2e-6
        torch.testing.assert_close(child["results"][key], expected, rtol=tol, atol=tol, msg=key)


def test_missing_library_warns_once_and_works(tmp_path):
    child = run_child(tmp_path, copy_package(tmp_path, with_library=False))
    assert child["info"]["cpu"] is False and "not found" in child["info"]["error"]
    assert len(child["warnings"]) == 1 and "pure-PyTorch reference" in child["warnings"][0]
    for key, value in loss_results().items():  # the fallback agrees with this process
        torch.testing.assert_close(child["results"][key], value, rtol=2e-6, atol=2e-6, msg=key)


@pytest.mark.skipif(not COMPILED, reason="needs the compiled library to copy")
def test_library_built_for_another_torch_is_not_loaded(tmp_path):
    root = copy_package(tmp_path, with_library=True)
    info_file = root / "sophon_ext" / "_build_info.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "torch": "0.0.1"}))
    child = run_child(tmp_path, root)
    assert child["info"]["cpu"] is False and "rebuild" in child["info"]["error"]
    assert len(child["warnings"]) == 1
    assert torch.isfinite(child["results"]["fused/torch.float64"]).all()


def test_every_ops_python_schema_equals_the_registered_one():
    import sophon_ext.ops.losses  # noqa: F401  (defines the loss ops)
    import sophon_ext.ops.multi_step  # noqa: F401  (defines multi_step_update_)
    from sophon_ext import ops

    assert set(ops.PYTHON_SCHEMAS) >= {"suppression_loss", "suppression_loss_backward", "multi_step_update_"}
    # registered = the compiled library's schema (csrc/ops.cpp) when it is loaded
    assert {name: ops.schema_mismatch(name) for name in ops.PYTHON_SCHEMAS} == dict.fromkeys(ops.PYTHON_SCHEMAS)
    schema = ops.PYTHON_SCHEMAS["suppression_loss"]
    assert ops.schema_mismatch("suppression_loss", schema.replace("int ignore_index", "float ignore_index")) is not None
