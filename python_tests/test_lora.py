"""Low-rank adapters: exact at initialisation, equal to the merged weight, only adapters train."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from sophon_ext.lora import LoRAAdapter, add_lora, merge_lora
from sophon_ext.models import SmallCNN

LAYERS = [
    lambda: nn.Linear(7, 5),
    lambda: nn.Conv2d(3, 4, 3, padding=1),
    lambda: nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2), bias=False),
    lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
]


def _input(layer, batch=4):
    g = torch.Generator().manual_seed(1)
    shape = (batch, layer.in_features) if isinstance(layer, nn.Linear) else (batch, layer.in_channels, 9, 8)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("make", LAYERS)
def test_adapter_starts_as_the_base_layer_and_equals_the_merged_weight(make):
    torch.manual_seed(0)
    base = make().double()
    adapter = LoRAAdapter(base, rank=2, alpha=3.0, generator=torch.Generator().manual_seed(0))
    x = _input(base)
    torch.testing.assert_close(adapter(x), base(x), rtol=0, atol=0)
    with torch.no_grad():
        adapter.up.weight.normal_()
    merged = base.weight + adapter.delta_weight()
    if isinstance(base, nn.Linear):
        expected = F.linear(x, merged, base.bias)
    else:
        expected = base._conv_forward(x, merged, base.bias)
    torch.testing.assert_close(adapter(x), expected, rtol=1e-12, atol=1e-12)
    assert adapter.scale == 1.5


@pytest.mark.parametrize("make", LAYERS)
def test_only_the_adapter_gets_gradients(make):
    adapter = LoRAAdapter(make().double(), rank=3)
    with torch.no_grad():
        adapter.up.weight.normal_()
    adapter(_input(adapter.base)).square().sum().backward()
    assert all(p.grad is None for p in adapter.base.parameters())
    assert adapter.up.weight.grad.abs().sum() > 0 and adapter.down.weight.grad.abs().sum() > 0


def test_add_lora_wraps_every_linear_and_conv_and_merge_restores_a_plain_model():
    torch.manual_seed(0)
    model = SmallCNN(width=4, depth=2)
    reference = SmallCNN(width=4, depth=2)
    reference.load_state_dict(model.state_dict())
    wrapped = add_lora(model, rank=2, generator=torch.Generator().manual_seed(0))
    assert wrapped == ["features.0", "features.3", "head"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"{w}.{part}.weight" for w in wrapped for part in ("down", "up"))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRAAdapter):
                module.up.weight.normal_(std=0.1)
    adapted = model(x)
    assert not torch.allclose(adapted, reference(x))
    merge_lora(model)
    assert not any(isinstance(m, LoRAAdapter) for m in model.modules())
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="rank"):
        LoRAAdapter(nn.Linear(3, 3), rank=0)
    with pytest.raises(ValueError, match="groups=1"):
        LoRAAdapter(nn.Conv2d(4, 4, 3, groups=2), rank=1)
    with pytest.raises(TypeError, match="nn.Linear or nn.Conv2d"):
        LoRAAdapter(nn.Conv1d(3, 3, 1), rank=1)
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d"):
        add_lora(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), rank=1)
    # grouped convs are left alone, the rest is adapted
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    assert add_lora(model, rank=1) == ["1"]
