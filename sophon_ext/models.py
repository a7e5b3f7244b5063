"""Small models for the built-in default (classification); the UNet lives with generation."""

from __future__ import annotations

import torch
from torch import nn

from .unet import TinyUNet  # generation mode's noise predictor, registered below


class SmallCNN(nn.Module):
    """``depth`` conv3x3 blocks of ``width`` channels (ReLU, 2x2 max-pool after each
    of the first two), global average pooling, and a linear ``head``.

    ``norm="batch"`` adds BatchNorm after every conv (to exercise the BatchNorm
    handling); the default has none.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, depth: int = 3, norm: str = "none"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        if norm not in ("none", "batch"):
            raise ValueError(f"norm: must be 'none' or 'batch', got {norm!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model from the registry by name (used by configs and checkpoints)."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"model name: unknown model {name!r}; choose one of {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](**kwargs)


MODEL_REGISTRY = {"small_cnn": SmallCNN, "tiny_unet": TinyUNet}
