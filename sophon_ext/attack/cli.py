"""The ``sophon attack`` command (:func:`add_attack_arguments`, :func:`run_attack_cli`;
also ``python -m sophon_ext.attack``), and what it reads: domains (:func:`load_domain`)
and model files (:func:`load_model_file`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from ..data import ArrayDataset, MapDataset
from ..errors import UserInputError, describe, is_user_error
from .. import surgery
from .grid import GRID_PRESETS, _read_grid_file
from .run import _check_shard, run_attacks


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
    from ..tasks import task_names

    parser.add_argument("--mode", choices=task_names(), default=None,
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
    from ..cli import _default_config, overrides_from_sets
    from ..config import load_config

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
    from ..checkpoint import load_model_and_spec
    from ..models import DEFAULT_OUTPUT_KEY, is_reference

    fallback = {"name": model_name, "kwargs": model_kwargs or {}}
    if is_reference(model_name) and output_key != DEFAULT_OUTPUT_KEY:
        fallback["output_key"] = output_key
    return load_model_and_spec(path, fallback)


def load_domain(source: str, image_size: int = 16, grayscale: bool = True) -> ArrayDataset | MapDataset:
    """A dataset from ``builtin:NAME``, an ImageFolder directory, an ``.npz`` with arrays x and y,
    or ``package.module:callable``: a function called without arguments that returns anything
    :func:`sophon_ext.data.as_dataset` accepts (a map-style Dataset or a DataLoader with its
    transforms, read batch by batch; an ``(x, y)`` pair; an ArrayDataset)."""
    from ..data import dataset_from_reference, from_arrays, image_folder, load_builtin
    from ..references import is_python_reference

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
        if report.get("across_seeds"):
            recipes = report["across_seeds"]
            print(f"sophon attack: across seeds, {sum(r['escape_mean'] for r in recipes)} of {len(recipes)} recipes "
                  f"escape on the mean curves, {sum(r['escape_best'] for r in recipes)} best seed against best seed")
    else:
        print(f"sophon attack: shard done ({len(report['attacks'])} attacks finished so far); "
              "the report is written when every shard has finished")
    return 0


def _attack_from_args(args: argparse.Namespace) -> dict:
    import shlex
    import sys
    from functools import partial

    from ..models import model_from_spec

    config = run_config_of(args)
    args = resolved_options(args, config)
    protected, spec = _load_model_and_spec(args.protected, args.model, args.model_kwargs, args.output_key)
    unprotected = (load_model_file(args.unprotected, args.model, args.model_kwargs, args.output_key)
                   if args.unprotected else None)
    first = next(iter(protected.parameters()), None)
    grayscale = first is None or first.dim() < 2 or first.shape[1] == 1
    config_domains = None
    if config is not None and (args.restricted is None or args.original is None):
        from ..workflow import load_domains

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
    from ..data import domain_splits

    try:
        return domain_splits(load_domain(source, args.image_size, grayscale),
                             val=args.val_fraction, test=args.test_fraction, seed=args.split_seed)
    except (ValueError, TypeError) as exc:
        if is_user_error(exc):
            raise
        raise UserInputError(f"{option}: {describe(exc)}") from exc


def _config_task(config):
    from ..tasks import make_task

    return make_task(config.mode, **config.task)


def _cli_task(mode: str):
    from ..tasks import make_task

    try:
        return make_task(mode)
    except ValueError as exc:
        raise UserInputError(f"--mode: {describe(exc)}") from None


def _check_model_fits(task, model: nn.Module, train) -> None:
    """The protected model runs on the restricted inputs and gives the task's output. Labels are
    not checked here: a method that builds a new head sizes it to them (each attack checks its own)."""
    from ..models import ModelOutputError

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
        from ..workflow import attack_grid

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
