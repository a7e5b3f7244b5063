"""Classification: cross-entropy to adapt and to keep, ICE/KLU to suppress, accuracy to score."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import weighted_mean

SUPPRESSION_LOSSES = ("ice+klu", "ice", "klu", "ice_reference", "neg_ce", "none")


@dataclass
class ClassificationTask:
    """``suppression`` picks SOPHON's loss on the restricted domain:

    - ``"ice+klu"``: ``ice_weight * ICE + klu_weight * KLU`` (fused kernel),
    - ``"ice"``: inverse cross-entropy, paper form ``-log(1 - p_y)``,
    - ``"klu"``: KL(uniform || softmax), label-free,
    - ``"ice_reference"``: the reference code's ``CE(1 - z, y)``,
    - ``"neg_ce"``: negated cross-entropy, the naive baseline that diverges,
    - ``"none"``: zero suppression (for ablations: protection switched off).
    """

    suppression: str = "ice+klu"
    ice_weight: float = 1.0
    klu_weight: float = 1.0

    name = "classification"
    metric_name = "accuracy"
    higher_is_better = True
    has_head = True

    def __post_init__(self) -> None:
        if self.suppression not in SUPPRESSION_LOSSES:
            raise ValueError(f"suppression: unknown loss {self.suppression!r}; choose one of {SUPPRESSION_LOSSES}")

    def prepare(self, x, y, generator=None):
        return (x,), y

    def adaptation_loss(self, output, targets, weight=None):
        return weighted_mean(F.cross_entropy(output, targets, reduction="none"), weight)

    original_loss = adaptation_loss

    def suppression_loss(self, output, targets, weight=None):
        from .. import functional as SF  # noqa: N812 - the package's loss functions

        kind = self.suppression
        if kind == "ice+klu":
            values = SF.suppression_loss(output, targets, ice_weight=self.ice_weight, klu_weight=self.klu_weight, reduction="none")
        elif kind == "ice":
            values = SF.inverse_cross_entropy(output, targets, reduction="none")
        elif kind == "klu":
            values = SF.kl_uniform(output, reduction="none")
        elif kind == "ice_reference":
            values = SF.inverse_cross_entropy_reference(output, targets, reduction="none")
        elif kind == "neg_ce":
            values = -F.cross_entropy(output, targets, reduction="none")
        else:  # "none"
            values = output.sum(dim=-1) * 0.0
        return weighted_mean(values, weight)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512, seed: int = 0) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size].to(logits.device)
            loss_sum += F.cross_entropy(logits.float(), target, reduction="sum").item()
            correct += (logits.argmax(dim=1) == target).sum().item()
        model.train(was_training)
        n = max(x.shape[0], 1)
        return {"accuracy": correct / n, "loss": loss_sum / n}

    def check_model(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] == 0:
            raise ValueError("dataset: is empty")
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(x[:2])
        model.train(was_training)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model: a classifier must return logits of shape (N, C), got a {type(out).__name__}; "
                             "for a model returning a mapping or an object holding the logits, give it by reference "
                             "(model.name, model.output_key) or apply sophon_ext.models.logits_output(model, key)")
        if out.dim() != 2:
            raise ValueError(f"model: a classifier must return logits of shape (N, C), got {tuple(out.shape)}")
        num_classes = out.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(
                f"dataset labels: must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
                f"got labels in [{int(y.min())}, {int(y.max())}]"
            )
