"""The attack harness: real fine-tuning of a protected model, compared with the
unprotected model and training from scratch, over a grid of attacks.

Each attack (:class:`AttackSpec`) fine-tunes every starting point on the
restricted domain's training split with an ordinary ``torch.optim`` loop
(:mod:`sophon_ext.finetune`) and evaluates on its test split after every
epoch. Results go to ``out_dir/runs/<attack name>.json`` (one file per attack,
written atomically), and every starting point's curve to
``out_dir/cache/<key>.json``, keyed by the attack, the starting model's weights,
the data and the task. So a re-run skips finished attacks, a run with a new
protected model only re-trains the protected column, and ``shard=(rank,
world)`` lets processes split the grid (attack ``i`` runs where
``i % world == rank``); ``jobs=N`` runs N attacks at a time in worker processes.

Command line: :func:`add_attack_arguments` / :func:`run_attack_cli` (``sophon
attack``; also ``python -m sophon_ext.attack``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed, surgery
from .data import ArrayDataset, MapDataset, as_dataset
from .diagnostics import compare_models
from .errors import UserInputError, UserInputTypeError, describe, is_user_error
from .finetune import ATTACK_METHODS, SCHEDULES, AttackSpec, fine_tune, prepare_attack_model
from .optim.presets import PRESETS
from .report import atomic_write_json, build_report, chance_level, summarise_attack, write_outputs

__all__ = [
    "ATTACK_METHODS", "SCHEDULES", "GRID_PRESETS", "AttackSpec", "expand_grid", "load_grid", "run_attacks",
    "fine_tune", "prepare_attack_model", "state_fingerprint", "default_scratch_factory",
    "add_attack_arguments", "run_attack_cli",
]

class GridError(UserInputError):
    """An attack grid (preset, keys, attack fields) is wrong; the message names the key."""


class GridTypeError(GridError, UserInputTypeError):
    """An attack grid entry has the wrong type."""


#: Named grids. "paper" is the reference attack of SOPHON's evaluation protocol.
GRID_PRESETS: dict[str, dict] = {
    "paper": {"methods": ["full"], "optimizers": ["sgd_momentum"], "lrs": [1e-4], "batch_sizes": [200],
              "epochs": [20], "weight_decays": [1e-4]},
    # SGD and Adagrad learn nothing in 10 epochs from scratch at Adam's rates: each gets its own two rates
    "default": {"methods": ["full", "reinit_head", "head_only"],
                "optimizers": ["sgd_momentum", "nesterov", "adam", "rmsprop", "adagrad"],
                "lrs": {"sgd_momentum": [1e-2, 1e-1], "nesterov": [1e-2, 1e-1], "adam": [1e-3, 1e-2],
                        "rmsprop": [1e-3, 1e-2], "adagrad": [1e-2, 1e-1]},
                "batch_sizes": [64], "epochs": [10], "weight_decays": [1e-4]},
    "quick": {"methods": ["full", "head_only"], "optimizers": ["adam"], "lrs": [1e-3], "batch_sizes": [64],
              "epochs": [3]},
    "methods": {"methods": list(ATTACK_METHODS), "optimizers": ["adam"], "lrs": [1e-3], "batch_sizes": [64],
                "epochs": [3]},
}

# grid key -> AttackSpec field; a grid key takes one value or a list of values
_GRID_KEYS = {"methods": "method", "optimizers": "optimizer", "lrs": "lr", "batch_sizes": "batch_size",
              "epochs": "epochs", "weight_decays": "weight_decay", "schedules": "schedule", "seeds": "seed",
              "ranks": "rank"}
_SINGULAR = {"method": "methods", "optimizer": "optimizers", "lr": "lrs", "batch_size": "batch_sizes",
             "weight_decay": "weight_decays", "schedule": "schedules", "seed": "seeds", "rank": "ranks"}
# keys applied unchanged to every attack of the grid
_SHARED_KEYS = ("layers", "hparams")
#: samples of each domain the diagnostics read (what compare_models reads of data in tensors)
DIAGNOSTIC_SAMPLES = 1024
#: real images a generation inspection compares samples with, for data read on demand
INSPECTION_REFERENCE = 2048


def expand_grid(config: dict | str) -> list[AttackSpec]:
    """The attacks of a grid config, in a fixed order (duplicates dropped).

    ``config`` is a preset name (see :data:`GRID_PRESETS`) or a dict with an
    optional ``preset`` (the base, overridden by the other keys), list-valued
    grid keys ``methods, optimizers, lrs, batch_sizes, epochs, weight_decays,
    schedules, seeds, ranks`` (singular names and scalars are accepted too),
    ``lrs`` may also map optimizer names to their own learning rates
    (``{"sgd_momentum": [0.01, 0.1], "adam": [1e-3, 1e-2]}``), since SGD and
    adaptive optimizers work at different scales. ``layers`` and ``hparams``
    are shared by every attack, and ``attacks`` lists extra
    attacks, each a dict of :class:`AttackSpec` fields or a method name; an
    explicit attack fixes the fields it sets and is spanned over the grid's
    values of the others (so ``seeds: [0, 1]`` runs every attack twice). The
    full grid is spanned only when ``methods`` or ``optimizers`` is given, or
    when there is no ``attacks`` list.
    """
    if isinstance(config, str):
        config = {"preset": config}
    if not isinstance(config, dict):
        raise GridTypeError(f"grid: expected a preset name or a dict, got {type(config).__name__}")
    merged: dict = {}
    if "preset" in config:
        name = config["preset"]
        if name not in GRID_PRESETS:
            raise GridError(f"grid preset: unknown preset {name!r}; choose one of {sorted(GRID_PRESETS)}")
        merged.update(copy.deepcopy(GRID_PRESETS[name]))
    for key, value in config.items():
        if key == "preset":
            continue
        key = _SINGULAR.get(key, key)
        if key not in _GRID_KEYS and key not in _SHARED_KEYS and key != "attacks":
            known = sorted([*_GRID_KEYS, *_SINGULAR, *_SHARED_KEYS, "attacks", "preset"])
            raise GridError(f"grid: unknown key {key!r}; known keys: {known}")
        merged[key] = value
    lr_table = merged.pop("lrs", None) if isinstance(merged.get("lrs"), dict) else None
    if lr_table is not None:
        lr_table = {opt: (v if isinstance(v, (list, tuple)) else [v]) for opt, v in lr_table.items()}
        for opt, values in lr_table.items():
            if opt not in PRESETS:
                raise GridError(f"grid lrs: unknown optimizer {opt!r}; choose among {sorted(PRESETS)}")
            if not values:
                raise GridError(f"grid lrs: no learning rate for {opt!r}")
    axes = {}
    for key, field_name in _GRID_KEYS.items():
        if key in merged:
            values = merged[key] if isinstance(merged[key], (list, tuple)) else [merged[key]]
            if not values:
                raise GridError(f"grid: {key} is empty")
            axes[field_name] = list(values)
    shared = {k: merged[k] for k in _SHARED_KEYS if k in merged}

    def span(fixed: dict) -> list[AttackSpec]:
        """Attacks with the ``fixed`` fields, over every combination of the other axes."""
        free = [name for name in axes if name not in fixed]
        out = []
        for combo in itertools.product(*(axes[n] for n in free)):
            fields = {**copy.deepcopy(shared), **dict(zip(free, combo)), **fixed}
            if lr_table is None or "lr" in fixed:
                out.append(_attack_spec(fields))
                continue
            optimizer = fields.get("optimizer", AttackSpec.optimizer)
            if optimizer not in lr_table:
                raise GridError(f"grid lrs: no learning rates for optimizer {optimizer!r} (lrs lists {sorted(lr_table)})")
            out += [_attack_spec({**fields, "lr": lr}) for lr in lr_table[optimizer]]
        return out

    specs: list[AttackSpec] = []
    # a grid is spanned unless the config only lists explicit attacks (then the axes span those)
    if "method" in axes or "optimizer" in axes or "attacks" not in merged:
        specs += span({})
    if not isinstance(merged.get("attacks", []), (list, tuple)):
        raise GridError(f"grid attacks: expected a list of attacks (dicts of attack fields or method names), "
                         f"got {type(merged['attacks']).__name__} {merged['attacks']!r}")
    for item in merged.get("attacks", []):
        if isinstance(item, str):
            item = {"method": item}
        if not isinstance(item, dict):
            raise GridTypeError(f"grid attacks: each entry must be a dict of attack fields or a method name, got {item!r}")
        unknown = sorted(set(item) - set(AttackSpec.__dataclass_fields__))
        if unknown:
            raise GridError(f"grid attacks: unknown attack fields {unknown}; known: {sorted(AttackSpec.__dataclass_fields__)}")
        # an explicit attack fixes the fields it sets; the grid's axes span the others
        specs += span(item)
    if not specs:
        raise GridError("grid: no attacks (give methods/optimizers, a preset, or an attacks list)")
    unique = {}
    for spec in specs:
        unique.setdefault(spec.name, spec)
    return list(unique.values())


def _attack_spec(fields: dict) -> AttackSpec:
    """``AttackSpec(**fields)``; a field the grid set wrongly is a :class:`GridError`."""
    try:
        return AttackSpec(**fields)
    except UserInputError:
        raise
    except TypeError as exc:
        raise GridTypeError(str(exc)) from None
    except ValueError as exc:
        raise GridError(str(exc)) from None


def load_grid(source: dict | str | Path | list) -> list[AttackSpec]:
    """Attacks from a preset name, a YAML/JSON file, a grid dict or a list of :class:`AttackSpec`."""
    if isinstance(source, list) and all(isinstance(s, AttackSpec) for s in source):
        if not source:
            raise GridError("grid: no attacks")
        return list({s.name: s for s in source}.values())
    if isinstance(source, AttackSpec):
        return [source]
    if isinstance(source, Path) or (isinstance(source, str) and source not in GRID_PRESETS
                                    and source.endswith((".yaml", ".yml", ".json"))):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"grid: no config file at {path}")
        data = _read_grid_file(path)
        if isinstance(data, dict) and "attack_grid" in data:
            data = data["attack_grid"]
        return expand_grid(data)
    return expand_grid(source)


def _read_grid_file(path: Path):
    import yaml  # JSON is YAML too

    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise GridError(f"grid: cannot parse {path}: {describe(exc)}") from None


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
    (torch's default init, from the global RNG the harness seeds per attack) and
    norm statistics reset."""
    def factory() -> nn.Module:
        fresh = copy.deepcopy(model)
        surgery.reinitialise(fresh, surgery.parametrised_layers(fresh), torch.default_generator)
        for module in fresh.modules():
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
        return fresh
    return factory


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
    from .engine import show_progress
    from .tasks import ClassificationTask

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
    specs = load_grid(grid)
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
        "device": str(device), "shard": list(shard) if shard is not None else None, "head": head,
        "task": repr(task),
        "data": {"restricted_train": len(train), "restricted_test": len(test),
                 "original_test": len(original) if original is not None else None, "fingerprint": data_fp},
        "models": {**start_fps, "scratch": {str(seed): scratch_for(seed)[1] for seed in seeds}},
    }
    report = build_report(task, run_config, attacks, original_domain, diag, seeds=seeds, complete=complete,
                          command=command)
    if out is not None and complete and comm.is_main:
        write_outputs(report, out, plots=plots)
    return report


