""":func:`run_attacks`: every attack of a grid on every starting point (the protected
model, the unprotected one, a model trained from scratch), then the report.

Each attack (:class:`~sophon_ext.attack.AttackSpec`) fine-tunes every starting
point on the restricted domain's training split with an ordinary ``torch.optim``
loop (:mod:`sophon_ext.attack.finetune`) and evaluates on its test split after
every epoch. Results go to ``out_dir/runs/<attack name>.json`` (one file per attack,
written atomically), and every starting point's curve to
``out_dir/cache/<key>.json``, keyed by the attack, the starting model's weights,
the data and the task. So a re-run skips finished attacks, a run with a new
protected model only re-trains the protected column, and ``shard=(rank,
world)`` lets processes split the grid (attack ``i`` runs where
``i % world == rank``); ``jobs=N`` runs N attacks at a time in worker processes.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from .. import distributed
from ..data import ArrayDataset, MapDataset, as_dataset
from ..errors import UserInputError
from ..methods import get_method
from ..report import (atomic_write_json, build_report, chance_level, summarise_attack, summarise_seeds,
                      write_outputs)
from .. import surgery
from .diagnostics import compare_models
from .finetune import fine_tune
from .grid import load_grid
from .spec import AttackSpec

#: samples of each domain the diagnostics read (what compare_models reads of data in tensors)
DIAGNOSTIC_SAMPLES = 1024
#: real images a generation inspection compares samples with, for data read on demand
INSPECTION_REFERENCE = 2048


# ---------------------------------------------------------------- fingerprints

def _hash_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state_dict (names, dtypes, shapes, values)."""
    return _hash_tensors(model.state_dict().items())


def _data_fingerprint(train: ArrayDataset | MapDataset, test: ArrayDataset | MapDataset) -> str:
    if isinstance(train, ArrayDataset) and isinstance(test, ArrayDataset):
        return _hash_tensors([("train.x", train.x), ("train.y", train.y), ("test.x", test.x), ("test.y", test.y)])
    # data read on demand is hashed as it is read, batch by batch (one pass over it)
    def items():
        for name, data in (("train", train), ("test", test)):
            for i, (x, y) in enumerate(data.batches(torch.arange(len(data)), 512)):
                yield f"{name}.{i}.x", x
                yield f"{name}.{i}.y", y
    return _hash_tensors(items())


def _run_key(spec: AttackSpec, model_fp: str, data_fp: str, task, head: str | None) -> str:
    text = json.dumps([spec.to_dict(), model_fp, data_fp, repr(task), head], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---------------------------------------------------------------- starting points

def default_scratch_factory(model: nn.Module) -> Callable[[], nn.Module]:
    """Scratch = ``model``'s architecture with every parametrised layer re-initialised
    (from the global RNG the harness seeds per attack) and norm statistics reset."""
    return lambda: surgery.fresh_model(model, torch.default_generator)


def _build_scratch(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"scratch_factory: must return an nn.Module, got {type(model).__name__}")
    return model


def _check_same_architecture(reference: nn.Module, other: nn.Module, name: str) -> None:
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in other.state_dict().items()}
    if ref != got:
        missing = sorted(set(ref) - set(got))[:5]
        extra = sorted(set(got) - set(ref))[:5]
        shapes = [f"{k}: {ref[k]} vs {got[k]}" for k in sorted(set(ref) & set(got)) if ref[k] != got[k]][:5]
        raise UserInputError(f"{name}: architecture differs from the protected model "
                         f"(missing {missing}, unexpected {extra}, shape mismatches {shapes})")


# ---------------------------------------------------------------- the harness

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: recompute


def _runnable(specs: list, model: nn.Module) -> tuple[list, dict[str, str]]:
    """The attacks whose method can change ``model``, and ``{name: why}`` for the others: a grid
    that names every method (the ``methods`` preset) runs what applies, and says what it left out."""
    skipped = {s.name: why for s in specs if (why := get_method(s.method).refusal(model)) is not None}
    if skipped:
        if len(skipped) == len(specs):
            raise UserInputError(f"grid: no attack can run on this model: {skipped}")
        warnings.warn(f"attacks skipped, their method cannot change this model: {skipped}", stacklevel=3)
    return [s for s in specs if s.name not in skipped], skipped


