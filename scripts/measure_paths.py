"""Seconds per protection iteration and peak memory on each simulation path.

    PYTHONPATH=. python scripts/measure_paths.py --preset resnet --iterations 5
    PYTHONPATH=. python scripts/measure_paths.py --preset demo --paths vmap,stacked --set protect.inner_steps=5

(``PYTHONPATH=.`` from the repository root measures the source tree; without
it, the installed package.)

Each path runs in a fresh subprocess (peak RSS is per process, and the auto
path's cached choices must not carry over): the preset's config (plus
``--set`` overrides) with ``protect.simulate_path`` set to the path, the
built-in data, a freshly initialised model of the config's spec (no
pre-training: an iteration costs the same), the guard off (it is a periodic
evaluation, not part of the iteration). ``--warmup`` iterations run first
(tracing, kernel choices, functorch's first call), then ``--iterations``
are timed one by one, in wall-clock and in process CPU seconds (on a shared
machine the wall clock also counts the waits for a core). Peak memory is
``ru_maxrss`` of the subprocess (torch's allocations are invisible to
tracemalloc); "before" is the RSS with data and model loaded, so the
difference is what the protection adds. ``auto-timed`` runs the engine with
``simulate(path="auto")`` itself (timed candidates) instead of the engine's
untimed choice.
Prints a Markdown table; ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PATHS = ("auto", "vmap", "stacked", "loop")
#: not a config value: the engine calls simulate(path="auto") itself, which times its candidates on
#: the first steps and keeps the fastest (the engine's own "auto" settles on a path without timing)
TIMED_AUTO = "auto-timed"


def _config(preset: str, sets: list[str], path: str):
    from sophon_ext.cli import overrides_from_sets
    from sophon_ext.config import Config
    from sophon_ext.presets import preset_overrides

    config = Config().replace(preset_overrides(preset)).replace(overrides_from_sets(sets))
    path = "auto" if path == TIMED_AUTO else path
    return config.replace({"protect": {"simulate_path": path, "guard": {"enabled": False}, "checkpoint_every": 0}})


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure_one(preset: str, sets: list[str], path: str, iterations: int, warmup: int) -> dict:
    """One path in this process: the row of the table."""
    import torch

    from sophon_ext.engine import Sophon
    from sophon_ext.workflow import init_model, load_domains, model_spec

    config = _config(preset, sets, path)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    original, restricted = load_domains(config)
    spec = model_spec(config, original, restricted)
    model = init_model(spec, config.seed, config.device)
    before = _rss_mib()
    simulate_fn = None
    if path == TIMED_AUTO:
        from sophon_ext import simulate

        def simulate_fn(*args, **kwargs):
            return simulate(*args, **{**kwargs, "path": "auto"})

    engine = Sophon(model, original, restricted, config, model_spec=spec, progress=False, simulate_fn=simulate_fn)
    record = {}
    for _ in range(warmup):
        record = engine.step()
    times, cpu = [], []
    for _ in range(iterations):
        start, start_cpu = time.perf_counter(), time.process_time()
        record = engine.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {
        "path": path,
        "ran": record.get("path"),
        "variant": _timed_choice() if path == TIMED_AUTO else record.get("variant"),
        "s_per_iter_median": statistics.median(times),
        "s_per_iter_min": min(times),
        "cpu_s_per_iter_median": statistics.median(cpu),
        "rss_before_mib": before,
        "peak_rss_mib": _rss_mib(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _timed_choice() -> str:
    from sophon_ext.simulation import autotune

    return "+".join(sorted(set(autotune._PATH_CACHE.values()))) or "still timing: raise --warmup"


def _run_child(args, path: str) -> dict:
    command = [sys.executable, __file__, "--child", path, "--preset", args.preset, "--iterations", str(args.iterations),
               "--warmup", str(args.warmup)] + [f"--set={item}" for item in args.set]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"path": path, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| path asked | ran (variant) | s / iteration (median, min) | CPU s / iteration (median) "
             "| peak RSS MiB (before protection) |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['path']} | {r['ran']} ({r['variant']}) "
                     f"| {r['s_per_iter_median']:.3f}, {r['s_per_iter_min']:.3f} "
                     f"| {r['cpu_s_per_iter_median']:.3f} | {r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="resnet", help="a protection preset (sophon_ext/presets)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    parser.add_argument("--paths", default=",".join(PATHS),
                        help=f"comma-separated protect.simulate_path values, or {TIMED_AUTO} (simulate's timed auto; "
                             "give enough --warmup iterations to time its candidates, e.g. 4 at K=10)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each subprocess")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure_one(args.preset, args.set, args.child, args.iterations, args.warmup)))
        return 0
    rows = []
    for path in args.paths.split(","):
        rows.append(_run_child(args, path))
        print(f"# {path}: {rows[-1]}", file=sys.stderr, flush=True)
    print(f"preset {args.preset}, {args.iterations} timed iterations after {args.warmup}, {args.threads} thread(s), "
          f"{platform.machine()}, sets {args.set}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
