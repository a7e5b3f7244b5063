"""The SOPHON loop: fine-tuning suppression, normal training reinforcement, guard.

One outer iteration (SOPHON.md, "Algorithm"):

1. FTS, ``fts_steps`` times: draw the simulated strategies, run them with
   :func:`sophon_ext.simulate` on a restricted-domain batch, put the returned
   meta-gradient on the parameters, clip its norm, take an Adam step (rate
   ``alpha``). Buffers (BatchNorm running statistics) are restored afterwards,
   so FTS never changes them. With ``protect.horizon`` longer than the
   simulated steps, each strategy's trajectory is continued at later FTS
   steps until it has run ``horizon`` steps (:mod:`sophon_ext.chains`).
2. NTR, ``ntr_steps`` times: one step of the task's original loss on an
   original-domain batch with a separate Adam (rate ``beta``); BatchNorm
   statistics follow the original domain here, in train mode.
3. Guard, every ``guard.every`` iterations and at the end: the task's metric on
   the held-out original-domain split; when it is worse than the floor the
   model and both optimizers roll back to the last good check, then the run
   stops or continues with lower rates.

The engine knows only the :class:`~sophon_ext.tasks.Task` protocol (nothing
about classification) and the ``simulate`` contract (nothing about vmap).
Everything random is drawn from one seeded ``torch.Generator``, whose state,
with the model, the optimizers and the guard's last good state, goes into the
checkpoints, so a resumed run ends exactly where an uninterrupted one does.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed
from .config import Config, ConfigError, ProtectConfig, StrategyConfig
from .data import ArrayDataset, DomainSplits, MapDataset, as_dataset, split
from .errors import UserInputError
from .methods import get_method
from .tasks import Task, check_model_on, evaluate_dataset, make_task

DataLike = Any  # ArrayDataset | DomainSplits | (x, y) pair | map-style torch Dataset | DataLoader
Dataset = ArrayDataset | MapDataset
#: what a run writes in its ``out_dir``
OUT_DIR_FILES = {"log.jsonl": "file", "checkpoint": "dir"}
#: how a guard stop caused by NaN/inf weights or metrics starts its reason
NON_FINITE = "non-finite values"


def _check_methods_fit(model: nn.Module, strategies, pc: ProtectConfig) -> None:
    """Refuse, before the first iteration, a simulated method that cannot change ``model``."""
    if strategies is not None:
        named = [(f"strategies[{i}].method", s.method) for i, s in enumerate(strategies)]
    elif pc.family is not None:
        named = [(f"protect.strategies.methods[{i}]", m) for i, m in enumerate(pc.family.methods)]
    else:
        named = [(f"protect.strategies[{i}].method", s.method) for i, s in enumerate(pc.strategies)]
    for where, name in named:
        if name == "custom":
            continue
        why = get_method(name).refusal(model)
        if why is not None:
            raise UserInputError(f"{where}: method {name!r} cannot change this model: {why}")


class ProtectionFailed(RuntimeError):
    """The protection could not produce a usable model (e.g. it diverged to non-finite weights
    and the guard gave up); nothing is written as the protected model."""


@dataclass
class ProtectionResult:
    """What :meth:`Sophon.run` returns."""

    model: nn.Module
    #: one record per iteration (the JSONL log's lines)
    history: list[dict]
    #: guard metric on the held-out original split before protection and at the end
    start_metric: float | None
    final_metric: float | None
    metric_name: str
    iterations: int
    stopped: bool
    stop_reason: str | None
    seconds: float
    rollbacks: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        """Whether the guard stopped the run because weights or metrics became non-finite."""
        return self.stopped and (self.stop_reason or "").startswith(NON_FINITE)


def _train_and_val(data: DataLike, val_fraction: float, seed: int, what: str) -> tuple[Dataset, Dataset]:
    """The training part and the held-out guard part of a domain."""
    if isinstance(data, DomainSplits):
        train, val = as_dataset(data.train, f"{what}.train"), as_dataset(data.val, f"{what}.val")
        return train, val
    dataset = as_dataset(data, what)
    if len(dataset) < 2:
        raise ValueError(f"{what}: needs at least 2 samples to hold some out for the guard, got {len(dataset)}")
    train, val = split(dataset, [1.0 - val_fraction, val_fraction], seed=seed)
    return train, val


def _normalise_config(config: Config | ProtectConfig | dict | str | Path | None) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config.validate()
    if isinstance(config, ProtectConfig):
        return Config(protect=config).validate()
    if isinstance(config, dict):
        return Config.from_dict(config)
    if isinstance(config, (str, Path)):
        from .config import load_config

        return load_config(config)
    raise TypeError(f"config: expected a Config, ProtectConfig, dict or path, got {type(config).__name__}")


def _model_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if len(devices) > 1:
        raise ValueError(f"model: parameters and buffers must be on one device, found {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def resolve_device(model: nn.Module, device: str | torch.device | None, config_device: str = "cpu") -> torch.device:
    """Where protection runs: the model's device, unless ``device`` (or a ``config.device``
    other than the default ``"cpu"``) names one, which must then be the model's."""
    model_device = _model_device(model)
    if device is not None:
        wanted, source = torch.device(device), "device"
    elif torch.device(config_device) != torch.device("cpu"):
        wanted, source = torch.device(config_device), "config.device"
    else:
        return model_device
    if model_device.type != wanted.type or (wanted.index is not None and model_device != wanted):
        raise ValueError(f"model: is on {model_device} but {source} is {wanted}; move the model or set device")
    return model_device if wanted.index is None else wanted


