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
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import Config, DatasetConfig, save_config
from .data import ArrayDataset, DomainSplits, domain_splits, load_builtin, torchvision_dataset
from .models import MODEL_REGISTRY, build_model
from .tasks import Task, make_task

PRETRAINED_FILE = "pretrained.safetensors"
PROTECTED_FILE = "protected.safetensors"
PROTECT_DIR = "protect"


# ----------------------------------------------------------------------------- data


def load_dataset(spec: DatasetConfig, seed: int = 0) -> ArrayDataset:
    """One domain's data as described by ``spec`` (never downloads)."""
    if spec.source == "builtin":
        dataset = load_builtin(spec.name, image_size=spec.image_size)
    elif spec.source == "torchvision":
        dataset = torchvision_dataset(spec.name, spec.path, train=spec.train, image_size=spec.image_size)
    elif spec.source in ("image_folder", "arrays"):
        from .attack import load_domain  # ImageFolder / .npz reading lives there

        path = Path(spec.path)
        if spec.source == "image_folder" and not path.is_dir():
            raise FileNotFoundError(f"data path: {path} is not a directory (source image_folder)")
        if spec.source == "arrays" and not (path.is_file() and path.suffix == ".npz"):
            raise FileNotFoundError(f"data path: {path} is not an .npz file (source arrays)")
        dataset = load_domain(str(path), image_size=spec.image_size, grayscale=spec.grayscale)
    else:  # the config validates source; kept for direct callers
        raise ValueError(f"data source: unknown source {spec.source!r}")
    if len(dataset) == 0:
        raise ValueError(f"data: {spec.source} {spec.name or spec.path} is empty")
    if spec.limit is not None and spec.limit < len(dataset):
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: spec.limit]
        dataset = dataset.subset(index)
    return dataset


def load_domains(config: Config) -> tuple[DomainSplits, DomainSplits]:
    """(original, restricted), each cut into train / val / test by ``config.data``."""
    data = config.data
    out = []
    for spec in (data.original, data.restricted):
        dataset = load_dataset(spec, data.split_seed)
        out.append(domain_splits(dataset, val=data.val_fraction, test=data.test_fraction, seed=data.split_seed))
    return out[0], out[1]


# ----------------------------------------------------------------------------- models


def model_spec(config: Config, original: DomainSplits, restricted: DomainSplits) -> dict:
    """The registry spec of the config's model, with ``in_channels`` / ``num_classes``
    filled from the data when the constructor takes them and the config leaves them out."""
    kwargs = dict(config.model.kwargs)
    accepted = inspect.signature(MODEL_REGISTRY[config.model.name]).parameters
    x = original.train.x
    if "in_channels" in accepted and "in_channels" not in kwargs and x.dim() >= 2:
        kwargs["in_channels"] = int(x.shape[1])
    if "num_classes" in accepted and "num_classes" not in kwargs:
        kwargs["num_classes"] = max(original.train.num_classes, restricted.train.num_classes, 1)
    return {"name": config.model.name, "kwargs": kwargs}


def build_from_spec(spec: dict, seed: int, device: str | torch.device) -> nn.Module:
    """A freshly initialised model, its weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(spec["name"], **spec["kwargs"])
    return model.to(device)


def load_model_file(path: str | Path, device: str | torch.device) -> tuple[nn.Module, dict]:
    """A model file written by :func:`sophon_ext.checkpoint.save_model`, with its spec."""
    _, spec, _ = ckpt.read_model_file(path)
    if not spec:
        raise ckpt.CheckpointError(f"model file: {path} has no model spec; rebuild it with sophon pretrain")
    return ckpt.load_model(path, map_location=device), spec


# ----------------------------------------------------------------------------- jobs


@dataclass
class PretrainOutcome:
    model: nn.Module
    spec: dict
    records: list[dict]
    metric: float
    seconds: float


def run_pretrain(config: Config, out: str | Path | None, domains=None, progress: bool = True) -> PretrainOutcome:
    """Train the config's model from scratch on the original domain; save ``out/pretrained.safetensors``."""
    from .pretrain import pretrain

    started = time.perf_counter()
    original, restricted = domains or load_domains(config)
    task = make_task(config.mode, **config.task)
    spec = model_spec(config, original, restricted)
    model = build_from_spec(spec, config.seed, config.device)
    records = pretrain(model, original.train, task, config.pretrain, val=original.val, seed=config.seed, progress=progress)
    metric = task.evaluate(model, original.test.x.to(config.device), original.test.y.to(config.device), seed=config.seed)[task.metric_name]
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
                resume: bool = False, progress: bool = True) -> ProtectOutcome:
    """Protect a copy of ``model``; checkpoints and log under ``out/protect``, the result in
    ``out/protected.safetensors``. ``resume`` continues from ``out/protect/checkpoint``."""
    from .engine import ProtectionFailed, Sophon

    started = time.perf_counter()
    original, restricted = domains or load_domains(config)
    protected = copy.deepcopy(model)
    out = Path(out)
    engine = Sophon(protected, original, restricted, config, out_dir=out / PROTECT_DIR, model_spec=spec,
                    head=config.model.head, progress=progress)
    if resume:
        engine.resume()
    elif engine.comm.is_main and engine.log_path.exists():
        engine.log_path.unlink()  # a fresh run starts a fresh log
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


def run_demo(config: Config, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """The main job: pretrain, protect, attack (protected / unprotected / scratch), report.

    Returns the report (also in ``out/report.json``, with the PNG of the curves
    next to it). ``resume`` reuses a pretrained model and protection checkpoint
    found in ``out``.
    """
    from .attack import run_attacks
    from .report import write_outputs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    timings = {}
    domains = load_domains(config)
    original, restricted = domains
    task = make_task(config.mode, **config.task)

    pretrained_path = out / PRETRAINED_FILE
    if resume and pretrained_path.is_file():
        unprotected, spec = load_model_file(pretrained_path, config.device)
        timings["pretrain"] = 0.0
    else:
        outcome = run_pretrain(config, out, domains, progress)
        unprotected, spec, timings["pretrain"] = outcome.model, outcome.spec, outcome.seconds

    has_checkpoint = ckpt.has_checkpoint(out / PROTECT_DIR / "checkpoint")
    protected_outcome = run_protect(config, unprotected, spec, out, domains, resume=resume and has_checkpoint, progress=progress)
    timings["protect"] = protected_outcome.seconds

    started = time.perf_counter()
    report = run_attacks(
        protected_outcome.model, unprotected, partial(build_model, spec["name"], **spec["kwargs"]),
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
