"""The fused multi-trajectory update op: ``torch.ops.sophon_ext.multi_step_update_``.

Updates, in place and in one pass, the stacked flat parameters ``(N, P)`` of N
trajectories with per-trajectory hyperparameters (kinds ``sgd``, ``adam``,
``adamw``, ``lion``); compiled kernels: csrc/cpu/multi_step.cpp and
csrc/cuda/multi_step.cu, schema: csrc/ops.cpp. This module registers the
op's schema, its pure-PyTorch reference (the functional optimizer of
:mod:`sophon_ext.optim.functional` applied to all rows at once, with the
kernels' argument checks), an Autograd kernel that refuses tensors requiring
grad (the update is not differentiable) and its fake kernel. The user-facing
side, :class:`sophon_ext.optim.FusedMultiTrajectoryOptimizer` and the keyword
wrapper :func:`sophon_ext.optim.multi_step_update_`, is in
:mod:`sophon_ext.optim.fused`.

The last argument, ``check_values`` (default True), says whether the call
checks the hyperparameter and step values (ValueError naming the first broken
rule); on CUDA that check is a device->host copy. A caller that checked them
once with :func:`check_value_rules` passes False and the values are used as
given (out-of-range ones give undefined numbers). Shapes, dtypes and devices
are always checked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import define_op

FUSED_KINDS = ("adam", "adamw", "lion", "sgd")

_SCHEMA = (
    "(Tensor(a!) params, Tensor grads, Tensor(b!) state1, Tensor(c!) state2, Tensor(d!) step, "
    "Tensor lr, Tensor momentum, Tensor dampening, Tensor beta1, Tensor beta2, Tensor weight_decay, "
    "Tensor eps, str kind, bool nesterov, bool check_values=True) -> ()"
)
# state1 / state2 of each kind, named as the functional optimizer's buffers
_STATE_BUFFERS = {
    "sgd": ("momentum_buffer", None),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "lion": ("exp_avg", None),
}
_HP_ARGS = ("lr", "momentum", "dampening", "beta1", "beta2", "weight_decay", "eps")
_PREFIX = "multi_step_update_: "


def _check_like_params(t: Tensor, name: str, params: Tensor, written: bool) -> None:
    if t.shape != params.shape:
        raise ValueError(f"{_PREFIX}{name} must have the shape of params {list(params.shape)}, got {list(t.shape)}")
    if t.dtype != params.dtype:
        raise TypeError(f"{_PREFIX}{name} must have dtype {params.dtype} like params, got {t.dtype}")
    if t.device != params.device:
        raise ValueError(f"{_PREFIX}{name} must be on device {params.device} like params, got {t.device}")
    if written and not t.is_contiguous():
        raise ValueError(f"{_PREFIX}{name} must be contiguous (it is updated in place)")


def _check_arguments(
    params, grads, state1, state2, step, hps: dict, kind: str, nesterov: bool, check_values: bool = True
) -> None:
    """The checks of the compiled op (check_arguments + fill_row in csrc/), same order and messages;
    the value rules only with ``check_values``."""
    if kind not in FUSED_KINDS:
        raise ValueError(f"{_PREFIX}unknown kind {kind!r}; accepted: {', '.join(map(repr, FUSED_KINDS))}")
    if params.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_PREFIX}params must be float32 or float64, got {params.dtype}")
    if params.dim() != 2:
        raise ValueError(
            f"{_PREFIX}params must be 2-D (trajectories, flattened parameters), got shape {list(params.shape)}"
        )
    if not params.is_contiguous():
        raise ValueError(f"{_PREFIX}params must be contiguous (it is updated in place)")
    _check_like_params(grads, "grads", params, written=False)
    if nesterov and kind != "sgd":
        raise ValueError(f"{_PREFIX}nesterov applies only to kind 'sgd', got kind {kind!r}")
    n = params.shape[0]
    for name, t in {"step": step, **hps}.items():
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{_PREFIX}{name} must have shape [{n}] (one value per trajectory), got {list(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{_PREFIX}{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != params.device:
            raise ValueError(f"{_PREFIX}{name} must be on device {params.device} like params, got {t.device}")
    if not step.is_contiguous():
        raise ValueError(f"{_PREFIX}step must be contiguous (it is updated in place)")
    if kind == "sgd" and state1.numel() != 0:
        _check_like_params(state1, "state1 (momentum buffers)", params, written=True)
    if kind in ("adam", "adamw"):
        _check_like_params(state1, "state1 (exp_avg)", params, written=True)
        _check_like_params(state2, "state2 (exp_avg_sq)", params, written=True)
    if kind == "lion":
        _check_like_params(state1, "state1 (exp_avg)", params, written=True)
    if check_values:
        check_value_rules(hps, step, kind, nesterov, sgd_buffers=state1.numel() != 0)


def check_value_rules(hps: dict, step: Tensor | None, kind: str, nesterov: bool, sgd_buffers: bool = True) -> None:
    """The range rules of the op's values (fill_row in csrc/multi_step.h): ValueError naming the
    first broken rule and trajectory, with the op's message. ``hps``: the (N,) hyperparameters
    by name (lr ... eps); ``step``: the (N,) update counts, or None to check only ``hps``;
    ``sgd_buffers``: whether kind sgd has momentum buffers. For callers that check once and
    then call the op with check_values=False.
    """
    h = {k: v.double() for k, v in hps.items()}
    # a non-finite rate or a negative update count would write NaN/inf into params
    if step is not None:
        h["step"] = step.double()
    checks = [
        ("lr", torch.isfinite(h["lr"]) & (h["lr"] >= 0), "finite and >= 0"),
        ("weight_decay", h["weight_decay"] >= 0, ">= 0"),
    ]
    if kind == "sgd":
        checks += [("momentum", h["momentum"] >= 0, ">= 0"), ("dampening", torch.isfinite(h["dampening"]), "finite")]
        if nesterov:
            checks += [
                ("momentum", h["momentum"] > 0, "> 0 with nesterov"),
                ("dampening", h["dampening"] == 0, "0 with nesterov"),
            ]
        if not sgd_buffers:
            checks.append(("momentum", h["momentum"] == 0, "0 when state1 (momentum buffers) is empty"))
    else:
        checks += [(b, (h[b] >= 0) & (h[b] < 1), "in [0, 1)") for b in ("beta1", "beta2")]
        if kind != "lion":
            checks.append(("eps", h["eps"] >= 0, ">= 0"))
    if step is not None:
        checks.append(("step", torch.isfinite(h["step"]) & (h["step"] >= 0), "finite and >= 0"))
    for name, ok, accepted in checks:
        if not bool(ok.all()):
            row = int((~ok).nonzero()[0, 0])
            raise ValueError(
                f"{_PREFIX}{name} must be {accepted} for every trajectory, "
                f"got {h[name][row].item()} at trajectory {row}"
            )


def _reference(params, grads, state1, state2, step, lr, momentum, dampening, beta1, beta2, weight_decay, eps, kind,
               nesterov, check_values=True):
    """Pure-PyTorch fallback: the functional optimizer applied to all N rows at once
    (per-trajectory hyperparameters and step counters broadcast as (N, 1) columns)."""
    # imported here: sophon_ext.optim imports this module (through optim/fused.py)
    from ..optim.functional import get_functional_optimizer

    hps = dict(zip(_HP_ARGS, (lr, momentum, dampening, beta1, beta2, weight_decay, eps)))
    _check_arguments(params, grads, state1, state2, step, hps, kind, nesterov, check_values)
    opt = get_functional_optimizer(kind)
    hp = {name: hps[name][:, None] for name in opt.defaults if name in hps}
    if kind == "sgd":
        hp["nesterov"] = nesterov
    names = _STATE_BUFFERS[kind]
    stored = [s for s, name in zip((state1, state2), names) if name is not None]
    if kind == "sgd" and state1.numel() == 0:  # no buffer: plain SGD (as the kernels, even unchecked)
        hp["momentum"] = torch.zeros_like(hp["momentum"])
        stored = [torch.zeros_like(params)]
    state = {"step": step[:, None], **{opt.state_key(name, "flat"): s for name, s in zip(names, stored)}}
    new_params, new_state = opt.step({"flat": params}, {"flat": grads}, state, hp)
    with torch.no_grad():
        params.copy_(new_params["flat"])
        step.copy_(new_state["step"][:, 0])
        for name, s in zip(names, (state1, state2)):
            if name is not None and s.numel():
                s.copy_(new_state[opt.state_key(name, "flat")])


multi_step_update_op = define_op("multi_step_update_", _SCHEMA, _reference)


# The update is not differentiable: refuse tensors that require grad instead of
# silently returning values without a graph. Below autograd, the CPU/CUDA
# kernels (or the reference) answer.
_autograd_library = torch.library.Library("sophon_ext", "FRAGMENT")


def _refuse_grad(*args):
    if torch.is_grad_enabled():
        for name, value in zip(("params", "grads", "state1", "state2", "step", *_HP_ARGS), args):
            if isinstance(value, Tensor) and value.requires_grad:
                raise ValueError(
                    f"{_PREFIX}{name} requires grad, but the fused update is not differentiable; "
                    "differentiate through sophon_ext.optim.functional instead, or pass detached tensors"
                )
    with torch._C._AutoDispatchBelowAutograd():
        return multi_step_update_op(*args)


_autograd_library.impl("multi_step_update_", _refuse_grad, "Autograd")


@torch.library.register_fake("sophon_ext::multi_step_update_")
def _fake(*args):
    # shapes are unchanged and nothing is returned: the op only mutates its inputs
    return None
