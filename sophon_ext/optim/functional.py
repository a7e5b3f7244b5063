"""Functional (pure, vmappable, differentiable) versions of the torch.optim optimizers.

``opt = get_functional_optimizer("adam")``; ``state = opt.init(params)``;
``new_params, new_state = opt.step(params, grads, state, hp)``.

Each update follows the formulas of torch.optim's single-tensor path, in the
same order of operations, so a trajectory matches its torch.optim counterpart
step for step. Nothing is updated in place, so the step works under
``torch.func.vmap`` (hyperparameters given as 0-dim tensors are then
per-trajectory) and under ``torch.func.grad`` (meta-gradients through the
update). Two deliberate differences from torch.optim, both invisible in the
forward values:

* square roots of running averages use :func:`_sqrt_zero_safe`, whose
  derivative at 0 is 0 instead of inf (torch's would turn a parameter that
  never received a gradient into NaN meta-gradients);
* state that torch.optim creates lazily on the first step (SGD's momentum
  buffer, Adagrad's ``initial_accumulator_value``) is allocated at ``init``
  and filled on the first step by selecting on the step counter.

Boolean hyperparameters (``nesterov``, ``centered``) are static Python bools:
they change the computation, so trajectories that differ in them cannot share
one vmapped call (see :attr:`FunctionalOptimizer.static_names`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

HyperParam = float | Tensor | bool

# Range rules shared by every optimizer, mirroring torch.optim's constructor checks.
# name -> (predicate on a float tensor, text of the accepted range)
_RANGES: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "lr": (lambda x: x >= 0, ">= 0"),
    "momentum": (lambda x: x >= 0, ">= 0"),
    "dampening": (lambda x: torch.isfinite(x), "finite"),
    "weight_decay": (lambda x: x >= 0, ">= 0"),
    "eps": (lambda x: x >= 0, ">= 0"),
    "beta1": (lambda x: (x >= 0) & (x < 1), "in [0, 1)"),
    "beta2": (lambda x: (x >= 0) & (x < 1), "in [0, 1)"),
    "alpha": (lambda x: x >= 0, ">= 0"),
    "rho": (lambda x: (x >= 0) & (x <= 1), "in [0, 1]"),
    "lr_decay": (lambda x: x >= 0, ">= 0"),
    "initial_accumulator_value": (lambda x: x >= 0, ">= 0"),
}
# State key of a per-parameter buffer: "<buffer>:<parameter name>".
_SEPARATOR = ":"
STEP_KEY = "step"


def _is_zero(x: HyperParam) -> bool:
    """True only for a Python number equal to 0 (a tensor may vary per trajectory)."""
    return not isinstance(x, Tensor) and x == 0


def _like(x: HyperParam, ref: Tensor) -> HyperParam:
    """A tensor hyperparameter in ``ref``'s dtype/device (floats stay Python floats)."""
    return x.to(dtype=ref.dtype, device=ref.device) if isinstance(x, Tensor) else x


