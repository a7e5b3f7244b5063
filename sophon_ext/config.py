"""Every knob of a SOPHON run in one typed, validated configuration.

:class:`Config` is a tree of dataclasses. :func:`Config.from_dict` (and
:func:`load_config` for YAML/JSON files) checks every key and type against the
dataclass annotations and every value against its section's rules, and names
the offending field (``protect.alpha: must be > 0, got -1.0``) in a
:class:`ConfigError`. :func:`save_config` writes the same tree back, so a saved
config reloads to an equal object.

This module imports nothing of the package but its leaves (errors, references,
the atomic writer). Whether a name is known (an optimizer, a fine-tuning
method, a task, a model, a built-in data set) or an attack recipe is valid is
for the module that owns it to say: :mod:`sophon_ext.config_checks` installs
those checks (:class:`Registry`) when the package is imported.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch

from .atomic import atomic_write_bytes
from .errors import UserInputError, UserInputTypeError
from .references import is_python_reference

DATA_SOURCES = ("builtin", "image_folder", "torchvision", "arrays", "reference")
#: seeds must fit every generator they feed (torch, numpy), with room for per-iteration offsets
MAX_SEED = 2**32 - 1
#: the largest image side a data set may be resized to
MAX_IMAGE_SIZE = 4096


class ConfigError(UserInputError):
    """A configuration value is unknown, mistyped or impossible; the message names the field."""


class ConfigTypeError(ConfigError, UserInputTypeError):
    """A configuration value has the wrong type."""


# ----------------------------------------------------------------------------- registry checks


@dataclass
class Registry:
    """What the checks ask the package's registries (filled by :mod:`sophon_ext.config_checks`)."""

    #: optimizer preset names, sorted
    optimizers: list[str]
    #: () -> the fine-tuning methods a protection can simulate (methods may be registered later)
    simulated_methods: Callable[[], tuple[str, ...]]
    builtin_datasets: tuple[str, ...]
    #: () -> the task (mode) names
    task_names: Callable[[], tuple[str, ...]]
    #: make_task(mode, **task): raises TypeError/ValueError/ImportError for bad options
    make_task: Callable[..., Any]
    #: check_model(name, kwargs, where=...): raises UserInputError for an unknown model or bad kwargs
    check_model: Callable[..., None]
    #: check_family(family): raises ValueError when a member could not make a valid strategy
    check_family: Callable[[Any], None]
    #: attack_spec(**fields): builds an AttackSpec, raising TypeError/ValueError naming the field
    attack_spec: Callable[..., Any]


_registry: Optional[Registry] = None


def install_registry(checks: Registry) -> None:
    """Give the config its registry checks (:mod:`sophon_ext.config_checks` calls this once)."""
    global _registry
    _registry = checks


def registry() -> Registry:
    if _registry is None:  # only while the package itself is being imported
        raise RuntimeError("sophon_ext.config: the registry checks are not installed yet; import sophon_ext first")
    return _registry


# ----------------------------------------------------------------------------- sections


