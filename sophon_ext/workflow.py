"""The jobs behind the command line: data and model from a config, pretrain, protect, demo.

Each function takes a validated :class:`~sophon_ext.config.Config` and an
output directory, so the CLI stays a thin argument parser and the same jobs
can be run from Python. Nothing here branches on the mode: the task plug-in
and the config carry every mode-specific choice.

Output layout (``out``)::

    config.yaml              the full config of the run
    pretrained.safetensors   the unprotected model (model file with its spec)
    protected.safetensors    the protected model
    protect/log.jsonl        one line per protection iteration
    protect/checkpoint/      the resumable protection state
    report.json, curves.png  the attack check (demo; written by sophon_ext.report)

A fresh run refuses an ``out`` that holds another run's files unless told to
``overwrite`` them (then exactly those files are removed, after the inputs are
checked); ``resume`` continues the run found there.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config, DatasetConfig, save_config
from .data import (ArrayDataset, DomainSplits, MapDataset, dataset_from_reference, domain_splits, image_folder, load_builtin, split_sizes,
                   torchvision_dataset)
from .errors import UserInputError, describe
from .references import resolve
from .models import DEFAULT_OUTPUT_KEY, ModelOutputError, data_arguments, is_reference, model_from_spec
from .tasks import Task, evaluate_dataset, make_task

PRETRAINED_FILE = "pretrained.safetensors"
PROTECTED_FILE = "protected.safetensors"
PROTECT_DIR = "protect"
CONFIG_FILE = "config.yaml"

#: what each job writes under ``out``: {relative path: "file" | "dir"}
PRETRAIN_OUTPUTS = {PRETRAINED_FILE: "file"}
PROTECT_OUTPUTS = {PROTECTED_FILE: "file", f"{PROTECT_DIR}/log.jsonl": "file", f"{PROTECT_DIR}/checkpoint": "dir"}
ATTACK_OUTPUTS = {"report.json": "file", "summary.md": "file", "curves.csv": "file", "curves.png": "file",
                  "heatmap.png": "file", "diagnostics.png": "file", "runs": "dir", "cache": "dir", "samples": "dir"}
DEMO_OUTPUTS = {**PRETRAIN_OUTPUTS, **PROTECT_OUTPUTS, **ATTACK_OUTPUTS}


# ----------------------------------------------------------------------------- checks before any work


def claim_output_dir(out: str | Path, outputs: dict[str, str], *, resume: bool = False, overwrite: bool = False) -> list[str]:
    """Check ``out`` before any work (a writable directory, no output path taken by the wrong
    kind of entry) and apply the output-directory rule: a fresh run into a directory holding
    another run's ``outputs`` is refused unless ``overwrite``; ``resume`` keeps them.
    Returns the earlier run's files to remove (with ``overwrite``) once the inputs are checked.
    ``config.yaml`` is rewritten by every run and does not count as another run's file."""
    existing = ckpt.check_output_dir(out, {**outputs, CONFIG_FILE: "file"})
    existing = [path for path in existing if path != CONFIG_FILE]
    if resume:
        return []
    if not overwrite:
        ckpt.refuse_previous_run(out, existing)
    return existing


def check_device(device: str | torch.device) -> None:
    """The config's device must exist on this machine (e.g. no ``cuda:0`` on a CPU-only torch)."""
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, AssertionError) as exc:  # a CPU-only torch asserts
        raise UserInputError(f"device: {device} is not available here ({describe(exc)}); pick another with --device") from None


def check_data_fits(task: Task, model: nn.Module, domains: tuple[DomainSplits, DomainSplits], device) -> None:
    """The model accepts both domains' data and labels (checked on the training parts)."""
    for name, domain in zip(("original", "restricted"), domains):
        data = domain.train
        try:
            sample = data.head(8)
            task.check_model(model, sample.x.to(device), data.labels().to(device))
        except ModelOutputError:
            raise  # names model.output_key: about the model, not this domain's data
        except (ValueError, TypeError, RuntimeError) as exc:
            raise UserInputError(f"data.{name}: does not fit the model: {describe(exc)}") from None


def _write_config(config: Config, out: Path) -> None:
    from . import distributed

    if distributed.current().is_main:
        save_config(config, out / CONFIG_FILE)


# ----------------------------------------------------------------------------- data


