"""Low-rank adapters (LoRA): ``nn.Linear`` / ``nn.Conv2d`` layers and the q, k, v and out
projections of ``nn.MultiheadAttention``.

An adapted layer computes ``base(x) + scale * up(down(x))`` with the base
layer frozen. ``down`` has the base layer's receptive field (for a conv: the
same kernel, stride, padding and dilation) and ``rank`` outputs; ``up`` maps
``rank`` back to the base layer's outputs (a 1x1 conv for convs) and starts at
zero, so an adapted model computes exactly what the original did until it is
trained. :meth:`LoRAAdapter.delta_weight` is the low-rank update in the base
weight's shape, so ``base.weight + delta_weight()`` is the merged layer.

Attention is adapted in place with ``torch.nn.utils.parametrize`` (its weights
become ``weight + scale * up @ down``), not by replacing modules: the module
stays an ``nn.MultiheadAttention``, which its owners (``nn.TransformerEncoderLayer``'s
fast path, the attention's own ``out_proj`` read) require. The packed
``in_proj_weight`` gets separate factors for q, k and v; separate
``q/k/v_proj_weight`` (kdim/vdim differing from embed_dim) one each.

``target_modules`` picks modules by name as ``peft`` does: a list entry matches a
module whose name is the entry or ends with ``"." + entry``; a single string is a
regular expression the whole name must match. :func:`add_peft_lora` does the same
with the ``peft`` package when it is installed.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

ADAPTABLE_TYPES = (nn.Linear, nn.Conv2d)
#: the projections of an nn.MultiheadAttention that LoRA adapts
ATTENTION_PROJECTIONS = ("q", "k", "v", "out")
TargetModules = Sequence[str] | str | None


def _check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: must be a positive int, got {rank!r}")


def _fill_down(weight: torch.Tensor, generator: torch.Generator | None) -> None:
    # kaiming-uniform(a=sqrt(5)) like torch's default, drawn from `generator` so a seed fixes it
    bound = 1.0 / math.sqrt(weight[0].numel())
    noise = torch.rand(weight.shape, generator=generator, dtype=torch.float32)
    weight.copy_((noise * 2 - 1) * bound)


class LoRAAdapter(nn.Module):
    """A frozen ``base`` layer plus a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, ADAPTABLE_TYPES):
            raise TypeError(f"base: LoRA adapts nn.Linear or nn.Conv2d, got {type(base).__name__}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError(f"base: LoRA needs a conv with groups=1, got groups={base.groups}")
        _check_rank(rank)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.up = nn.Linear(rank, base.out_features, bias=False, **factory)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False, padding_mode=base.padding_mode, **factory)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        with torch.no_grad():
            _fill_down(self.down.weight, generator)
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.up(self.down(x))

    # the merged layer's tensors, for owners that read a child's weights instead of calling it
    # (nn.TransformerEncoderLayer's inference fast path reads linear1.weight)
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.delta_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update, shaped like ``base.weight``."""
        up = self.up.weight.flatten(1)  # (out, rank)
        down = self.down.weight.flatten(1)  # (rank, in * kh * kw)
        return (self.scale * (up @ down)).reshape(self.base.weight.shape)


class LowRankDelta(nn.Module):
    """A parametrization ``weight -> weight + scale * up @ down`` of an (out, in) weight; ``up`` starts at zero."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        _check_rank(rank)
        out_features, in_features = weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank
        self.down = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.up = nn.Parameter(torch.zeros(out_features, rank, **factory))
        with torch.no_grad():
            _fill_down(self.down, generator)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()


class PackedQKVDelta(nn.Module):
    """The parametrization of a packed ``in_proj_weight`` (3E, E): one :class:`LowRankDelta` each for q, k and v."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        q, k, v = weight.detach().chunk(3)
        self.q = LowRankDelta(q, rank, alpha, generator)
        self.k = LowRankDelta(k, rank, alpha, generator)
        self.v = LowRankDelta(v, rank, alpha, generator)

    def delta_weight(self) -> torch.Tensor:
        return torch.cat([self.q.delta_weight(), self.k.delta_weight(), self.v.delta_weight()])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight()


def attention_deltas(attention: nn.MultiheadAttention) -> dict[str, LowRankDelta]:
    """The :class:`LowRankDelta` of each adapted projection of ``attention`` (``q``, ``k``, ``v``, ``out``)."""
    found = {}
    for name, owner, projection in (("in_proj_weight", attention, None), ("q_proj_weight", attention, "q"),
                                ("k_proj_weight", attention, "k"), ("v_proj_weight", attention, "v"),
                                ("weight", attention.out_proj, "out")):
        if not parametrize.is_parametrized(owner, name):
            continue
        for delta in owner.parametrizations[name]:
            if isinstance(delta, PackedQKVDelta):
                found.update({"q": delta.q, "k": delta.k, "v": delta.v})
            elif isinstance(delta, LowRankDelta):
                found[projection] = delta
    return found


def _adapt_weight(owner: nn.Module, name: str, delta: nn.Module) -> None:
    getattr(owner, name).requires_grad_(False)
    parametrize.register_parametrization(owner, name, delta)


def adapt_attention(attention: nn.MultiheadAttention, rank: int, alpha: float | None = None,
                    generator: torch.Generator | None = None, out: bool = True) -> None:
    """Freeze ``attention``'s projections and add low-rank updates to q, k, v (and ``out``), in place."""
    if not isinstance(attention, nn.MultiheadAttention):
        raise TypeError(f"attention: expected an nn.MultiheadAttention, got {type(attention).__name__}")
    if attention._qkv_same_embed_dim:
        _adapt_weight(attention, "in_proj_weight", PackedQKVDelta(attention.in_proj_weight, rank, alpha, generator))
    else:
        for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            _adapt_weight(attention, name, LowRankDelta(getattr(attention, name), rank, alpha, generator))
    if out:
        adapt_linear_in_place(attention.out_proj, rank, alpha, generator)


