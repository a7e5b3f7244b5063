"""torch.optim drop-ins whose ``step()`` is the fused multi-tensor kernel.

:class:`FusedSGD`, :class:`FusedAdam`, :class:`FusedAdamW` and
:class:`FusedLion` take the constructor arguments of ``torch.optim.SGD`` /
``Adam`` / ``AdamW`` and :class:`sophon_ext.optim.Lion` (the options the
fused op implements) and give the same parameters step for step. Param
groups, ``state_dict()`` / ``load_state_dict()``, ``step(closure)``, lr
schedulers, ``zero_grad()`` (to None or to zero) and parameters without a
gradient behave as in torch.optim.

How: on the first step a param group's parameters move into one contiguous
``(1, P)`` buffer (``p.data`` becomes a view of it, as in apex's fused
optimizers; parameters become contiguous), with a gradient buffer and the
kind's state buffers beside it. The group is then one row of
``torch.ops.sophon_ext.multi_step_update_``: one call per group and step, its
hyperparameters read from the group every step (schedulers may change them).
A gradient that is not already a view of the gradient buffer (after
``zero_grad(set_to_none=True)``) is copied in and the view becomes ``p.grad``.
State entries are views of the flat state, named and shaped as torch.optim
names them (``exp_avg``, ``exp_avg_sq``, ``step``, ``momentum_buffer``), so
a state dict loads into either.

When some parameters of a group have no gradient, or their step counts
differ, the parameters with a gradient are updated in buckets of equal step
count (gathered into a temporary row): slower, same result.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from ..ops.multi_step import _HP_ARGS, multi_step_update_op
from .fused import _UNUSED_FILLER
from .functional import _RANGES

__all__ = ["FusedAdam", "FusedAdamW", "FusedLion", "FusedSGD"]


class _FlatGroup:
    """One param group as one row: flat params, grads, state buffers, per-parameter step counts."""

    def __init__(self, params: list[Tensor]):
        self.param_list = params
        self.params = list(params)
        first = self.params[0]
        self.numels = [p.numel() for p in self.params]
        self.params_flat = torch.empty((1, sum(self.numels)), dtype=first.dtype, device=first.device)
        self.grads_flat = torch.zeros_like(self.params_flat)
        self.param_views = self._views(self.params_flat)
        self.grad_views = self._views(self.grads_flat)
        for p, view in zip(self.params, self.param_views):
            view.copy_(p.detach())
            p.data = view
        self.state_flat: list[Tensor | None] = [None, None]  # allocated by the optimizer when needed
        self.empty = self.params_flat.new_empty((0,))  # the op's argument for an unused state buffer
        self.state_views: list[list[Tensor] | None] = [None, None]
        # steps[i]: updates parameter i has had; row_step: the same count while all are equal
        self.steps = torch.zeros(len(self.params), dtype=first.dtype, device=first.device)
        self.row_step = torch.zeros(1, dtype=first.dtype, device=first.device)
        self.uniform = True
        self.has_state = [False] * len(self.params)
        self.all_have_state = False
        self.hp = {name: torch.zeros(1, dtype=torch.float64, device=first.device) for name in _HP_ARGS}
        self._hp_values: dict[str, float] = {}

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [chunk.view(p.shape) for chunk, p in zip(flat[0].split(self.numels), self.params)]

    def allocate_state(self, slot: int) -> None:
        self.state_flat[slot] = torch.zeros_like(self.params_flat)
        self.state_views[slot] = self._views(self.state_flat[slot])

    def set_hparams(self, values: dict) -> None:
        """Write the row's hyperparameters into the op's (1,) tensors; unchanged floats are not rewritten."""
        for name, value in values.items():
            if isinstance(value, Tensor):
                self.hp[name].copy_(value.detach().reshape(1))
            elif self._hp_values.get(name) != value:
                self.hp[name].fill_(value)
                self._hp_values[name] = value

    def collect_grads(self) -> list[int]:
        """Indices of the parameters with a gradient; copies each gradient into the flat buffer
        unless it is already the view there, and moves parameters whose ``.data`` was replaced back in."""
        present = []
        for i, p in enumerate(self.params):
            view = self.param_views[i]
            if p.data.data_ptr() != view.data_ptr():
                self._rebind_data(p, view)
            g = p.grad
            if g is None:
                continue
            present.append(i)
            grad_view = self.grad_views[i]
            if g.data_ptr() != grad_view.data_ptr():
                if g.is_sparse:
                    raise RuntimeError("fused optimizers do not support sparse gradients")
                grad_view.copy_(g)
                p.grad = grad_view
        return present

    @staticmethod
    def _rebind_data(p: Tensor, view: Tensor) -> None:
        # e.g. module.to() or `p.data = ...` after the group was flattened
        if p.shape != view.shape or p.dtype != view.dtype or p.device != view.device:
            raise ValueError(
                f"a parameter changed to {tuple(p.shape)} {p.dtype} on {p.device} after the optimizer flattened it "
                f"as {tuple(view.shape)} {view.dtype} on {view.device}; create the optimizer after moving the model"
            )
        view.copy_(p.data)
        p.data = view


class _FusedOptimizer(torch.optim.Optimizer):
    """Base of the drop-ins: flat rows per param group, one fused op call per group and step.

    Subclasses set ``_state_names`` (torch.optim's names of the op's state1 and
    state2, or None), ``_exposes_step`` (whether the state has torch's
    ``"step"`` entry) and implement ``_kind(group)``, ``_row_hparams(group)``
    and ``_check_group(group)``.
    """

    _state_names: tuple[str | None, str | None]
    _exposes_step: bool

    def __init__(self, params, defaults: dict):
        self._flat: dict[int, _FlatGroup] = {}
        super().__init__(params, defaults)

    # --- hooks of the subclasses

    def _kind(self, group: dict) -> str:
        raise NotImplementedError

    def _row_hparams(self, group: dict) -> dict:
        """The group's values under the op's argument names (``lr``, ``beta1``, ...)."""
        raise NotImplementedError

    def _check_group(self, group: dict) -> None:
        raise NotImplementedError

    def _uses_state(self, slot: int, group: dict) -> bool:
        return self._state_names[slot] is not None

    # --- torch.optim.Optimizer interface

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"params: the fused update needs float32 or float64 parameters, got {p.dtype}")
            first = group["params"][0]
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    "params: every parameter of a param group must have one dtype and device (the group is one flat "
                    f"buffer), got {first.dtype} on {first.device} and {p.dtype} on {p.device}; use separate groups"
                )
        self._check_group(group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._check_group(group)  # e.g. a torch.optim.Adam state dict with amsgrad=True
        # the loaded tensors are not views of the flat buffers: rebuild them on the next step, adopting the state
        self._flat.clear()

    @torch.no_grad()
    def step(self, closure=None):
        """One fused update per param group; returns the closure's loss (None without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            if group["params"]:
                self._step_group(group, self._flat_group(index, group))
        return loss

    # --- implementation

    def _flat_group(self, index: int, group: dict) -> _FlatGroup:
        flat = self._flat.get(index)
        if flat is None or flat.param_list is not group["params"]:
            flat = self._flat[index] = _FlatGroup(group["params"])
            self._adopt_state(flat)
        return flat

    def _adopt_state(self, flat: _FlatGroup) -> None:
        """Move state already in ``self.state`` (loaded, or from an earlier flat group) into the flat buffers."""
        for i, p in enumerate(flat.params):
            state = self.state.get(p)
            if not state:
                continue
            for slot, name in enumerate(self._state_names):
                if name is not None and name in state:
                    if flat.state_flat[slot] is None:
                        flat.allocate_state(slot)
                    flat.state_views[slot][i].copy_(state[name])
            flat.steps[i] = float(state["step"]) if "step" in state else 1.0  # sgd/lion: only "started" matters
            self._expose_state(flat, i)
        flat.uniform = bool((flat.steps == flat.steps[0]).all())
        flat.row_step.copy_(flat.steps[:1])
        flat.all_have_state = all(flat.has_state)

    def _expose_state(self, flat: _FlatGroup, i: int) -> None:
        """Make ``self.state[p]`` hold views of the flat state, named as torch.optim names them."""
        state = self.state[flat.params[i]]
        for slot, name in enumerate(self._state_names):
            if name is not None and flat.state_views[slot] is not None:
                state[name] = flat.state_views[slot][i]
        if self._exposes_step:
            state["step"] = flat.steps[i]
        flat.has_state[i] = True

    def _step_group(self, group: dict, flat: _FlatGroup) -> None:
        # values a scheduler changes are range-checked by the op itself
        present = flat.collect_grads()
        if not present:
            return
        kind = self._kind(group)
        for slot in (0, 1):
            if self._uses_state(slot, group) and flat.state_flat[slot] is None:
                flat.allocate_state(slot)
                if slot == 0 and kind == "sgd":
                    # a new momentum buffer starts as the next gradient, as torch.optim's does
                    flat.steps.zero_()
                    flat.row_step.zero_()
                    flat.uniform = True
        state = [
            s if s is not None and self._uses_state(slot, group) else flat.empty for slot, s in enumerate(flat.state_flat)
        ]
        flat.set_hparams({**_UNUSED_FILLER, **self._row_hparams(group)})
        hp = [flat.hp[name] for name in _HP_ARGS]
        nesterov = bool(group.get("nesterov", False))
        if len(present) == len(flat.params) and flat.uniform:
            multi_step_update_op(flat.params_flat, flat.grads_flat, *state, flat.row_step, *hp, kind, nesterov)
            flat.steps.add_(1)
        else:
            self._step_buckets(flat, present, state, hp, kind, nesterov)
        if not flat.all_have_state and any(self._uses_state(slot, group) for slot in (0, 1)):
            for i in present:
                if not flat.has_state[i]:
                    self._expose_state(flat, i)
            flat.all_have_state = all(flat.has_state)

    def _step_buckets(self, flat: _FlatGroup, present: list[int], state, hp, kind: str, nesterov: bool) -> None:
        """The parameters with a gradient, in buckets of equal step count, each gathered into one temporary row."""
        buckets: dict[float, list[int]] = {}
        for i, count in zip(present, flat.steps[present].tolist()):
            buckets.setdefault(count, []).append(i)
        for count, members in buckets.items():
            sizes = [flat.numels[i] for i in members]

            def gather(views):
                return torch.cat([views[i].reshape(-1) for i in members])[None]

            row_params, row_grads = gather(flat.param_views), gather(flat.grad_views)
            row_state = [gather(views) if s.numel() else s for s, views in zip(state, flat.state_views)]
            row_step = flat.row_step.new_full((1,), count)
            multi_step_update_op(row_params, row_grads, *row_state, row_step, *hp, kind, nesterov)
            for row, views in [(row_params, flat.param_views)] + [
                (r, v) for r, v in zip(row_state, flat.state_views) if r.numel()
            ]:
                for i, chunk in zip(members, row[0].split(sizes)):
                    views[i].copy_(chunk.view(views[i].shape))
            flat.steps[members] += 1
        flat.uniform = bool((flat.steps == flat.steps[0]).all())
        if flat.uniform:
            flat.row_step.copy_(flat.steps[:1])


