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
safetensors file whose metadata holds the model spec (registry name or
reference, kwargs, output key), so a model can be rebuilt without its Python
class being pickled; rebuilding a model given by reference imports the module
it names. :func:`read_weights_file` also reads plain state dicts (safetensors,
or ``.pt`` / ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .atomic import atomic_write_bytes
from .errors import UserInputError

FORMAT = "sophon_ext.checkpoint"
MODEL_FORMAT = "sophon_ext.model"
FORMAT_VERSION = 1
INDEX_NAME = "checkpoint.json"


class CheckpointError(UserInputError):
    """A checkpoint or model file is missing, corrupt or does not fit."""


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
    state, metadata = unflatten_state(index["state"], tensors), index.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint: {index_path} has a malformed 'metadata' entry")
    _check_iteration(state, metadata, index_path)
    return state, metadata


def _check_iteration(state, metadata: dict, index_path: Path) -> None:
    """A protection checkpoint's iteration must be one its own run could reach (checkpoint.json
    is plain text: the tensor file's hash does not cover it)."""
    if not isinstance(state, dict) or "iteration" not in state:
        return
    iteration = state["iteration"]
    planned = ((metadata.get("config") or {}).get("protect") or {}).get("iterations")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"checkpoint: {index_path} has an invalid iteration {iteration!r}")
    if isinstance(planned, int) and iteration > planned:
        raise CheckpointError(f"checkpoint: {index_path} is at iteration {iteration}, beyond its run's "
                              f"protect.iterations {planned}; the file was altered")
    if "iteration" in metadata and metadata["iteration"] != iteration:
        raise CheckpointError(f"checkpoint: {index_path} contradicts itself (iteration {iteration} in the state, "
                              f"{metadata['iteration']!r} in the metadata); the file was altered")


# ----------------------------------------------------------------------------- model files


def save_model(path: str | Path, model: torch.nn.Module, spec: dict | None = None, metadata: dict | None = None) -> Path:
    """Write ``model``'s state_dict to one safetensors file, atomically.

    ``spec`` is ``{"name": registry name, "kwargs": {...}}`` so :func:`load_model`
    can rebuild the model; ``metadata`` is any JSON-ready extra (metrics, config).
    """
    path = Path(path)
    # copies: safetensors refuses tensors that share storage (tied weights)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    spec_text = json.dumps(spec)
    header = {"format": MODEL_FORMAT, "version": str(FORMAT_VERSION), "spec": spec_text,
              "metadata": json.dumps(metadata or {}), "sha256": model_checksum(tensors, spec_text)}
    atomic_write_bytes(path, safetensors_save(tensors, metadata=header))
    return path