@dataclass
class DatasetConfig:
    """Where one domain's data comes from.

    ``source``: ``"builtin"`` (``name`` is ``"mnist"`` or ``"digits"``, shipped in
    installed packages), ``"image_folder"`` (``path`` is root/<class>/<image>),
    ``"torchvision"`` (``name`` is the class, e.g. ``"CIFAR10"``, already on disk
    under ``path``; never downloads), ``"arrays"`` (``path`` is an ``.npz`` with
    arrays ``x`` and ``y``) or ``"reference"`` (``name`` is ``package.module:callable``,
    called with ``kwargs``, returning a map-style Dataset, a DataLoader or an ``(x, y)``
    pair; a Dataset or DataLoader is read batch by batch, its transforms applied).
    An image folder with torchvision installed can be read on demand (``lazy``; by
    default only above :data:`sophon_ext.data.IN_MEMORY_IMAGES` images) and through a
    ``transform`` (``package.module:name`` of a callable on PIL images, e.g. a torchvision
    ``Compose``; replaces the resizing to ``image_size``).
    """

    source: Literal["builtin", "image_folder", "torchvision", "arrays", "reference"] = "builtin"
    name: Optional[str] = "mnist"
    path: Optional[str] = None
    image_size: int = 16
    grayscale: bool = False
    train: bool = True
    #: keep at most this many samples (a seeded random subset); None keeps all
    limit: Optional[int] = None
    #: image_folder: read images when their batch is drawn (null: only for large folders; needs torchvision)
    lazy: Optional[bool] = None
    #: image_folder: package.module:name of a transform applied to each PIL image (needs torchvision)
    transform: Optional[str] = None
    #: reference: keyword arguments of the callable ``name``
    kwargs: dict[str, Any] = field(default_factory=dict)

    def _validate(self, where: str) -> None:
        _check(1 <= self.image_size <= MAX_IMAGE_SIZE, where, "image_size", f"must be in [1, {MAX_IMAGE_SIZE}], got {self.image_size}")
        _check(self.limit is None or self.limit >= 1, where, "limit", f"must be >= 1 or null, got {self.limit}")
        if self.source in ("builtin", "torchvision", "reference"):
            _check(bool(self.name), where, "name", f"is required for source {self.source!r}")
        if self.source == "reference":
            _check(is_python_reference(self.name), where, "name", f"expected package.module:callable, got {self.name!r}")
        _check(self.source == "reference" or not self.kwargs, where, "kwargs", "applies to source 'reference' only")
        for key in ("lazy", "transform"):
            _check(self.source == "image_folder" or getattr(self, key) is None, where, key,
                   "applies to source 'image_folder' only")
        _check(self.transform is None or is_python_reference(self.transform), where, "transform",
               f"expected package.module:name, got {self.transform!r}")
        if self.source in ("image_folder", "torchvision", "arrays"):
            _check(bool(self.path), where, "path", f"is required for source {self.source!r}")
        if self.source == "builtin":
            datasets = registry().builtin_datasets
            _check(self.name in datasets, where, "name", f"unknown built-in dataset {self.name!r}; choose one of {datasets}")


@dataclass
class DataConfig:
    """The original domain (kept) and the restricted domain (made non-fine-tunable)."""

    original: DatasetConfig = field(default_factory=lambda: DatasetConfig(name="mnist"))
    restricted: DatasetConfig = field(default_factory=lambda: DatasetConfig(name="digits"))
    #: held-out fraction of each domain for the guard / model selection
    val_fraction: float = 0.1
    #: held-out fraction of each domain for the final evaluation and attacks' test curves
    test_fraction: float = 0.2
    split_seed: int = 0

    def _validate(self, where: str) -> None:
        _check_seed(self.split_seed, where, "split_seed")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, where, name, f"must be in (0, 1), got {value}")
        _check(self.val_fraction + self.test_fraction < 1.0, where, "val_fraction", "val_fraction + test_fraction must be < 1")


@dataclass
class ModelConfig:
    """A model by name, optionally starting from saved weights: a registry name of
    :data:`sophon_ext.models.MODEL_REGISTRY`, or a reference (``package.module:callable``,
    ``torchvision:NAME``, ``timm:NAME``; see :mod:`sophon_ext.models`) called with ``kwargs``."""

    name: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"width": 16, "depth": 3})
    #: a model file written by ``sophon pretrain`` / :func:`sophon_ext.checkpoint.save_model`, or a
    #: plain state dict (safetensors, or .pt / .pth / .bin read with ``torch.load(weights_only=True)``)
    weights: Optional[str] = None
    #: module name of the classifier head, when sophon_ext.surgery.find_head cannot find it
    head: Optional[str] = None
    #: where a model given by reference keeps its logits when it returns a mapping or an object
    output_key: str = "logits"

    def _validate(self, where: str) -> None:
        _check(bool(self.output_key), where, "output_key", "must be a non-empty string")
        try:
            registry().check_model(self.name, self.kwargs, where=where or "model")
        except UserInputError as exc:
            raise ConfigError(str(exc)) from None