def adapt_linear_in_place(linear: nn.Linear, rank: int, alpha: float | None = None,
                          generator: torch.Generator | None = None) -> None:
    """A low-rank update on ``linear.weight`` as a parametrization (for a Linear its owner reads
    directly, such as an attention's ``out_proj``)."""
    for p in linear.parameters(recurse=False):
        p.requires_grad_(False)
    _adapt_weight(linear, "weight", LowRankDelta(linear.weight, rank, alpha, generator))


def _name_matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lora_targets(model: nn.Module, target_modules: TargetModules = None) -> list[tuple[str, str]]:
    """``(module name, kind)`` of what :func:`add_lora` adapts, kind one of ``"layer"`` (a Linear or
    Conv2d, wrapped), ``"attention"`` (an nn.MultiheadAttention: q, k, v and out) or
    ``"attention_out"`` (only an attention's ``out_proj``).

    Default (``target_modules=None``): every nn.MultiheadAttention and every layer of exactly
    type nn.Linear or nn.Conv2d (groups=1). Otherwise the modules the names or the pattern pick;
    a picked module of another type raises ``TypeError`` naming it.
    """
    modules = dict(model.named_modules())
    attentions = {name for name, m in modules.items() if isinstance(m, nn.MultiheadAttention)}
    out_projs = {f"{name}.out_proj" if name else "out_proj": name for name in attentions}
    if target_modules is None:
        picked = [name for name, m in modules.items() if name in attentions or (
            type(m) in ADAPTABLE_TYPES and not (isinstance(m, nn.Conv2d) and m.groups != 1))]
    else:
        if not isinstance(target_modules, str) and (not isinstance(target_modules, (list, tuple))
                                                   or not all(isinstance(t, str) for t in target_modules)):
            raise TypeError(f"target_modules: expected module names (a list of str) or one regular expression, "
                            f"got {target_modules!r}")
        picked = [name for name in modules if name and _name_matches(name, target_modules)]
        if not picked:
            some = [n for n in modules if n][:8]
            raise ValueError(f"target_modules: {target_modules!r} matches no module of the model (its modules "
                             f"include {some})")
    targets = []
    for name in picked:
        module = modules[name]
        if name in attentions:
            targets.append((name, "attention"))
        elif name in out_projs:
            if out_projs[name] not in picked:  # a picked attention adapts its out_proj already
                targets.append((name, "attention_out"))
        elif isinstance(module, ADAPTABLE_TYPES) and not (isinstance(module, nn.Conv2d) and module.groups != 1):
            targets.append((name, "layer"))
        else:
            raise TypeError(f"target_modules: {name!r} is a {type(module).__name__}; LoRA adapts nn.Linear, "
                            "nn.Conv2d (groups=1) and nn.MultiheadAttention")
    return targets


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, generator: torch.Generator | None = None,
             target_modules: TargetModules = None) -> list[str]:
    """Freeze every parameter of ``model`` and adapt the modules :func:`lora_targets` picks, in place:
    a Linear or Conv2d is wrapped in a :class:`LoRAAdapter`; an nn.MultiheadAttention gets low-rank
    updates on q, k, v and out (reported as ``"name[q]"``, ..., ``"name[out]"``).

    ``alpha`` scales the update by ``alpha / rank`` (default: ``rank``, a scale of 1). Returns what
    was adapted. Raises ``ValueError`` when the model has nothing to adapt.
    """
    _check_rank(rank)
    targets = lora_targets(model, target_modules)
    if not targets:
        raise ValueError("model: LoRA found no nn.Linear, nn.Conv2d (groups=1) or nn.MultiheadAttention to adapt")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = []
    for name, kind in targets:
        if kind == "attention":
            adapt_attention(model.get_submodule(name), rank, alpha, generator)
            adapted += [f"{name}[{p}]" for p in ATTENTION_PROJECTIONS]
        elif kind == "attention_out":
            adapt_linear_in_place(model.get_submodule(name), rank, alpha, generator)
            adapted.append(name)
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, LoRAAdapter(getattr(parent, child), rank, alpha, generator))
            adapted.append(name)
    return adapted


def add_peft_lora(model: nn.Module, rank: int, alpha: float | None = None,
                  target_modules: TargetModules = None) -> list[str]:
    """The same adaptation with the ``peft`` package (``peft.inject_adapter_in_model``), in place:
    only the ``lora_`` parameters train. Default targets are :func:`lora_targets`'s. Returns
    the names of the adapted modules. Raises ``ImportError`` when peft is not installed."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise ImportError("adapter 'peft': the peft package is not installed (pip install peft), "
                          "or use the built-in adapter") from exc
    _check_rank(rank)
    if target_modules is None:
        target_modules = [name for name, _ in lora_targets(model)]
        if not target_modules:
            raise ValueError("model: LoRA found no nn.Linear, nn.Conv2d (groups=1) or nn.MultiheadAttention to adapt")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0,
                        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return sorted({name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name})


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter of ``model`` back into its base layer, in place; returns ``model``."""
    adapters = [name for name, module in model.named_modules() if isinstance(module, LoRAAdapter)]
    for name in adapters:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapter = getattr(parent, child)
        adapter.base.weight.add_(adapter.delta_weight())
        setattr(parent, child, adapter.base)
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations):
            if any(isinstance(d, (LowRankDelta, PackedQKVDelta)) for d in module.parametrizations[tensor_name]):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    return model
