"""Model surgery shared by the simulator and the attack harness.

Names here are module names as ``model.named_modules()`` gives them. A "layer"
is a leaf module that owns parameters (conv, linear, norm, ...), in
registration order, which for the usual ``nn.Sequential`` backbones is the
order data flows through them.
"""

from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
from torch import nn

# Attribute names torchvision/timm/our models use for the classifier.
_HEAD_ATTRIBUTES = ("head", "fc", "classifier", "heads", "last_linear")


def parametrised_layers(model: nn.Module) -> list[str]:
    """Names of leaf modules that own parameters, in registration order."""
    names = []
    for name, module in model.named_modules():
        if name and not list(module.children()) and any(True for _ in module.parameters(recurse=False)):
            names.append(name)
    return names


def find_head(model: nn.Module, name: str | None = None) -> str:
    """Name of the last leaf layer of the classifier head.

    ``name`` overrides the search. Otherwise the usual head attributes are
    tried (``head``, ``fc``, ``classifier``, ...), taking the last
    parametrised leaf inside; failing that, the last ``nn.Linear``.
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ValueError(f"head name: {name!r} is not a module of the model; modules with parameters: {parametrised_layers(model)}")
        return name
    for attr in _HEAD_ATTRIBUTES:
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            inner = [n for n in parametrised_layers(sub)]
            if inner:
                return f"{attr}.{inner[-1]}"
            if any(True for _ in sub.parameters(recurse=False)):
                return attr
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    raise ValueError(
        "head: could not find the classifier head (no attribute among "
        f"{_HEAD_ATTRIBUTES} and no nn.Linear); pass the head's module name explicitly"
    )


def first_layers(model: nn.Module, count: int) -> list[str]:
    """The first ``count`` parametrised layers."""
    layers = parametrised_layers(model)
    if not 1 <= count <= len(layers):
        raise ValueError(f"layers: count must be in [1, {len(layers)}] for this model, got {count}")
    return layers[:count]


def resolve_layers(model: nn.Module, layers: int | str | Sequence[str]) -> list[str]:
    """Turn a count of first layers, one module name or a list of names into module names."""
    if isinstance(layers, bool):
        raise TypeError("layers: expected an int count or module names, got a bool")
    if isinstance(layers, int):
        return first_layers(model, layers)
    if isinstance(layers, str):
        layers = [layers]
    modules = dict(model.named_modules())
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise ValueError(f"layers: {unknown} are not modules of the model; modules with parameters: {parametrised_layers(model)}")
    return list(layers)


def parameter_names(model: nn.Module, module_names: Iterable[str]) -> list[str]:
    """Full parameter names (as in ``named_parameters``) owned by the given modules."""
    prefixes = tuple(module_names)
    return [n for n, _ in model.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)]


@torch.no_grad()
def fresh_parameters(module: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """New values for ``module``'s own parameters, as a newly built layer of its kind has them.

    A CPU float32 copy of the module runs its own ``reset_parameters()`` (or
    ``_reset_parameters()``, as ``nn.MultiheadAttention`` names it) with the
    global RNG set to ``generator``'s state, and ``generator`` is then advanced
    past the draws; so a seed fixes the values, whatever the module's device
    and dtype. A module with neither method gets torch's default rule for
    linear and conv layers (uniform(+-1/sqrt(fan_in)) weights and biases; every
    torch norm layer has ``reset_parameters``). Returns a dict keyed by the parameter's local
    name; the module is untouched.
    """
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator: must be a CPU torch.Generator, got one on {generator.device}")
    own = dict(module.named_parameters(recurse=False))
    fresh = copy.deepcopy(module).to(device="cpu", dtype=torch.float32)
    reset = getattr(fresh, "reset_parameters", None) or getattr(fresh, "_reset_parameters", None)
    if generator is None:  # the global RNG, as the layer's constructor would use it
        drawn = _drawn(fresh, reset)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(generator.get_state())
            drawn = _drawn(fresh, reset)
            after = torch.get_rng_state()
        generator.set_state(after)  # after the fork restored the global RNG: ``generator`` may be it
    return {name: drawn[name].to(device=p.device, dtype=p.dtype) for name, p in own.items()}


def _drawn(fresh: nn.Module, reset) -> dict[str, torch.Tensor]:
    """``fresh``'s own parameters after ``reset()``, or after the default rule when it has none."""
    if callable(reset):
        reset()
        return {name: p.detach() for name, p in fresh.named_parameters(recurse=False)}
    params = dict(fresh.named_parameters(recurse=False))
    weight = params.get("weight")
    fan_in = weight[0].numel() if weight is not None and weight.dim() >= 2 else None
    out = {}
    for name, p in params.items():
        bound = 1.0 / math.sqrt(fan_in if fan_in else max(p.numel(), 1))
        out[name] = (torch.rand(p.shape, dtype=torch.float32) * 2 - 1) * bound
    return out


def fresh_model(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` with every parametrised layer re-initialised (:func:`fresh_parameters`,
    from ``generator``) and every norm layer's running statistics reset: its architecture
    trained from scratch starts here."""
    fresh = copy.deepcopy(model)
    reinitialise(fresh, parametrised_layers(fresh), generator)
    for module in fresh.modules():
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    return fresh


@torch.no_grad()
def reinitialise(model: nn.Module, module_names: Iterable[str], generator: torch.Generator | None = None) -> None:
    """Re-initialise, in place, the parameters of the named modules. A re-initialised BatchNorm
    also starts its running statistics afresh, as a newly built layer (or torch's
    ``reset_parameters``) has them: the attack harness evaluates with them."""
    modules = dict(model.named_modules())
    for name in module_names:
        for local, value in fresh_parameters(modules[name], generator).items():
            getattr(modules[name], local).copy_(value)
        if isinstance(modules[name], nn.modules.batchnorm._NormBase) and modules[name].track_running_stats:
            modules[name].reset_running_stats()
