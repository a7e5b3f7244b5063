"""A small noise-prediction UNet for 16x16 to 32x32 images, ``model(x_t, t) -> eps``.

The usual DDPM layout, shrunk: sinusoidal time embedding and an MLP,
residual blocks (GroupNorm, SiLU, 3x3 conv, the time embedding added in
between), optional single-head self-attention at the resolutions listed in
``attention_resolutions``, stride-2 convs down, nearest-neighbour upsampling
and skip concatenation up. The output conv and the last conv of every
residual/attention branch start at zero, so a fresh model predicts zero noise
and each block starts as the identity. No BatchNorm and no in-place ops, so it
runs under ``torch.func.vmap`` / ``functional_call`` (the batched simulator).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer or real timesteps ``t`` (B,): [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # The largest group count <= ``groups`` that divides ``channels``.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResidualBlock(nn.Module):
    """GN-SiLU-conv, + time projection, GN-SiLU-dropout-conv (zero-init), + skip."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual, zero-init output."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(dim=1)
        # Written out (not F.scaled_dot_product_attention) so vmap and double backward work everywhere.
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
        return x + self.proj(out)


class _Level(nn.Module):
    """The residual blocks (each followed by attention if enabled) of one resolution."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, time_dim: int, groups: int, dropout: float, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for i in range(blocks):
            self.blocks.append(ResidualBlock(in_channels if i == 0 else out_channels, out_channels, time_dim, groups, dropout))
            self.attentions.append(SelfAttention(out_channels, groups) if attention else nn.Identity())

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block, attention in zip(self.blocks, self.attentions):
            x = attention(block(x, temb))
        return x


class TinyUNet(nn.Module):
    """Noise predictor ``forward(x_t, t) -> eps_hat`` with ``eps_hat.shape == x_t.shape``.

    ``channel_mults`` gives the width of each resolution level as a multiple of
    ``base_channels``; the image side must be divisible by
    ``2 ** (len(channel_mults) - 1)``. ``attention_resolutions`` lists the
    feature-map sides (e.g. 8) that get self-attention; the middle block gets
    attention whenever the list is non-empty.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (8,),
        image_size: int = 16,
        groups: int = 8,
        dropout: float = 0.0,
    ):
        super().__init__()
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1 or groups < 1:
            raise ValueError(
                "in_channels, base_channels, num_res_blocks, groups: must all be >= 1, got "
                f"{in_channels}, {base_channels}, {num_res_blocks}, {groups}"
            )
        if not channel_mults or any(int(m) < 1 for m in channel_mults):
            raise ValueError(f"channel_mults: must be a non-empty list of positive ints, got {list(channel_mults)}")
        factor = 2 ** (len(channel_mults) - 1)
        if image_size < 1 or image_size % factor:
            raise ValueError(f"image_size: must be a positive multiple of {factor} for {len(channel_mults)} levels, got {image_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must lie in [0, 1), got {dropout}")
        self.in_channels = in_channels
        self.image_size = image_size
        self.levels = len(channel_mults)
        time_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        widths = [base_channels * int(m) for m in channel_mults]
        attention_resolutions = set(int(r) for r in attention_resolutions)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        channels, side = base_channels, image_size
        for i, width in enumerate(widths):
            self.down.append(_Level(channels, width, num_res_blocks, time_dim, groups, dropout, side in attention_resolutions))
            channels = width
            if i + 1 < len(widths):
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                side //= 2
        self.middle = _Level(channels, channels, 2, time_dim, groups, dropout, bool(attention_resolutions))
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            # Input: the path from below (``channels``) concatenated with this level's skip (``width``).
            self.up.append(_Level(channels + width, width, num_res_blocks, time_dim, groups, dropout, side in attention_resolutions))
            channels = width
            side *= 2
        self.norm_out = _norm(channels, groups)
        self.conv_out = _zero(nn.Conv2d(channels, in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (self.levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"x: height and width must be multiples of {factor}, got {tuple(x.shape[-2:])}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.conv_in(x)
        skips = []
        for i, level in enumerate(self.down):
            h = level(h, temb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.middle(h, temb)
        for i, level in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = level(torch.cat([h, skips.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))
