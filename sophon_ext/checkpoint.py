"""Checkpoints that survive a kill: tensors in safetensors, everything else in JSON.

A checkpoint directory holds ``checkpoint.json`` and the tensor file it names.
Saving writes a new, uniquely named tensor file (temp file, fsync, rename),
then replaces ``checkpoint.json`` the same way; the JSON carries the tensor
file's SHA-256. So at every instant ``checkpoint.json`` names a complete tensor
file, and a crash mid-save leaves the previous checkpoint intact. Loading
checks the format, the hash and every tensor key, and never unpickles: JSON is
parsed with :mod:`json`, tensors with :mod:`safetensors`.

Any nested state (model and optimizer ``state_dict``s, RNG states, counters)
goes through :func:`flatten_state`: tensors are pulled out under path-like
keys (``"model/head.weight"``, ``"fts_optimizer/state/0/exp_avg"``) and the
rest stays as a JSON skeleton with placeholders, which also keeps int dict
keys and tuples as they were.

Single model files (:func:`save_model` / :func:`load_model`) are one
safetensors file whose metadata holds the model spec (registry name and
kwargs), so a model can be rebuilt without its Python class being pickled.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

FORMAT = "sophon_ext.checkpoint"
MODEL_FORMAT = "sophon_ext.model"
FORMAT_VERSION = 1
INDEX_NAME = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint or model file is missing, corrupt or does not fit."""


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name unique per process and call (ranks and shards never share one);
    # open(..., "xb") keeps the usual umask permissions, unlike mkstemp's 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- nested state


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split nested ``state`` into ``(tensors, skeleton)``; :func:`unflatten_state` inverts it.

    Dicts become ``{"__dict__": [[key, value], ...]}`` (keys keep their int/str
    type), tuples ``{"__tuple__": [...]}``, tensors ``{"__tensor__": key}``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            # clone: safetensors refuses tensors that share storage
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            items = []
            for key, item in value.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    raise TypeError(f"checkpoint state: dict keys must be str or int, got {key!r} at {path!r}")
                items.append([key, walk(item, f"{path}/{key}" if path else str(key))])
            return {"__dict__": items}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"checkpoint state: cannot store {type(value).__name__} at {path!r}")

    return tensors, walk(state, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the nested state :func:`flatten_state` split."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint: tensor {key!r} is missing from the tensor file")
            return tensors[key]
        if "__tuple__" in skeleton:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if "__dict__" in skeleton:
            return {key: unflatten_state(v, tensors) for key, v in skeleton["__dict__"]}
        raise CheckpointError(f"checkpoint: malformed state entry {sorted(skeleton)}")
    return skeleton


def generator_state(generator: torch.Generator) -> str:
    """A generator's state as base64 text (JSON-friendly)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(generator: torch.Generator, text: str) -> None:
    """Restore a state written by :func:`generator_state`."""
    raw = base64.b64decode(text.encode("ascii"))
    generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str | Path, state: dict, metadata: dict | None = None) -> Path:
    """Atomically write ``state`` (nested, with tensors) as the checkpoint in ``directory``.

    ``metadata`` (JSON-ready: config, model spec, ...) is stored beside it and
    returned by :func:`load_checkpoint`. Older tensor files are removed once
    the new index is in place. Returns the path of ``checkpoint.json``.
    """
    directory = Path(directory)
    tensors, skeleton = flatten_state(state)
    blob = safetensors_save(tensors)
    tensor_name = f"tensors-{uuid.uuid4().hex[:12]}.safetensors"
    atomic_write_bytes(directory / tensor_name, blob)
    index = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tensor_file": tensor_name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "metadata": metadata or {},
        "state": skeleton,
    }
    atomic_write_bytes(directory / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != tensor_name:
            old.unlink(missing_ok=True)
    return directory / INDEX_NAME


def has_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / INDEX_NAME).is_file()


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Read and verify the checkpoint in ``directory``: returns ``(state, metadata)``.

    Raises :class:`CheckpointError` (a ValueError) when it is missing,
    truncated, altered or of an unknown format.
    """
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        raise CheckpointError(f"checkpoint: no {INDEX_NAME} in {directory} (nothing to resume from)")
    try:
        index = json.loads(index_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint: {index_path} is corrupt (not valid JSON: {exc})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint: {index_path} is not a sophon_ext checkpoint")
    if index.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint: {index_path} has format version {index.get('version')}, this library reads {FORMAT_VERSION}")
    for key in ("tensor_file", "sha256", "state"):
        if key not in index:
            raise CheckpointError(f"checkpoint: {index_path} lacks the {key!r} entry")
    tensor_path = directory / Path(index["tensor_file"]).name
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint: tensor file {tensor_path} named by {index_path} is missing")
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != index["sha256"]:
        raise CheckpointError(f"checkpoint: {tensor_path} is corrupt (SHA-256 does not match {index_path})")
    try:
        tensors = safetensors_load(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"checkpoint: cannot read {tensor_path}: {exc}") from None
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return unflatten_state(index["state"], tensors), index.get("metadata", {})


# ----------------------------------------------------------------------------- model files


def save_model(path: str | Path, model: torch.nn.Module, spec: dict | None = None, metadata: dict | None = None) -> Path:
    """Write ``model``'s state_dict to one safetensors file, atomically.

    ``spec`` is ``{"name": registry name, "kwargs": {...}}`` so :func:`load_model`
    can rebuild the model; ``metadata`` is any JSON-ready extra (metrics, config).
    """
    path = Path(path)
    # copies: safetensors refuses tensors that share storage (tied weights)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    header = {"format": MODEL_FORMAT, "version": str(FORMAT_VERSION), "spec": json.dumps(spec), "metadata": json.dumps(metadata or {})}
    atomic_write_bytes(path, safetensors_save(tensors, metadata=header))
    return path


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """``(state_dict, spec, metadata)`` from a file written by :func:`save_model`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file: no file at {path}")
    blob = path.read_bytes()
    try:
        tensors = safetensors_load(blob)
        header = _safetensors_metadata(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"model file: {path} is corrupt or not a safetensors file: {exc}") from None
    if header.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"model file: {path} was not written by sophon_ext.checkpoint.save_model")
    try:
        spec = json.loads(header.get("spec", "null"))
        metadata = json.loads(header.get("metadata", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"model file: {path} has corrupt metadata: {exc}") from None
    return tensors, spec, metadata


def _safetensors_metadata(blob: bytes) -> dict:
    # The safetensors header is an 8-byte little-endian length and a JSON object.
    if len(blob) < 8:
        raise ValueError("file too short")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("header length exceeds the file")
    header = json.loads(blob[8 : 8 + size])
    return header.get("__metadata__", {}) or {}


def load_model(path: str | Path, model: torch.nn.Module | None = None, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Load weights into ``model``, or build the model from the file's spec when ``model`` is None."""
    tensors, spec, _ = read_model_file(path)
    if model is None:
        if not spec:
            raise CheckpointError(f"model file: {path} has no model spec; pass the model to load into")
        from .models import build_model

        model = build_model(spec["name"], **spec.get("kwargs", {}))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"model file: {path} does not fit the model: {exc}") from None
    return model.to(map_location)
