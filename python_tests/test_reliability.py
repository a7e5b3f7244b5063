"""A broken (non-finite) model is never kept or written as protected."""

from __future__ import annotations

import math

import pytest
import torch

from sophon_ext import Sophon
from sophon_ext.engine import ProtectionFailed
from sophon_ext.simulate import simulate

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

    monkeypatch.setattr(sys.modules["sophon_ext.simulate"], "simulate", nan_simulate)  # what the engine calls
    with pytest.raises(ProtectionFailed, match="nothing was written"):
        workflow.run_protect(config, clone(pretrained), None, tmp_path, domains=(original, restricted), progress=False)
    assert not (tmp_path / workflow.PROTECTED_FILE).exists()
