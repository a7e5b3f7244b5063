"""Checkpoints: exact round trips, atomic replacement, clear errors, no unpickling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from sophon_ext import checkpoint as ckpt
from sophon_ext.models import SmallCNN


def nested_state():
    model = SmallCNN(width=4, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),  # int keys, tuples (betas), 0-dim step tensors
        "iteration": 7,
        "metric": 0.1 + 0.2,  # floats must come back bit-exact
        "flags": [True, None, "text", float("inf")],
        "generator": ckpt.generator_state(torch.Generator().manual_seed(5)),
    }


def assert_same(a, b):
    # state_dict()s are OrderedDicts; they come back as dicts in the same order
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_flatten_round_trip_keeps_types_and_values():
    state = nested_state()
    tensors, skeleton = ckpt.flatten_state(state)
    json.dumps(skeleton)  # the skeleton is plain JSON
    assert "optimizer/state/0/exp_avg" in tensors
    assert_same(ckpt.unflatten_state(json.loads(json.dumps(skeleton)), tensors), state)
    with pytest.raises(TypeError, match="cannot store object"):
        ckpt.flatten_state({"x": object()})
    with pytest.raises(TypeError, match="dict keys must be str or int"):
        ckpt.flatten_state({(1, 2): 3})


def test_save_load_round_trip_and_old_tensor_files_removed(tmp_path):
    state = nested_state()
    ckpt.save_checkpoint(tmp_path, state, {"config": {"a": 1}})
    ckpt.save_checkpoint(tmp_path, state, {"config": {"a": 2}})
    loaded, metadata = ckpt.load_checkpoint(tmp_path)
    assert_same(loaded, state)
    assert metadata == {"config": {"a": 2}}
    assert len(list(tmp_path.glob("tensors-*.safetensors"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_generator_state_round_trip():
    g = torch.Generator().manual_seed(11)
    torch.rand(3, generator=g)
    text = ckpt.generator_state(g)
    expected = torch.rand(4, generator=g)
    h = torch.Generator()
    ckpt.set_generator_state(h, text)
    assert torch.equal(torch.rand(4, generator=h), expected)


def test_missing_and_corrupt_checkpoints_raise_clear_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint.json"):
        ckpt.load_checkpoint(tmp_path / "nothing")
    ckpt.save_checkpoint(tmp_path, nested_state())
    index = json.loads((tmp_path / "checkpoint.json").read_text())
    tensor_file = tmp_path / index["tensor_file"]

    blob = tensor_file.read_bytes()
    tensor_file.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(tmp_path)
    flipped = bytearray(blob)
    flipped[-1] ^= 0xFF  # one bit of one weight
    tensor_file.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(tmp_path)
    tensor_file.unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_checkpoint(tmp_path)

    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ckpt.CheckpointError, match="not a sophon_ext checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({**index, "version": 99}))
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.load_checkpoint(tmp_path)


def test_a_save_that_dies_midway_leaves_the_good_checkpoint(tmp_path, monkeypatch):
    good = nested_state()
    ckpt.save_checkpoint(tmp_path, good, {"n": 1})
    real_replace = ckpt.os.replace

    def dies_on_index(src, dst):
        if str(dst).endswith(ckpt.INDEX_NAME):
            raise OSError("killed while replacing the index")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dies_on_index)
    changed = nested_state()
    changed["iteration"] = 8
    with pytest.raises(OSError, match="killed"):
        ckpt.save_checkpoint(tmp_path, changed, {"n": 2})
    monkeypatch.undo()
    loaded, metadata = ckpt.load_checkpoint(tmp_path)
    assert loaded["iteration"] == 7 and metadata == {"n": 1}
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was cleaned up


def test_loading_never_unpickles(tmp_path):
    class Bomb:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(ckpt.CheckpointError, match="corrupt or not a safetensors file"):
        ckpt.load_model(tmp_path / "model.safetensors")
    ckpt.save_checkpoint(tmp_path / "c", {"x": torch.ones(2)})
    index = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    (tmp_path / "c" / index["tensor_file"]).write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(tmp_path / "c")


def test_model_file_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    spec = {"name": "small_cnn", "kwargs": {"width": 4, "depth": 2, "num_classes": 3}}
    model = SmallCNN(width=4, depth=2, num_classes=3)
    path = ckpt.save_model(tmp_path / "m.safetensors", model, spec, {"acc": 0.5})
    rebuilt = ckpt.load_model(path)
    assert_same(rebuilt.state_dict(), model.state_dict())
    _, read_spec, metadata = ckpt.read_model_file(path)
    assert read_spec == spec and metadata == {"acc": 0.5}
    with pytest.raises(ckpt.CheckpointError, match="does not fit the model"):
        ckpt.load_model(path, SmallCNN(width=8, depth=2, num_classes=3))
    with pytest.raises(ckpt.CheckpointError, match="no file"):
        ckpt.load_model(tmp_path / "absent.safetensors")
    ckpt.save_model(tmp_path / "nospec.safetensors", model)
    with pytest.raises(ckpt.CheckpointError, match="no model spec"):
        ckpt.load_model(tmp_path / "nospec.safetensors")