@dataclass
class PretrainConfig:
    """Ordinary training on the original domain (what ``sophon pretrain`` and the demo run)."""

    epochs: int = 8
    lr: float = 1e-2
    batch_size: int = 32
    optimizer: str = "adam"

    def _validate(self, where: str) -> None:
        _check(self.epochs >= 1, where, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.lr > 0, where, "lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size >= 1, where, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check_optimizer(self.optimizer, where, "optimizer")


@dataclass
class StrategyConfig:
    """One simulated fine-tuning strategy (the fields of :class:`sophon_ext.FineTuneStrategy`).

    ``steps`` null means "use ``protect.inner_steps``".
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 32
    steps: Optional[int] = None
    method: str = "full"
    hparams: dict[str, Any] = field(default_factory=dict)
    #: for reinit_layers / freeze_first: a count of first layers or module names
    layers: Union[int, list[str], None] = None

    def _validate(self, where: str) -> None:
        methods = registry().simulated_methods()
        _check_optimizer(self.optimizer, where, "optimizer")
        _check(self.lr > 0, where, "lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size >= 1, where, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.steps is None or self.steps >= 1, where, "steps", f"must be >= 1 or null, got {self.steps}")
        _check(self.method in methods, where, "method", f"unknown method {self.method!r}; choose one of {methods}")
        if isinstance(self.layers, int):
            _check(self.layers >= 1, where, "layers", f"must be >= 1, got {self.layers}")


@dataclass
class FamilyConfig:
    """An attack family: a distribution over simulated fine-tuning strategies (``protect.strategies`` given as a mapping).

    Each draw picks a *member*: an optimizer from ``optimizers``, a method
    from ``methods`` and one of ``lr_bins`` learning-rate bands, then a
    learning rate log-uniform in that band of the optimizer's ``lr_ranges``
    entry (default :data:`sophon_ext.families.DEFAULT_LR_RANGES`), a batch size from
    ``batch_sizes``, ``layers`` for the methods that read it, and optimizer
    hyperparameters from ``hparams`` (``{optimizer: {name: spec}}``, a spec
    being ``[low, high]`` (uniform), ``{choices: [values]}`` (one of them) or
    a value). ``sampler``: ``uniform`` draws members
    uniformly; ``worst_case`` draws them in proportion to a running estimate
    of how far each escapes (its post-fine-tuning suppression loss, raised
    by escaping attack probes), with ``floor`` of the draws spread uniformly
    so every member keeps being drawn.
    """

    optimizers: list[str] = field(default_factory=lambda: ["sgd", "sgd_momentum", "nesterov", "adam", "adamw", "rmsprop",
                                                           "adagrad", "adadelta", "lion"])
    methods: list[str] = field(default_factory=lambda: ["full", "reinit_head", "reinit_layers", "head_only"])
    lr_ranges: dict[str, list[float]] = field(default_factory=dict)
    #: each optimizer's range split into this many equal log-width bands, each band its own member
    #: (the worst-case sampler can then prefer the rates that escape, e.g. the highest)
    lr_bins: int = 1
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    layers: list[int] = field(default_factory=lambda: [1])
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    sampler: Literal["uniform", "worst_case"] = "worst_case"
    floor: float = 0.3
    #: worst_case draws in proportion to estimate ** sharpness: above 1 the few members that escape
    #: most get most of the non-floor draws even among hundreds of members
    sharpness: float = 1.0
    #: weight of the newest observation in a member's running escape estimate
    smoothing: float = 0.1

    @classmethod
    def from_dict(cls, data: dict) -> "FamilyConfig":
        """Build and validate a family from plain data (what ``protect.strategies`` holds in a config file)."""
        return _from_dict(cls, data, "")

    def _validate(self, where: str) -> None:
        optimizers = registry().optimizers

        _check(len(self.optimizers) >= 1, where, "optimizers", "must list at least one optimizer")
        for i, name in enumerate(self.optimizers):
            _check(name in optimizers, where, f"optimizers[{i}]", f"unknown optimizer {name!r}; choose one of {optimizers}")
        _check(len(self.methods) >= 1, where, "methods", "must list at least one method")
        simulated = registry().simulated_methods()
        for i, name in enumerate(self.methods):
            _check(name in simulated, where, f"methods[{i}]", f"unknown method {name!r}; choose one of {simulated}")
        for name, bounds in self.lr_ranges.items():
            _check(name in optimizers, where, f"lr_ranges.{name}", f"unknown optimizer; choose one of {optimizers}")
            ok = isinstance(bounds, list) and len(bounds) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            _check(ok, where, f"lr_ranges.{name}", f"expected [low, high], got {bounds!r}")
            _check(0 < bounds[0] <= bounds[1], where, f"lr_ranges.{name}", f"need 0 < low <= high, got {bounds}")
        _check(self.lr_bins >= 1, where, "lr_bins", f"must be >= 1, got {self.lr_bins}")
        _check(len(self.batch_sizes) >= 1, where, "batch_sizes", "must list at least one batch size")
        for i, b in enumerate(self.batch_sizes):
            _check(b >= 1, where, f"batch_sizes[{i}]", f"must be >= 1, got {b}")
        _check(len(self.layers) >= 1, where, "layers", "must list at least one layer count")
        for i, b in enumerate(self.layers):
            _check(b >= 1, where, f"layers[{i}]", f"must be >= 1, got {b}")
        for opt, specs in self.hparams.items():
            _check(opt in optimizers, where, f"hparams.{opt}", f"unknown optimizer; choose one of {optimizers}")
            _check(isinstance(specs, dict), where, f"hparams.{opt}", f"expected a mapping of hyperparameter ranges, got {specs!r}")
            for name, spec in specs.items():
                expected = f"expected [low, high] with low <= high, {{choices: [values]}} or a value, got {spec!r}"
                if isinstance(spec, list):
                    ok = len(spec) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in spec) and spec[0] <= spec[1]
                    _check(ok, where, f"hparams.{opt}.{name}", expected)
                elif isinstance(spec, dict):
                    ok = list(spec) == ["choices"] and isinstance(spec["choices"], list) and len(spec["choices"]) >= 1
                    _check(ok, where, f"hparams.{opt}.{name}", expected)
        _check(0.0 <= self.floor <= 1.0, where, "floor", f"must be in [0, 1], got {self.floor}")
        _check(0.0 < self.sharpness <= 16.0, where, "sharpness", f"must be in (0, 16], got {self.sharpness}")
        _check(0.0 < self.smoothing <= 1.0, where, "smoothing", f"must be in (0, 1], got {self.smoothing}")
        # every member must make a valid strategy: check each optimizer's hyperparameters at its range ends
        try:
            registry().check_family(self)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


@dataclass
class ProbeConfig:
    """Real attacks run against the model during protection (``protect.probes``).

    Every ``every`` iterations (0: never), ``count`` short fine-tuning runs of
    ``epochs`` epochs with the attack harness on a held-out part of the
    restricted training data: the recipes in ``attacks`` (dicts of
    :class:`sophon_ext.attack.AttackSpec` fields), or, when that is empty,
    recipes drawn from the attack family (``protect.strategies``) (worst-case members first). A probe
    that escapes (the product's escape rule against training from scratch
    with the same recipe) raises its family member's estimate, so it is
    simulated more often. Probes are logged and listed in the report.
    """

    every: int = 0
    count: int = 2
    epochs: int = 2
    batch_size: int = 64
    attacks: list[dict[str, Any]] = field(default_factory=list)
    #: fraction of the restricted training data the probes train on (the rest is their test set)
    train_fraction: float = 0.7

    def _validate(self, where: str) -> None:
        _check(self.every >= 0, where, "every", f"must be >= 0, got {self.every}")
        _check(self.count >= 1, where, "count", f"must be >= 1, got {self.count}")
        _check(self.epochs >= 1, where, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, where, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(0.0 < self.train_fraction < 1.0, where, "train_fraction", f"must be in (0, 1), got {self.train_fraction}")
        for i, attack in enumerate(self.attacks):
            try:
                registry().attack_spec(**{"epochs": self.epochs, "batch_size": self.batch_size, **attack})
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{_join(where, 'attacks')}[{i}].{exc}") from None


@dataclass
class GuardConfig:
    """Original-domain guard: measured on the held-out split every ``every`` iterations.

    The run is "bad" when the metric is worse than ``floor`` (absolute) or
    worse than the starting value by more than ``max_drop`` (in metric units,
    or a fraction of the starting value when ``drop_is_fraction``). On a bad
    check the model and optimizers roll back to the last good check; then
    ``action`` is ``"stop"`` or ``"lower_lr"`` (multiply alpha and beta by
    ``lr_factor``, give up after ``max_rollbacks``).
    """

    enabled: bool = True
    every: int = 10
    floor: Optional[float] = None
    max_drop: Optional[float] = 0.05
    drop_is_fraction: bool = False
    action: Literal["stop", "lower_lr"] = "lower_lr"
    lr_factor: float = 0.5
    max_rollbacks: int = 3

    def _validate(self, where: str) -> None:
        _check(self.every >= 1, where, "every", f"must be >= 1, got {self.every}")
        _check(self.max_drop is None or self.max_drop >= 0, where, "max_drop", f"must be >= 0 or null, got {self.max_drop}")
        _check(0.0 < self.lr_factor < 1.0, where, "lr_factor", f"must be in (0, 1), got {self.lr_factor}")
        _check(self.max_rollbacks >= 0, where, "max_rollbacks", f"must be >= 0, got {self.max_rollbacks}")


@dataclass
class ProtectConfig:
    """The SOPHON loop (SOPHON.md "Algorithm")."""

    iterations: int = 3000
    #: fine-tuning-suppression steps per iteration
    fts_steps: int = 1
    #: normal-training-reinforcement steps per iteration
    ntr_steps: int = 3
    #: simulated fine-tuning steps per trajectory (K)
    inner_steps: int = 10
    #: the simulated attackers: an attack family (a mapping, FamilyConfig: num_strategies trajectories
    #: per FTS step drawn from it, each continued up to ``horizon``), or a fixed list of strategies
    #: (each FTS step runs all of them, or num_strategies drawn from them)
    strategies: Union[FamilyConfig, list[StrategyConfig]] = field(default_factory=FamilyConfig)
    #: real attack probes during protection (off by default)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    #: keep each layer's weight and bias norms at most this multiple of the pre-trained model's
    #: (null: unbounded), so the protection cannot hide the features behind a scale an attacker undoes
    scale_bound: Optional[float] = None
    #: weight of a penalty, added to NTR, that holds every hidden layer's per-channel pre-activation
    #: mean and std on restricted inputs at the pre-trained model's (null: off), so the protection
    #: cannot hide the features in dead units or behind a scale (sophon_ext/liveness.py)
    liveness: Optional[float] = None
    #: simulated attackers per FTS step: with a family, that many trajectories (slots) drawn from it;
    #: with a fixed list, 0 runs every listed strategy, n > 0 draws n of them (with fresh seeds)
    num_strategies: int = 3
    #: longest simulated fine-tuning, in steps (null, or <= inner_steps: K steps from the current
    #: parameters, the paper's). A strategy's trajectory is continued the next times it is drawn,
    #: from the current parameters plus the attacker's displacement, until it has run this many
    #: steps (sophon_ext/chains.py). Default 300: on the built-in default the protection then holds
    #: for the demo's 10 epochs (200 steps) of real fine-tuning, where K = 10 alone lets it escape
    horizon: Optional[int] = 300
    #: restricted-domain samples held out per trajectory and step to evaluate the suppression loss
    query_size: int = 32
    #: restricted-domain samples drawn per FTS step for the trajectories' batches (null: all)
    pool_size: Optional[int] = 2048
    order: Literal["first", "second"] = "first"
    #: meta-gradient norm clip (null: no clipping)
    meta_clip: Optional[float] = 0.5
    #: FTS (meta) Adam rate
    alpha: float = 3e-3
    #: iterations over which the FTS rate ramps linearly up to alpha (0: none); lets NTR keep the
    #: original task through the first, largest meta-gradients
    alpha_warmup: int = 0
    #: NTR Adam rate
    beta: float = 2e-3
    ntr_batch_size: int = 64
    #: simulate() execution path: auto | vmap | stacked | chunked | loop
    simulate_path: Literal["auto", "vmap", "stacked", "chunked", "loop"] = "auto"
    chunk_size: Optional[int] = None
    #: save a checkpoint every this many iterations (0: only at the end)
    checkpoint_every: int = 50
    guard: GuardConfig = field(default_factory=GuardConfig)

    @property
    def family(self) -> Optional[FamilyConfig]:
        """``strategies`` when it is an attack family, else None (a fixed list)."""
        return self.strategies if isinstance(self.strategies, FamilyConfig) else None

    def _validate(self, where: str) -> None:
        for name in ("iterations", "fts_steps", "inner_steps", "query_size", "ntr_batch_size"):
            value = getattr(self, name)
            _check(value >= 1, where, name, f"must be >= 1, got {value}")
        _check(self.ntr_steps >= 0, where, "ntr_steps", f"must be >= 0, got {self.ntr_steps}")
        _check(self.family is not None or len(self.strategies) >= 1, where, "strategies", "must list at least one strategy")
        _check(self.pool_size is None or self.pool_size >= 2, where, "pool_size", f"must be >= 2 or null, got {self.pool_size}")
        if self.family is not None:
            largest = max(self.family.batch_sizes)
        else:
            largest = max(s.batch_size for s in self.strategies) if self.strategies else 0
        if self.pool_size is not None:
            _check(largest + self.query_size <= self.pool_size, where, "pool_size",
                   f"must be >= the largest strategy batch_size + query_size ({largest} + {self.query_size})")
        _check(self.horizon is None or self.horizon >= 1, where, "horizon", f"must be >= 1 or null, got {self.horizon}")
        _check(self.alpha_warmup >= 0, where, "alpha_warmup", f"must be >= 0, got {self.alpha_warmup}")
        _check(self.num_strategies >= 0, where, "num_strategies", f"must be >= 0, got {self.num_strategies}")
        if self.family is not None:
            _check(self.num_strategies >= 1, where, "num_strategies", "must be >= 1 with a family (trajectories per FTS step)")
        _check(self.scale_bound is None or self.scale_bound >= 1.0, where, "scale_bound", f"must be >= 1 or null, got {self.scale_bound}")
        _check(self.liveness is None or self.liveness > 0, where, "liveness", f"must be > 0 or null, got {self.liveness}")
        _check(self.meta_clip is None or self.meta_clip > 0, where, "meta_clip", f"must be > 0 or null, got {self.meta_clip}")
        _check(self.alpha > 0, where, "alpha", f"must be > 0, got {self.alpha}")
        _check(self.beta > 0, where, "beta", f"must be > 0, got {self.beta}")
        _check(self.chunk_size is None or self.chunk_size >= 1, where, "chunk_size", f"must be >= 1 or null, got {self.chunk_size}")
        _check(self.checkpoint_every >= 0, where, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")


def default_attacks() -> list[dict[str, Any]]:
    """The demo's attacks: full fine-tuning with SGD momentum and with Adam,
    head re-initialised then Adam, first layer re-initialised then Adam."""
    return [
        {"method": "full", "optimizer": "sgd_momentum", "lr": 1e-2},
        {"method": "full", "optimizer": "adam", "lr": 1e-3},
        {"method": "reinit_head", "optimizer": "adam", "lr": 1e-3},
        {"method": "reinit_layers", "layers": 1, "optimizer": "adam", "lr": 1e-3},
    ]


@dataclass
class AttackConfig:
    """The attack check the demo runs after protecting (``sophon attack`` runs bigger grids).

    ``attacks``: each a dict of :class:`sophon_ext.attack.AttackSpec` fields
    (method, optimizer, lr, layers, hparams, ...); ``epochs``, ``batch_size``
    and ``seeds`` apply to all of them.
    """

    epochs: int = 10
    batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0])
    attacks: list[dict[str, Any]] = field(default_factory=default_attacks)

    def _validate(self, where: str) -> None:
        _check(self.epochs >= 1, where, "epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, where, "batch_size", f"must be >= 1, got {self.batch_size}")
        _check(len(self.seeds) >= 1, where, "seeds", "must list at least one seed")
        for i, seed in enumerate(self.seeds):
            _check_seed(seed, where, f"seeds[{i}]")
        _check(len(self.attacks) >= 1, where, "attacks", "must list at least one attack")
        for i, attack in enumerate(self.attacks):
            for key in ("epochs", "batch_size", "seed"):
                _check(key not in attack, f"{_join(where, 'attacks')}[{i}]", key, f"is set for all attacks by {_join(where, key + ('s' if key == 'seed' else ''))}")
            try:
                registry().attack_spec(**attack, epochs=self.epochs, batch_size=self.batch_size)
            except TypeError as exc:
                raise ConfigTypeError(f"{_join(where, 'attacks')}[{i}]: {exc}") from None
            except ValueError as exc:
                raise ConfigError(f"{_join(where, 'attacks')}[{i}].{exc}") from None


@dataclass
class Config:
    """A whole run: mode, data, model, pre-training, protection and the attack check."""

    #: a registered task (:func:`sophon_ext.tasks.task_names`: classification, generation)
    mode: str = "classification"
    seed: int = 0
    device: str = "cpu"
    #: CPU threads for torch (the command line applies it; null: torch's default)
    threads: Optional[int] = None
    #: keyword arguments of the task plug-in (classification: suppression, ice_weight, klu_weight)
    task: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def _validate(self, where: str) -> None:
        _check_seed(self.seed, where, "seed")
        _check(self.threads is None or self.threads >= 1, where, "threads", f"must be >= 1 or null, got {self.threads}")
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"{_join(where, 'device')}: {exc}") from None
        self._validate_task(where)

    def _validate_task(self, where: str) -> None:
        tasks = registry().task_names()
        _check(self.mode in tasks, where, "mode", f"unknown mode {self.mode!r}; choose one of {list(tasks)}")
        try:
            registry().make_task(self.mode, **self.task)
        except TypeError as exc:
            raise ConfigTypeError(f"{_join(where, 'task')}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{_join(where, 'task')}.{exc}") from None
        except ImportError as exc:
            raise ConfigError(f"{_join(where, 'mode')}: {self.mode!r} is not available ({exc})") from None

    # -- conversion -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """Build and validate a config from plain data; unknown keys and bad values raise :class:`ConfigError`."""
        return _from_dict(cls, data, "")

    def to_dict(self) -> dict:
        """Plain data (JSON/YAML-ready) that :meth:`from_dict` turns back into an equal config."""
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Re-check every field (after editing attributes in code); returns self."""
        return _from_dict(type(self), self.to_dict(), "")

    def replace(self, overrides: dict) -> "Config":
        """A validated copy with nested ``overrides`` merged in, e.g. ``{"protect": {"alpha": 3e-3}}``."""
        return Config.from_dict(_merge(self.to_dict(), overrides))


def load_config(path: str | Path) -> Config:
    """Load a config from a ``.yaml``/``.yml`` or ``.json`` file (missing keys keep their defaults)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config: {path} is not a text file ({exc.reason} at byte {exc.start})") from None
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config: {path} must end in .yaml, .yml or .json")
    import yaml

    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config: cannot parse {path}: {exc}") from None
    if data is None:
        data = {}
    return Config.from_dict(data)


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML or JSON (by suffix)."""
    path = Path(path)
    data = config.to_dict()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    elif path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        raise ConfigError(f"config: {path} must end in .yaml, .yml or .json")
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- checking


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _check(ok: bool, where: str, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{_join(where, name)}: {message}")


def _check_seed(seed: int, where: str, name: str) -> None:
    _check(0 <= seed <= MAX_SEED, where, name, f"must be in [0, {MAX_SEED}], got {seed}")


def _check_optimizer(name: str, where: str, field_name: str) -> None:
    optimizers = registry().optimizers
    _check(name in optimizers, where, field_name, f"unknown optimizer {name!r}; choose one of {optimizers}")


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("task", "kwargs", "hparams"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``hint`` and convert nested dataclasses."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return _convert(options[0], value, where)  # its own message names the inner field
        # a mapping or a list (e.g. an attack family or a list of strategies): the value's kind decides
        kinds = {dict: next((a for a in options if dataclasses.is_dataclass(a)), None),
                 list: next((a for a in options if typing.get_origin(a) is list), None)}
        if all(kinds.values()):
            if dataclasses.is_dataclass(value) and isinstance(value, kinds[dict]):
                value = dataclasses.asdict(value)
            for kind, option in kinds.items():
                if isinstance(value, kind) or (kind is list and isinstance(value, tuple)):
                    return _convert(option, value, where)
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as exc:
                errors.append(exc)
        names = " or ".join(_type_name(a) for a in args)
        raise ConfigTypeError(f"{where}: expected {names}, got {_describe(value)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{where}: expected a mapping of {hint.__name__} fields, got {_describe(value)}")
        return _from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"{where}: expected a list, got {_describe(value)}")
        (item,) = args or (Any,)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigTypeError(f"{where}: expected a mapping, got {_describe(value)}")
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise ConfigTypeError(f"{where}: keys must be strings, got {bad!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(f"{where}: expected bool, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"{where}: expected int, got {_describe(value)}")
        return value
    if hint is float:
        # YAML reads "1e-3" as a string; accept numeric strings only in float fields
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigTypeError(f"{where}: expected float, got {_describe(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigTypeError(f"{where}: expected float, got {_describe(value)}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: must be finite, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"{where}: expected str, got {_describe(value)}")
        return value
    raise TypeError(f"config: unsupported annotation {hint!r} at {where}")  # a bug in this file


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is list:
        return "list"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def _from_dict(cls: type, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{where or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{_join(where, str(unknown[0]))}: unknown key; {cls.__name__} accepts {names}")
    kwargs = {k: _convert(hints[k], v, _join(where, k)) for k, v in data.items()}
    obj = cls(**kwargs)
    obj._validate(where)
    return obj
