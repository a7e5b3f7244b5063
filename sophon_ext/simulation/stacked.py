"""The "stacked" path's model: all N trajectories of a chunk in ONE ordinary forward pass.

vmap over stacked convolution weights already runs grouped convolutions, but
its batch rules move the trajectory dim between layouts around every layer
(copies), and each vmapped call pays the functorch wrapping. Here the model,
traced once with ``torch.fx``, runs on plain tensors with every activation
held as ``(B, N, *one trajectory's dims)``: channel-wise ops (a convolution
with ``groups * N``, pooling, batch and group norm) see it as
``(B, N * C, ...)`` without a copy, a linear layer is one batched matmul, and
plain autograd gives every trajectory its own gradient (trajectories share no
parameter, so the gradient of the sum of their losses is each one's own).

Only ops whose per-trajectory meaning is clear in that layout are accepted
(the tables below); anything else raises :class:`NotStackable` and the auto
path keeps to vmap and the loop. BatchNorm always normalises by batch
statistics (as on the other paths), per trajectory and channel.
"""

from __future__ import annotations

import operator
import statistics
import contextvars
import time
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn


class NotStackable(ValueError):
    """The model uses something the stacked path cannot run trajectory by trajectory."""


@dataclass
class _Act:
    """An activation of all trajectories: ``t`` is (B, N, *dims of one trajectory)."""

    t: Tensor

    def logical_dim(self, d: int) -> int:
        """Physical dim of logical dim ``d`` (batch dim 0 stays, the others move one right)."""
        rank = self.t.dim() - 1
        if not -rank <= d < rank:
            raise NotStackable(f"dim {d} out of range for a rank-{rank} activation")
        d %= rank
        return 0 if d == 0 else d + 1


@dataclass
class _Param:
    """A parameter of all trajectories: ``t`` is (N, *shape)."""

    t: Tensor


def _channels(x: _Act) -> Tensor:
    """(B, N * C, ...): a view when ``x`` is contiguous."""
    t = x.t
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])


def _unchannel(out: Tensor, n: int) -> _Act:
    return _Act(out.unflatten(1, (n, -1)))


def _aligned(value, rank: int):
    """``value`` as an operand of an elementwise op with a (B, N, ...) activation of physical rank ``rank``."""
    if isinstance(value, _Act):
        if value.t.dim() != rank:
            raise NotStackable("elementwise op between activations of different ranks")
        return value.t
    if isinstance(value, _Param):  # logical shape s aligns with the trailing logical dims
        p = value.t
        extra = rank - 1 - p.dim()  # logical rank minus len(s)
        if extra >= 0:
            return p.reshape(1, p.shape[0], *([1] * extra), *p.shape[1:])
        if extra == -1:  # s also spans the batch dim: (s0, N, s1, ...)
            return p.transpose(0, 1)
        raise NotStackable("a parameter of higher rank than the activation it meets")
    if isinstance(value, Tensor):  # the same for every trajectory
        if value.dim() <= rank - 2:
            return value
        if value.dim() == rank - 1:
            return value.unsqueeze(1)
        raise NotStackable("a constant tensor of higher rank than the activation it meets")
    return value


def _elementwise(fn):
    def apply(x, *args, **kwargs):
        if isinstance(x, _Act):
            return _Act(fn(x.t, *args, **kwargs))
        if isinstance(x, _Param):
            return _Param(fn(x.t, *args, **kwargs))
        return fn(x, *args, **kwargs)

    return apply


def _binary(fn):
    def apply(a, b, *args, **kwargs):
        acts = [v for v in (a, b) if isinstance(v, _Act)]
        if not acts:
            if isinstance(a, _Param) or isinstance(b, _Param):
                raise NotStackable("arithmetic between parameters outside an activation")
            return fn(a, b, *args, **kwargs)
        rank = acts[0].t.dim()
        return _Act(fn(_aligned(a, rank), _aligned(b, rank), *args, **kwargs))

    return apply


def _channelwise(fn):
    """An op that treats each channel of each sample alone (pooling, interpolation)."""

    def apply(x, *args, **kwargs):
        if not isinstance(x, _Act) or x.t.dim() < 3:
            raise NotStackable(f"{getattr(fn, '__name__', fn)} on something other than a (B, C, ...) activation")
        return _unchannel(fn(_channels(x), *args, **kwargs), x.t.shape[1])

    return apply


def _flatten(x, start_dim=0, end_dim=-1):
    if not isinstance(x, _Act):
        return torch.flatten(x, start_dim, end_dim)
    start, end = x.logical_dim(start_dim), x.logical_dim(end_dim)
    if start == 0:
        raise NotStackable("flatten over the batch dim")
    return _Act(x.t.flatten(start, end))


