"""One real fine-tuning run: an attack's surgery on a copy of a starting model,
then an ordinary ``torch.optim`` training loop, evaluated after every epoch.

Seeding (so a plain loop can reproduce a run exactly): for an attack with
``seed=s`` the surgery draws from ``torch.Generator().manual_seed(s)``, the
data order (one ``torch.randperm`` per epoch) and ``task.prepare`` draw from a
second ``torch.Generator().manual_seed(s)``, and the global torch RNG is
seeded with ``s`` (restored afterwards) for anything else (dropout).
Batches are cut from the permutation in order, the last one may be smaller.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Callable, Sequence

import torch
from torch import nn

from ..data import ArrayDataset, MapDataset, as_dataset
from ..errors import UserInputError
from ..methods import DATA_CHANGE_SAMPLES, InputChanged, get_method
from ..optim.presets import make_torch_optimizer
from ..tasks.base import check_model_on, evaluate_dataset
from .. import surgery
from .lora import add_lora, add_peft_lora
from .spec import AttackSpec, schedule_factor


class LinearProbe(nn.Module):
    """A new linear layer on the flattened output of ``layer`` inside a frozen ``backbone``.

    The backbone always runs in eval mode under ``no_grad``: only the probe trains.
    """

    def __init__(self, backbone: nn.Module, layer: str, sample_inputs: tuple, num_outputs: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.layer = layer
        self._features: torch.Tensor | None = None
        backbone.get_submodule(layer).register_forward_hook(self._keep)
        dim = self._extract(sample_inputs).shape[1]
        ref = next(backbone.parameters(), None)
        self.linear = nn.Linear(dim, num_outputs, device=getattr(ref, "device", None), dtype=getattr(ref, "dtype", None))
        surgery.reinitialise(self, ["linear"], generator)

    def _keep(self, module, inputs, output) -> None:
        self._features = output

    def _extract(self, inputs: tuple) -> torch.Tensor:
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            self.backbone(*inputs)
        self.backbone.train(was_training)
        features, self._features = self._features, None
        return features.flatten(1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(self._extract(inputs))


def _label_count(*datasets: ArrayDataset | MapDataset) -> int:
    return max(d.num_classes for d in datasets)


def _check_head(model: nn.Module, task, method: str, sample_inputs: tuple, head: str | None) -> str:
    """Name of the classifier head, after checking the model's output comes straight out of it."""
    if getattr(task, "has_head", True) is False:
        raise UserInputError(f"method: {method!r} needs a classifier head, and task {task.name!r} has none")
    try:
        head_name = surgery.find_head(model, head)
    except ValueError as exc:
        raise UserInputError(f"method: {method!r} needs a classifier head: {exc}") from exc
    captured = {}
    handle = model.get_submodule(head_name).register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*sample_inputs)
    finally:
        handle.remove()
        model.train(was_training)
    head_out = captured.get("out")
    if not (isinstance(head_out, torch.Tensor) and isinstance(out, torch.Tensor)
            and head_out.shape == out.shape and torch.equal(head_out, out)):
        raise UserInputError(
            f"method: {method!r} needs a classifier head whose output is the model's output; "
            f"{head_name!r} is not (pass the head's module name, or use a method that keeps the model whole)"
        )
    return head_name


def _resize_head(model: nn.Module, head_name: str, outputs: int) -> None:
    """Replace a linear head by one with ``outputs`` units (its values are re-initialised next)."""
    head_module = model.get_submodule(head_name)
    if isinstance(head_module, nn.Linear) and head_module.out_features != outputs:
        parent_name, _, child = head_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Linear(head_module.in_features, outputs, device=head_module.weight.device,
                                         dtype=head_module.weight.dtype))