def run_attacks(protected: nn.Module, unprotected: nn.Module | None, scratch_factory: Callable[[], nn.Module] | None,
                restricted_train, restricted_test, task=None, grid="quick", *, original_test=None,
                out_dir: str | Path | None = None, resume: bool = False, overwrite: bool = False,
                shard: tuple[int, int] | None = None,
                device: str | torch.device | None = None, head: str | None = None, diagnostics: bool = True,
                plots: bool = True, progress: bool | None = None, command: str | None = None,
                config: dict | None = None, jobs: int = 1) -> dict:
    """Fine-tune every starting point with every attack of ``grid``; return (and write) the report.

    ``protected``/``unprotected``: models (``unprotected`` may be None).
    ``scratch_factory``: builds a fresh model, called with the global RNG seeded
    by the attack's seed (None: :func:`default_scratch_factory` of ``protected``).
    ``restricted_train``/``restricted_test``/``original_test``: anything
    :func:`sophon_ext.data.as_dataset` accepts (ArrayDataset, ``(x, y)``, a
    map-style Dataset or a DataLoader, the last two read batch by batch).
    ``device``: where the attacks train (default: the protected model's device).
    ``progress``: a progress bar (default: when stderr is a terminal).
    ``task``: a task plug-in (default classification). ``grid``: see
    :func:`load_grid`. With ``out_dir``, per-attack results and curve caches are
    written there, and once every attack of the grid has a result, report.json,
    curves.csv, summary.md and the plots. A fresh run refuses an ``out_dir``
    holding results of its attacks from an earlier run: ``resume=True`` reuses
    those whose models, data and attack match (the rest are trained),
    ``overwrite=True`` replaces them.
    ``shard=(rank, world)`` runs only attacks ``i`` with ``i % world == rank``.
    Under torchrun (``shard`` None), the ranks share the grid out the same way,
    gather every result, and each returns the full report (rank 0 writes it).
    ``jobs > 1`` runs the attacks in that many spawned processes (needs
    ``out_dir``, and picklable models, data and task).
    ``head`` names the classifier head when :func:`surgery.find_head` cannot.
    The report's ``complete`` is False while other shards' attacks are missing.
    """
    from ..engine import show_progress
    from ..tasks import ClassificationTask

    task = task if task is not None else ClassificationTask()
    if not isinstance(protected, nn.Module):
        raise TypeError(f"protected: expected an nn.Module, got {type(protected).__name__}")
    if device is None:
        device = next((p.device for p in protected.parameters()), torch.device("cpu"))
    progress = show_progress(progress)
    if unprotected is not None and not isinstance(unprotected, nn.Module):
        raise TypeError(f"unprotected: expected an nn.Module or None, got {type(unprotected).__name__}")
    train = as_dataset(restricted_train, "restricted_train")
    test = as_dataset(restricted_test, "restricted_test")
    original = as_dataset(original_test, "original_test") if original_test is not None else None
    if len(train) == 0 or len(test) == 0:
        raise UserInputError(f"restricted data: train and test must be non-empty, got {len(train)} and {len(test)} samples")
    specs, skipped = _runnable(load_grid(grid), protected)
    world_rank = _check_shard(shard)
    comm = distributed.setup() if shard is None else distributed.Communicator()
    if comm.is_distributed:
        world_rank = (comm.rank, comm.world_size)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserInputError(f"jobs: must be an int >= 1, got {jobs!r}")
    if unprotected is not None:
        _check_same_architecture(protected, unprotected, "unprotected")
    scratch_factory = scratch_factory or default_scratch_factory(protected)
    out = Path(out_dir) if out_dir is not None else None

    starts = {"protected": protected}
    if unprotected is not None:
        starts["unprotected"] = unprotected
    start_fps = {name: state_fingerprint(model) for name, model in starts.items()}
    data_fp = _data_fingerprint(train, test)
    scratch_models: dict[int, tuple[nn.Module, str]] = {}

    def scratch_for(seed: int) -> tuple[nn.Module, str]:
        if seed not in scratch_models:
            model = _build_scratch(scratch_factory, seed)
            _check_same_architecture(protected, model, "scratch_factory's model")
            scratch_models[seed] = (model, state_fingerprint(model))
        return scratch_models[seed]

    mine = [s for i, s in enumerate(specs) if world_rank is None or i % world_rank[1] == world_rank[0]]
    if out is not None:
        # each process claims what only it writes: its attacks' results, and the report when it writes it
        _claim_results(out, mine, report=shard is None and comm.is_main, resume=resume, overwrite=overwrite)
    jobs_args = []
    for spec in mine:
        models = {**starts, "scratch": scratch_for(spec.seed)[0]}
        fps = {**start_fps, "scratch": scratch_for(spec.seed)[1]}
        keys = {name: _run_key(spec, fps[name], data_fp, task, head) for name in models}
        jobs_args.append((spec, models, keys, task, train, test, out, resume, device, head))
    records: dict[str, dict] = {}
    if jobs > 1 and len(jobs_args) > 1:
        if out is None:
            raise ValueError("jobs: running attacks in several processes needs out_dir (they share results through it)")
        for record in _in_processes(jobs, jobs_args, progress, device):
            records[record["name"]] = record
    else:
        bar = _progress(jobs_args, progress and comm.is_main)
        for args in bar:
            if hasattr(bar, "set_postfix_str"):  # which attack is running (a full grid takes minutes)
                bar.set_postfix_str(args[0].name, refresh=False)
            records[args[0].name] = _attack_record(*args)
    for gathered in comm.gather_objects(records):  # no shared file system needed
        records.update(gathered)

    attacks = []
    for spec in specs:
        record = records.get(spec.name)
        if record is None and out is not None:
            record = _read_json(out / "runs" / f"{spec.name}.json")  # another shard's result
        if record is not None:
            attacks.append(record)
    complete = len(attacks) == len(specs)

    seeds = sorted({s.seed for s in specs})
    original_domain = None
    if original is not None:
        scratch0 = scratch_for(seeds[0])[0]
        evaluated = {**starts, "scratch": scratch0}
        original_domain = {name: _evaluate(task, m, original, device) for name, m in evaluated.items()}
    diag = None
    if diagnostics:
        domains = {"restricted": test} if original is None else {"original": original, "restricted": test}
        # the diagnostics read the first DIAGNOSTIC_SAMPLES samples of each domain
        domains = {name: data.head(DIAGNOSTIC_SAMPLES) for name, data in domains.items()}
        diag = compare_models({n: copy.deepcopy(m).to(device) for n, m in starts.items()}, domains, task)
    run_config = {
        **(config or {}),
        "grid": str(grid) if isinstance(grid, (str, Path)) else grid if isinstance(grid, dict) else None,
        "attacks": [s.to_dict() for s in specs],
        "skipped": skipped,
        "device": str(device), "shard": list(shard) if shard is not None else None, "head": head,
        "task": repr(task),
        "data": {"restricted_train": len(train), "restricted_test": len(test),
                 "original_test": len(original) if original is not None else None, "fingerprint": data_fp},
        "models": {**start_fps, "scratch": {str(seed): scratch_for(seed)[1] for seed in seeds}},
    }
    across_seeds = summarise_seeds(attacks, task.higher_is_better, chance_level(task, test))
    report = build_report(task, run_config, attacks, original_domain, diag, seeds=seeds, complete=complete,
                          command=command, **({"across_seeds": across_seeds} if across_seeds else {}))
    if out is not None and complete and comm.is_main:
        write_outputs(report, out, plots=plots)
    return report


