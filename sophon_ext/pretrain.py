"""Ordinary training on the original domain: the pre-trained model SOPHON starts from."""

from __future__ import annotations

import torch
from torch import nn

from .attack.finetune import train_one_epoch
from .config import PretrainConfig
from .data import ArrayDataset, MapDataset
from .optim.presets import make_torch_optimizer
from .tasks import Task, evaluate_dataset


def pretrain(
    model: nn.Module,
    train: ArrayDataset | MapDataset,
    task: Task,
    config: PretrainConfig | None = None,
    *,
    val: ArrayDataset | MapDataset | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Train ``model`` in place with the task's original loss; returns one record per epoch.

    Each record has ``epoch``, ``loss`` (mean training loss) and, when ``val``
    is given, the task's metrics on it prefixed with ``val_``. Data order and
    ``task.prepare`` draw from a generator seeded with ``seed``.
    """
    config = config or PretrainConfig()
    if len(train) == 0:
        raise ValueError("pretrain: training dataset is empty")
    device = next(model.parameters()).device
    train = train.to(device)
    sample = train.head(8)
    task.check_model(model, sample.x, sample.y)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_torch_optimizer(config.optimizer, model.parameters(), config.lr)
    records = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, desc="pretrain", unit="epoch", dynamic_ncols=True)
    for epoch in range(1, config.epochs + 1):
        loss = train_one_epoch(model, task, train, optimizer, config.batch_size, generator, task.original_loss)
        record = {"epoch": epoch, "loss": loss}
        if val is not None and len(val):
            metrics = evaluate_dataset(task, model, val.to(device), seed=seed)
            record.update({f"val_{k}": v for k, v in metrics.items()})
        records.append(record)
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k != "epoch"}, refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return records
