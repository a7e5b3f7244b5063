"""Model surgery shared by the simulator and the attack harness.

Names here are module names as ``model.named_modules()`` gives them. A "layer"
is a leaf module that owns parameters (conv, linear, norm, ...), in
registration order, which for the usual ``nn.Sequential`` backbones is the
order data flows through them.
"""

from __future__ import annotations

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
    """New values for ``module``'s own parameters, drawn as torch's default init
    would (kaiming-uniform(a=sqrt(5)) weights, uniform(+-1/sqrt(fan_in)) biases;
    norm layers: ones and zeros), from ``generator`` so a seed fixes them.
    Returns a dict keyed by the parameter's local name; the module is untouched.
    """
    out = {}
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
    fan_in = None
    if weight is not None and weight.dim() >= 2:
        fan_in = weight[0].numel()
    for name, p in params.items():
        if is_norm:
            out[name] = torch.ones_like(p) if name == "weight" else torch.zeros_like(p)
            continue
        if name == "weight" and p.dim() >= 2:
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) gives this bound
        else:
            bound = 1.0 / math.sqrt(fan_in) if fan_in else 1.0 / math.sqrt(max(p.numel(), 1))
        noise = torch.rand(p.shape, generator=generator, dtype=torch.float32, device="cpu")
        out[name] = ((noise * 2 - 1) * bound).to(device=p.device, dtype=p.dtype)
    return out


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