#: the files a finished grid writes under ``out_dir`` besides its per-attack results
REPORT_FILES = ("report.json", "summary.md", "curves.csv", "curves.png", "heatmap.png", "diagnostics.png")


def _claim_results(out: Path, specs: list[AttackSpec], report: bool, resume: bool, overwrite: bool) -> None:
    """The output-directory rule of every sophon job, for an attack run's files in ``out``."""
    from ..checkpoint import check_output_dir, refuse_previous_run, remove_run_files

    if resume and overwrite:
        raise UserInputError("resume, overwrite: give one of them (resume continues the run, overwrite replaces it)")
    outputs = {f"runs/{spec.name}.json": "file" for spec in specs}
    if report:
        outputs.update(dict.fromkeys(REPORT_FILES, "file"))
    existing = check_output_dir(out, outputs, option="out_dir")
    if resume or not existing:
        return
    if not overwrite:
        refuse_previous_run(out, existing, option="out_dir", remedy="continue it with resume=True (sophon attack "
                            "--resume), or replace it with overwrite=True (--overwrite)")
    remove_run_files(out, existing)


def _attack_record(spec: AttackSpec, models: dict[str, nn.Module], keys: dict[str, str], task, train: ArrayDataset,
                   test: ArrayDataset, out: Path | None, resume: bool, device, head: str | None) -> dict:
    """One attack on every starting point: from its run file or the curve caches when
    they match ``keys``, otherwise trained; written back to ``out``."""
    run_path = out / "runs" / f"{spec.name}.json" if out is not None else None
    if resume and run_path is not None:
        previous = _read_json(run_path)
        if previous is not None and previous.get("keys") == keys:
            # the curves are reused; the summary always follows the current escape rule
            previous["summary"] = summarise_attack(previous["curves"], task.higher_is_better, chance_level(task, test))
            return previous
    curves = {}
    for name, model in models.items():
        cache_path = out / "cache" / f"{name}-{keys[name]}.json" if out is not None else None
        curve = _read_json(cache_path) if (resume and cache_path is not None) else None
        if curve is None:
            inspect = _inspection(task, test, out, spec, name)
            curve = fine_tune(model, spec, task, train, test, device=device, head=head, inspect=inspect)
            if cache_path is not None:
                atomic_write_json(cache_path, curve)
        curves[name] = curve
    record = {"name": spec.name, **spec.to_dict(), "curves": curves,
              "summary": summarise_attack(curves, task.higher_is_better, chance_level(task, test)), "keys": keys}
    if run_path is not None:
        atomic_write_json(run_path, record)
    return record