def load_dataset(spec: DatasetConfig, seed: int = 0, where: str = "data") -> ArrayDataset | MapDataset:
    """One domain's data as described by ``spec`` (never downloads); ``where`` names it in errors.
    In memory (:class:`ArrayDataset`), or read batch by batch (:class:`MapDataset`) for a
    reference's Dataset or DataLoader and a lazily read image folder."""
    if spec.source == "builtin":
        dataset = load_builtin(spec.name, image_size=spec.image_size)
    elif spec.source == "torchvision":
        try:
            dataset = torchvision_dataset(spec.name, spec.path, train=spec.train, image_size=spec.image_size)
        except (ValueError, RuntimeError) as exc:  # an unknown class, or no data on disk (never downloaded)
            raise UserInputError(f"{where}: torchvision {spec.name} under {spec.path}: {describe(exc)}") from None
    elif spec.source == "image_folder":
        path = Path(spec.path)
        if not path.is_dir():
            raise FileNotFoundError(f"data path: {path} is not a directory (source image_folder)")
        transform = resolve(spec.transform, f"{where}.transform", "a transform") if spec.transform else None
        dataset = image_folder(path, spec.image_size, grayscale=spec.grayscale, lazy=spec.lazy, transform=transform)
    elif spec.source == "arrays":
        from .attack import load_domain  # .npz reading lives there

        path = Path(spec.path)
        if not (path.is_file() and path.suffix == ".npz"):
            raise FileNotFoundError(f"data path: {path} is not an .npz file (source arrays)")
        try:
            dataset = load_domain(str(path), image_size=spec.image_size, grayscale=spec.grayscale)
        except (ValueError, TypeError) as exc:  # the file's contents: wrong arrays, labels, shapes
            raise UserInputError(f"{where}.path: {describe(exc)}") from None
        if dataset.x.dim() != 4:
            raise UserInputError(f"{where}.path: {path} holds x of shape {tuple(dataset.x.shape)} ({dataset.x.dtype}); "
                                 "expected images of shape (N, C, H, W)")
    elif spec.source == "reference":
        dataset = dataset_from_reference(spec.name, spec.kwargs, f"{where}.name")
    else:  # the config validates source; kept for direct callers
        raise ValueError(f"data source: unknown source {spec.source!r}")
    if len(dataset) == 0:
        raise UserInputError(f"{where}: {spec.source} {spec.name or spec.path} is empty")
    if spec.limit is not None and spec.limit < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: spec.limit]
        dataset = dataset.subset(index)
    return dataset


def load_domains(config: Config) -> tuple[DomainSplits, DomainSplits]:
    """(original, restricted), each cut into train / val / test by ``config.data``."""
    data = config.data
    out = []
    for name, spec in (("original", data.original), ("restricted", data.restricted)):
        where = f"data.{name}"
        dataset = load_dataset(spec, data.split_seed, where)
        _check_split_sizes(len(dataset), config, where, limited=spec.limit is not None and spec.limit <= len(dataset))
        out.append(domain_splits(dataset, val=data.val_fraction, test=data.test_fraction, seed=data.split_seed))
    return out[0], out[1]


def _check_split_sizes(n: int, config: Config, where: str, limited: bool) -> None:
    """Every part (train, val = the guard's, test = the attacks') must hold a sample."""
    data = config.data
    fractions = [1.0 - data.val_fraction - data.test_fraction, data.val_fraction, data.test_fraction]
    empty = [part for part, size in zip(("train", "val", "test"), split_sizes(n, fractions)) if size < 1]
    if empty:
        needed = next(m for m in range(n + 1, n + 10**6) if min(split_sizes(m, fractions)) >= 1)
        field = f"{where}.limit" if limited else where
        raise UserInputError(f"{field}: {n} samples leave the {' and '.join(empty)} split empty (data.val_fraction "
                             f"{data.val_fraction}, data.test_fraction {data.test_fraction}); use at least {needed}")


# ----------------------------------------------------------------------------- models


def model_spec(config: Config, original: DomainSplits, restricted: DomainSplits) -> dict:
    """The spec of the config's model (``{"name", "kwargs"}``, and ``"output_key"`` for a reference
    with another key), with the channel and class counts filled from the data when the model takes
    them and the config leaves them out (:func:`sophon_ext.models.data_arguments` names them)."""
    kwargs = dict(config.model.kwargs)
    arguments = data_arguments(config.model.name)
    x = original.train.head(1).x
    if "in_channels" in arguments and arguments["in_channels"] not in kwargs and x.dim() >= 2:
        kwargs[arguments["in_channels"]] = int(x.shape[1])
    if "num_classes" in arguments and arguments["num_classes"] not in kwargs:
        kwargs[arguments["num_classes"]] = max(original.train.num_classes, restricted.train.num_classes, 1)
    spec = {"name": config.model.name, "kwargs": kwargs}
    if is_reference(config.model.name) and config.model.output_key != DEFAULT_OUTPUT_KEY:
        spec["output_key"] = config.model.output_key
    return spec