def model_checksum(tensors: dict[str, torch.Tensor], spec_text: str) -> str:
    """SHA-256 over the model spec and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(spec_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """``(state_dict, spec, metadata)`` from a file written by :func:`save_model`."""
    path = Path(path)
    tensors, header = _read_safetensors(path)
    if header.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"model file: {path} was not written by sophon_ext.checkpoint.save_model")
    return _verified_model_file(path, tensors, header)


#: suffixes of state dicts read with ``torch.load(weights_only=True)``; other files are read as safetensors
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """``(state_dict, spec, metadata)`` of any weights file: a model file of :func:`save_model`
    (its spec and metadata), a plain safetensors state dict, or a ``.pt`` / ``.pth`` / ``.bin``
    state dict read with ``torch.load(weights_only=True)`` (a plain one has spec None, metadata {})."""
    path = Path(path)
    if path.suffix.lower() in TORCH_SUFFIXES:
        return _read_torch_state_dict(path), None, {}
    tensors, header = _read_safetensors(path)
    if header.get("format") != MODEL_FORMAT:
        return tensors, None, {}
    return _verified_model_file(path, tensors, header)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.is_file():
        raise CheckpointError(f"model file: no file at {path}")
    blob = path.read_bytes()
    try:
        return safetensors_load(blob), _safetensors_metadata(blob)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"model file: {path} is corrupt or not a safetensors file: {exc}") from None


def _read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: tensors and plain containers only, never arbitrary objects (no code runs)
    if not path.is_file():
        raise CheckpointError(f"model file: no file at {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"model file: {path} is not a state dict torch.load(weights_only=True) can read "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
    return _state_dict_in(loaded, path)


def _state_dict_in(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The parameter-name -> tensor mapping in a loaded file (also under a ``state_dict`` entry)."""
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"model file: {path} holds a {type(loaded).__name__}; expected a state dict "
                              "(a mapping of parameter names to tensors)")
    others = [k for k, v in loaded.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if others:
        raise CheckpointError(f"model file: {path} is not a plain state dict: entries {_shown(others)} are not "
                              "tensors under parameter names")
    return dict(loaded)


def _verified_model_file(path: Path, tensors: dict, header: dict) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    if "sha256" in header and header["sha256"] != model_checksum(tensors, header.get("spec", "null")):
        raise CheckpointError(f"model file: {path} is corrupt (its weights or spec do not match the SHA-256 it was saved with)")
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
    """Load weights into ``model``, or build the model from the file's spec when ``model`` is None.
    ``path`` is a model file of :func:`save_model`, a checkpoint directory or, with ``model``
    given, a plain state dict (:func:`read_weights_file`). A spec naming
    ``package.module:callable`` imports that module."""
    if model is None:
        return load_model_and_spec(path, map_location=map_location)[0]
    load_weights(model, _weights_and_spec(path)[0], f"model file: {path}")
    return model.to(map_location)


def load_model_and_spec(path: str | Path, fallback_spec: dict | Callable[[], dict] | None = None,
                        map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """THE model loader: ``(model, spec)`` from a model file of :func:`save_model`, a checkpoint
    directory or a plain state dict (safetensors, ``.pt`` / ``.pth``). The architecture is the
    file's model spec, or for files without one ``fallback_spec`` (or what it returns when it is a
    function: called only then). Weights that do not fit the architecture raise one
    :class:`CheckpointError` naming the missing, unexpected and resized ones."""
    tensors, spec = _weights_and_spec(path)
    where = f"model file: {path}"
    if not spec:
        if fallback_spec is None:
            raise CheckpointError(f"{where} has no model spec (a plain state dict, or saved without one); "
                                  "pass the model to load into")
        spec = fallback_spec() if callable(fallback_spec) else fallback_spec
        where = f"{where} (a plain state dict, loaded into model {spec.get('name')})"
    model = build_from_spec(spec, where)
    load_weights(model, tensors, where, what=f"the architecture {spec['name']}({spec.get('kwargs', {})})")
    return model.to(map_location), spec


def _weights_and_spec(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A model file's or plain state dict's tensors and spec, or a checkpoint directory's model state and spec."""
    path = Path(path)
    if path.is_dir():
        state, metadata = load_checkpoint(path)
        if not isinstance(state.get("model"), dict):
            raise CheckpointError(f"checkpoint: {path} holds no model weights")
        return state["model"], metadata.get("model_spec")
    tensors, spec, _ = read_weights_file(path)
    return tensors, spec


def build_from_spec(spec, where: str) -> torch.nn.Module:
    """The model a file's ``{"name", "kwargs", "output_key"}`` spec describes (a registry spec is
    checked before it is built; a reference's module is imported)."""
    from .models import model_from_spec

    if not _is_spec(spec):
        raise CheckpointError(f"{where}: malformed model spec {spec!r}; expected {{'name': ..., 'kwargs': {{...}}}}")
    try:
        return model_from_spec(spec)
    except UserInputError as exc:
        raise CheckpointError(f"{where}: its model spec is invalid: {exc}") from None


def _is_spec(spec) -> bool:
    return (isinstance(spec, dict) and isinstance(spec.get("name"), str) and isinstance(spec.get("kwargs", {}), dict)
            and isinstance(spec.get("output_key", ""), str))


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str, what: str = "the model") -> None:
    """``model.load_state_dict(tensors)``, with one line naming what does not fit ``what``."""
    problems = weight_mismatches(model.state_dict(), tensors)
    if problems:
        raise CheckpointError(f"{where}: does not fit {what} ({problems})")
    model.load_state_dict(tensors)


#: names shown per kind of mismatch before "and N more"
SHOWN_MISMATCHES = 5


def weight_mismatches(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str:
    """What keeps ``tensors`` from loading into a model with state dict ``expected``: missing and
    unexpected keys and shape mismatches, each list cut after :data:`SHOWN_MISMATCHES`; "" when it fits."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    resized = [f"{k} has shape {tuple(tensors[k].shape)}, the model expects {tuple(expected[k].shape)}"
               for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_shown(unexpected)}")
    if resized:
        problems.append(f"shape mismatches: {', '.join(resized[:SHOWN_MISMATCHES])}{_more(resized)}")
    return "; ".join(problems)


def _shown(names: list) -> str:
    return f"{names[:SHOWN_MISMATCHES]}{_more(names)}"


def _more(items: list) -> str:
    return f" and {len(items) - SHOWN_MISMATCHES} more" if len(items) > SHOWN_MISMATCHES else ""


# ----------------------------------------------------------------------------- output directories


def check_output_dir(directory: str | Path, outputs: dict[str, str], option: str = "--out") -> list[str]:
    """Check, before any work, that ``directory`` can hold a run's ``outputs``
    (``{relative path: "file" | "dir"}``): it is (or can be made) a writable directory and no
    output path is taken by the wrong kind of entry. Creates the directory. Returns the outputs
    that already exist (another run's files)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserInputError(f"{option}: {directory} is a file, not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{option}: cannot create {directory} ({exc.strerror or exc})") from None
    _check_writable(directory, option)
    for relative, kind in outputs.items():
        _check_kind(directory, relative, kind, option)
    return [relative for relative in outputs if (directory / relative).exists()]


def _check_writable(directory: Path, option: str) -> None:
    # A real write: permission bits do not tell about read-only mounts or root.
    probe = directory / f".sophon-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise UserInputError(f"{option}: cannot write in {directory} ({exc.strerror or exc})") from None
    probe.unlink(missing_ok=True)


def _check_kind(directory: Path, relative: str, kind: str, option: str) -> None:
    parts = Path(relative).parts
    for depth in range(1, len(parts)):  # every folder on the way must be a folder
        parent = directory.joinpath(*parts[:depth])
        if parent.exists() and not parent.is_dir():
            raise UserInputError(f"{option}: {parent} is a file, but the run writes into a directory of that name; "
                                 "move the file away")
    path = directory / relative
    if path.exists() and path.is_dir() != (kind == "dir"):
        found, wanted = ("a directory", "a file") if path.is_dir() else ("a file", "a directory")
        raise UserInputError(f"{option}: {path} is {found}, but the run writes {wanted} there; move it away")


def refuse_previous_run(directory: str | Path, existing: list[str], option: str = "--out",
                        remedy: str = "continue it with --resume, or replace it with --overwrite") -> None:
    """The rule for a fresh run: a directory holding another run's files is not mixed with a new one."""
    if existing:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise UserInputError(f"{option}: {directory} holds another run's files ({shown}); {remedy}")


def remove_run_files(directory: str | Path, relatives: list[str]) -> None:
    """Delete the given outputs of an earlier run (and temporary files a killed write left next to
    them); nothing else in ``directory`` is touched."""
    directory = Path(directory)
    for relative in relatives:
        path = directory / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        for leftover in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else ():
            leftover.unlink(missing_ok=True)
