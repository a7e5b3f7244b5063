"""User data in any form: tensors, (x, y), ArrayDataset, a map-style Dataset or a DataLoader
(with transforms) give the same protection and the same attacks; bad forms are named."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sophon_ext import Sophon, protect
from sophon_ext.attack import AttackSpec, fine_tune, load_domain, run_attacks
from sophon_ext.config import Config
from sophon_ext.data import ArrayDataset, MapDataset, as_dataset, split
from sophon_ext.tasks import ClassificationTask

SIDE = 6
CLASSES = 4


def raw_domain(seed: int, n: int = 120) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer 'pixels' in [0, 255] (what an image file holds) and labels: one pattern per class + noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(CLASSES, 1, SIDE, SIDE, generator=g) * 255
    y = torch.randint(CLASSES, (n,), generator=g)
    noise = torch.randn(n, 1, SIDE, SIDE, generator=g) * 40
    return (prototypes[y] + noise).clamp(0, 255).round().to(torch.uint8), y


def to_input(pixels: torch.Tensor) -> torch.Tensor:
    """The transform: uint8 pixels -> float64 in [-1, 1]."""
    return pixels.to(torch.float64) / 127.5 - 1.0


class Images(Dataset):
    """A map-style dataset that transforms each sample when it is read, as torchvision datasets do."""

    def __init__(self, pixels, labels, transform=to_input):
        self.pixels, self.labels, self.transform = pixels, labels, transform
        self.reads = 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        self.reads += 1
        return self.transform(self.pixels[index]), int(self.labels[index])


def preloaded(seed: int) -> ArrayDataset:
    pixels, labels = raw_domain(seed)
    return ArrayDataset(to_input(pixels), labels)


def model_for_test(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.ReLU(), nn.Linear(16, CLASSES)).double()


def small_config(**protect_overrides) -> Config:
    base = {
        "iterations": 4, "inner_steps": 2, "query_size": 8, "pool_size": 40, "ntr_batch_size": 16,
        "simulate_path": "loop", "guard": {"every": 2},
        "strategies": [{"optimizer": "sgd_momentum", "lr": 1e-2, "batch_size": 8},
                       {"optimizer": "adam", "lr": 1e-3, "batch_size": 8, "method": "reinit_head"}],
    }
    base.update(protect_overrides)
    return Config.from_dict({"seed": 5, "protect": base})


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_protect_on_a_dataloader_with_a_transform_equals_protect_on_tensors():
    config = small_config()
    in_tensors = protect(model_for_test(), preloaded(1), preloaded(2), config, progress=False)
    original = Images(*raw_domain(1))
    # the loader's own shuffle and batch size are not used: the engine draws the indices
    loader = DataLoader(original, batch_size=7, shuffle=True)
    read_on_demand = protect(model_for_test(), loader, Images(*raw_domain(2)), config, progress=False)
    assert_same_weights(in_tensors, read_on_demand)
    assert original.reads > 0
    assert not all(torch.equal(p, q) for p, q in zip(in_tensors.state_dict().values(), model_for_test().state_dict().values()))


def test_sophon_with_probes_on_datasets_logs_what_it_logs_on_tensors():
    # the probes fine-tune on the restricted data: the attacks' training loop reads it on demand too
    config = small_config(iterations=2, probes={"every": 2, "epochs": 1, "batch_size": 16,
                                                 "attacks": [{"method": "full", "optimizer": "adam", "lr": 1e-2}]})
    a = Sophon(model_for_test(), preloaded(1), preloaded(2), config, progress=False).run()
    b = Sophon(model_for_test(), DataLoader(Images(*raw_domain(1))), Images(*raw_domain(2)), config, progress=False).run()
    drop = {"seconds"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in a.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b.history]
    assert "probes" in a.history[-1]
    assert_same_weights(a.model, b.model)


def test_attacks_on_a_dataset_equal_attacks_on_tensors(tmp_path):
    train, test = preloaded(3), preloaded(4)
    task = ClassificationTask()
    lazy_train, lazy_test = Images(*raw_domain(3)), DataLoader(Images(*raw_domain(4)), batch_size=5)
    for method in ("full", "reinit_head"):  # a new head is sized from the labels read through the dataset
        spec = AttackSpec(method=method, optimizer="adam", lr=1e-2, batch_size=16, epochs=2, seed=1)
        expected = fine_tune(model_for_test(), spec, task, train, test)
        got = fine_tune(model_for_test(), spec, task, lazy_train, lazy_test)
        for key in ("metric", "loss", "train_loss"):
            assert got[key] == expected[key], (method, key)
    grid = [AttackSpec(method="full", optimizer="adam", lr=1e-2, batch_size=16, epochs=1)]
    report = run_attacks(model_for_test(), None, None, lazy_train, lazy_test, task, grid, original_test=lazy_test,
                         out_dir=tmp_path, progress=False, plots=False)
    reference = run_attacks(model_for_test(), None, None, train, test, task, grid, original_test=test,
                            progress=False, plots=False)
    for start in ("protected", "scratch"):
        got, expected = report["attacks"][0]["curves"][start], reference["attacks"][0]["curves"][start]
        assert [got[k] for k in ("metric", "loss", "train_loss")] == [expected[k] for k in ("metric", "loss", "train_loss")]
    assert report["original_domain"] == reference["original_domain"]
    assert report["diagnostics"]["zero_fraction"] == reference["diagnostics"]["zero_fraction"]
    # a second run finds the cached results (the data read on demand hashes the same)
    again = run_attacks(model_for_test(), None, None, lazy_train, lazy_test, task, grid, out_dir=tmp_path,
                        resume=True, progress=False, plots=False, diagnostics=False)
    assert again["attacks"][0]["curves"] == report["attacks"][0]["curves"]


def test_map_dataset_draws_subsets_labels_and_worker_batches():
    pixels, labels = raw_domain(6, n=30)
    data = as_dataset(DataLoader(Images(pixels, labels), num_workers=1), "data")
    assert isinstance(data, MapDataset) and len(data) == 30 and data.num_workers == 1
    index = torch.tensor([4, 0, 29, 4])
    x, y = data.gather(index)
    assert torch.equal(x, to_input(pixels[index])) and torch.equal(y, labels[index])
    part, rest = split(data, [0.5, 0.5], seed=0)
    tensors_part, _ = split(ArrayDataset(to_input(pixels), labels), [0.5, 0.5], seed=0)
    assert torch.equal(part.labels(), tensors_part.y) and part.num_classes == tensors_part.num_classes
    order = torch.randperm(len(part), generator=torch.Generator().manual_seed(0))
    with_workers = list(part.batches(order, 4))
    in_process = list(part.to("cpu")._replace(num_workers=0).batches(order, 4))
    assert len(with_workers) == 4
    for (xa, ya), (xb, yb) in zip(with_workers, in_process):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


class Dicts(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return {"image": torch.zeros(1, SIDE, SIDE), "label": 0}


class Triples(Images):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x, y, index


class Picture:
    """What an image file opens as before a to-tensor transform."""


class FloatLabels(Images):
    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return x, float(y)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(3), 0


def test_bad_data_is_named():
    pixels, labels = raw_domain(7, n=10)
    with pytest.raises(ValueError, match=r"original: batches must be \(inputs, labels\) pairs of tensors, "
                                         r"got a dict with keys \['image', 'label'\]"):
        Sophon(model_for_test(), DataLoader(Dicts()), preloaded(2), small_config(), progress=False)
    with pytest.raises(ValueError, match=r"restricted: batches must be \(inputs, labels\).*got a list of 3 "
                                         r"\(Tensor, Tensor, Tensor\)"):
        Sophon(model_for_test(), preloaded(1), DataLoader(Triples(pixels, labels)), small_config(), progress=False)
    with pytest.raises(ValueError, match=r"data: batches must be \(inputs, labels\) with integer labels.*"
                                         r"labels a torch.float64 tensor"):
        as_dataset(DataLoader(FloatLabels(pixels, labels)), "data")
    with pytest.raises(ValueError, match=r"data: could not batch its samples \(a tuple of 2 \(Picture, int\)\).*"
                                         r"add a transform that makes tensors"):
        as_dataset(Images(pixels, labels, transform=lambda p: Picture()), "data")
    with pytest.raises(TypeError, match="data: needs a map-style dataset.*got the iterable Stream"):
        as_dataset(Stream(), "data")
    with pytest.raises(TypeError, match="data: needs a DataLoader over a map-style dataset"):
        as_dataset(DataLoader(Stream()), "data")
    with pytest.raises(ValueError, match="data: dataset is empty"):
        as_dataset(Images(pixels[:0], labels[:0]), "data")
    with pytest.raises(TypeError, match="original: expected an ArrayDataset, an \\(x, y\\) pair, a map-style"):
        Sophon(model_for_test(), "mnist", preloaded(2), small_config(), progress=False)


def importable_module(tmp_path, monkeypatch, name: str, source: str) -> None:
    """A user's module ``name`` holding ``source``, importable (freshly) for the test's duration."""
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_attack_cli_data_source_takes_a_python_reference(tmp_path, monkeypatch):
    importable_module(tmp_path, monkeypatch, "my_data", (
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "def make():\n"
        "    return DataLoader(TensorDataset(torch.randn(10, 1, 4, 4), torch.arange(10) % 2), batch_size=4)\n"
    ))
    data = load_domain("my_data:make")
    assert isinstance(data, MapDataset) and len(data) == 10 and data.num_classes == 2
    with pytest.raises(ValueError, match="'my_data:nothing': module 'my_data' has no attribute 'nothing'"):
        load_domain("my_data:nothing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_here'"):
        load_domain("no_such_module_here:make")


def test_a_config_data_source_takes_a_python_reference_read_on_demand(tmp_path, monkeypatch):
    from sophon_ext.config import ConfigError
    from sophon_ext.workflow import load_domains, run_pretrain

    importable_module(tmp_path, monkeypatch, "config_data", (
        "import torch\n"
        "from torch.utils.data import Dataset\n"
        "class Noisy(Dataset):\n"
        "    def __init__(self, n, shift):\n"
        "        g = torch.Generator().manual_seed(n)\n"
        "        self.y = torch.arange(n) % 3\n"
        "        self.x = torch.randn(n, 1, 8, 8, generator=g) + self.y[:, None, None, None] * shift\n"
        "    def __len__(self):\n"
        "        return len(self.y)\n"
        "    def __getitem__(self, i):\n"
        "        return self.x[i] * 0.5, int(self.y[i])  # a transform applied on read\n"
        "def make(n, shift=1.0):\n"
        "    return Noisy(n, shift)\n"
        "def broken(n):\n"
        "    raise RuntimeError('no such data')\n"
    ))
    data = {"original": {"source": "reference", "name": "config_data:make", "kwargs": {"n": 90}},
            "restricted": {"source": "reference", "name": "config_data:make", "kwargs": {"n": 60, "shift": -1.0}, "limit": 50}}
    model = {"name": "small_cnn", "kwargs": {"width": 4, "depth": 2}}
    config = Config().replace({"data": data, "model": model, "pretrain": {"epochs": 1}})
    original, restricted = load_domains(config)
    assert isinstance(original.train, MapDataset) and len(original.train) + len(original.val) + len(original.test) == 90
    assert len(restricted.train) + len(restricted.val) + len(restricted.test) == 50
    x, y = original.test.gather(torch.arange(3))
    import config_data

    whole = config_data.make(90)
    position = original.test.indices[:3]
    assert torch.equal(x, whole.x[position] * 0.5) and torch.equal(y, whole.y[position])
    outcome = run_pretrain(config, None, (original, restricted))  # trains and evaluates batch by batch
    assert 0.0 <= outcome.metric <= 1.0 and outcome.spec["kwargs"]["num_classes"] == 3

    bad = {"source": "reference", "name": "config_data:broken", "kwargs": {"n": 3}}
    with pytest.raises(ValueError, match="data.original.name: config_data:broken.*raised RuntimeError: no such data"):
        load_domains(config.replace({"data": {"original": bad}}))
    for override, message in (
        ({"source": "reference", "name": "not a reference"}, "data.original.name: expected package.module:callable"),
        ({"source": "builtin", "name": "digits", "kwargs": {"n": 1}}, "data.original.kwargs: applies to source 'reference'"),
        ({"source": "builtin", "name": "digits", "lazy": True}, "data.original.lazy: applies to source 'image_folder'"),
        ({"source": "image_folder", "path": "x", "transform": "nope"}, "data.original.transform: expected package.module:name"),
    ):
        with pytest.raises(ConfigError, match=message):
            Config().replace({"data": {"original": override}})


def _write_folder(root, sizes=((5, 7), (9, 4), (6, 6))):
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for label in ("ant", "bee"):
        (root / label).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    (root / "bee" / "notes.txt").write_text("not an image")


class StandInImageFolder(Dataset):
    """torchvision.datasets.ImageFolder's documented contract, for machines whose torchvision cannot
    load (the real one is used when it imports): sorted class directories, files kept by
    ``is_valid_file``, ``targets``, samples read by ``loader`` and passed through ``transform``."""

    def __init__(self, root, transform=None, loader=None, is_valid_file=None, allow_empty=False):
        from pathlib import Path

        classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
        self.samples = [(str(p), i) for i, name in enumerate(classes) for p in sorted((Path(root) / name).rglob("*"))
                        if p.is_file() and is_valid_file(str(p))]
        self.targets = [target for _, target in self.samples]
        self.transform, self.loader, self.target_transform = transform, loader, None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        return self.transform(self.loader(path)), target


def test_image_folder_in_memory_and_on_demand_give_the_same_tensors(tmp_path, monkeypatch):
    import types

    from sophon_ext import data as data_module

    pytest.importorskip("PIL")
    _write_folder(tmp_path / "f")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as on a machine without torchvision
    in_memory = data_module.image_folder(tmp_path / "f", 4, grayscale=True)
    assert isinstance(in_memory, ArrayDataset) and in_memory.x.shape == (6, 1, 4, 4)
    assert in_memory.y.tolist() == [0, 0, 0, 1, 1, 1] and in_memory.x.min() >= -1 and in_memory.x.max() <= 1
    with pytest.raises(ValueError, match="needs torchvision: pip install torchvision"):
        data_module.image_folder(tmp_path / "f", 4, lazy=True)
    monkeypatch.delitem(sys.modules, "torchvision")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build that does not load with this torch
        monkeypatch.setitem(sys.modules, "torchvision",
                            types.SimpleNamespace(datasets=types.SimpleNamespace(ImageFolder=StandInImageFolder)))
    on_demand = data_module.image_folder(tmp_path / "f", 4, grayscale=True, lazy=True)
    assert isinstance(on_demand, MapDataset) and len(on_demand) == 6
    assert torch.equal(on_demand.head(6).x, in_memory.x) and torch.equal(on_demand.labels(), in_memory.y)
    auto = data_module.image_folder(tmp_path / "f", 4, grayscale=True)  # small: loaded into memory
    assert isinstance(auto, ArrayDataset) and torch.equal(auto.x, in_memory.x)
    monkeypatch.setattr(data_module, "IN_MEMORY_IMAGES", 5)
    assert isinstance(data_module.image_folder(tmp_path / "f", 4), MapDataset)
    flipped = data_module.image_folder(tmp_path / "f", 4, transform=lambda img: torch.full((1, 2, 2), float(img.size[0])))
    assert flipped.head(6).x[:, 0, 0, 0].tolist() == [7.0, 4.0, 6.0] * 2  # the image widths, read by the transform
