"""Zero (dead) activations per layer, on hand-built models with known answers."""

import pytest
import torch
from torch import nn

from sophon_ext.attack.diagnostics import compare_models, zero_activations
from sophon_ext.data import ArrayDataset
from sophon_ext.tasks import ClassificationTask

TASK = ClassificationTask()


def known_model():
    """Linear(2 -> 3) then ReLU: unit 0 = x0, unit 1 = -x0, unit 2 = -1 (always dead after ReLU)."""
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
        linear.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    return nn.Sequential(linear, nn.ReLU())


def test_fractions_match_a_hand_count():
    x = torch.tensor([[1.0, 5.0], [2.0, 5.0], [-3.0, 5.0], [0.0, 5.0]])
    data = ArrayDataset(x, torch.zeros(4, dtype=torch.long))
    stats = zero_activations(known_model(), TASK, data, batch_size=3)
    # linear output: exact zeros only where x0 == 0 (units 0 and 1 of the last sample): 2 of 12
    assert stats["zero_fraction"]["0"] == pytest.approx(2 / 12)
    # relu: unit 0 zero for x0 <= 0 (2), unit 1 zero for x0 >= 0 (3), unit 2 always (4): 9 of 12
    assert stats["zero_fraction"]["1"] == pytest.approx(9 / 12)
    assert stats["dead_unit_fraction"] == {"0": 0.0, "1": pytest.approx(1 / 3)}
    limited = zero_activations(known_model(), TASK, data, max_samples=2)
    assert limited["zero_fraction"]["1"] == pytest.approx(4 / 6)


def test_dead_units_are_counted_per_channel_for_images():
    conv = nn.Conv2d(1, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -1.0]))
    model = nn.Sequential(conv, nn.ReLU())
    data = ArrayDataset(torch.rand(5, 1, 3, 3) + 0.1, torch.zeros(5, dtype=torch.long))
    stats = zero_activations(model, TASK, data)
    assert stats["dead_unit_fraction"]["1"] == pytest.approx(0.5)
    assert stats["zero_fraction"]["1"] == pytest.approx(0.5)


def test_compare_models_layout_and_model_state_is_kept():
    model = known_model().train()
    data = ArrayDataset(torch.randn(6, 2), torch.zeros(6, dtype=torch.long))
    out = compare_models({"a": model, "b": known_model()}, {"original": data, "restricted": data}, TASK)
    assert out["layers"] == ["0", "1"]
    assert set(out["zero_fraction"]) == {"a", "b"} and set(out["zero_fraction"]["a"]) == {"original", "restricted"}
    assert model.training
    with pytest.raises(ValueError, match="empty"):
        zero_activations(model, TASK, ArrayDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