def _sqrt_zero_safe(x: Tensor) -> Tensor:
    """sqrt(x) with derivative 0 (not inf) where x == 0; same forward values."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def _decayed_grad(p: Tensor, g: Tensor, weight_decay: HyperParam) -> Tensor:
    # torch.optim's coupled L2 weight decay: grad.add(param, alpha=weight_decay)
    return g if _is_zero(weight_decay) else g + weight_decay * p


# ---------------------------------------------------------------------------
# Per-parameter update rules: (p, g, buffers, step_before, step_after, hp) -> (p, buffers)
# ``step_before`` counts the updates already done (0 on the first step).


def _sgd(p, g, buf, step_before, step_after, hp):
    lr, momentum, dampening = hp["lr"], hp["momentum"], hp["dampening"]
    g = _decayed_grad(p, g, hp["weight_decay"])
    if _is_zero(momentum):
        return p - lr * g, buf
    old = buf["momentum_buffer"]
    # torch.optim starts the buffer as a copy of the first gradient (no dampening)
    new = torch.where(step_before == 0, g, old * momentum + (1 - dampening) * g)
    direction = g + momentum * new if hp["nesterov"] else new
    if isinstance(momentum, Tensor):
        # a trajectory with momentum 0 is plain SGD in torch.optim (dampening ignored)
        has_momentum = momentum != 0
        direction = torch.where(has_momentum, direction, g)
        new = torch.where(has_momentum, new, old)
    return p - lr * direction, {"momentum_buffer": new}


def _adam_like(decoupled: bool):
    def update(p, g, buf, step_before, step_after, hp):
        lr, beta1, beta2, eps, weight_decay = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
        if decoupled:
            if not _is_zero(weight_decay):
                p = p * (1 - lr * weight_decay)
        else:
            g = _decayed_grad(p, g, weight_decay)
        exp_avg = torch.lerp(buf["exp_avg"], g, 1 - beta1)
        exp_avg_sq = buf["exp_avg_sq"] * beta2 + (1 - beta2) * (g * g)
        bias_correction1 = 1 - beta1**step_after
        bias_correction2_sqrt = (1 - beta2**step_after) ** 0.5
        step_size = lr / bias_correction1
        denom = _sqrt_zero_safe(exp_avg_sq) / bias_correction2_sqrt + eps
        return p - step_size * (exp_avg / denom), {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    return update


def _rmsprop(p, g, buf, step_before, step_after, hp):
    lr, alpha, eps, momentum = hp["lr"], hp["alpha"], hp["eps"], hp["momentum"]
    g = _decayed_grad(p, g, hp["weight_decay"])
    square_avg = buf["square_avg"] * alpha + (1 - alpha) * (g * g)
    grad_avg = buf["grad_avg"]
    if hp["centered"]:
        grad_avg = torch.lerp(grad_avg, g, 1 - alpha)
        avg = _sqrt_zero_safe(square_avg - grad_avg * grad_avg)
    else:
        avg = _sqrt_zero_safe(square_avg)
    avg = avg + eps
    new = {"square_avg": square_avg, "grad_avg": grad_avg, "momentum_buffer": buf["momentum_buffer"]}
    if _is_zero(momentum):
        return p - lr * (g / avg), new
    # with a per-trajectory momentum of 0 this is exactly the plain update above
    new["momentum_buffer"] = buf["momentum_buffer"] * momentum + g / avg
    return p - lr * new["momentum_buffer"], new


def _adagrad(p, g, buf, step_before, step_after, hp):
    lr, lr_decay, eps = hp["lr"], hp["lr_decay"], hp["eps"]
    g = _decayed_grad(p, g, hp["weight_decay"])
    clr = lr / (1 + (step_after - 1) * lr_decay)
    state_sum = buf["sum"]
    initial = hp["initial_accumulator_value"]
    if not _is_zero(initial):
        # torch.optim fills the accumulator with this value when the state is created
        state_sum = torch.where(step_before == 0, state_sum + initial, state_sum)
    state_sum = state_sum + g * g
    std = _sqrt_zero_safe(state_sum) + eps
    return p - clr * (g / std), {"sum": state_sum}


def _adadelta(p, g, buf, step_before, step_after, hp):
    lr, rho, eps = hp["lr"], hp["rho"], hp["eps"]
    g = _decayed_grad(p, g, hp["weight_decay"])
    square_avg = buf["square_avg"] * rho + (1 - rho) * (g * g)
    std = (square_avg + eps).sqrt()
    delta = (buf["acc_delta"] + eps).sqrt() / std * g
    acc_delta = buf["acc_delta"] * rho + (1 - rho) * (delta * delta)
    return p - lr * delta, {"square_avg": square_avg, "acc_delta": acc_delta}


def _lion(p, g, buf, step_before, step_after, hp):
    # Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Alg. 2
    lr, beta1, beta2, weight_decay = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    m = buf["exp_avg"]
    c = beta1 * m + (1 - beta1) * g
    new_p = p - lr * (torch.sign(c) + weight_decay * p)
    return new_p, {"exp_avg": beta2 * m + (1 - beta2) * g}


# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionalOptimizer:
    """A pure optimizer: ``init(params) -> state``, ``step(params, grads, state, hp)``.

    ``state`` is a flat ``dict[str, Tensor]``: ``"step"`` (0-dim, updates done
    so far) and one ``"<buffer>:<param name>"`` entry per buffer and parameter.
    """

    name: str
    defaults: Mapping[str, HyperParam]
    buffers: tuple[str, ...]
    update: Callable
    static_names: frozenset[str] = frozenset()

    def init(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Fresh state for ``params`` (zeros; the step counter is a 0-dim tensor)."""
        if not params:
            raise ValueError("params: expected at least one parameter tensor")
        first = next(iter(params.values()))
        dtype = first.dtype if first.is_floating_point() else torch.get_default_dtype()
        state = {STEP_KEY: torch.zeros((), dtype=dtype, device=first.device)}
        for name, p in params.items():
            for buffer in self.buffers:
                state[buffer + _SEPARATOR + name] = torch.zeros_like(p)
        return state

    def step(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        hp: Mapping[str, HyperParam] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One update of every parameter; returns ``(new_params, new_state)``.

        ``hp`` overrides :attr:`defaults`; values are floats or 0-dim tensors
        (static names: Python bools). Names are checked here; values are
        checked by :func:`validate_hparams` (call it outside vmap/grad).
        """
        merged = self.resolve(hp)
        if set(grads) != set(params):
            missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
            raise ValueError(f"grads: must have the same names as params; missing {missing}, unexpected {extra}")
        step_before = state[STEP_KEY]
        step_after = step_before + 1
        new_params: dict[str, Tensor] = {}
        new_state: dict[str, Tensor] = {STEP_KEY: step_after}
        for name, p in params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(
                    f"grads[{name!r}]: shape {tuple(g.shape)} does not match the parameter's {tuple(p.shape)}"
                )
            buffers = {b: state[b + _SEPARATOR + name] for b in self.buffers}
            local = {k: _like(v, p) for k, v in merged.items()}
            new_params[name], new_buffers = self.update(
                p, g, buffers, _like(step_before, p), _like(step_after, p), local
            )
            for b in self.buffers:
                new_state[b + _SEPARATOR + name] = new_buffers[b]
        return new_params, new_state

    def resolve(self, hp: Mapping[str, HyperParam] | None) -> dict[str, HyperParam]:
        """``defaults`` overridden by ``hp``, after checking names and static types."""
        hp = dict(hp or {})
        unknown = sorted(set(hp) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"hp: unknown hyperparameter(s) {unknown} for optimizer {self.name!r}; "
                f"accepted: {sorted(self.defaults)}"
            )
        for name in self.static_names & set(hp):
            if not isinstance(hp[name], bool):
                raise TypeError(
                    f"hp[{name!r}]: must be a Python bool (it selects the computation), got {type(hp[name]).__name__}"
                )
        return {**self.defaults, **hp}

    def state_key(self, buffer: str, param_name: str) -> str:
        """The state entry of ``buffer`` (e.g. ``"exp_avg"``) for parameter ``param_name``."""
        if buffer not in self.buffers:
            raise ValueError(f"buffer: {buffer!r} is not a buffer of {self.name!r}; accepted: {list(self.buffers)}")
        return buffer + _SEPARATOR + param_name


_SGD_DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
_ADAM_DEFAULTS = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}

_OPTIMIZERS: dict[str, FunctionalOptimizer] = {
    opt.name: opt
    for opt in (
        FunctionalOptimizer("sgd", _SGD_DEFAULTS, ("momentum_buffer",), _sgd, frozenset({"nesterov"})),
        FunctionalOptimizer("adam", _ADAM_DEFAULTS, ("exp_avg", "exp_avg_sq"), _adam_like(decoupled=False)),
        FunctionalOptimizer(
            "adamw", {**_ADAM_DEFAULTS, "weight_decay": 1e-2}, ("exp_avg", "exp_avg_sq"), _adam_like(decoupled=True)
        ),
        FunctionalOptimizer(
            "rmsprop",
            {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False},
            ("square_avg", "grad_avg", "momentum_buffer"),
            _rmsprop,
            frozenset({"centered"}),
        ),
        FunctionalOptimizer(
            "adagrad",
            {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0, "eps": 1e-10},
            ("sum",),
            _adagrad,
        ),
        FunctionalOptimizer(
            "adadelta",
            {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
            ("square_avg", "acc_delta"),
            _adadelta,
        ),
        FunctionalOptimizer(
            "lion", {"lr": 1e-4, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.0}, ("exp_avg",), _lion
        ),
    )
}

FUNCTIONAL_OPTIMIZERS = tuple(_OPTIMIZERS)


def get_functional_optimizer(base_name: str) -> FunctionalOptimizer:
    """The functional optimizer for a base name (``sgd``, ``adam``, ``adamw``, ``rmsprop``,
    ``adagrad``, ``adadelta``, ``lion``)."""
    if base_name not in _OPTIMIZERS:
        raise ValueError(f"optimizer: unknown base name {base_name!r}; choose one of {sorted(_OPTIMIZERS)}")
    return _OPTIMIZERS[base_name]


def defaults(base_name: str) -> dict[str, HyperParam]:
    """torch.optim's default hyperparameters for ``base_name`` (a fresh dict)."""
    return dict(get_functional_optimizer(base_name).defaults)


def validate_hparams(base_name: str, hp: Mapping[str, HyperParam] | None) -> dict[str, HyperParam]:
    """Check names and values of ``hp`` like torch.optim's constructors do; return the merged dict.

    Values may be floats or tensors of any shape (e.g. an ``(N,)`` stack of
    per-trajectory values); every element is checked, so call this outside
    vmap/grad. Raises ValueError (unknown name, value out of range) or TypeError.
    """
    opt = get_functional_optimizer(base_name)
    merged = opt.resolve(hp)
    for name, value in merged.items():
        if name in opt.static_names:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
            raise TypeError(f"hp[{name!r}]: expected a float or a tensor, got {type(value).__name__}")
        tensor = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
        if not tensor.is_floating_point():
            tensor = tensor.double()
        rule, accepted = _RANGES[name]
        ok = rule(tensor) & ~torch.isnan(tensor)
        if not bool(ok.all()):
            bad = tensor[~ok].flatten()[0].item() if tensor.dim() else tensor.item()
            raise ValueError(f"hp[{name!r}]: must be {accepted} for optimizer {base_name!r}, got {bad}")
    if merged.get("nesterov"):
        momentum = torch.as_tensor(merged["momentum"], dtype=torch.float64)
        dampening = torch.as_tensor(merged["dampening"], dtype=torch.float64)
        if not (bool((momentum > 0).all()) and bool((dampening == 0).all())):
            raise ValueError("hp['nesterov']: Nesterov momentum requires momentum > 0 and dampening == 0")
    return merged


def torch_optimizer_kwargs(base_name: str, hp: Mapping[str, HyperParam] | None) -> dict:
    """``hp`` spelled for the torch.optim class (``beta1``/``beta2`` -> ``betas``)."""
    merged = dict(hp or {})
    get_functional_optimizer(base_name).resolve(merged)
    if "beta1" in merged or "beta2" in merged:
        base = get_functional_optimizer(base_name).defaults
        merged["betas"] = (merged.pop("beta1", base.get("beta1")), merged.pop("beta2", base.get("beta2")))
    return merged


__all__ = [
    "FUNCTIONAL_OPTIMIZERS",
    "FunctionalOptimizer",
    "STEP_KEY",
    "defaults",
    "get_functional_optimizer",
    "torch_optimizer_kwargs",
    "validate_hparams",
]
