"""Fused multi-trajectory optimizer update: N trajectories, one op call.

``torch.ops.sophon_ext.multi_step_update_`` (registered by
:mod:`sophon_ext.ops.multi_step`) updates, in place and in one pass,
the stacked flat parameters ``(N, P)`` of N trajectories with per-trajectory
hyperparameters. Kinds: ``sgd`` (momentum, dampening, Nesterov, weight decay),
``adam``, ``adamw`` and ``lion``. Each row follows the same formulas as
:mod:`sophon_ext.optim.functional` (and so torch.optim).

:class:`FusedMultiTrajectoryOptimizer` keeps the flat buffers: trajectories'
parameters and gradients are views into them, so a training loop over N model
copies does its backward passes as usual and then calls one ``step()``.

The op is not differentiable (it is for first-order updates); differentiate
through :mod:`sophon_ext.optim.functional` instead.

The optimizer checks its hyperparameter values when they are set (and the
step counts when a state is loaded) and then calls the op with
``check_values=False``: its steps never wait for the device (the op's own
value check is a device->host copy on CUDA). The step counts it owns are
written by the op only, so they stay valid.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

# Importing ops.multi_step registers the op (torch.ops.sophon_ext.multi_step_update_).
from ..ops.multi_step import FUSED_KINDS, _HP_ARGS, _STATE_BUFFERS, check_value_rules, multi_step_update_op
from .functional import HyperParam, get_functional_optimizer, validate_hparams
from .presets import resolve_preset


def multi_step_update_(
    params: Tensor,
    grads: Tensor,
    state1: Tensor,
    state2: Tensor,
    step: Tensor,
    *,
    kind: str,
    lr: Tensor,
    momentum: Tensor,
    dampening: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    weight_decay: Tensor,
    eps: Tensor,
    nesterov: bool = False,
    check_values: bool = True,
) -> None:
    """Update ``params`` (N, P) in place from ``grads`` (N, P); keyword access to the op.

    ``state1``/``state2`` are the kind's buffers (sgd: momentum buffer, or an
    empty tensor when every momentum is 0; adam/adamw: exp_avg, exp_avg_sq;
    lion: exp_avg); unused ones may be empty. ``step`` (N,) counts the updates
    done and is advanced by one. Hyperparameters are (N,) floating tensors;
    those a kind does not use are ignored. ``check_values=False`` skips the
    check of the hyperparameter and step values (see
    :mod:`sophon_ext.ops.multi_step`).
    """
    multi_step_update_op(
        params, grads, state1, state2, step, lr, momentum, dampening, beta1, beta2, weight_decay, eps, kind, nesterov,
        check_values,
    )


# values for the op arguments a kind does not read
_UNUSED_FILLER = {"momentum": 0.0, "dampening": 0.0, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


def _per_trajectory(base: str, hparams, n: int) -> dict[str, HyperParam]:
    """One dict (numbers, bools, N-value sequences/tensors) or N dicts -> {name: value}."""
    if isinstance(hparams, Mapping):
        items = dict(hparams)
    else:
        rows = list(hparams)
        if len(rows) != n:
            raise ValueError(f"hparams: expected one dict per trajectory ({n}), got {len(rows)}")
        opt = get_functional_optimizer(base)
        for row in rows:
            opt.resolve(row)  # unknown names -> ValueError listing the accepted ones
        items = {name: [row.get(name, opt.defaults[name]) for row in rows] for name in set().union(*rows)}
    out: dict[str, HyperParam] = {}
    for name, value in items.items():
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, bool) for v in value):
            if len(set(value)) != 1:
                raise ValueError(f"hparams[{name!r}]: must be the same for every trajectory, got {list(value)}")
            value = value[0]
        elif isinstance(value, (list, tuple, Tensor)):
            value = torch.as_tensor(value, dtype=torch.float64).detach()
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n):
                raise ValueError(
                    f"hparams[{name!r}]: expected a number or {n} values (one per trajectory), "
                    f"got shape {list(value.shape)}"
                )
        out[name] = value
    return out


def flatten_rows(params: Mapping[str, Tensor]) -> Tensor:
    """The ``(N, *shape)`` tensors of ``params`` as one new contiguous ``(N, P)`` buffer, in their order (detached)."""
    n = next(iter(params.values())).shape[0]
    return torch.cat([p.detach().reshape(n, -1) for p in params.values()], dim=1).contiguous()


def flat_views(flat: Tensor, shapes: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """name -> ``(N, *shape)`` view of consecutive columns of ``flat`` (N, P), in the order of ``shapes``."""
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = flat[:, offset : offset + size].view(flat.shape[0], *shape)
        offset += size
    return views


class FusedMultiTrajectoryOptimizer:
    """N trajectories' parameters in flat ``(N, P)`` buffers, updated by one op call.

    Args:
        params: name -> stacked tensor ``(N, *shape)`` (trajectory first), or
            use :meth:`from_modules` to bind N model copies.
        optimizer: a base or preset name whose base is ``sgd``, ``adam``,
            ``adamw`` or ``lion`` (e.g. ``"nesterov"``).
        hparams: one dict for all trajectories (values: numbers or N-value
            sequences/tensors) or a list of N dicts; torch.optim names
            (``lr``, ``momentum``, ``beta1``...), checked like torch.optim
            and by the op's rules, here rather than at every step.

        buffers: optional ``(flat_params, flat_grads)``, contiguous ``(N, P)``
            tensors (``P`` the total size of ``params``, laid out in its order)
            to use in place instead of new ones; ``params`` must then already
            be their views (e.g. row slices of a larger buffer).

    ``params``/``grads`` are dicts of ``(N, *shape)`` views into the flat
    buffers; write gradients there (or pass them to :meth:`step`).
    """

    def __init__(self, params: Mapping[str, Tensor], optimizer: str = "adam", hparams=None, *,
                 buffers: tuple[Tensor, Tensor] | None = None):
        base, preset_hp = resolve_preset(optimizer)
        if base not in FUSED_KINDS:
            raise ValueError(
                f"optimizer: {optimizer!r} (base {base!r}) has no fused update; accepted bases: {list(FUSED_KINDS)}"
            )
        if not params:
            raise ValueError("params: expected at least one stacked parameter tensor")
        first = next(iter(params.values()))
        n = first.shape[0] if first.dim() else 0
        for name, p in params.items():
            if p.dim() == 0 or p.shape[0] != n or p.dtype != first.dtype or p.device != first.device:
                raise ValueError(
                    f"params[{name!r}]: every tensor must be (N={n}, ...) with dtype {first.dtype} on {first.device}, "
                    f"got shape {list(p.shape)}, {p.dtype} on {p.device}"
                )
        self.kind = base
        self.num_trajectories = n
        self._shapes = {name: tuple(p.shape[1:]) for name, p in params.items()}
        if buffers is None:
            self.flat_params = flatten_rows(params)
            self.flat_grads = torch.zeros_like(self.flat_params)
        else:
            self.flat_params, self.flat_grads = buffers
            size = sum(math.prod(shape) for shape in self._shapes.values())
            for name, flat in zip(("flat_params", "flat_grads"), buffers):
                if flat.shape != (n, size) or not flat.is_contiguous() or flat.dtype != first.dtype:
                    raise ValueError(f"buffers: {name} must be a contiguous ({n}, {size}) {first.dtype} tensor, "
                                     f"got {list(flat.shape)} {flat.dtype}")
        buffers = _STATE_BUFFERS[base]
        empty = self.flat_params.new_empty((0,))
        self.state1 = torch.zeros_like(self.flat_params) if buffers[0] else empty
        self.state2 = torch.zeros_like(self.flat_params) if buffers[1] else empty
        self.step_count = torch.zeros(n, dtype=self.flat_params.dtype, device=self.flat_params.device)
        self.params = self._views(self.flat_params)
        self.grads = self._views(self.flat_grads)
        self._bound: list[tuple[nn.Parameter, Tensor, Tensor]] = []
        self._preset_hp = preset_hp
        self.set_hparams(hparams)

    @classmethod
    def from_modules(cls, modules: Sequence[nn.Module], optimizer: str = "adam", hparams=None):
        """Bind N model copies: their trainable parameters and ``.grad`` become views
        of the flat buffers, so ``backward()`` writes straight into them."""
        if not modules:
            raise ValueError("modules: expected at least one module")
        named = [dict((k, p) for k, p in m.named_parameters() if p.requires_grad) for m in modules]
        if any(list(d) != list(named[0]) or any(d[k].shape != named[0][k].shape for k in d) for d in named):
            raise ValueError("modules: every module must have the same trainable parameters (names and shapes)")
        stacked = {k: torch.stack([d[k].detach() for d in named]) for k in named[0]}
        opt = cls(stacked, optimizer, hparams)
        for i, d in enumerate(named):
            for k, p in d.items():
                if p.grad is not None:  # keep gradients already computed
                    opt.grads[k][i].copy_(p.grad)
                p.data = opt.params[k][i]
                p.grad = opt.grads[k][i]
                opt._bound.append((p, opt.params[k][i], opt.grads[k][i]))
        return opt

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        return flat_views(flat, self._shapes)

    def set_hparams(self, hparams=None) -> None:
        """Replace the hyperparameters (same forms as the constructor; preset values
        are the defaults). Values are checked like torch.optim's constructors do,
        then by the op's rules (its ValueError), so :meth:`step` need not check them."""
        if hparams is None or isinstance(hparams, Mapping):
            hparams = {**self._preset_hp, **(hparams or {})}
        else:
            hparams = [{**self._preset_hp, **row} for row in hparams]
        merged = validate_hparams(self.kind, _per_trajectory(self.kind, hparams, self.num_trajectories))
        nesterov = bool(merged.pop("nesterov", False))
        hp = {
            name: torch.as_tensor(merged.get(name, _UNUSED_FILLER.get(name)), dtype=torch.float64)
            .expand(self.num_trajectories)
            for name in _HP_ARGS
        }
        self._check_values(hp, None, nesterov)  # before moving: numbers given here need no device sync
        self.nesterov = nesterov
        self._hp = {name: value.to(self.flat_params.device).contiguous() for name, value in hp.items()}

    def _check_values(self, hp: Mapping[str, Tensor], step: Tensor | None, nesterov: bool) -> None:
        # the op's rules and messages, once; step() then calls the op with check_values=False
        check_value_rules(hp, step, self.kind, nesterov, sgd_buffers=self.state1.numel() != 0)

    def zero_grad(self) -> None:
        """Zero the flat gradient buffer (bound ``.grad`` views stay bound)."""
        self.flat_grads.zero_()

    @torch.no_grad()
    def step(self, grads: Mapping[str, Tensor] | None = None) -> None:
        """Update every trajectory once. ``grads``: name -> ``(N, *shape)``, copied into
        the gradient buffer first; otherwise the buffer (or bound ``.grad``) is used."""
        if grads is not None:
            if set(grads) != set(self.grads):
                raise ValueError(f"grads: expected names {sorted(self.grads)}, got {sorted(grads)}")
            for name, g in grads.items():
                self.grads[name].copy_(g)
        self._sync_bound()
        multi_step_update_op(
            self.flat_params, self.flat_grads, self.state1, self.state2, self.step_count,
            *(self._hp[name] for name in _HP_ARGS), self.kind, self.nesterov, check_values=False,
        )

    def _sync_bound(self) -> None:
        # backward() adds into a bound .grad in place; if someone replaced a
        # .grad or .data (e.g. zero_grad(set_to_none=True)), copy it back in.
        for p, data_view, grad_view in self._bound:
            if p.grad is None:
                raise ValueError(
                    "a bound parameter has no gradient (.grad is None); the fused update needs every gradient. "
                    "Use FusedMultiTrajectoryOptimizer.zero_grad() instead of setting gradients to None"
                )
            if p.data.data_ptr() != data_view.data_ptr():
                data_view.copy_(p.data)
                p.data = data_view
            if p.grad.data_ptr() != grad_view.data_ptr():
                grad_view.copy_(p.grad)
                p.grad = grad_view

    def functional_state(self) -> dict[str, Tensor]:
        """The state as :mod:`sophon_ext.optim.functional` lays it out, stacked over
        trajectories (copies; keys ``"step"`` and ``"<buffer>:<param name>"``)."""
        opt = get_functional_optimizer(self.kind)
        state = {"step": self.step_count.clone()}
        for buffer, flat in zip(_STATE_BUFFERS[self.kind], (self.state1, self.state2)):
            if buffer is None:
                continue
            views = self._views(flat if flat.numel() else torch.zeros_like(self.flat_params))
            state.update({opt.state_key(buffer, k): v.clone() for k, v in views.items()})
        return state

    def state_dict(self) -> dict:
        """What :meth:`load_state_dict` needs to continue identically: kind, per-trajectory
        hyperparameters and :meth:`functional_state` (copies). As in torch.optim, the
        parameters are not included: save ``flat_params`` (or the bound modules) with it."""
        return {
            "kind": self.kind,
            "nesterov": self.nesterov,
            "num_trajectories": self.num_trajectories,
            "hparams": {name: value.clone() for name, value in self._hp.items()},
            "state": self.functional_state(),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore what :meth:`state_dict` returned, into this optimizer's buffers (in place)."""
        for key, mine in (("kind", self.kind), ("num_trajectories", self.num_trajectories)):
            if state_dict.get(key) != mine:
                raise ValueError(f"state_dict: {key} is {state_dict.get(key)!r}, this optimizer's is {mine!r}")
        state, expected = state_dict["state"], self.functional_state()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            raise ValueError(
                "state_dict: its state does not fit these parameters; expected "
                f"{ {k: list(v.shape) for k, v in expected.items()} }, got { {k: list(v.shape) for k, v in state.items()} }"
            )
        hp = {name: state_dict["hparams"][name].to(self.flat_params.device, torch.float64).clone() for name in _HP_ARGS}
        nesterov = bool(state_dict["nesterov"])
        self._check_values(hp, state["step"], nesterov)  # before anything is replaced
        self.step_count.copy_(state["step"])
        opt = get_functional_optimizer(self.kind)
        for buffer, flat in zip(_STATE_BUFFERS[self.kind], (self.state1, self.state2)):
            if buffer is None or not flat.numel():
                continue
            for name, view in self._views(flat).items():
                view.copy_(state[opt.state_key(buffer, name)])
        self.nesterov, self._hp = nesterov, hp


__all__ = ["FUSED_KINDS", "FusedMultiTrajectoryOptimizer", "flat_views", "flatten_rows", "multi_step_update_", "multi_step_update_op"]
