"""Looking at generated images: sample grids as PNG and a distribution distance to real images.

The distance is the squared maximum mean discrepancy (MMD^2, unbiased) with a
Gaussian kernel, either on raw pixels or on the features of a fixed, seeded
random convolutional network (cheap, needs no download, and more sensitive to
local structure than pixels). The kernel bandwidth comes from the *real*
images only (median pairwise distance), so the distances of several models'
samples to the same real set are on one scale.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from ..._optional import require
from ...atomic import atomic_write_bytes

FEATURES = ("pixels", "random_conv")


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images (N, C, H, W) in [-1, 1] into one (C, H', W') image in [0, 1], ``nrow`` per row."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images: expected a non-empty (N, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images: must have 1 or 3 channels, got {images.shape[1]}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow: must be >= 1, got {nrow}")
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    pixels = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[:, top : top + h, left : left + w] = pixels[i]
    return grid


def save_sample_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write images (N, C, H, W) in [-1, 1] as one PNG grid, each pixel ``scale`` x ``scale``."""
    Image = require("PIL.Image", "images")

    if scale < 1:
        raise ValueError(f"scale: must be >= 1, got {scale}")
    grid = make_grid(images, nrow)
    array = (grid * 255.0).round().to(torch.uint8)
    array = array.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    path = Path(path)
    if array.shape[0] == 1:
        image = Image.fromarray(array[0].numpy(), mode="L")
    else:
        image = Image.fromarray(array.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def save_labelled_grids(panels: Mapping[str, torch.Tensor], path: str | Path, nrow: int | None = None, title: str | None = None) -> Path:
    """One PNG with a titled grid per entry of ``panels`` (name -> images in [-1, 1]), side by side."""
    matplotlib = require("matplotlib", "plots")

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("panels: need at least one named set of images")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, images) in zip(axes[0], panels.items()):
        grid = make_grid(images, nrow)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if grid.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    from ...report import save_figure

    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def random_conv_features(images: torch.Tensor, seed: int = 0, width: int = 32) -> torch.Tensor:
    """Features (N, 2 * width) of a fixed random 2-layer conv net: mean- and max-pooled ReLU maps.

    The weights come from ``seed`` alone, so features of different image sets
    (same channel count) are comparable.
    """
    if images.dim() != 4:
        raise ValueError(f"images: expected (N, C, H, W), got {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(int(seed))
    c = images.shape[1]
    w1 = torch.randn(width, c, 3, 3, generator=generator, dtype=torch.float64) / math.sqrt(9 * c)
    w2 = torch.randn(width, width, 3, 3, generator=generator, dtype=torch.float64) / math.sqrt(9 * width)
    x = images.detach().to(torch.float64).cpu()
    h = F.relu(F.conv2d(x, w1, padding=1))
    h = F.relu(F.conv2d(F.avg_pool2d(h, 2) if min(h.shape[-2:]) >= 2 else h, w2, padding=1))
    return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


def _features(images: torch.Tensor, features: str, seed: int) -> torch.Tensor:
    if features == "pixels":
        return images.detach().to(torch.float64).cpu().reshape(images.shape[0], -1)
    if features == "random_conv":
        return random_conv_features(images, seed=seed)
    raise ValueError(f"features: unknown kind {features!r}; choose one of {FEATURES}")


def median_bandwidth(x: torch.Tensor) -> float:
    """Median pairwise Euclidean distance between the rows of ``x`` (N, D), N >= 2 (the median heuristic)."""
    if x.shape[0] < 2:
        raise ValueError(f"x: the median heuristic needs at least 2 samples, got {x.shape[0]}")
    d = torch.cdist(x, x)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    value = float(d[i, j].median())
    return value if value > 0 else 1.0  # all points equal: any bandwidth gives the same kernel


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 between samples ``x`` (N, D) and ``y`` (M, D) with ``k(a, b) = exp(-|a-b|^2 / (2 bw^2))``.

    Zero in expectation when both come from the same distribution (so it can be
    slightly negative); larger means further apart.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y: need (N, D) and (M, D) with the same D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"x, y: the unbiased estimate needs at least 2 samples each, got {x.shape[0]} and {y.shape[0]}")
    if not bandwidth > 0:
        raise ValueError(f"bandwidth: must be > 0, got {bandwidth}")
    x, y = x.to(torch.float64), y.to(torch.float64)
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x).square())
    kyy = torch.exp(-gamma * torch.cdist(y, y).square())
    kxy = torch.exp(-gamma * torch.cdist(x, y).square())
    n, m = x.shape[0], y.shape[0]
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def generation_distance(generated: torch.Tensor, real: torch.Tensor, features: str = "random_conv", seed: int = 0) -> float:
    """MMD^2 between generated and real images (N, C, H, W) on ``features`` ("pixels" or "random_conv").

    The bandwidth is the median pairwise distance of the real features.
    """
    if generated.dim() != 4 or real.dim() != 4 or generated.shape[1:] != real.shape[1:]:
        raise ValueError(f"generated, real: need image batches of one shape (N, C, H, W), got {tuple(generated.shape)} and {tuple(real.shape)}")
    real_features = _features(real, features, seed)
    return mmd2(_features(generated, features, seed), real_features, median_bandwidth(real_features))