def _reduce(name):
    def apply(x, dim=None, *args, **kwargs):
        if not isinstance(x, _Act):
            return getattr(torch, name)(x, *(() if dim is None else (dim,)), *args, **kwargs)
        if dim is None:
            raise NotStackable(f"{name} over every dim (it would mix trajectories)")
        dims = [x.logical_dim(d) for d in ((dim,) if isinstance(dim, int) else dim)]
        return _Act(getattr(x.t, name)(dims, *args, **kwargs))

    return apply


def _reshape(x, *shape):
    if not isinstance(x, _Act):
        return x.reshape(*shape)
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
    batch, per = x.t.shape[0], x.t.shape[2:].numel()
    rest = list(shape[1:])
    if shape and shape[0] == -1 and -1 not in rest and torch.Size(rest).numel() == per:
        pass  # the batch dim inferred, the rest of one trajectory given
    elif not shape or shape[0] != batch:
        raise NotStackable(f"reshape to {shape}: only reshapes that keep the batch dim first are supported")
    return _Act(x.t.reshape(batch, x.t.shape[1], *rest))


def _size(x, dim=None):
    if not isinstance(x, _Act):
        return x.size() if dim is None else x.size(dim)
    logical = torch.Size([x.t.shape[0], *x.t.shape[2:]])
    return logical if dim is None else logical[dim]


def _cat(tensors, dim=0):
    if not all(isinstance(t, _Act) for t in tensors):
        raise NotStackable("cat of something other than activations")
    return _Act(torch.cat([t.t for t in tensors], tensors[0].logical_dim(dim)))


def _getattr(x, name):
    if isinstance(x, _Act):
        if name == "shape":
            return _size(x)
        if name in ("dtype", "device"):
            return getattr(x.t, name)
        raise NotStackable(f"attribute {name!r} of an activation")
    return getattr(x, name)


def _getitem(x, index):
    if isinstance(x, (_Act, _Param)):
        raise NotStackable("indexing an activation or a parameter")
    return x[index]


_ELEMENTWISE_FUNCTIONS = [torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.softplus, F.hardswish,
                          F.hardsigmoid, F.mish, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, F.dropout]
_FUNCTIONS = {
    **{fn: _elementwise(fn) for fn in _ELEMENTWISE_FUNCTIONS},
    **{fn: _binary(fn) for fn in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                                  torch.mul, torch.div)},
    **{fn: _channelwise(fn) for fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
                                       F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                                       F.interpolate)},
    torch.flatten: _flatten,
    torch.cat: _cat,
    torch.mean: _reduce("mean"),
    torch.sum: _reduce("sum"),
    getattr: _getattr,
    operator.getitem: _getitem,
}
_ELEMENTWISE_METHODS = ("relu", "sigmoid", "tanh", "exp")
_METHODS = {
    **{name: _elementwise(lambda t, *a, _name=name, **k: getattr(t, _name)(*a, **k)) for name in _ELEMENTWISE_METHODS},
    **{name: _binary(getattr(operator, op)) for name, op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "truediv"))},
    "flatten": _flatten,
    "view": _reshape,
    "reshape": _reshape,
    "mean": _reduce("mean"),
    "sum": _reduce("sum"),
    "size": _size,
    "contiguous": lambda x: x,
}


# -- modules: handler(module, its parameters by local name, input activation) --
def _grouped_conv(conv, x: Tensor, weight: Tensor, bias, module: nn.Module) -> Tensor:
    """All trajectories as one convolution with ``groups * N``: (B, N, C, ...) -> (B, N, O, ...)."""
    n = weight.shape[0]
    out = conv(x.reshape(x.shape[0], -1, *x.shape[3:]), weight.flatten(0, 1), None if bias is None else bias.flatten(),
               module.stride, module.padding, module.dilation, module.groups * n)
    return out.unflatten(1, (n, -1))


def _per_trajectory_conv(conv, x: Tensor, weight: Tensor, bias, module: nn.Module) -> Tensor:
    """One ordinary convolution per trajectory (grouped kernels are slow for some shapes, e.g. one input channel)."""
    return torch.stack([conv(x[:, j], weight[j], None if bias is None else bias[j], module.stride, module.padding,
                             module.dilation, module.groups) for j in range(weight.shape[0])], dim=1)