def _probe_layer(model: nn.Module, layers) -> str:
    names = surgery.parametrised_layers(model)
    if layers is None:
        return names[max(len(names) // 2 - 1, 0)]
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= len(names):
            raise UserInputError(f"layers: the probe's layer count must be in [1, {len(names)}], got {layers}")
        return names[layers - 1]
    resolved = surgery.resolve_layers(model, layers)
    if len(resolved) != 1:
        raise UserInputError(f"layers: a probe reads one layer, got {resolved}")
    return resolved[0]


def prepare_attack_model(model: nn.Module, spec: AttackSpec, task, train: ArrayDataset | MapDataset,
                         test: ArrayDataset | MapDataset,
                         head: str | None = None, generator: torch.Generator | None = None,
                         device: str | torch.device | None = None) -> tuple[nn.Module, list]:
    """A copy of ``model`` (on ``device``) after the attack's surgery, and the parameters the attack trains.

    Raises ``ValueError`` when the method needs a head the model lacks, or when
    the data's labels do not fit a head the method keeps.
    """
    model = copy.deepcopy(model)
    if device is not None:
        model.to(device)
    method = get_method(spec.method)
    sample = train.head(2)
    sample_inputs, _ = task.prepare(sample.x, sample.y, torch.Generator().manual_seed(0))
    new_head = "head" in method.reinit or spec.method == "probe"  # an attacker sizes it to the restricted labels
    head_name = _check_head(model, task, spec.method, sample_inputs, head) if method.needs_head or spec.method == "probe" else None
    if new_head and spec.method != "probe":
        _resize_head(model, head_name, _label_count(train, test))
    if spec.method == "probe":
        model = LinearProbe(model, _probe_layer(model, spec.layers), sample_inputs, _label_count(train, test), generator)
    elif spec.method == "lora" and spec.adapter == "peft":
        add_peft_lora(model, spec.rank, spec.lora_alpha, spec.target_modules)  # draws from the seeded global RNG
    elif spec.method == "lora":
        add_lora(model, spec.rank, spec.lora_alpha, generator, spec.target_modules)
    else:
        reinit, frozen = method.targets(model, spec.layers, head_name)
        method.apply_to_module(model, reinit, generator, _restricted_inputs(task, train) if method.needs_inputs else None)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in set(frozen))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserInputError(f"method: {spec.method!r} with layers={spec.layers!r} leaves no parameter to train")
    change = method.input_change_for(spec.seed)
    if change is not None:
        model = InputChanged(model, change)
    try:
        check_model_on(task, model, train)
        check_model_on(task, model, test)
    except ValueError as exc:
        keeps = "builds a new head" if new_head else "keeps the model's head"
        raise UserInputError(f"attack {spec.name}: method {spec.method!r} {keeps}: {exc}") from exc
    return model, params


def _restricted_inputs(task, train) -> torch.Tensor:
    """The inputs a method's ``data_change`` sees: the first ``DATA_CHANGE_SAMPLES`` training samples."""
    sample = train.head(min(DATA_CHANGE_SAMPLES, len(train)))
    return task.prepare(sample.x, sample.y, torch.Generator().manual_seed(0))[0][0]


def _finite(value: float) -> bool:
    return value is not None and math.isfinite(value)


def fine_tune(model: nn.Module, spec: AttackSpec, task, train, test, device: str | torch.device | None = None,
              head: str | None = None, inspect: Callable[[nn.Module], dict] | None = None) -> dict:
    """Run ``spec`` on a copy of ``model`` (the model itself is untouched) on ``device``
    (default: the model's).

    ``train`` / ``test``: anything :func:`sophon_ext.data.as_dataset` accepts; a
    Dataset or DataLoader is read batch by batch.

    Returns the run's curves: ``metric`` and ``loss`` on ``test`` (``epochs + 1``
    entries, entry 0 after the surgery and before any step), ``train_loss``
    (entry 0 is None), ``diverged`` / ``diverged_at_epoch`` (a non-finite
    training or test loss; later entries are None), ``steps_per_epoch``,
    ``trainable_parameters`` and ``time_s``. ``inspect``, if given, is called
    on the fine-tuned model when the run did not diverge; its dict goes under
    ``inspection`` (e.g. generation's sample grid and distribution distance).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    train, test = as_dataset(train, "train").to(device), as_dataset(test, "test").to(device)
    started = time.perf_counter()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.seed)
        surgery_gen = torch.Generator().manual_seed(spec.seed)
        data_gen = torch.Generator().manual_seed(spec.seed)
        attacked, params = prepare_attack_model(model, spec, task, train, test, head, surgery_gen, device)
        curve = _train_loop(attacked, params, spec, task, train, test, data_gen)
        if inspect is not None and not curve["diverged"]:
            curve["inspection"] = inspect(attacked)
    curve["trainable_parameters"] = sum(p.numel() for p in params)
    curve["time_s"] = time.perf_counter() - started
    return curve


def train_one_epoch(model: nn.Module, task, data: ArrayDataset | MapDataset, optimizer: torch.optim.Optimizer,
                    batch_size: int, generator: torch.Generator, loss_fn, scheduler=None) -> float:
    """One pass over ``data`` in an order drawn from ``generator``, one optimizer
    step per batch of ``loss_fn(model(*inputs), targets)``; returns the mean
    training loss. Shared by the attacks and by pre-training."""
    model.train()
    n = len(data)
    order = torch.randperm(n, generator=generator).to(data.device)
    loss_sum = torch.zeros((), device=data.device)
    for x, y in data.batches(order, batch_size):
        inputs, targets = task.prepare(x, y, generator)
        batch_loss = loss_fn(model(*inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        batch_loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += batch_loss.detach() * y.shape[0]
    return float(loss_sum) / n  # one host sync per epoch


def _train_loop(model: nn.Module, params: Sequence[torch.Tensor], spec: AttackSpec, task, train: ArrayDataset | MapDataset,
                test: ArrayDataset | MapDataset, generator: torch.Generator) -> dict:
    optimizer = make_torch_optimizer(spec.optimizer, params, spec.lr, {**spec.hparams, "weight_decay": spec.weight_decay})
    n = len(train)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(spec.schedule, steps_per_epoch * spec.epochs))
    first = evaluate_dataset(task, model, test, seed=spec.seed)
    if not (_finite(first.get("loss")) and _finite(first.get(task.metric_name))):
        raise UserInputError(f"model: gives a non-finite {task.metric_name} or loss before any fine-tuning ({first}); "
                         "check the starting model's weights")
    metric, loss, train_loss = [first[task.metric_name]], [first["loss"]], [None]
    diverged_at = None
    for epoch in range(1, spec.epochs + 1):
        epoch_loss = train_one_epoch(model, task, train, optimizer, spec.batch_size, generator,
                                     task.adaptation_loss, scheduler)
        scores = evaluate_dataset(task, model, test, seed=spec.seed) if _finite(epoch_loss) else {}
        if not (_finite(epoch_loss) and _finite(scores.get("loss")) and _finite(scores.get(task.metric_name))):
            diverged_at = epoch
            break
        metric.append(scores[task.metric_name])
        loss.append(scores["loss"])
        train_loss.append(epoch_loss)
    missing = spec.epochs + 1 - len(metric)
    return {
        "metric": metric + [None] * missing,
        "loss": loss + [None] * missing,
        "train_loss": train_loss + [None] * missing,
        "diverged": diverged_at is not None,
        "diverged_at_epoch": diverged_at,
        "steps_per_epoch": steps_per_epoch,
    }
