"""Low-rank adapters (LoRA) for ``nn.Linear`` and ``nn.Conv2d`` layers.

An adapted layer computes ``base(x) + scale * up(down(x))`` with the base
layer frozen. ``down`` has the base layer's receptive field (for a conv: the
same kernel, stride, padding and dilation) and ``rank`` outputs; ``up`` maps
``rank`` back to the base layer's outputs (a 1x1 conv for convs) and starts at
zero, so an adapted model computes exactly what the original did until it is
trained. :meth:`LoRAAdapter.delta_weight` is the low-rank update in the base
weight's shape, so ``base.weight + delta_weight()`` is the merged layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ADAPTABLE_TYPES = (nn.Linear, nn.Conv2d)


class LoRAAdapter(nn.Module):
    """A frozen ``base`` layer plus a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, ADAPTABLE_TYPES):
            raise TypeError(f"base: LoRA adapts nn.Linear or nn.Conv2d, got {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"base: LoRA needs a conv with groups=1, got groups={base.groups}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: must be a positive int, got {rank!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.up = nn.Linear(rank, base.out_features, bias=False, **factory)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False, padding_mode=base.padding_mode, **factory)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        with torch.no_grad():
            # kaiming-uniform(a=sqrt(5)) like torch's default, drawn from `generator` so a seed fixes it
            bound = 1.0 / math.sqrt(self.down.weight[0].numel())
            noise = torch.rand(self.down.weight.shape, generator=generator, dtype=torch.float32)
            self.down.weight.copy_((noise * 2 - 1) * bound)
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update, shaped like ``base.weight``."""
        up = self.up.weight.flatten(1)  # (out, rank)
        down = self.down.weight.flatten(1)  # (rank, in * kh * kw)
        return (self.scale * (up @ down)).reshape(self.base.weight.shape)


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, generator: torch.Generator | None = None) -> list[str]:
    """Freeze every parameter of ``model`` and wrap each adaptable layer (exactly
    ``nn.Linear``, or ``nn.Conv2d`` with groups=1) in a :class:`LoRAAdapter`, in place.

    Returns the names of the wrapped modules. Raises ``ValueError`` when the
    model has no adaptable layer.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    # exact types: subclasses (e.g. MultiheadAttention's out_proj) are read directly by their owners
    targets = [name for name, module in model.named_modules()
               if type(module) in ADAPTABLE_TYPES and not (isinstance(module, nn.Conv2d) and module.groups != 1)]
    if not targets:
        raise ValueError("model: LoRA found no nn.Linear or nn.Conv2d (groups=1) layer to adapt")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRAAdapter(getattr(parent, child), rank, alpha, generator))
    return targets


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter of ``model`` back into its base layer, in place; returns ``model``."""
    adapters = [name for name, module in model.named_modules() if isinstance(module, LoRAAdapter)]
    for name in adapters:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = getattr(parent, child)
        adapter.base.weight.add_(adapter.delta_weight())
        setattr(parent, child, adapter.base)
    return model