_CONV_WAYS = {"grouped": _grouped_conv, "per_trajectory": _per_trajectory_conv}
# (shapes, hyperparameters, dtype, device, threads) -> the faster of _CONV_WAYS, timed at first use
_CONV_CHOICE: dict[tuple, str] = {}


#: False while a caller asked for a path explicitly: the convolution way then follows a fixed rule
#: (one ordinary convolution per trajectory for single-channel inputs, where grouped kernels are
#: slow, grouped otherwise), so a run does not depend on timings
TIMED_CHOICES: contextvars.ContextVar[bool] = contextvars.ContextVar("sophon_timed_choices", default=True)


def _conv_way(conv, x: Tensor, weight: Tensor, bias, module: nn.Module) -> str:
    if not TIMED_CHOICES.get():
        return "per_trajectory" if weight.shape[2] == 1 else "grouped"  # weight (N, O, C/groups, ...)
    key = (tuple(x.shape), x.stride(), tuple(weight.shape), bias is not None, module.stride, module.padding, module.dilation,
           module.groups, x.dtype, str(x.device), torch.get_num_threads())
    if key not in _CONV_CHOICE:
        _CONV_CHOICE[key] = _time_conv_ways(conv, x, weight, bias, module)
    return _CONV_CHOICE[key]


def _time_conv_ways(conv, x, weight, bias, module, repeats: int = 3) -> str:
    """The way with the lowest median forward + backward time on detached copies of
    these tensors, after one untimed run of each (oneDNN prepares a kernel per shape)."""
    x = x.detach().requires_grad_(x.requires_grad)
    weight = weight.detach().requires_grad_(True)
    bias = None if bias is None else bias.detach().requires_grad_(True)
    times = {way: [] for way in _CONV_WAYS}
    for i in range(repeats + 1):
        for way, run in _CONV_WAYS.items():
            _synchronize(x.device)
            start = time.perf_counter()
            out = run(conv, x, weight, bias, module)
            out.backward(torch.ones_like(out))
            _synchronize(x.device)
            if i:
                times[way].append(time.perf_counter() - start)
    return min(times, key=lambda way: statistics.median(times[way]))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _conv(module: nn.Module, params: dict, x) -> _Act:
    if module.padding_mode != "zeros":
        raise NotStackable(f"a convolution with padding_mode={module.padding_mode!r}")
    if not isinstance(x, _Act) or x.t.dim() < 4:
        raise NotStackable("a convolution of something other than a batched activation")
    weight, bias = params["weight"], params.get("bias")
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 3]
    way = _conv_way(conv, x.t, weight, bias, module)
    return _Act(_CONV_WAYS[way](conv, x.t, weight, bias, module))