def init_model(spec: dict, seed: int, device: str | torch.device) -> nn.Module:
    """A freshly initialised model, its weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_from_spec(spec)
    return model.to(device)


def load_pretrained(config: Config, domains=None) -> tuple[nn.Module, dict, tuple[DomainSplits, DomainSplits] | None]:
    """``(model, spec, domains)`` for ``config.model.weights``: a model file rebuilds the model its
    spec records; a plain state dict (safetensors, .pt / .pth) loads into the config's model, its
    channel and class counts filled from the data, which is loaded for that (and returned for
    reuse; else ``domains`` as given). Keys and shapes that do not fit raise one error naming them."""
    def spec_from_config() -> dict:
        nonlocal domains
        domains = domains or load_domains(config)
        return model_spec(config, *domains)

    model, spec = ckpt.load_model_and_spec(config.model.weights, spec_from_config, map_location=config.device)
    return model, spec, domains


# ----------------------------------------------------------------------------- jobs


@dataclass
class PretrainOutcome:
    model: nn.Module
    spec: dict
    records: list[dict]
    metric: float
    seconds: float


def run_pretrain(config: Config, out: str | Path | None, domains=None, progress: bool = True,
                 overwrite: bool = False) -> PretrainOutcome:
    """Train the config's model from scratch on the original domain; save ``out/pretrained.safetensors``
    (and ``out/config.yaml``), by the output-directory rule (see the module docstring)."""
    from .pretrain import pretrain

    started = time.perf_counter()
    previous = claim_output_dir(out, PRETRAIN_OUTPUTS, overwrite=overwrite) if out is not None else []
    check_device(config.device)
    original, restricted = domains or load_domains(config)
    task = make_task(config.mode, **config.task)
    spec = model_spec(config, original, restricted)
    model = init_model(spec, config.seed, config.device)
    check_data_fits(task, model, (original, restricted), config.device)
    if out is not None:
        ckpt.remove_run_files(out, previous)
        _write_config(config, Path(out))
    records = pretrain(model, original.train, task, config.pretrain, val=original.val, seed=config.seed, progress=progress)
    metric = evaluate_dataset(task, model, original.test.to(config.device), seed=config.seed)[task.metric_name]
    seconds = time.perf_counter() - started
    if out is not None:
        ckpt.save_model(Path(out) / PRETRAINED_FILE, model, spec, {"pretrain": records, f"test_{task.metric_name}": metric})
    return PretrainOutcome(model, spec, records, metric, seconds)


@dataclass
class ProtectOutcome:
    model: nn.Module
    result: "object"  # engine.ProtectionResult
    seconds: float


def run_protect(config: Config, model: nn.Module, spec: dict | None, out: str | Path, domains=None,
                resume: bool = False, progress: bool = True, overwrite: bool = False) -> ProtectOutcome:
    """Protect a copy of ``model``; checkpoints and log under ``out/protect``, the result in
    ``out/protected.safetensors`` (and ``out/config.yaml``). ``resume`` continues from
    ``out/protect/checkpoint``; a fresh run follows the output-directory rule (module docstring)."""
    from .engine import ProtectionFailed, Sophon

    started = time.perf_counter()
    out = Path(out)
    previous = claim_output_dir(out, PROTECT_OUTPUTS, resume=resume, overwrite=overwrite)
    check_device(config.device)
    original, restricted = domains or load_domains(config)
    protected = copy.deepcopy(model)
    check_data_fits(make_task(config.mode, **config.task), protected, (original, restricted), config.device)
    ckpt.remove_run_files(out, previous)
    _write_config(config, out)
    engine = Sophon(protected, original, restricted, config, out_dir=out / PROTECT_DIR, model_spec=spec,
                    head=config.model.head, progress=progress)
    if resume:
        engine.resume()
    result = engine.run()
    if not engine.model_is_finite() or result.diverged:
        raise ProtectionFailed(f"protect: the run diverged ({result.stop_reason}) after {result.iterations} iterations; "
                               f"nothing was written as {out / PROTECTED_FILE}. Lower protect.alpha / protect.beta or "
                               "keep protect.meta_clip set")
    if engine.comm.is_main:  # under torchrun every rank holds the same model; rank 0 writes it
        ckpt.save_model(out / PROTECTED_FILE, protected, spec, {"protection": _result_summary(result)})
    return ProtectOutcome(protected, result, time.perf_counter() - started)


def _result_summary(result) -> dict:
    return {
        "iterations": result.iterations,
        "start_metric": result.start_metric,
        "final_metric": result.final_metric,
        "metric": result.metric_name,
        "stopped": result.stopped,
        "stop_reason": result.stop_reason,
        "rollbacks": result.rollbacks,
        "seconds": result.seconds,
        **result.extra,
    }


def attack_grid(config: Config) -> dict:
    """The demo's attack list in the attack harness's grid format."""
    attack = config.attack
    return {"epochs": [attack.epochs], "batch_sizes": [attack.batch_size], "seeds": list(attack.seeds),
            "attacks": [dict(a) for a in attack.attacks]}


def check_criteria(report: dict, max_original_drop: float = 0.03, min_unprotected_lead: float = 0.02) -> dict:
    """The demo's pass/fail checks on a report (metric units; direction from the report).

    - ``original_intact``: protected within ``max_original_drop`` of unprotected on the original domain;
    - per attack, ``escape``: the product's escape rule (:func:`sophon_ext.report.escapes`: final more
      than 0.02 or area more than 0.01 better than scratch, unless both are at chance); the largest lead
      over scratch at any epoch is reported next to it;
    - ``unprotected_above_scratch``: the unprotected model's area beats scratch's by more than
      ``min_unprotected_lead`` on average (so the attacks are meaningful).
    """
    sign = 1.0 if report["higher_is_better"] else -1.0
    original = report.get("original_domain") or {}
    checks: dict = {"attacks": {}}
    if "protected" in original and "unprotected" in original:
        drop = sign * (original["unprotected"] - original["protected"])
        checks["original_drop"] = drop
        checks["original_intact"] = drop <= max_original_drop + 1e-9  # 3.0 points is within 3 points despite rounding
    leads = []
    for attack in report["attacks"]:
        summary = attack["summary"]
        auc = summary["auc"]
        entry = {
            "escape": summary["escape"],
            "final_protected": summary["final"]["protected"],
            "final_scratch": summary["final"]["scratch"],
            "auc_protected": auc["protected"],
            "auc_scratch": auc["scratch"],
            "max_gap_vs_scratch": summary["max_gap_vs_scratch"],
        }
        if "unprotected" in auc:
            entry["auc_unprotected"] = auc["unprotected"]
            leads.append(sign * (auc["unprotected"] - auc["scratch"]))
        checks["attacks"][attack["name"]] = entry
    if leads:
        checks["unprotected_lead"] = sum(leads) / len(leads)
        checks["unprotected_above_scratch"] = checks["unprotected_lead"] > min_unprotected_lead
    checks["protected_passes"] = bool(checks.get("original_intact", True)) and not any(
        e["escape"] for e in checks["attacks"].values())
    checks["meaningful"] = bool(checks.get("unprotected_above_scratch", False))
    return checks


def run_demo(config: Config, out: str | Path, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """The main job: pretrain, protect, attack (protected / unprotected / scratch), report.

    Returns the report (also in ``out/report.json``, with the PNG of the curves
    next to it). ``resume`` reuses a pretrained model and protection checkpoint
    found in ``out``; a fresh run follows the output-directory rule (module docstring).
    """
    from .attack import run_attacks
    from .report import write_outputs

    out = Path(out)
    previous = claim_output_dir(out, DEMO_OUTPUTS, resume=resume, overwrite=overwrite)
    check_device(config.device)
    timings = {}
    domains = load_domains(config)
    ckpt.remove_run_files(out, previous)
    _write_config(config, out)
    original, restricted = domains
    task = make_task(config.mode, **config.task)

    pretrained_path = out / PRETRAINED_FILE
    if resume and pretrained_path.is_file():
        unprotected, spec = ckpt.load_model_and_spec(pretrained_path, map_location=config.device)
        timings["pretrain"] = 0.0
    else:
        outcome = run_pretrain(config, out, domains, progress)
        unprotected, spec, timings["pretrain"] = outcome.model, outcome.spec, outcome.seconds

    has_checkpoint = ckpt.has_checkpoint(out / PROTECT_DIR / "checkpoint")
    # resuming a demo killed before its first protection checkpoint restarts the protection
    protected_outcome = run_protect(config, unprotected, spec, out, domains, resume=resume and has_checkpoint,
                                    progress=progress, overwrite=resume and not has_checkpoint)
    timings["protect"] = protected_outcome.seconds

    started = time.perf_counter()
    report = run_attacks(
        protected_outcome.model, unprotected, partial(model_from_spec, spec),
        restricted.train, restricted.test, task, attack_grid(config), original_test=original.test,
        out_dir=out, resume=resume, device=config.device, head=config.model.head, progress=progress,
        command="sophon demo", config={"sophon": config.to_dict()},
    )
    timings["attack"] = time.perf_counter() - started
    report["protection"] = {**_result_summary(protected_outcome.result), "log": str(out / PROTECT_DIR / "log.jsonl")}
    report["timings"] = timings
    report["checks"] = check_criteria(report)
    write_outputs(report, out, plots=False)  # report.json and summary.md with the protection and the check
    return report
