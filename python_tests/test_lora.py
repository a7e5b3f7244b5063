"""Low-rank adapters: exact at initialisation, equal to the merged weight, only adapters train;
every projection of nn.MultiheadAttention and Linear projections picked by name are adapted."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from sophon_ext.attack.lora import LoRAAdapter, add_lora, attention_deltas, merge_lora
from sophon_ext.data import as_dataset
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
    with pytest.raises(ValueError, match="no nn.Linear, nn.Conv2d"):
        add_lora(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), rank=1)
    # grouped convs are left alone, the rest is adapted
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    assert add_lora(model, rank=1) == ["1"]


# ---------------------------------------------------------------- attention

class AttentionModel(nn.Module):
    """Linear in, nn.MultiheadAttention (packed, or separate q/k/v weights when ``kdim`` differs), MLP, head."""

    def __init__(self, features=5, dim=8, heads=2, classes=3, kdim=None):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.context = nn.Linear(features, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, kdim=kdim, vdim=kdim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x)
        kv = self.context(x) if self.context is not None else h
        attended, _ = self.attn(h, kv, kv)
        h = h + attended
        return self.head((h + self.mlp(h)).mean(dim=1))


def _tokens(batch=4, length=6, features=5):
    return torch.randn(batch, length, features, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _attention_pair(kdim):
    torch.manual_seed(0)
    base = AttentionModel(kdim=kdim).double()
    adapted = AttentionModel(kdim=kdim).double()
    adapted.load_state_dict(base.state_dict())
    return base, adapted


@pytest.mark.parametrize("kdim", [None, 6], ids=["packed_in_proj", "separate_qkv"])
def test_every_attention_projection_is_adapted_exactly_at_init_and_only_factors_train(kdim):
    base, model = _attention_pair(kdim)
    adapted = add_lora(model, rank=2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    assert {"attn[q]", "attn[k]", "attn[v]", "attn[out]", "embed", "mlp.0", "mlp.2", "head"} <= set(adapted)
    deltas = attention_deltas(model.attn)
    assert sorted(deltas) == ["k", "out", "q", "v"]
    assert all(d.rank == 2 and d.scale == 2.0 for d in deltas.values())
    assert isinstance(model.attn, nn.MultiheadAttention)  # adapted in place: owners still read its weights
    # counted: 2 factors per projection (4) and per wrapped Linear; nothing else trains
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    linears = 5 if kdim else 4  # embed, mlp.0, mlp.2, head (+ context)
    assert len(trainable) == 2 * (4 + linears)
    factor_ids = {id(d.up) for d in deltas.values()} | {id(d.down) for d in deltas.values()}
    assert factor_ids <= {id(p) for p in trainable.values()}
    e, k = 8, kdim or 8
    # rank 2: q and out have (e + e) * 2 factor entries, k and v (k + e) * 2
    assert sum(d.up.numel() + d.down.numel() for d in deltas.values()) == 2 * (2 * e + 2 * (k + e) + 2 * e)
    x = _tokens()
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # exact: the updates start at zero
    model.eval(), base.eval()
    with torch.no_grad():  # the inference paths (MHA's fast path when it applies) agree too
        torch.testing.assert_close(model(x), base(x), rtol=1e-12, atol=1e-12)
    model.train()
    with torch.no_grad():
        for d in deltas.values():
            d.up.normal_(std=0.1)
    model(x).square().sum().backward()
    for name, d in deltas.items():
        assert d.up.grad is not None and d.up.grad.abs().sum() > 0, name
        assert d.down.grad is not None and d.down.grad.abs().sum() > 0, name
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("in_proj_weight" in n or "q_proj_weight" in n for n in frozen) and any("out_proj" in n for n in frozen)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_merged_attention_computes_what_the_adapted_one_did():
    base, model = _attention_pair(None)
    add_lora(model, rank=3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for d in attention_deltas(model.attn).values():
            d.up.normal_(std=0.1)
    x = _tokens()
    adapted = model(x)
    assert not torch.allclose(adapted, base(x))
    merge_lora(model)
    assert type(model.attn) is nn.MultiheadAttention and not attention_deltas(model.attn)
    torch.testing.assert_close(model(x), adapted, rtol=1e-10, atol=1e-12)


def test_adapted_attention_works_inside_a_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    reference = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).double()
    reference.load_state_dict(layer.state_dict())
    adapted = add_lora(layer, rank=2)
    assert {"self_attn[q]", "self_attn[out]", "linear1", "linear2"} <= set(adapted)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
    layer.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-12, atol=1e-12)


class NamedProjections(nn.Module):
    """Attention written with Linear projections named as in Llama / Hugging Face models."""

    def __init__(self, dim=8):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Linear(dim, dim)

    def forward(self, x):
        weights = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(1, 2), dim=-1)
        return self.mlp(self.o_proj(weights @ self.v_proj(x)))


def test_target_modules_pick_projections_by_name_or_pattern():
    model = NamedProjections()
    assert add_lora(model, rank=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]) == \
        ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert not isinstance(model.mlp, LoRAAdapter) and not model.mlp.weight.requires_grad
    assert add_lora(NamedProjections(), rank=2, target_modules=r"[qkv]_proj") == ["q_proj", "k_proj", "v_proj"]
    # naming an attention's out_proj adapts only it; naming the attention adapts all four
    model = AttentionModel()
    assert add_lora(model, rank=1, target_modules=["out_proj"]) == ["attn.out_proj"]
    assert sorted(attention_deltas(model.attn)) == ["out"]
    assert add_lora(AttentionModel(), rank=1, target_modules=r"attn(\.out_proj)?") == \
        ["attn[q]", "attn[k]", "attn[v]", "attn[out]"]
    with pytest.raises(ValueError, match=r"target_modules: \['nope'\] matches no module"):
        add_lora(NamedProjections(), rank=1, target_modules=["nope"])
    with pytest.raises(TypeError, match="'mlp' is a Sequential"):
        add_lora(AttentionModel(), rank=1, target_modules=["mlp"])


def test_peft_adapter_adapts_the_attention_when_installed():
    pytest.importorskip("peft")
    from sophon_ext.attack.lora import add_peft_lora

    torch.manual_seed(0)
    base = AttentionModel()
    model = AttentionModel()
    model.load_state_dict(base.state_dict())
    adapted = add_peft_lora(model, rank=2, target_modules=["attn", "head"])
    assert "attn" in adapted and "head" in adapted
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = _tokens().float()
    torch.testing.assert_close(model(x), base(x))


def test_lora_attack_adapts_the_attention_through_the_harness():
    from sophon_ext.attack import AttackSpec, prepare_attack_model, run_attacks
    from sophon_ext.tasks import ClassificationTask

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, 5, generator=g)
    y = x[:, :, :3].sum(dim=1).argmax(dim=1)  # 3 classes read off the tokens
    train, test = (x[:64], y[:64]), (x[64:], y[64:])
    torch.manual_seed(0)
    protected = AttentionModel()
    spec = AttackSpec(method="lora", optimizer="adam", lr=1e-2, rank=2, lora_alpha=4.0, batch_size=16, epochs=2)
    task = ClassificationTask()
    attacked, params = prepare_attack_model(protected, spec, task, as_dataset(train), as_dataset(test))
    factors = attention_deltas(attacked.attn)
    assert sorted(factors) == ["k", "out", "q", "v"]
    trained = {id(p) for p in params}
    assert all(id(d.up) in trained and id(d.down) in trained for d in factors.values())
    report = run_attacks(protected, None, None, train, test, task, [spec], progress=False, diagnostics=False)
    (record,) = report["attacks"]
    assert record["name"].startswith("lora-adam") and "-r2-a4-" in record["name"]
    curve = record["curves"]["protected"]
    assert curve["trainable_parameters"] == sum(p.numel() for p in params)
    assert len(curve["metric"]) == 3 and not curve["diverged"]
