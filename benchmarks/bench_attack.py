"""One attack epoch: the harness's loop (sophon_ext.attack.fine_tune) vs the usual
PyTorch loop (DataLoader with shuffling, then an evaluation pass).

Both train a SmallCNN (width 16) for one epoch of full fine-tuning with Adam,
batch 64, on the built-in digits training split (16x16), and evaluate on its
test split once before and once after, as the harness does. The harness keeps
tensors in memory and cuts batches from one permutation; the baseline goes
through ``torch.utils.data.DataLoader`` (per-sample indexing and collation).

    python -m pytest benchmarks/bench_attack.py --benchmark-only
    PYTHONPATH=. python benchmarks/bench_attack.py   # plain table of the same figures
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from sophon_ext.attack import AttackSpec, fine_tune
from sophon_ext.data import domain_splits, load_builtin
from sophon_ext.models import SmallCNN
from sophon_ext.tasks import ClassificationTask

SPEC = AttackSpec(method="full", optimizer="adam", lr=1e-3, batch_size=64, epochs=1)
TASK = ClassificationTask()


def _setup():
    splits = domain_splits(load_builtin("digits"), seed=0)
    torch.manual_seed(0)
    return SmallCNN(width=16), splits.train, splits.test


def harness_epoch(model, train, test):
    return fine_tune(model, SPEC, TASK, train, test)


def dataloader_epoch(model, train, test):
    model = copy.deepcopy(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=SPEC.lr)
    loader = torch.utils.data.DataLoader(train, batch_size=SPEC.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    TASK.evaluate(model, test.x, test.y)
    model.train()
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return TASK.evaluate(model, test.x, test.y)


@pytest.mark.parametrize("loop", ["harness", "dataloader"])
def test_attack_epoch(benchmark, loop):
    model, train, test = _setup()
    fn = harness_epoch if loop == "harness" else dataloader_epoch
    fn(model, train, test)  # warm-up (first optimizer import, allocator)
    benchmark.pedantic(fn, args=(model, train, test), rounds=5, iterations=1)


def _median_seconds(fn, *args, rounds: int = 5) -> float:
    fn(*args)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    model, train, test = _setup()
    harness = _median_seconds(harness_epoch, model, train, test)
    baseline = _median_seconds(dataloader_epoch, model, train, test)
    print(f"threads={torch.get_num_threads()}  harness {harness * 1e3:.0f} ms  "
          f"DataLoader loop {baseline * 1e3:.0f} ms  speedup {baseline / harness:.2f}x")