def _inspection(task, test: ArrayDataset | MapDataset, out: Path | None, spec: AttackSpec, start: str):
    """The task's optional look at each fine-tuned model, ``task.inspect_model(model, reference,
    path, seed)`` (generation: a sample grid under ``out/samples`` and a distance to the real
    restricted test images); None when the task has none."""
    inspect = getattr(task, "inspect_model", None)
    if inspect is None:
        return None
    path = out / "samples" / f"{spec.name}-{start}.png" if out is not None else None
    reference = test.x if isinstance(test, ArrayDataset) else test.head(INSPECTION_REFERENCE).x
    return lambda model: inspect(model, reference, path, seed=spec.seed)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _in_processes(jobs: int, jobs_args: list[tuple], progress: bool, device) -> list[dict]:
    """Run :func:`_attack_record` for each attack in a pool of ``jobs`` processes; each
    gets an equal share of the CPU threads. Forked on CPU (no re-import), spawned for
    accelerators (CUDA cannot be used in a forked child)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    can_fork = torch.device(device).type == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if can_fork else "spawn")
    if can_fork:
        # the first torch.optim optimizer imports torch._dynamo (seconds); do it once here
        # so the forked workers inherit it instead of each importing it again
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(_attack_record, *args) for args in jobs_args]
        return [f.result() for f in _progress(as_completed(futures), progress, total=len(futures))]


def _evaluate(task, model: nn.Module, data: ArrayDataset | MapDataset, device) -> float:
    from ..tasks import evaluate_dataset

    model = copy.deepcopy(model).to(device)
    return evaluate_dataset(task, model, data.to(device))[task.metric_name]


def _check_shard(shard) -> tuple[int, int] | None:
    if shard is None:
        return None
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)):
        raise TypeError(f"shard: expected (rank, world) ints, got {shard!r}")
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise UserInputError(f"shard: need world >= 1 and 0 <= rank < world, got rank={rank}, world={world}")
    return rank, world


def _progress(items, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="attacks", unit="attack", total=total)
