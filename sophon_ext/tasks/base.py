"""What a task plug-in answers; the engine, simulator and attack harness ask only this.

A task turns a raw batch ``(x, y)`` into model inputs and targets
(:meth:`Task.prepare`: classification passes them through; generation draws
timesteps and noise), and scores model outputs against targets with three
losses. Every loss takes an optional per-sample ``weight`` (B,) and returns
the weighted mean, so the simulator can run different batch sizes together
over one padded batch.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

ModelInputs = tuple  # tuple[torch.Tensor, ...], the positional arguments of model(...)


@runtime_checkable
class Task(Protocol):
    name: str
    #: key of the headline number :meth:`evaluate` returns ("accuracy", "denoising_loss")
    metric_name: str
    higher_is_better: bool
    #: whether the model ends in a classifier head (head methods need one)
    has_head: bool

    def prepare(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> tuple[ModelInputs, torch.Tensor]:
        """(model inputs, targets) for a raw batch."""

    def adaptation_loss(self, output: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss an attacker fine-tunes with (scalar)."""

    def suppression_loss(self, output: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The loss SOPHON minimises on the restricted domain after simulated fine-tuning (scalar)."""

    def original_loss(self, output: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The normal-training-reinforcement loss on the original domain (scalar)."""

    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512, seed: int = 0) -> dict[str, float]:
        """Metrics of ``model`` on a dataset; must include :attr:`metric_name` and "loss"."""

    def check_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a clear error if ``model`` cannot be used on data ``(x, y)``."""


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-sample ``values`` (B,), weighted by ``weight`` (B,) if given."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(torch.finfo(values.dtype).tiny)


def call_model(model: Callable, inputs: ModelInputs) -> torch.Tensor:
    return model(*inputs)


#: samples a dataset read on demand is evaluated in at a time (a set this size or smaller is one chunk)
EVAL_CHUNK = 4096
#: samples of a dataset read on demand that :func:`check_model_on` shows the model
CHECK_SAMPLES = 256


def evaluate_dataset(task: Task, model: nn.Module, data, seed: int = 0, chunk_size: int = EVAL_CHUNK) -> dict[str, float]:
    """``task.evaluate`` on an :class:`~sophon_ext.data.ArrayDataset` (whole, as before) or a
    :class:`~sophon_ext.data.MapDataset` (chunk ``i`` of ``chunk_size`` samples evaluated with
    ``seed + i``, every metric averaged weighted by chunk size: the built-in tasks' metrics are
    per-sample means, and a set of one chunk gives exactly what the same data in tensors gives)."""
    if hasattr(data, "x"):
        return task.evaluate(model, data.x, data.y, seed=seed)
    sums: dict[str, float] = {}
    count = 0
    for i, (x, y) in enumerate(data.batches(torch.arange(len(data)), chunk_size)):
        metrics = task.evaluate(model, x, y, seed=seed + i)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value * x.shape[0]
        count += x.shape[0]
    return {key: value / max(count, 1) for key, value in sums.items()}


def check_model_on(task: Task, model: nn.Module, data) -> None:
    """``task.check_model`` on a dataset: all of an ArrayDataset, the first
    :data:`CHECK_SAMPLES` samples of a dataset read on demand."""
    sample = data if hasattr(data, "x") else data.head(CHECK_SAMPLES)
    task.check_model(model, sample.x, sample.y)
