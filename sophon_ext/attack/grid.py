"""Attack grids: named presets (:data:`GRID_PRESETS`), the expansion of a grid into
attacks (:func:`expand_grid`), and grids from presets, files, dicts or lists of
attacks (:func:`load_grid`)."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

from ..errors import UserInputError, UserInputTypeError, describe
from ..optim.presets import PRESETS
from .spec import ATTACK_METHODS, AttackSpec

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