def show_progress(progress: bool | None) -> bool:
    """``progress``, where None means: when stderr is a terminal."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return bool(progress)


def _strategy_from_config(sc: StrategyConfig, default_steps: int, seed: int):
    from .strategies import FineTuneStrategy

    return FineTuneStrategy(
        optimizer=sc.optimizer,
        lr=sc.lr,
        batch_size=sc.batch_size,
        steps=sc.steps if sc.steps is not None else default_steps,
        method=sc.method,
        hparams=dict(sc.hparams),
        layers=sc.layers,
        seed=seed,
    )


class Sophon:
    """SOPHON protection of ``model`` (modified in place), step by step or all at once.

    Args:
        model: any ``nn.Module`` the task accepts (classification: logits (N, C)).
        original: the domain to keep: an ``ArrayDataset``, an ``(x, y)`` pair,
            ``DomainSplits`` (its ``val`` part feeds the guard; otherwise
            ``config.data.val_fraction`` is held out), a map-style
            ``torch.utils.data.Dataset`` or a ``DataLoader`` (its dataset and
            collate_fn are read batch by batch; its sampler is not used:
            batches are drawn by the engine's generator).
        restricted: the domain to make non-fine-tunable (its training part).
        config: a :class:`~sophon_ext.config.Config`, a
            :class:`~sophon_ext.config.ProtectConfig`, a dict or a YAML/JSON path.
        task: a task plug-in; default ``make_task(config.mode, **config.task)``.
        strategies: a fixed list of :class:`~sophon_ext.FineTuneStrategy` to
            simulate instead of ``config.protect.strategies``.
        out_dir: where checkpoints and ``log.jsonl`` go (None: nothing written).
        model_spec: ``{"name", "kwargs"}`` of the model registry, saved in checkpoints
            so a run can resume without the Python model object.
        device: where to run; None (default): the model's device (see :func:`resolve_device`).
        progress: show a tqdm bar with the live losses; None (default): when stderr is a terminal.
        simulate_fn: replaces :func:`sophon_ext.simulate` (same contract).
        comm: a :class:`~sophon_ext.distributed.Communicator`; default
            :func:`sophon_ext.distributed.setup` (under torchrun the strategies
            are shared out over the ranks, the result is the single-process one).
    """

    def __init__(
        self,
        model: nn.Module,
        original: DataLike,
        restricted: DataLike,
        config: Config | ProtectConfig | dict | str | Path | None = None,
        *,
        task: Task | None = None,
        strategies: Sequence | None = None,
        out_dir: str | Path | None = None,
        model_spec: dict | None = None,
        head: str | None = None,
        device: str | torch.device | None = None,
        progress: bool | None = None,
        simulate_fn: Callable | None = None,
        comm: distributed.Communicator | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        self.config = _normalise_config(config)
        self.pc = self.config.protect
        self.task = task if task is not None else make_task(self.config.mode, **self.config.task)
        self.device = resolve_device(model, device, self.config.device)
        self.model = model
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("model: has no trainable parameters")
        self.model_spec = model_spec
        self.head = head
        self.comm = comm if comm is not None else distributed.setup()
        self.comm.broadcast_(list(model.state_dict().values()))  # every rank starts from rank 0's model
        self.progress = show_progress(progress) and self.comm.is_main
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._simulate = simulate_fn

        split_seed = self.config.data.split_seed
        self.original_train, self.original_val = _train_and_val(original, self.config.data.val_fraction, split_seed, "original")
        restricted_train = restricted.train if isinstance(restricted, DomainSplits) else restricted
        self.restricted_train = as_dataset(restricted_train, "restricted")
        self.original_train = self.original_train.to(self.device)
        self.original_val = self.original_val.to(self.device)
        self.restricted_train = self.restricted_train.to(self.device)
        for name, data in (("original", self.original_train), ("restricted", self.restricted_train)):
            try:
                check_model_on(self.task, model, data)
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{name}: {exc}") from None

        if strategies is not None:
            strategies = list(strategies)
            if not strategies:
                raise ValueError("strategies: must list at least one strategy")
        self.fixed_strategies = strategies
        _check_methods_fit(model, strategies, self.pc)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.sampler = None
        self.slots: dict[int, tuple[int, Any]] = {}  # family slot -> (member index, its strategy)
        if strategies is None and self.pc.family is not None:
            from .families import FamilySampler

            self.sampler = FamilySampler(self.pc.family, self.pc.inner_steps)
        self.variant: str | None = None  # the simulation path "auto" settled on (recorded, replayed)
        self.probes = None
        if self.pc.probes.every:
            from .probes import AttackProbes

            self.probes = AttackProbes(self.pc.probes, self.task, self.restricted_train, self.config.seed, self.device, head)
        self.liveness = None
        self.liveness_losses: list[float] = []
        if self.pc.liveness is not None:
            from .liveness import LivenessPenalty

            # the reference statistics: the pre-trained model on a fixed restricted sample (its own
            # generator, so turning the penalty on does not move the run's other draws)
            pick = torch.Generator().manual_seed(self.config.seed)
            n = len(self.restricted_train)
            x, y = self.restricted_train.gather(torch.randperm(n, generator=pick)[:min(n, 512)])
            self.liveness = LivenessPenalty(model, self.task.prepare(x, y, pick)[0], self.pc.liveness, head)
        # the pre-trained scale every layer is held to (protect.scale_bound)
        self.reference_norms = {n: float(p.detach().norm()) for n, p in self.params.items()}
        params = list(self.params.values())
        self.fts_optimizer = torch.optim.Adam(params, lr=self.pc.alpha)
        for group in self.fts_optimizer.param_groups:
            group["base_lr"] = self.pc.alpha  # the rate the guard scales; "lr" is it after the warm-up
        self.chains = None
        if self.pc.horizon is not None and self.pc.horizon > self.pc.inner_steps:
            from .chains import TrajectoryChains

            self.chains = TrajectoryChains(self.pc.horizon, head=head)
        self.ntr_optimizer = torch.optim.Adam(params, lr=self.pc.beta)

        self.iteration = 0
        self.history: list[dict] = []
        self.start_metric: float | None = None
        self.last_metric: float | None = None
        self.last_good: dict | None = None
        self.rollbacks = 0
        self.stopped = False
        self.stop_reason: str | None = None
        self._seconds = 0.0
        self._bar = None

    # ------------------------------------------------------------------ sampling

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator).item())

    def _draw_strategies(self) -> tuple[list[int], list]:
        """This FTS step's (slots, strategies): positions in the strategy list and the
        strategies, each with a fresh seed (new re-initialisations every step)."""
        if self.fixed_strategies is not None:
            slots = list(range(len(self.fixed_strategies)))
            return slots, [dataclasses.replace(s, seed=self._randint(2**31)) for s in self.fixed_strategies]
        if self.sampler is not None:
            return self._draw_from_family()
        listed = self.pc.strategies
        if self.pc.num_strategies:
            slots = torch.randint(len(listed), (self.pc.num_strategies,), generator=self.generator).tolist()
        else:
            slots = list(range(len(listed)))
        return slots, [_strategy_from_config(listed[i], self.pc.inner_steps, self._randint(2**31)) for i in slots]

    def _draw_from_family(self) -> tuple[list[int], list]:
        """One trajectory per family slot: a slot whose simulated attacker is still being continued
        keeps its strategy; the others draw a new member (worst-case first, when so configured)."""
        slots = list(range(self.pc.num_strategies))
        for slot in slots:
            continuing = self.chains is not None and self.chains.has_chain(slot)
            if slot not in self.slots or not continuing:
                self.slots[slot] = self.sampler.draw(self.generator)
        return slots, [self.slots[slot][1] for slot in slots]

    def _sample(self, data: Dataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` samples drawn without replacement (with, when the dataset is smaller). The
        positions come from the engine's generator whatever the dataset's kind, so data in tensors
        and the same data read on demand give the same batches."""
        n = len(data)
        if size <= n:
            index = torch.randperm(n, generator=self.generator)[:size]
        else:
            index = torch.randint(n, (size,), generator=self.generator)
        return data.gather(index)

    def _restricted_pool(self) -> tuple[tuple, torch.Tensor]:
        """The restricted-domain samples this FTS step's trajectories draw their batches from."""
        size = self.pc.pool_size or len(self.restricted_train)
        x, y = self._sample(self.restricted_train, min(size, len(self.restricted_train)))
        return self.task.prepare(x, y, self.generator)

    # ------------------------------------------------------------------ the loop

    def _fts_step(self) -> dict:
        slots, strategies = self._draw_strategies()
        continuing = self.chains is not None
        inputs, targets = self._restricted_pool()
        result, runs = self._simulate_strategies(slots, strategies, inputs, targets)
        losses = result.query_losses.detach()
        diverged = [i for i in range(len(runs)) if not bool(torch.isfinite(losses[i]).all())]
        dropped = []
        if diverged:
            # A simulated attacker whose fine-tuning diverged is an attack that failed, not a signal:
            # its chain ends, and when others are left the meta-gradient is taken from them alone.
            if continuing:
                self.chains.drop([slots[i] for i in diverged])
            if len(diverged) < len(runs):
                dropped = [self._member_name(slots[i]) for i in diverged]
                keep = [i for i in range(len(runs)) if i not in diverged]
                slots, strategies = [slots[i] for i in keep], [strategies[i] for i in keep]
                result, runs = self._simulate_strategies(slots, strategies, inputs, targets)
        depths = self.chains.depths(slots, strategies) if continuing else None
        if continuing:
            if getattr(result, "params", None) is None:
                raise TypeError("simulate_fn: must return the adapted params when asked (return_params=True) to "
                                "continue trajectories; set protect.horizon: null to run without")
            # before the meta step the parameters are still where the trajectories started
            theta = {n: p.detach() for n, p in self.params.items()}
            self.chains.record(self.model, slots, strategies, theta, result.params)
        for name, p in self.params.items():
            grad = result.meta_grad.get(name)
            p.grad = None if grad is None else grad.detach().to(p.dtype).clone()
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if self.pc.meta_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.pc.meta_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else torch.zeros(())
        warmup = min(1.0, self.iteration / self.pc.alpha_warmup) if self.pc.alpha_warmup else 1.0
        for group in self.fts_optimizer.param_groups:
            group["lr"] = group["base_lr"] * warmup
        self.fts_optimizer.step()
        self.fts_optimizer.zero_grad(set_to_none=True)
        losses = result.query_losses.detach().float()
        if self.sampler is not None:
            for i, slot in enumerate(slots):
                self.sampler.observe(self.slots[slot][0], float(losses[i, -1]))
        return {
            "sup_loss": float(losses.mean()),
            "sup_loss_first": float(losses[:, 0].mean()),
            "sup_loss_last": float(losses[:, -1].mean()),
            "sup_loss_per_strategy": [float(v) for v in losses[:, -1]],
            "meta_grad_norm": float(norm),
            "path": str(getattr(result, "path", "")),
            "variant": self._simulate_path(inputs),
            **({"chain_depths": depths} if depths is not None else {}),
            **({"members": [self._member_name(s) for s in slots]} if self.sampler is not None else {}),
            **({"diverged": dropped} if dropped else {}),
        }

    def _simulate_strategies(self, slots: list[int], strategies: list, inputs: tuple, targets) -> tuple[Any, list]:
        """Simulate this FTS step's trajectories (continued ones from where their chains stopped);
        BatchNorm statistics are left as they were. Returns (result, the strategies run)."""
        simulate = self._simulate
        if simulate is None:
            from .simulation import simulate
        continuing = self.chains is not None
        runs = self.chains.strategies_to_run(slots, strategies) if continuing else strategies
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.model.train()
        result = distributed.simulate_sharded(
            self.comm,
            simulate,
            self.model,
            runs,
            data=(inputs, targets),
            adaptation_loss=self.task.adaptation_loss,
            suppression_loss=self.task.suppression_loss,
            query_size=self.pc.query_size,
            order=self.pc.order,
            path=self._simulate_path(inputs),
            chunk_size=self.pc.chunk_size,
            head=self.head,
            generator=self.generator,
            **({"return_params": True} if continuing else {}),
        )
        # The paper keeps BatchNorm statistics out of FTS; simulate promises
        # this, restoring makes it hold for any simulate_fn too.
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(buffers[name])
        return result, runs

    def _member_name(self, slot: int) -> str:
        if self.sampler is not None:
            return self.sampler.members[self.slots[slot][0]].name
        return f"strategy {slot}"

    def _simulate_path(self, inputs: tuple) -> str:
        """``protect.simulate_path``; "auto" is settled once without timing (stacked when the model
        traces, see :func:`sophon_ext.simulation.autotune.untimed_variant`), logged and checkpointed, so
        two runs of one config, seed and thread count compute the same numbers."""
        if self.pc.simulate_path != "auto":
            return self.pc.simulate_path
        if self.variant is None:
            from .simulation.autotune import untimed_variant

            self.variant = untimed_variant(self.model, inputs)
        return self.variant

    def _ntr_step(self) -> float:
        x, y = self._sample(self.original_train, self.pc.ntr_batch_size)
        inputs, targets = self.task.prepare(x, y, self.generator)
        self.model.train()
        loss = self.task.original_loss(self.model(*inputs), targets)
        if self.liveness is not None:
            xr, yr = self._sample(self.restricted_train, self.pc.ntr_batch_size)
            penalty = self.liveness(self.model, self.task.prepare(xr, yr, self.generator)[0])
            self.liveness_losses.append(float(penalty.detach()))
            loss = loss + penalty
        self.ntr_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # every rank ran the same batch; rank 0's gradient, statistics and loss keep them identical
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        self.comm.broadcast_([loss.detach(), *grads, *self.model.buffers()])
        self.ntr_optimizer.step()
        self.ntr_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def _bound_scale(self) -> None:
        """Project every parameter tensor back to at most ``scale_bound`` times its pre-trained norm."""
        for name, p in self.params.items():
            limit = self.pc.scale_bound * self.reference_norms[name]
            norm = float(p.norm())
            if norm > limit > 0:
                p.mul_(limit / norm)

    def _probe_specs(self) -> list:
        """This round's probe recipes: the configured ones, or members drawn from the family."""
        probes = self.probes
        if self.pc.probes.attacks:
            return [probes.spec(dict(a)) for a in self.pc.probes.attacks]
        if self.sampler is None:
            return [probes.spec(dict(a)) for a in self.config.attack.attacks]
        specs = []
        for _ in range(self.pc.probes.count):
            index = self.sampler.draw_member(self.generator)
            specs.append(probes.spec_for(self.sampler.strategy_for(index, self.generator)))
        return specs

    def _run_probes(self) -> list[dict]:
        """Real attacks on the current model; an escape makes its member the worst-case one."""
        specs = self._probe_specs()  # every rank draws them, so the shared random stream stays in step
        # rank 0 runs them for all; every rank gets the same feedback
        records = self.comm.broadcast_object(self.probes.run(self.model, specs) if self.comm.is_main else None)
        if self.sampler is not None:
            for record in records:
                index = self.sampler.member_of(record["optimizer"], record["method"], record["lr"])
                if record["escape"] and index is not None:
                    self.sampler.boost(index)
        return records

    def evaluate_original(self) -> float:
        """The task's metric on the held-out original-domain split."""
        if not self.comm.is_main:  # rank 0 measures for all, so the guard decides the same everywhere
            return self.comm.broadcast_object(None)
        # A fresh draw of the task's evaluation noise (generation: timesteps and noise) at every
        # check: with one fixed draw the protection learnt to pass the guard while failing on
        # other draws (docs/DESIGN_NOTES.md). Classification ignores the seed.
        seed = self.config.seed + self.iteration
        metrics = evaluate_dataset(self.task, self.model, self.original_val, seed=seed)
        return self.comm.broadcast_object(float(metrics[self.task.metric_name]))

    def _bound(self) -> float | None:
        """The worst acceptable guard metric, or None when nothing is enforced."""
        guard = self.pc.guard
        better = 1.0 if self.task.higher_is_better else -1.0
        bounds = []
        if guard.floor is not None:
            bounds.append(guard.floor)
        if guard.max_drop is not None and self.start_metric is not None:
            drop = guard.max_drop * abs(self.start_metric) if guard.drop_is_fraction else guard.max_drop
            bounds.append(self.start_metric - better * drop)
        if not bounds:
            return None
        return max(bounds) if better > 0 else min(bounds)

    def model_is_finite(self) -> bool:
        """Whether every floating-point parameter and buffer of the model is finite."""
        return all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values() if t.is_floating_point())

    def _is_good(self, metric: float) -> bool:
        # a model with a non-finite weight is broken whatever its metric says (a NaN model that
        # predicts one class can sit within max_drop of a weak start)
        if not math.isfinite(metric) or not self.model_is_finite():
            return False
        bound = self._bound()
        if bound is None:
            return True
        return metric >= bound if self.task.higher_is_better else metric <= bound

    def _snapshot(self) -> dict:
        return {
            "iteration": self.iteration,
            "metric": self.last_metric,
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "fts_optimizer": copy.deepcopy(self.fts_optimizer.state_dict()),
            "ntr_optimizer": copy.deepcopy(self.ntr_optimizer.state_dict()),
        }

    def _restore(self, snapshot: dict) -> None:
        self.model.load_state_dict(snapshot["model"])
        self.fts_optimizer.load_state_dict(snapshot["fts_optimizer"])
        self.ntr_optimizer.load_state_dict(snapshot["ntr_optimizer"])

    def _scale_rates(self, factor: float) -> None:
        for opt in (self.fts_optimizer, self.ntr_optimizer):
            for group in opt.param_groups:
                group["lr"] *= factor
                if "base_lr" in group:
                    group["base_lr"] *= factor

    def _guard(self, record: dict) -> None:
        metric = self.evaluate_original()
        self.last_metric = metric
        record["original_" + self.task.metric_name] = metric
        if not self.pc.guard.enabled or self._is_good(metric):
            self.last_good = self._snapshot()
            return
        finite = math.isfinite(metric) and self.model_is_finite()
        # Roll back to the last good state; keep the random stream moving on.
        good = self.last_good
        self._restore(good)
        self.last_metric = good["metric"]
        self.rollbacks += 1
        record["rollback_to"] = good["iteration"]
        if finite:
            reason = f"original-domain {self.task.metric_name} {metric:.4g} crossed the guard bound {self._bound():.4g}"
        else:
            reason = f"{NON_FINITE}: parameters or original-domain {self.task.metric_name} ({metric:.4g})"
        if self.pc.guard.action == "stop" or self.rollbacks > self.pc.guard.max_rollbacks:
            self.stopped, self.stop_reason = True, reason + f"; rolled back to iteration {good['iteration']} and stopped"
        else:
            self._scale_rates(self.pc.guard.lr_factor)
            record["rates_scaled_by"] = self.pc.guard.lr_factor
        self.last_good = self._snapshot()
        self.last_good["iteration"] = good["iteration"]

    def _start(self) -> None:
        if self.start_metric is None:  # a fresh run (a resumed one has its start from the checkpoint)
            self._claim_out_dir()
            self.start_metric = self.last_metric = self.evaluate_original()
            self.last_good = self._snapshot()

    def _claim_out_dir(self) -> None:
        """A fresh run never writes into another run's log and checkpoint."""
        if self.out_dir is None or not self.comm.is_main:
            return
        existing = ckpt.check_output_dir(self.out_dir, OUT_DIR_FILES, option="out_dir")
        ckpt.refuse_previous_run(self.out_dir, existing, option="out_dir",
                                 remedy="continue it with Sophon(...).resume() or protect(..., resume=True), "
                                        "or replace it with protect(..., overwrite=True)")

    def step(self) -> dict:
        """Run one outer iteration (FTS, NTR, maybe the guard); returns its log record."""
        if self.stopped:
            raise RuntimeError(f"Sophon.step: the run has stopped ({self.stop_reason})")
        self._start()
        started = time.perf_counter()
        self.iteration += 1
        record: dict[str, Any] = {"iteration": self.iteration}
        fts = [self._fts_step() for _ in range(self.pc.fts_steps)]
        record.update({k: v for k, v in fts[-1].items() if k not in ("sup_loss", "sup_loss_first", "sup_loss_last")})
        for key in ("sup_loss", "sup_loss_first", "sup_loss_last"):
            record[key] = sum(f[key] for f in fts) / len(fts)
        self.liveness_losses: list[float] = []
        ntr = [self._ntr_step() for _ in range(self.pc.ntr_steps)]
        if ntr:
            record["ntr_loss"] = sum(ntr) / len(ntr)
        if self.liveness_losses:
            record["liveness_loss"] = sum(self.liveness_losses) / len(self.liveness_losses)
        if self.pc.scale_bound is not None:
            self._bound_scale()
        if self.probes is not None and self.iteration % self.pc.probes.every == 0:
            record["probes"] = self._run_probes()
        if not all(math.isfinite(record[k]) for k in ("sup_loss", "meta_grad_norm")) or not all(map(math.isfinite, ntr)):
            record["non_finite"] = True
        at_end = self.iteration >= self.pc.iterations
        if record.get("non_finite") or self.iteration % self.pc.guard.every == 0 or at_end:
            self._guard(record)
        record["alpha"] = self.fts_optimizer.param_groups[0]["lr"]
        record["beta"] = self.ntr_optimizer.param_groups[0]["lr"]
        record["seconds"] = time.perf_counter() - started
        self._seconds += record["seconds"]
        self.history.append(record)
        self._log(record)
        every = self.pc.checkpoint_every
        if self.out_dir is not None and self.comm.is_main and ((every and self.iteration % every == 0) or at_end or self.stopped):
            self.save_checkpoint()
        return record

    def run(self, iterations: int | None = None, stop_after: int | None = None) -> ProtectionResult:
        """Iterate until ``iterations`` (default ``config.protect.iterations``) are done or the guard stops.

        ``stop_after`` ends this call after that many iterations (the run can be
        continued later, e.g. from a checkpoint).
        """
        total = self.pc.iterations if iterations is None else iterations
        if total != self.pc.iterations:
            self.config = self.config.replace({"protect": {"iterations": total}})
            self.pc = self.config.protect
        todo = total - self.iteration
        if stop_after is not None:
            todo = min(todo, stop_after)
        self._open_bar(total)
        try:
            for _ in range(max(todo, 0)):
                if self.stopped:
                    break
                record = self.step()
                self._update_bar(record)
        finally:
            self._close_bar()
        return self.result()

    def result(self) -> ProtectionResult:
        return ProtectionResult(
            model=self.model,
            history=list(self.history),
            start_metric=self.start_metric,
            final_metric=self.last_metric,
            metric_name=self.task.metric_name,
            iterations=self.iteration,
            stopped=self.stopped,
            stop_reason=self.stop_reason,
            seconds=self._seconds,
            rollbacks=self.rollbacks,
            extra=self._extra(),
        )

    def _extra(self) -> dict:
        """What the report shows of the simulated family and the probes."""
        extra: dict[str, Any] = {}
        if self.sampler is not None:
            extra["family"] = self.sampler.summary()
        probes = [{"iteration": r["iteration"], **p} for r in self.history for p in r.get("probes", [])]
        if probes:
            extra["probes"] = probes
            extra["probe_escapes"] = sum(p["escape"] for p in probes)
        return extra

    # ------------------------------------------------------------------ progress / log

    def _open_bar(self, total: int) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=self.iteration, desc="sophon protect", unit="it", dynamic_ncols=True)

    def _update_bar(self, record: dict) -> None:
        if self._bar is None:
            return
        post = {"sup": f"{record['sup_loss_last']:.3f}"}
        if "ntr_loss" in record:
            post["ntr"] = f"{record['ntr_loss']:.3f}"
        if self.last_metric is not None:
            post[self.task.metric_name[:3]] = f"{self.last_metric:.3f}"
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(1)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @property
    def log_path(self) -> Path | None:
        return self.out_dir / "log.jsonl" if self.out_dir is not None else None

    def _log(self, record: dict) -> None:
        if self.log_path is None or not self.comm.is_main:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.out_dir / "checkpoint" if self.out_dir is not None else None

    def state_dict(self) -> dict:
        """Everything a resumed run needs (tensors and JSON-ready values)."""
        state = {
            "iteration": self.iteration,
            "model": dict(self.model.state_dict()),
            "fts_optimizer": self.fts_optimizer.state_dict(),
            "ntr_optimizer": self.ntr_optimizer.state_dict(),
            "generator": ckpt.generator_state(self.generator),
            "torch_rng": ckpt.generator_state(torch.default_generator),
            "start_metric": self.start_metric,
            "last_metric": self.last_metric,
            "last_good": self.last_good,
            "rollbacks": self.rollbacks,
            "stopped": self.stopped,
            "stop_reason": self.stop_reason,
            "seconds": self._seconds,
            "variant": self.variant,
        }
        if self.chains is not None:
            state["chains"] = self.chains.state_dict()
        if self.liveness is not None:
            state["liveness"] = self.liveness.state_dict()
        if self.sampler is not None:
            from .families import strategy_to_dict

            state["family"] = {"sampler": self.sampler.state_dict(),
                               "slots": {str(s): [m, strategy_to_dict(st)] for s, (m, st) in self.slots.items()}}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        try:
            self.model.load_state_dict(state["model"])
            self.fts_optimizer.load_state_dict(state["fts_optimizer"])
            self.ntr_optimizer.load_state_dict(state["ntr_optimizer"])
            ckpt.set_generator_state(self.generator, state["generator"])
            ckpt.set_generator_state(torch.default_generator, state["torch_rng"])
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
            self.iteration = int(state["iteration"])
            self.start_metric = state["start_metric"]
            self.last_metric = state["last_metric"]
            self.last_good = state["last_good"]
            if self.last_good is not None:
                self.last_good["model"] = {k: v.to(self.device) for k, v in self.last_good["model"].items()}
            self.rollbacks = int(state["rollbacks"])
            self.stopped = bool(state["stopped"])
            self.stop_reason = state["stop_reason"]
            self._seconds = float(state["seconds"])
            self.variant = state.get("variant")
            if self.chains is not None:
                self.chains.load_state_dict(state["chains"], self.device)
            if self.liveness is not None:
                self.liveness.load_state_dict(state["liveness"], self.device)
            if self.sampler is not None:
                from .strategies import FineTuneStrategy

                self.sampler.load_state_dict(state["family"]["sampler"])
                self.slots = {int(s): (int(m), FineTuneStrategy(**fields)) for s, (m, fields) in state["family"]["slots"].items()}
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint: state does not fit this run: {exc}") from None

    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Write the resumable state atomically (default: ``out_dir/checkpoint``)."""
        directory = Path(directory) if directory is not None else self.checkpoint_dir
        if directory is None:
            raise ValueError("save_checkpoint: give a directory or construct Sophon with out_dir")
        metadata = {"config": self.config.to_dict(), "model_spec": self.model_spec, "task": self.task.name, "iteration": self.iteration}
        return ckpt.save_checkpoint(directory, self.state_dict(), metadata)

    def resume(self, directory: str | Path | None = None) -> "Sophon":
        """Continue from the checkpoint in ``directory`` (default ``out_dir/checkpoint``).

        The checkpoint must come from a run with the same config; the JSONL log
        is cut back to the checkpoint's iteration so it matches an uninterrupted run.
        """
        directory = Path(directory) if directory is not None else self.checkpoint_dir
        if directory is None:
            raise ValueError("resume: give a directory or construct Sophon with out_dir")
        state, metadata = ckpt.load_checkpoint(directory, map_location=self.device)
        saved = metadata.get("config")
        if saved is not None:
            saved = _normalised_config(saved, directory)
        if saved is not None and _without_iterations(saved) != _without_iterations(self.config.to_dict()):
            raise ckpt.CheckpointError(
                f"checkpoint: {directory} was written with a different config; resume with the saved one "
                "(sophon protect --resume reads it from the checkpoint)"
            )
        self.load_state_dict(state)
        self.history = self._read_log()
        self._rewrite_log()
        return self

    def _read_log(self) -> list[dict]:
        if self.log_path is None or not self.log_path.is_file():
            return []
        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line cut by the kill
            if record.get("iteration", 0) > self.iteration:
                break
            records.append(record)
        return records

    def _rewrite_log(self) -> None:
        if self.log_path is None or not self.comm.is_main:
            return
        text = "".join(json.dumps(r) + "\n" for r in self.history)
        ckpt.atomic_write_bytes(self.log_path, text.encode())


def _normalised_config(saved: dict, directory: Path) -> dict:
    # Through this version's Config, so keys added since the checkpoint was written take their
    # defaults instead of reading as a different config.
    try:
        return Config.from_dict(saved).to_dict()
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint: {directory} holds a config this version rejects: {exc}") from None


def _without_iterations(config: dict) -> dict:
    # A resumed run may be asked to go further than the first one planned.
    out = copy.deepcopy(config)
    out.get("protect", {}).pop("iterations", None)
    return out


def protect(
    model: nn.Module,
    original: DataLike,
    restricted: DataLike,
    config: Config | ProtectConfig | dict | str | Path | None = None,
    *,
    inplace: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    **kwargs,
) -> nn.Module:
    """Return a SOPHON-protected copy of ``model`` (``inplace=True`` modifies ``model`` itself).

    ``original`` is the domain the model must keep working on, ``restricted``
    the one it must resist being fine-tuned to; each is an ``ArrayDataset``, an
    ``(x, y)`` pair, ``DomainSplits``, a map-style ``torch.utils.data.Dataset`` or a
    ``DataLoader`` (read batch by batch; see :class:`sophon_ext.data.MapDataset`).
    Other keyword arguments go to :class:`Sophon` (``task``, ``strategies``,
    ``out_dir``, ``device``, ``progress``, ...). A fresh run refuses an ``out_dir``
    holding another run's log or checkpoint (a ValueError naming it): ``resume=True``
    continues that run, ``overwrite=True`` removes its files first.
    """
    if resume and overwrite:
        raise ConfigError("overwrite: contradicts resume (one continues the run in out_dir, the other replaces it)")
    if not inplace:
        model = copy.deepcopy(model)
    engine = Sophon(model, original, restricted, config, **kwargs)
    if overwrite and engine.out_dir is not None:
        ckpt.remove_run_files(engine.out_dir, list(OUT_DIR_FILES))
    if resume:
        engine.resume()
    engine.run()
    return model


__all__ = ["Sophon", "protect", "ProtectionResult", "ProtectionFailed", "ConfigError"]
