"""Keep the restricted domain's hidden units alive at their pre-trained scale (``protect.liveness``).

Left alone, the protection hides the restricted features in dead units and large weight
scales (``sophon_ext.attack.diagnostics``): ReDo, a weight decay, a re-normalisation or an
input re-framing revives them. This penalty holds every hidden conv/linear layer's per-channel
pre-activation mean and standard deviation on restricted inputs at the pre-trained model's, so
the protection has to make the features useless rather than dead or hidden behind a scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .methods import weighted_layers


def hidden_layers(model: nn.Module, head: str | None = None) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers whose outputs feed further layers: all but the head (``head``, or
    the last one registered)."""
    layers = weighted_layers(model)
    if head is None:
        return layers[:-1]
    return [(name, module) for name, module in layers if name != head and not name.startswith(f"{head}.")]


def channel_stats(model: nn.Module, inputs: tuple, layers: list[str]) -> list[tuple[Tensor, Tensor]]:
    """Per named layer, the per-channel (dim 1) mean and standard deviation of its outputs on
    ``inputs`` over every other dimension (batch and positions), differentiable."""
    outputs: dict[str, Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out))
             for name in layers]
    try:
        model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    stats = []
    for name in layers:
        out = outputs[name]
        dims = [d for d in range(out.dim()) if d != 1]
        stats.append((out.mean(dims), out.std(dims)))
    return stats


class LivenessPenalty:
    """``weight`` x the mean over hidden layers of the mean over channels of
    ``((mu - mu0)^2 + (sd - sd0)^2) / sd0^2``, with ``mu0``, ``sd0`` the statistics the model had
    on ``reference_inputs`` when the penalty was made (the pre-trained model)."""

    def __init__(self, model: nn.Module, reference_inputs: tuple, weight: float, head: str | None = None) -> None:
        if not weight > 0:
            raise ValueError(f"weight: must be > 0, got {weight}")
        self.weight = float(weight)
        self.layers = [name for name, _ in hidden_layers(model, head)]
        if not self.layers:
            raise ValueError("model: has no hidden conv/linear layer for protect.liveness to keep alive")
        with torch.no_grad():
            self.reference = [(mu.detach().clone(), sd.detach().clone()) for mu, sd in channel_stats(model, reference_inputs, self.layers)]

    def __call__(self, model: nn.Module, inputs: tuple) -> Tensor:
        terms = []
        for (mu, sd), (mu0, sd0) in zip(channel_stats(model, inputs, self.layers), self.reference):
            scale = sd0.clamp_min(1e-3)  # a channel constant on the reference keeps a finite weight
            terms.append((((mu - mu0) / scale) ** 2 + ((sd - sd0) / scale) ** 2).mean())
        return self.weight * torch.stack(terms).mean()

    def state_dict(self) -> dict:
        return {"reference": [[mu, sd] for mu, sd in self.reference]}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        reference = state["reference"]
        if len(reference) != len(self.layers):
            raise ValueError(f"liveness: the checkpoint has {len(reference)} layers, the model {len(self.layers)}")
        self.reference = [(mu.to(device), sd.to(device)) for mu, sd in reference]
