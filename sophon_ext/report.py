"""The evaluation report: summary numbers per attack, and the files written from it.

Written by the attack harness and by ``sophon demo``. The JSON layout is the
contract in docs/ARCHITECTURE.md ("Report"); this module also writes a CSV of
every curve, a Markdown summary table like the paper's (rows: starting
points, columns: attacks) and PNG plots. Nothing here branches on the task:
the metric's name and direction come from the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ._optional import missing_extra, require
from .atomic import atomic_write_bytes

SCHEMA_VERSION = 1
STARTS = ("protected", "unprotected", "scratch")
_SPEC_COLUMNS = ("method", "optimizer", "lr", "batch_size", "epochs", "weight_decay", "schedule", "seed")


# ---------------------------------------------------------------- summary numbers

def _filled(values: Sequence[float | None]) -> list[float]:
    """A curve with the entries after a divergence (None) counted as no progress from entry 0."""
    return [values[0] if v is None else float(v) for v in values]


def _better_or_equal(a: float, b: float, higher_is_better: bool) -> bool:
    return a >= b if higher_is_better else a <= b


def epochs_to_reach(values: Sequence[float | None], target: float, higher_is_better: bool) -> int | None:
    """First epoch (0 = before fine-tuning) whose value is at least as good as ``target``, or None."""
    for epoch, value in enumerate(values):
        if value is not None and _better_or_equal(value, target, higher_is_better):
            return epoch
    return None


def area_under_curve(values: Sequence[float | None]) -> float:
    """Trapezoidal area under a per-epoch curve, divided by the number of epochs
    (so it is the curve's mean level); diverged entries count as entry 0."""
    v = _filled(values)
    if len(v) < 2:
        return v[0]
    return sum((a + b) / 2 for a, b in zip(v[:-1], v[1:])) / (len(v) - 1)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b != 0 else None


#: the escape rule's margins, in metric units: final and area (mean level) of the curve
ESCAPE_FINAL_MARGIN = 0.02
ESCAPE_AREA_MARGIN = 0.01


@dataclass(frozen=True)
class Chance:
    """What guessing scores (``level``, e.g. 1/C for accuracy over C classes) and how far a
    guessing model's score spreads on the test set (``band``: two binomial standard errors of
    ``level`` over the test samples, at least ``ESCAPE_FINAL_MARGIN``)."""

    level: float
    band: float


def chance_level(task, data) -> Chance | None:
    """The chance level of ``task``'s metric on ``data`` (accuracy: 1/C), or None when it has none."""
    if task.metric_name != "accuracy" or data.num_classes <= 0 or len(data) == 0:
        return None
    level = 1.0 / data.num_classes
    return Chance(level, max(ESCAPE_FINAL_MARGIN, 2.0 * math.sqrt(level * (1.0 - level) / len(data))))


def escapes(protected: Sequence[float | None], scratch: Sequence[float | None], higher_is_better: bool,
            chance: Chance | None = None) -> bool:
    """The one escape rule of the product (demo check, attack grids, probes in the loop).

    An attack escapes when fine-tuning the protected model ends more than
    ``ESCAPE_FINAL_MARGIN`` better than training from scratch under the same
    recipe, or its area under the per-epoch curve is more than
    ``ESCAPE_AREA_MARGIN`` better. A protected curve whose final value and
    area both stay within ``chance.band`` of ``chance.level`` (what a guessing
    model scores, give or take two standard errors on the test set) is a tie
    at chance, not an escape.
    """
    sign = 1.0 if higher_is_better else -1.0
    p, s = _filled(protected), _filled(scratch)
    ahead = sign * (p[-1] - s[-1]) > ESCAPE_FINAL_MARGIN or \
        sign * (area_under_curve(p) - area_under_curve(s)) > ESCAPE_AREA_MARGIN
    if not ahead or chance is None:
        return ahead
    at_chance = all(sign * (v - chance.level) <= chance.band for v in (p[-1], area_under_curve(p)))
    return not at_chance


def summarise_attack(curves: dict, higher_is_better: bool, chance: Chance | None = None) -> dict:
    """Summary numbers of one attack from its curves (``{start: {"metric": [...]}}``).

    - ``overhead_ratio``: epochs the protected model needs to reach the metric
      scratch has at the end of the budget, over the epochs scratch itself
      needs (its first epoch at that level, counted as at least 1); "never"
      when the protected model does not get there within the budget.
    - ``auc_ratio``: area under the protected curve over the area under the
      scratch curve (None when scratch's area is 0).
    - ``max_gap_vs_scratch``: the largest lead of protected over scratch at
      any epoch, in the better direction (positive: the protected model was
      ahead of training from scratch at some point).
    - ``final``: the last entry of each curve (None if it diverged).
    - ``escape``: :func:`escapes` (protected against scratch).
    Diverged entries count as no progress from entry 0.
    """
    sign = 1.0 if higher_is_better else -1.0
    protected = _filled(curves["protected"]["metric"])
    scratch = _filled(curves["scratch"]["metric"])
    target = scratch[-1]
    scratch_epochs = epochs_to_reach(scratch, target, higher_is_better)
    reach = {start: epochs_to_reach(_filled(c["metric"]), target, higher_is_better) for start, c in curves.items()}
    overhead = {start: ("never" if e is None else e / max(scratch_epochs, 1)) for start, e in reach.items()}
    return {
        "overhead_ratio": overhead["protected"],
        "auc_ratio": _ratio(area_under_curve(protected), area_under_curve(scratch)),
        "max_gap_vs_scratch": max(sign * (p - s) for p, s in zip(protected, scratch)),
        "final": {start: c["metric"][-1] for start, c in curves.items()},
        "scratch_final_target": target,
        "epochs_to_scratch_final": reach,
        "overhead_ratios": overhead,
        "auc": {start: area_under_curve(c["metric"]) for start, c in curves.items()},
        "escape": escapes(curves["protected"]["metric"], curves["scratch"]["metric"], higher_is_better, chance),
        "chance": None if chance is None else {"level": chance.level, "band": chance.band},
    }


def _recipe_key(attack: dict) -> str:
    """An attack's recipe: everything that defines it except its seed."""
    fields = {k: v for k, v in attack.items() if k not in ("name", "seed", "curves", "summary", "keys")}
    return json.dumps(fields, sort_keys=True, default=str)


def _mean_curve(curves: list[Sequence[float | None]]) -> list[float]:
    filled = [_filled(c) for c in curves]
    return [sum(values) / len(values) for values in zip(*filled)]


def _best_curve(curves: list[Sequence[float | None]], higher_is_better: bool) -> list[float]:
    """The curve with the best final value (what one keeps of several tries)."""
    sign = 1.0 if higher_is_better else -1.0
    return max((_filled(c) for c in curves), key=lambda c: sign * c[-1])


def summarise_seeds(attacks: list[dict], higher_is_better: bool, chance: Chance | None = None) -> list[dict]:
    """One entry per recipe that ran with two or more seeds: the escape rule applied to the
    seeds' mean curves (``escape_mean``) and to each start's best seed (``escape_best``: the
    attacker and the from-scratch trainer each keep their best of the same number of tries),
    with the per-seed finals and how many single seeds escape.

    Why: at a high adaptive rate training from scratch lands anywhere between chance and a
    good model depending on the seed, so a one-seed verdict can be noise either way."""
    groups: dict[str, list[dict]] = {}
    for attack in attacks:
        groups.setdefault(_recipe_key(attack), []).append(attack)
    recipes = []
    for members in groups.values():
        if len({a["seed"] for a in members}) < 2 or any("scratch" not in a["curves"] for a in members):
            continue
        curves = {start: [a["curves"][start]["metric"] for a in members]
                  for start in STARTS if all(start in a["curves"] for a in members)}
        mean = {start: _mean_curve(c) for start, c in curves.items()}
        best = {start: _best_curve(c, higher_is_better) for start, c in curves.items()}
        first = members[0]
        recipes.append({
            "name": first["name"].rsplit("-s", 1)[0] if first["name"].endswith(f"-s{first['seed']}") else first["name"],
            "seeds": [a["seed"] for a in members],
            "finals": {start: [_filled(c)[-1] for c in cs] for start, cs in curves.items()},
            "mean_final": {start: c[-1] for start, c in mean.items()},
            "mean_auc": {start: area_under_curve(c) for start, c in mean.items()},
            "best_final": {start: c[-1] for start, c in best.items()},
            "seed_escapes": sum(bool(a["summary"].get("escape")) for a in members),
            "escape_mean": escapes(mean["protected"], mean["scratch"], higher_is_better, chance),
            "escape_best": escapes(best["protected"], best["scratch"], higher_is_better, chance),
        })
    return recipes


# ---------------------------------------------------------------- the report dict

def versions() -> dict:
    """Versions of everything that can change a number."""
    import numpy
    import torch

    from . import __version__
    from .ops import extension_info

    try:
        ext = extension_info()
    except Exception as exc:  # noqa: BLE001 - the report must still be written
        ext = {"error": str(exc)}
    return {"sophon_ext": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0], "platform": platform.platform(), "extension": ext}


