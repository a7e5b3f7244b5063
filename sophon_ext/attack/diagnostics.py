"""Where does the protection live? Exactly-zero ("dead") activations per layer.

For every leaf module of a model, the fraction of its output entries that are
exactly zero over a dataset (``zero_fraction``), and the fraction of its units
(channels: dim 1) that are zero for every input (``dead_unit_fraction``).
Comparing a protected and an unprotected model on original versus restricted
inputs shows which layers the protection switched off.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import ArrayDataset


@torch.no_grad()
def zero_activations(model: nn.Module, task, data: ArrayDataset, batch_size: int = 256, max_samples: int = 1024,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """``{"zero_fraction": {layer: f}, "dead_unit_fraction": {layer: f}}`` for every leaf
    module with a tensor output, over the first ``max_samples`` samples of ``data``
    (inputs made by ``task.prepare`` with a generator seeded by ``seed``)."""
    if len(data) == 0:
        raise ValueError("data: is empty")
    leaves = [(name, m) for name, m in model.named_modules() if name and not list(m.children())]
    zeros: dict[str, int] = {}
    totals: dict[str, int] = {}
    alive: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            is_zero = output == 0
            zeros[name] = zeros.get(name, 0) + int(is_zero.sum())
            totals[name] = totals.get(name, 0) + output.numel()
            if output.dim() >= 2:
                # a unit is alive if it is non-zero anywhere: reduce all dims but the unit dim (1)
                nonzero = (~is_zero).transpose(0, 1).flatten(1).any(dim=1)
                alive[name] = nonzero if name not in alive else alive[name] | nonzero
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in leaves]
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        n = min(len(data), max_samples)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            inputs, _ = task.prepare(data.x[start:stop].to(device), data.y[start:stop].to(device), generator)
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    order = [name for name, _ in leaves if name in totals]
    return {
        "zero_fraction": {name: zeros[name] / totals[name] for name in order},
        "dead_unit_fraction": {name: 1.0 - alive[name].float().mean().item() for name in order if name in alive},
    }


@torch.no_grad()
def layer_norms(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per parametrised leaf layer: ``weight_norm``, ``bias_norm`` and ``bias_mean`` (None when absent).

    A protection that hides the features behind a scale (weights much larger than
    the pre-trained ones, strongly negative biases) shows here; such a trap is
    what a layer-wise re-normalisation attack undoes."""
    out = {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not name or not own or list(module.children()):
            continue
        weight, bias = own.get("weight"), own.get("bias")
        out[name] = {
            "weight_norm": float(weight.norm()) if weight is not None else None,
            "bias_norm": float(bias.norm()) if bias is not None else None,
            "bias_mean": float(bias.mean()) if bias is not None else None,
        }
    return out


def compare_models(models: dict[str, nn.Module], domains: dict[str, ArrayDataset], task, **kwargs) -> dict:
    """Zero-activation statistics of each model on each domain.

    Returns ``{"layers": [...], "zero_fraction": {model: {domain: {layer: f}}},
    "dead_unit_fraction": {...same...}, "norms": {model: layer_norms(model)}}``.
    """
    zero, dead, layers = {}, {}, []
    norms = {name: layer_norms(model) for name, model in models.items()}
    for model_name, model in models.items():
        zero[model_name], dead[model_name] = {}, {}
        for domain_name, data in domains.items():
            stats = zero_activations(model, task, data, **kwargs)
            zero[model_name][domain_name] = stats["zero_fraction"]
            dead[model_name][domain_name] = stats["dead_unit_fraction"]
            layers += [name for name in stats["zero_fraction"] if name not in layers]
    return {"layers": layers, "zero_fraction": zero, "dead_unit_fraction": dead, "norms": norms}
