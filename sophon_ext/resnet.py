"""A CIFAR-style ResNet for small images: the built-in scenario with BatchNorm and residual connections.

The ResNet-(6n+2) family of He et al. (2016, section 4.2), sized by two numbers:

- a 3x3 stem convolution of ``width`` channels, BatchNorm, ReLU;
- three stages of ``blocks_per_stage`` basic blocks with ``width``, ``2 * width``
  and ``4 * width`` channels, the first block of the second and third stage
  halving the resolution (16x16 inputs: 16 -> 8 -> 4);
- global average pooling and a linear ``head``.

``blocks_per_stage=3, width=16`` is ResNet-20. Where a block changes shape its
shortcut is a 1x1 convolution with BatchNorm (option B of the paper): the
zero-padding shortcut (option A) slices activations, which the stacked
simulation path cannot keep per trajectory.

Convolutions followed by BatchNorm have no bias (BatchNorm's shift replaces it,
and a bias it cancels would only get rounding-noise gradients). Modules are
registered in the order data flows through them, so "the first layers" of the
fine-tuning methods (:mod:`sophon_ext.surgery`) are the stem convolution, then
the stem BatchNorm, then the first block's layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                                     nn.BatchNorm2d(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6 ``blocks_per_stage`` + 2); see the module docstring."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, blocks_per_stage: int = 3):
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage: must be >= 1, got {blocks_per_stage}")
        if width < 1:
            raise ValueError(f"width: must be >= 1, got {width}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages: list[nn.Module] = []
        channels = width
        for stage in range(3):
            out_channels = width * 2**stage
            stride = 1 if stage == 0 else 2  # the first block of a later stage halves the resolution
            blocks = [BasicBlock(channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                      for i in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


__all__ = ["BasicBlock", "ResNet"]