def build_report(task, config: dict, attacks: list[dict], original_domain: dict | None = None,
                 diagnostics: dict | None = None, **extra) -> dict:
    """The report dict (schema in docs/ARCHITECTURE.md); ``extra`` keys are added at the top level."""
    report = {
        "schema_version": SCHEMA_VERSION,
        "task": task.name,
        "metric": task.metric_name,
        "higher_is_better": bool(task.higher_is_better),
        "versions": versions(),
        "config": config,
        "original_domain": original_domain or {},
        "attacks": attacks,
        "diagnostics": diagnostics or {},
    }
    report.update(extra)
    return report


# ---------------------------------------------------------------- files

def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`sophon_ext.atomic.atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, allow_nan=False, default=_json_default) + "\n")


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"report: cannot write a {type(value).__name__} to JSON")


def curves_csv(report: dict) -> str:
    """One row per (attack, starting point, epoch)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["attack", *_SPEC_COLUMNS, "start", "epoch", report["metric"], "loss", "train_loss", "diverged"])
    for attack in report["attacks"]:
        spec = [attack.get(c) for c in _SPEC_COLUMNS]
        for start, curve in attack["curves"].items():
            for epoch, value in enumerate(curve["metric"]):
                train_loss = curve.get("train_loss", [None] * len(curve["metric"]))[epoch]
                writer.writerow([attack["name"], *spec, start, epoch, _csv(value), _csv(curve["loss"][epoch]),
                                 _csv(train_loss), int(bool(curve["diverged"]))])
    return out.getvalue()


def _csv(value) -> str:
    return "" if value is None else repr(float(value))


def _fmt(value) -> str:
    if value is None:
        return "diverged"
    if isinstance(value, str):
        return value
    return f"{value:.3f}"


def _starts(report: dict) -> list[str]:
    present = {s for a in report["attacks"] for s in a["curves"]}
    return [s for s in STARTS if s in present]


def summary_markdown(report: dict) -> str:
    """Markdown tables: the paper-style table (rows: starting points, columns: attacks,
    cells: final metric), then one row per attack with its summary numbers."""
    metric = report["metric"]
    direction = "higher is better" if report["higher_is_better"] else "lower is better"
    attacks = report["attacks"]
    lines = [f"# Attack evaluation ({report['task']}, {metric}: {direction})", ""]
    if report.get("original_domain"):
        lines += ["Original-domain " + metric + " before fine-tuning: "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in report["original_domain"].items()), ""]
    lines += [f"## Final restricted-domain {metric} after fine-tuning", ""]
    lines += ["| start | " + " | ".join(f"A{i}" for i in range(len(attacks))) + " |",
              "|---|" + "---|" * len(attacks)]
    for start in _starts(report):
        cells = [_fmt(a["curves"][start]["metric"][-1]) if start in a["curves"] else "" for a in attacks]
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    lines += ["", "## Attacks", "",
              "| id | method | optimizer | lr | batch | epochs | wd | schedule | seed | "
              + " | ".join(f"{s} final" for s in _starts(report))
              + " | overhead ratio | AUC ratio | max gap vs scratch |",
              "|---" * (9 + len(_starts(report)) + 3) + "|"]
    for i, a in enumerate(attacks):
        s = a["summary"]
        spec = [a["method"], a["optimizer"], f"{a['lr']:g}", a["batch_size"], a["epochs"], f"{a['weight_decay']:g}",
                a["schedule"], a["seed"]]
        finals = [_fmt(a["curves"][st]["metric"][-1]) if st in a["curves"] else "" for st in _starts(report)]
        lines.append(f"| A{i} | " + " | ".join(str(x) for x in spec) + " | " + " | ".join(finals)
                     + f" | {_fmt(s['overhead_ratio'])} | {_fmt(s['auc_ratio'])} | {_fmt(s['max_gap_vs_scratch'])} |")
    escaped = [f"A{i}" for i, a in enumerate(attacks) if a["summary"].get("escape")]
    lines += ["", f"**{len(escaped)} of {len(attacks)} attacks escape** (final more than {ESCAPE_FINAL_MARGIN} or area "
              f"more than {ESCAPE_AREA_MARGIN} better than scratch, not a tie at chance)"
              + (": " + ", ".join(escaped) if escaped else "") + "."]
    lines += ["", "Overhead ratio: epochs the protected model needs to reach scratch's final "
              f"{metric}, over the epochs scratch needs (\"never\": not within the budget). AUC ratio: area under "
              "the protected curve over scratch's. Max gap: largest lead of protected over scratch at any epoch.", ""]
    lines += _seeds_markdown(report)
    lines += _inspection_markdown(report)
    lines += _diagnostics_markdown(report)
    lines += _protection_markdown(report)
    if report.get("command"):
        lines += ["Produced by:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def _seeds_markdown(report: dict) -> list[str]:
    """The recipes that ran with several seeds: per-seed finals, and the escape rule on the
    seeds' mean curves and on each start's best seed."""
    recipes = report.get("across_seeds") or []
    if not recipes:
        return []
    lines = ["## Across seeds", "",
             "| recipe | seeds | protected finals | scratch finals | mean final, protected / scratch "
             "| best final, protected / scratch | single seeds escaping | escape (mean) | escape (best) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in recipes:
        finals = {start: " ".join(_fmt(v) for v in r["finals"][start]) for start in ("protected", "scratch")}
        lines.append(f"| {r['name']} | {' '.join(str(s) for s in r['seeds'])} | {finals['protected']} | "
                     f"{finals['scratch']} | {_fmt(r['mean_final']['protected'])} / {_fmt(r['mean_final']['scratch'])} | "
                     f"{_fmt(r['best_final']['protected'])} / {_fmt(r['best_final']['scratch'])} | "
                     f"{r['seed_escapes']} of {len(r['seeds'])} | {'yes' if r['escape_mean'] else 'no'} | "
                     f"{'yes' if r['escape_best'] else 'no'} |")
    by_mean = sum(r["escape_mean"] for r in recipes)
    by_best = sum(r["escape_best"] for r in recipes)
    lines += ["", f"**{by_mean} of {len(recipes)} recipes escape on the seeds' mean curves, {by_best} of "
              f"{len(recipes)} best seed against best seed** (the same rule as above).", ""]
    return lines


def _diagnostics_markdown(report: dict) -> list[str]:
    """Where the protection lives, per layer: exactly-zero activations on each domain and the
    weight/bias scale of the protected model against the unprotected one."""
    def _number(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    diag = report.get("diagnostics") or {}
    zero, norms = diag.get("zero_fraction", {}), diag.get("norms", {})
    if "protected" not in zero or "unprotected" not in zero:
        return []
    domains = list(zero["protected"])
    lines = ["## Where the protection lives", "",
             "| layer | " + " | ".join(f"zero share on {d}, protected / unprotected" for d in domains)
             + " | weight norm, protected / unprotected | bias mean, protected / unprotected |",
             "|---|" + "---|" * (len(domains) + 2)]
    for layer in diag.get("layers", []):
        cells = [f"{_number(zero['protected'][d].get(layer))} / {_number(zero['unprotected'][d].get(layer))}" for d in domains]
        p, u = norms.get("protected", {}).get(layer, {}), norms.get("unprotected", {}).get(layer, {})
        cells.append(f"{_number(p.get('weight_norm'))} / {_number(u.get('weight_norm'))}")
        cells.append(f"{_number(p.get('bias_mean'))} / {_number(u.get('bias_mean'))}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return lines + [""]


def _protection_markdown(report: dict, members: int = 12) -> list[str]:
    """The demo's protection run: the check's verdict, the simulated family's most-drawn members
    (worst-case sampler: draws, escape estimate, probability) and the real attack probes."""
    protection, checks = report.get("protection") or {}, report.get("checks") or {}
    lines = []
    if checks:
        verdict = "PASS" if checks.get("protected_passes") else "FAIL"
        lines += [f"## Protection check: {verdict}", "",
                  f"No attack escapes and the original domain drops at most 0.03 "
                  f"(drop {checks.get('original_drop', 0.0):.3f}).", ""]
    family = protection.get("family")
    if family:
        top = sorted(family, key=lambda m: -m["draws"])[:members]
        lines += [f"## Simulated attack family ({len(family)} members; the {len(top)} most drawn)", "",
                  "| member | draws | escape estimate | probability now |", "|---|---|---|---|"]
        for m in top:
            estimate = "-" if m["estimate"] is None else f"{m['estimate']:.3f}"
            lines.append(f"| {m['member']} | {m['draws']} | {estimate} | {m['probability']:.3f} |")
        lines.append("")
    probes = protection.get("probes")
    if probes:
        lines += [f"## Attack probes during protection ({protection.get('probe_escapes', 0)} of {len(probes)} escaped)", "",
                  "| iteration | attack | protected final / area | scratch final / area | escape |", "|---|---|---|---|---|"]
        for p in probes:
            lines.append(f"| {p['iteration']} | {p['attack']} | {_fmt(p['protected_final'])} / {_fmt(p['protected_area'])} "
                         f"| {_fmt(p['scratch_final'])} / {_fmt(p['scratch_area'])} | {'yes' if p['escape'] else 'no'} |")
        lines.append("")
    return lines


def _inspection_markdown(report: dict) -> list[str]:
    """A table of what the task's ``inspect_model`` recorded on each fine-tuned model
    (generation: distances of samples to real restricted images, the sample grid); empty if nothing."""
    rows = [(i, start, a["curves"][start]["inspection"]) for i, a in enumerate(report["attacks"])
            for start in _starts(report) if isinstance(a["curves"].get(start, {}).get("inspection"), dict)]
    if not rows:
        return []
    keys = sorted({k for _, _, found in rows for k in found})
    lines = ["## After fine-tuning: the task's inspection of each model", "",
             "| id | start | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for i, start, found in rows:
        cells = [_fmt(found[k]) if isinstance(found.get(k), float) else str(found.get(k, "")) for k in keys]
        lines.append(f"| A{i} | {start} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_curves(report: dict, path: str | Path, columns: int = 6) -> None:
    """Metric vs epoch, one panel per attack, one line per starting point."""
    plt = _pyplot()
    attacks = report["attacks"]
    cols = max(1, min(columns, len(attacks)))
    rows = max(1, math.ceil(len(attacks) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    styles = {"protected": ("tab:red", "-"), "unprotected": ("tab:blue", "--"), "scratch": ("tab:gray", ":")}
    for ax, (i, attack) in zip(axes.flat, enumerate(attacks)):
        for start, curve in attack["curves"].items():
            color, style = styles.get(start, ("black", "-"))
            values = [math.nan if v is None else v for v in curve["metric"]]
            ax.plot(range(len(values)), values, style, color=color, label=start)
        ax.set_title(f"A{i} {attack['method']} {attack['optimizer']} lr={attack['lr']:g}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=7)
    for ax in axes.flat[len(attacks):]:
        ax.axis("off")
    axes[0, 0].set_ylabel(report["metric"], fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _grid_axes(attacks: list[dict]) -> tuple[list[str], list[str]]:
    """Heat-map rows (methods) and columns (every other spec field that varies)."""
    varying = [c for c in _SPEC_COLUMNS if c != "method" and len({json.dumps(a.get(c)) for a in attacks}) > 1]
    rows = list(dict.fromkeys(a["method"] for a in attacks))

    def label(c, value):
        if c in ("optimizer", "schedule"):
            return str(value)  # the value names itself
        return f"{c}={value:g}" if isinstance(value, float) else f"{c}={value}"

    def column(a):
        return " ".join(label(c, a[c]) for c in varying) or "all"

    return rows, [column(a) for a in attacks]


def plot_heatmap(report: dict, path: str | Path) -> None:
    """Final protected minus final scratch metric over the grid (rows: methods)."""
    import numpy as np

    plt = _pyplot()
    attacks = report["attacks"]
    rows, labels = _grid_axes(attacks)
    cols = list(dict.fromkeys(labels))
    grid = np.full((len(rows), len(cols)), np.nan)
    for attack, label in zip(attacks, labels):
        final = attack["summary"]["final"]
        if final.get("protected") is not None and final.get("scratch") is not None:
            grid[rows.index(attack["method"]), cols.index(label)] = final["protected"] - final["scratch"]
    limit = max(float(np.nanmax(np.abs(grid))), 1e-3) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.9 * len(cols)), 1.8 + 0.45 * len(rows)))
    image = ax.imshow(grid, cmap="RdBu_r" if report["higher_is_better"] else "RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for (r, c), value in np.ndenumerate(grid):
        ax.text(c, r, "x" if np.isnan(value) else f"{value:+.2f}", ha="center", va="center", fontsize=6)
    direction = "higher" if report["higher_is_better"] else "lower"
    ax.set_title(f"final {report['metric']}: protected - scratch ({direction} is better for the attacker)", fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    _save(fig, path)


def plot_diagnostics(report: dict, path: str | Path) -> None:
    """Fraction of exactly-zero activations per layer, per model and domain."""
    plt = _pyplot()
    zero = report["diagnostics"]["zero_fraction"]
    layers = report["diagnostics"]["layers"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(layers) + 2), 3.0))
    series = [(m, d) for m in zero for d in zero[m]]
    width = 0.8 / max(len(series), 1)
    for k, (model, domain) in enumerate(series):
        values = [zero[model][domain].get(layer, math.nan) for layer in layers]
        ax.bar([i + k * width for i in range(len(layers))], values, width, label=f"{model} / {domain}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("zero activations", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _pyplot():
    matplotlib = require("matplotlib", "plots")

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    try:
        save_figure(fig, path, dpi=110)
    finally:
        _pyplot().close(fig)


def save_figure(fig, path: str | Path, dpi: int) -> None:
    """A matplotlib figure as a PNG, written atomically (:func:`sophon_ext.atomic.atomic_write_bytes`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def write_outputs(report: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write report.json, curves.csv, summary.md and (with ``plots``) curves.png,
    heatmap.png and diagnostics.png (when there are diagnostics) under ``out_dir``."""
    out = Path(out_dir)
    paths = {"report": out / "report.json", "curves_csv": out / "curves.csv", "summary": out / "summary.md"}
    atomic_write_json(paths["report"], report)
    atomic_write_text(paths["curves_csv"], curves_csv(report))
    atomic_write_text(paths["summary"], summary_markdown(report))
    if plots and (why := missing_extra("plots")):  # the report is the result; the plots only show it
        warnings.warn(f"report: plots not written: {why}", RuntimeWarning, stacklevel=2)
        plots = False
    if plots and report["attacks"]:
        paths["curves_png"] = out / "curves.png"
        paths["heatmap_png"] = out / "heatmap.png"
        plot_curves(report, paths["curves_png"])
        plot_heatmap(report, paths["heatmap_png"])
    if plots and report.get("diagnostics", {}).get("zero_fraction"):
        paths["diagnostics_png"] = out / "diagnostics.png"
        plot_diagnostics(report, paths["diagnostics_png"])
    return paths