#: the files a finished grid writes under ``out_dir`` besides its per-attack results
REPORT_FILES = ("report.json", "summary.md", "curves.csv", "curves.png", "heatmap.png", "diagnostics.png")


def _claim_results(out: Path, specs: list[AttackSpec], report: bool, resume: bool, overwrite: bool) -> None:
    """The output-directory rule of every sophon job, for an attack run's files in ``out``."""
    from .checkpoint import check_output_dir, refuse_previous_run, remove_run_files

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
    from .tasks import evaluate_dataset

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


# ---------------------------------------------------------------- command line

def add_attack_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``sophon attack`` to ``parser``.

    As in the other commands, ``--config`` / ``--set`` give a sophon run config (e.g. a run's
    ``config.yaml``): its ``data`` names both domains, its ``model`` the architecture of files
    without a model spec, and its ``attack`` section is the grid when neither ``--preset`` nor
    ``--grid`` is given. Options given on the command line win over the config."""
    parser.add_argument("--protected", required=True,
                        help="the protected model: a model file (sophon_ext.checkpoint.save_model), a plain "
                             "state dict (.safetensors, or .pt/.pth read with weights_only=True; with --model), "
                             "or a checkpoint directory")
    parser.add_argument("--unprotected", help="the unprotected pre-trained model (same forms as --protected)")
    parser.add_argument("--config", help="sophon run config file (YAML or JSON, see `sophon config`): domains, "
                                         "architecture, mode, device and, without --preset/--grid, the grid")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key, e.g. --set data.restricted.name=mnist (repeatable)")
    parser.add_argument("--model", default=None,
                        help="the architecture of files that carry no model spec: a registry name, "
                             "package.module:callable, torchvision:NAME or timm:NAME (default: the config's, "
                             f"else {CLI_DEFAULTS['model']})")
    parser.add_argument("--model-kwargs", default=None, type=json.loads,
                        help="JSON keyword arguments of --model (default: the config's, else "
                             f"'{json.dumps(CLI_DEFAULTS['model_kwargs'])}')")
    parser.add_argument("--output-key", default=None,
                        help="where a --model given by reference keeps its logits when it returns a mapping or "
                             "an object (default: logits)")
    parser.add_argument("--restricted", default=None,
                        help="restricted domain: builtin:digits, builtin:mnist, an ImageFolder directory, an .npz "
                             "with arrays x and y, or package.module:callable returning a Dataset, DataLoader or "
                             "(x, y) (default: the config's, else builtin:digits)")
    parser.add_argument("--original", help="original domain (same forms), for its accuracy and the diagnostics "
                                           "(default: the config's, else none)")
    parser.add_argument("--image-size", type=int, default=None, help="image side for built-in and folder data (default 16)")
    parser.add_argument("--val-fraction", type=float, default=None, help="held-out validation fraction, unused here (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=None, help="test fraction of each domain (default 0.2)")
    parser.add_argument("--split-seed", type=int, default=None, help="seed of the train/val/test split (default 0)")
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--preset", default=None, help=f"named grid: {', '.join(sorted(GRID_PRESETS))} (default: the "
                                                     "config's attack section with --config/--set, else default)")
    grid.add_argument("--grid", help="grid file (YAML or JSON; see sophon_ext.attack.expand_grid)")
    parser.add_argument("--epochs", type=int, help="override the grid's epochs")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the grid's seeds")
    parser.add_argument("--mode", choices=("classification", "generation"), default=None,
                        help="task (default: the config's, else classification)")
    parser.add_argument("--head", help="module name of the classifier head, when it cannot be found")
    parser.add_argument("--out", default="runs/attack", help="output directory (default runs/attack); a fresh run "
                                                             "refuses one holding another attack run's results")
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out: reuse the results whose models, data and attack match")
    run.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in --out")
    parser.add_argument("--shard", help="RANK/WORLD: run only attacks i with i %% WORLD == RANK")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one attack at a time each (default 1)")
    parser.add_argument("--device", default=None, help="torch device (default: the config's, else cpu)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


#: what ``sophon attack`` uses for an option given neither on the command line nor by a run config
CLI_DEFAULTS = {"model": "small_cnn", "model_kwargs": {"width": 16, "depth": 3}, "output_key": "logits",
                "image_size": 16, "val_fraction": 0.1, "test_fraction": 0.2, "split_seed": 0,
                "mode": "classification", "device": "cpu"}


def run_config_of(args: argparse.Namespace):
    """The sophon run config of ``--config`` / ``--set`` (None when neither is given)."""
    if not args.config and not args.set:
        return None
    from .cli import _default_config, overrides_from_sets
    from .config import load_config

    config = load_config(args.config) if args.config else _default_config(args.mode or "classification")
    if args.mode is not None and args.mode != config.mode:
        raise UserInputError(f"--mode: {args.mode} contradicts mode {config.mode!r} of the run config")
    return config.replace(overrides_from_sets(args.set)) if args.set else config


def resolved_options(args: argparse.Namespace, config) -> argparse.Namespace:
    """``args`` with each option left out taken from the run config, else from :data:`CLI_DEFAULTS`."""
    base = dict(CLI_DEFAULTS)
    if config is not None:
        data = config.data
        base.update(model=config.model.name, model_kwargs=config.model.kwargs, output_key=config.model.output_key,
                    image_size=data.restricted.image_size, val_fraction=data.val_fraction,
                    test_fraction=data.test_fraction, split_seed=data.split_seed, mode=config.mode,
                    device=config.device)
        if args.head is None:
            base["head"] = config.model.head
    given = {key: value for key, value in vars(args).items() if value is not None}
    return argparse.Namespace(**{**vars(args), **base, **given})


def load_model_file(path: str | Path, model_name: str = "small_cnn", model_kwargs: dict | None = None,
                    output_key: str = "logits") -> nn.Module:
    """A model from a model file, a plain state dict (safetensors, ``.pt`` / ``.pth``) or a checkpoint
    directory (:func:`sophon_ext.checkpoint.load_model_and_spec`), whose architecture is the file's
    model spec or, for files without one, ``model_name`` (a registry name or a reference, see
    :mod:`sophon_ext.models`) with ``model_kwargs`` and ``output_key``."""
    return _load_model_and_spec(path, model_name, model_kwargs, output_key)[0]


def _load_model_and_spec(path, model_name: str, model_kwargs: dict | None,
                         output_key: str = "logits") -> tuple[nn.Module, dict]:
    from .checkpoint import load_model_and_spec
    from .models import DEFAULT_OUTPUT_KEY, is_reference

    fallback = {"name": model_name, "kwargs": model_kwargs or {}}
    if is_reference(model_name) and output_key != DEFAULT_OUTPUT_KEY:
        fallback["output_key"] = output_key
    return load_model_and_spec(path, fallback)


def load_domain(source: str, image_size: int = 16, grayscale: bool = True) -> ArrayDataset | MapDataset:
    """A dataset from ``builtin:NAME``, an ImageFolder directory, an ``.npz`` with arrays x and y,
    or ``package.module:callable``: a function called without arguments that returns anything
    :func:`sophon_ext.data.as_dataset` accepts (a map-style Dataset or a DataLoader with its
    transforms, read batch by batch; an ``(x, y)`` pair; an ArrayDataset)."""
    from .data import dataset_from_reference, from_arrays, image_folder, load_builtin
    from .references import is_python_reference

    if source.startswith("builtin:"):
        return load_builtin(source.split(":", 1)[1], image_size=image_size)
    path = Path(source)
    if not path.exists() and is_python_reference(source):
        return dataset_from_reference(source)
    if path.is_dir():
        return image_folder(path, image_size, grayscale=grayscale)
    if path.suffix == ".npz" and path.is_file():
        import numpy as np

        with np.load(path) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise ValueError(f"data: {path} must hold arrays named x and y, found {sorted(arrays.files)}")
            return from_arrays(arrays["x"], arrays["y"])
    raise ValueError(f"data: {source!r} is not builtin:<name>, an ImageFolder directory, an existing .npz file "
                     "or package.module:callable")


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        rank, world = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserInputError(f"--shard: expected RANK/WORLD such as 0/4, got {text!r}") from None
    return _check_shard((rank, world))


def run_attack_cli(args: argparse.Namespace) -> int:
    """Run ``sophon attack`` from parsed arguments; returns the exit status: 2 with one line for
    wrong input (:func:`sophon_ext.errors.is_user_error`); anything else is a bug and propagates."""
    import os
    import sys
    import traceback

    try:
        report = _attack_from_args(args)
    except Exception as exc:  # noqa: BLE001 - wrong input is reported here; bugs propagate
        if not is_user_error(exc):
            raise
        if os.environ.get("SOPHON_DEBUG", "") not in ("", "0"):
            traceback.print_exc()  # as the sophon command does: the traceback, for bug reports
        print(f"sophon attack: error: {describe(exc)}", file=sys.stderr)
        return 2
    if report["complete"]:
        print(f"sophon attack: {len(report['attacks'])} attacks; report in {Path(args.out) / 'report.json'}")
    else:
        print(f"sophon attack: shard done ({len(report['attacks'])} attacks finished so far); "
              "the report is written when every shard has finished")
    return 0


def _attack_from_args(args: argparse.Namespace) -> dict:
    import shlex
    import sys
    from functools import partial

    from .models import model_from_spec

    config = run_config_of(args)
    args = resolved_options(args, config)
    protected, spec = _load_model_and_spec(args.protected, args.model, args.model_kwargs, args.output_key)
    unprotected = (load_model_file(args.unprotected, args.model, args.model_kwargs, args.output_key)
                   if args.unprotected else None)
    first = next(iter(protected.parameters()), None)
    grayscale = first is None or first.dim() < 2 or first.shape[1] == 1
    config_domains = None
    if config is not None and (args.restricted is None or args.original is None):
        from .workflow import load_domains

        config_domains = load_domains(config)
    if args.restricted is not None:
        restricted = _cli_domain("--restricted", args.restricted, args, grayscale)
    else:
        restricted = config_domains[1] if config_domains else _cli_domain("--restricted", "builtin:digits", args, grayscale)
    if args.original is not None:
        original = _cli_domain("--original", args.original, args, grayscale).test
    else:
        original = config_domains[0].test if config_domains else None
    task = _cli_task(args.mode) if config is None else _config_task(config)
    _check_model_fits(task, protected, restricted.train)
    if args.head is not None and args.head not in dict(protected.named_modules()):
        raise UserInputError(f"--head: {args.head!r} is not a module of the model; its modules with parameters: "
                             f"{surgery.parametrised_layers(protected)}")
    return run_attacks(
        protected, unprotected, partial(model_from_spec, spec), restricted.train, restricted.test, task,
        _cli_grid(args, config), original_test=original, out_dir=args.out, resume=args.resume,
        overwrite=args.overwrite, shard=_parse_shard(args.shard), device=args.device, head=args.head,
        plots=args.plots, progress=args.progress, jobs=args.jobs,
        command="sophon attack " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["attack"] else sys.argv[1:]),
        config={"protected": str(args.protected), "unprotected": args.unprotected,
                "restricted": args.restricted or ("run config" if config is not None else "builtin:digits"),
                "original": args.original or ("run config" if config is not None else None),
                "split_seed": args.split_seed, "image_size": args.image_size,
                **({"sophon": config.to_dict()} if config is not None else {})},
    )


def _cli_domain(option: str, source: str, args: argparse.Namespace, grayscale: bool):
    """A domain named on the command line, cut into train / val / test; what is wrong with it
    (a file, its contents, a callable's result) is wrong input naming ``option``."""
    from .data import domain_splits

    try:
        return domain_splits(load_domain(source, args.image_size, grayscale),
                             val=args.val_fraction, test=args.test_fraction, seed=args.split_seed)
    except (ValueError, TypeError) as exc:
        if is_user_error(exc):
            raise
        raise UserInputError(f"{option}: {describe(exc)}") from exc


def _config_task(config):
    from .tasks import make_task

    return make_task(config.mode, **config.task)


def _cli_task(mode: str):
    from .tasks import make_task

    try:
        return make_task(mode)
    except ValueError as exc:
        raise UserInputError(f"--mode: {describe(exc)}") from None


def _check_model_fits(task, model: nn.Module, train) -> None:
    """The protected model runs on the restricted inputs and gives the task's output. Labels are
    not checked here: a method that builds a new head sizes it to them (each attack checks its own)."""
    from .models import ModelOutputError

    sample = train.head(8)
    try:
        task.check_model(model, sample.x, torch.zeros_like(sample.y))
    except ModelOutputError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserInputError(f"--restricted: the model cannot run on it: {describe(exc)}") from exc


def _cli_grid(args: argparse.Namespace, config=None):
    """The grid of ``--preset`` / ``--grid`` (else the run config's attack section, else the
    default grid), with ``--epochs`` / ``--seeds`` applied."""
    grid: dict | list = {"preset": args.preset or "default"}
    if args.grid:
        path = Path(args.grid)
        if not path.is_file():
            raise FileNotFoundError(f"--grid: no grid file at {path}")
        loaded = _read_grid_file(path)
        grid = loaded.get("attack_grid", loaded) if isinstance(loaded, dict) else loaded
    elif args.preset is None and config is not None:
        from .workflow import attack_grid

        grid = attack_grid(config)
    if args.epochs is not None or args.seeds is not None:
        grid = dict(grid) if isinstance(grid, dict) else {"preset": grid}
        if args.epochs is not None:
            grid["epochs"] = [args.epochs]
        if args.seeds is not None:
            grid["seeds"] = args.seeds
    return grid


def main(argv: list[str] | None = None) -> int:
    """``python -m sophon_ext.attack``: the same as ``sophon attack``."""
    parser = add_attack_arguments(argparse.ArgumentParser(
        prog="sophon attack", description="Evaluate a protected model against real fine-tuning attacks."))
    return run_attack_cli(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