def _check_values(values: dict, names: dict[str, str] | None = None) -> None:
    """Ranges as torch.optim's constructors check them; errors name the argument (``names``: op name -> user's)."""
    for name, value in values.items():
        shown = (names or {}).get(name, name)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"{shown}: a tensor value must hold one element, got shape {tuple(value.shape)}")
            value = value.item()
        elif isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{shown}: must be a real number, got {type(value).__name__}")
        rule, accepted = _RANGES[name]
        if math.isnan(value) or not bool(rule(torch.tensor(float(value), dtype=torch.float64))):
            raise ValueError(f"{shown}: must be {accepted}, got {value}")


_BETA_NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}


def _betas(group: dict) -> tuple:
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"betas: must be two values (beta1, beta2), got {betas!r}")
    return betas


class FusedSGD(_FusedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, L2 weight decay) on the fused kernel.

    Not supported: ``maximize``. State per parameter: ``momentum_buffer`` once
    a step with momentum != 0 has run (as torch.optim.SGD).
    """

    _state_names = ("momentum_buffer", None)
    _exposes_step = False

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})

    def _kind(self, group):
        return "sgd"

    def _row_hparams(self, group):
        return {"lr": group["lr"], "momentum": group["momentum"], "dampening": group["dampening"],
                "weight_decay": group["weight_decay"]}

    def _uses_state(self, slot, group):
        return slot == 0 and group["momentum"] != 0

    def _check_group(self, group):
        if group.get("maximize"):
            raise ValueError("maximize: not supported by the fused update")
        _check_values(self._row_hparams(group))
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov: Nesterov momentum requires momentum > 0 and dampening == 0")


class FusedAdam(_FusedOptimizer):
    """``torch.optim.Adam`` (L2 weight decay, or decoupled as AdamW with
    ``decoupled_weight_decay=True``) on the fused kernel.

    Not supported: ``amsgrad``, ``maximize``. State per parameter: ``step``,
    ``exp_avg``, ``exp_avg_sq`` (as torch.optim.Adam).
    """

    _state_names = ("exp_avg", "exp_avg_sq")
    _exposes_step = True

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, decoupled_weight_decay: bool = False):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "decoupled_weight_decay": decoupled_weight_decay})

    def _kind(self, group):
        return "adamw" if group.get("decoupled_weight_decay") else "adam"

    def _row_hparams(self, group):
        beta1, beta2 = _betas(group)
        return {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"],
                "weight_decay": group["weight_decay"]}

    def _check_group(self, group):
        for option in ("amsgrad", "maximize"):
            if group.get(option):
                raise ValueError(f"{option}: not supported by the fused update")
        _check_values(self._row_hparams(group), _BETA_NAMES)


class FusedAdamW(FusedAdam):
    """``torch.optim.AdamW`` (decoupled weight decay, default 1e-2) on the fused kernel; see :class:`FusedAdam`."""

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True)


class FusedLion(_FusedOptimizer):
    """:class:`sophon_ext.optim.Lion` on the fused kernel. State per parameter: ``exp_avg``."""

    _state_names = ("exp_avg", None)
    _exposes_step = False

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    def _kind(self, group):
        return "lion"

    def _row_hparams(self, group):
        beta1, beta2 = _betas(group)
        return {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "weight_decay": group["weight_decay"]}

    def _check_group(self, group):
        _check_values(self._row_hparams(group), _BETA_NAMES)