def _linear(module: nn.Module, params: dict, x) -> _Act:
    weight, bias = params["weight"], params.get("bias")  # (N, O, I), (N, O)
    n = weight.shape[0]
    moved = x.t.movedim(1, 0)  # (N, B, ..., I)
    rows = moved.reshape(n, -1, moved.shape[-1])
    out = torch.bmm(rows, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
    return _Act(out.reshape(n, *moved.shape[1:-1], weight.shape[1]).movedim(0, 1))


def _flat_or_none(params: dict, name: str):
    value = params.get(name)
    return None if value is None else value.flatten()


def _batch_norm(module: nn.Module, params: dict, x) -> _Act:
    out = F.batch_norm(_channels(x), None, None, _flat_or_none(params, "weight"), _flat_or_none(params, "bias"),
                       training=True, momentum=0.0, eps=module.eps)
    return _unchannel(out, x.t.shape[1])


def _group_norm(module: nn.Module, params: dict, x) -> _Act:
    n = x.t.shape[1]  # trajectory-major channels: each trajectory's groups stay together
    out = F.group_norm(_channels(x), module.num_groups * n, _flat_or_none(params, "weight"), _flat_or_none(params, "bias"),
                       module.eps)
    return _unchannel(out, n)


def _layer_norm(module: nn.Module, params: dict, x) -> _Act:
    out = F.layer_norm(x.t, module.normalized_shape, None, None, module.eps)
    rank = out.dim()
    if "weight" in params:
        out = out * _aligned(_Param(params["weight"]), rank)
    if "bias" in params:
        out = out + _aligned(_Param(params["bias"]), rank)
    return _Act(out)


def _module_flatten(module: nn.Module, params: dict, x) -> _Act:
    return _flatten(x, module.start_dim, module.end_dim)


def _module_elementwise(module: nn.Module, params: dict, x):
    return _elementwise(module)(x)


def _module_channelwise(module: nn.Module, params: dict, x) -> _Act:
    if getattr(module, "return_indices", False):
        raise NotStackable(f"{type(module).__name__} with return_indices=True")
    return _channelwise(module)(x)


_MODULES = {
    **{cls: _conv for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    nn.Linear: _linear,
    **{cls: _batch_norm for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Flatten: _module_flatten,
    **{cls: _module_elementwise for cls in (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
                                            nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Mish,
                                            nn.Dropout)},
    **{cls: _module_channelwise for cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                                            nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                                            nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.Dropout1d,
                                            nn.Dropout2d, nn.Dropout3d)},
}


class StackedModel:
    """``model`` traced once; ``self(params, inputs)`` runs N trajectories.

    ``params``: name -> (N, ...) (every parameter of ``model``); ``inputs``:
    a tuple of (N, B, ...) tensors. Returns the output(s) as (B, N, ...):
    trajectory j's output is ``out[:, j]``.
    """

    def __init__(self, model: nn.Module):
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception as exc:  # fx raises many kinds (data-dependent control flow, ...)
            raise NotStackable(f"torch.fx cannot trace {type(model).__name__}: {exc}") from exc
        # a weak reference: the cache below is keyed by the model (a strong one would keep it alive forever)
        self._model, self.nodes = weakref.ref(model), list(graph.nodes)
        self.handlers = {node: self._handler(model, node) for node in self.nodes}  # unsupported ops fail here
        # a module node's parameters: (local name, full name)
        self.own = {node: [(name, f"{node.target}.{name}") for name, _ in model.get_submodule(node.target).named_parameters(recurse=False)]
                    for node in self.nodes if node.op == "call_module"}

    @staticmethod
    def _handler(model: nn.Module, node: fx.Node):
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            if type(module) not in _MODULES:
                raise NotStackable(f"module {node.target!r} ({type(module).__name__}) is not supported")
            return _MODULES[type(module)]
        if node.op == "call_function":
            if node.target not in _FUNCTIONS:
                raise NotStackable(f"function {getattr(node.target, '__name__', node.target)} is not supported")
            return _FUNCTIONS[node.target]
        if node.op == "call_method":
            if node.target not in _METHODS:
                raise NotStackable(f"method .{node.target}() is not supported")
            return _METHODS[node.target]
        return None

    def __call__(self, params: dict, inputs: tuple):
        model = self._model()
        env: dict[fx.Node, object] = {}
        remaining = list(inputs)
        for node in self.nodes:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
            if node.op == "placeholder":
                if not remaining:
                    raise NotStackable(f"the model takes more inputs than the {len(inputs)} given")
                env[node] = _Act(remaining.pop(0).transpose(0, 1))
            elif node.op == "get_attr":
                env[node] = _Param(params[node.target]) if node.target in params else operator.attrgetter(node.target)(model)
            elif node.op == "call_module":
                own = {local: params[full] for local, full in self.own[node]}
                env[node] = self.handlers[node](model.get_submodule(node.target), own, *args, **kwargs)
            elif node.op in ("call_function", "call_method"):
                env[node] = self.handlers[node](*args, **kwargs)
            elif node.op == "output":
                return _physical(args[0])
        raise NotStackable("the traced graph has no output")


def _physical(value):
    if isinstance(value, _Act):
        return value.t
    if isinstance(value, (tuple, list)):
        return type(value)(_physical(v) for v in value)
    raise NotStackable(f"the model returns a {type(value).__name__}, expected activations")


# model -> (structure, StackedModel or the NotStackable it raised); tracing is not free
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(model: nn.Module) -> tuple:
    """What a trace depends on besides the code: the module tree (a changed one is traced again)."""
    return tuple((name, type(m)) for name, m in model.named_modules())


def stacked_model(model: nn.Module) -> StackedModel:
    """The (cached) :class:`StackedModel` of ``model``; raises :class:`NotStackable`."""
    structure = _structure(model)
    cached = _CACHE.get(model)
    if cached is None or cached[0] != structure:
        try:
            cached = (structure, StackedModel(model))
        except NotStackable as exc:
            cached = (structure, exc)
        _CACHE[model] = cached
    if isinstance(cached[1], NotStackable):
        raise cached[1]
    return cached[1]


def mark_not_stackable(model: nn.Module, exc: NotStackable) -> None:
    """Remember a failure found while running (a shape-dependent use), so auto stops trying."""
    _CACHE[model] = (_structure(model), exc)


def trajectory_output(out, j: int):
    """Trajectory j's output from :class:`StackedModel`'s (B, N, ...) output(s)."""
    return out[:, j] if isinstance(out, Tensor) else type(out)(o[:, j] for o in out)
