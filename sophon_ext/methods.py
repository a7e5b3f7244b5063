"""The one registry of fine-tuning methods: what an attacker changes before fine-tuning.

Every method is defined once, as data and two small functions, and both
sides read that one definition:

- the simulator (:func:`sophon_ext.simulate`, the protection's inner loop)
  applies it to the functional parameters (:meth:`FineTuneMethod.simulated_start`),
  so parameters computed from the current ones keep their meta-gradient;
- the attack harness (:func:`sophon_ext.attack.prepare_attack_model`) applies
  it to a real copy of the module (:meth:`FineTuneMethod.apply_to_module`).

A method is: which modules are re-initialised (``reinit``: the head, the
first ``layers`` layers, or both), which parameters stay frozen
(``freeze``), an optional change of the parameters (``param_change``, a
function ``(params: dict, model) -> dict`` of the values it changes, e.g. a
layer-wise re-normalisation), an optional change computed from restricted
inputs (``data_change``, a function ``(params, model, inputs, generator) ->
dict``, e.g. recycling the units that are dead on them) and an optional fixed
change of the inputs (``input_change``, a function of the first model input,
e.g. a preprocessing). Users add their own with :func:`register_method`; a
registered method can be simulated by the protection, named in configs and
run by the attack harness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from . import surgery

ParamChange = Callable[[dict, nn.Module], dict]
InputChange = Callable[[Tensor], Tensor]
#: seed -> one fixed input change (a method whose attacker draws its preprocessing)
InputChangeFactory = Callable[[int], InputChange]
#: (params, model, restricted inputs, generator) -> the values it changes
DataChange = Callable[[dict, nn.Module, Tensor, torch.Generator], dict]
#: restricted inputs a data change sees: the first this many of the attack's training data
DATA_CHANGE_SAMPLES = 256

_REINIT = ("none", "head", "layers", "head+layers")
_FREEZE = ("none", "all_but_head", "layers")


@dataclass(frozen=True)
class FineTuneMethod:
    """One way an attacker prepares a model for fine-tuning (see the module docstring).

    ``continuable``: a simulated trajectory of this method may be continued
    over several FTS steps (:mod:`sophon_ext.chains`; the continuation trains
    every parameter, so freezing methods are not). ``simulated``: False for
    methods only the real harness can run (a linear probe, LoRA adapters).
    """

    name: str
    summary: str
    reinit: str = "none"
    freeze: str = "none"
    param_change: ParamChange | None = None
    data_change: DataChange | None = None
    #: raises ValueError (saying why) for a model the method cannot change, e.g. one with BatchNorm
    check_model: Callable[[nn.Module], object] | None = None
    input_change: InputChange | None = None
    #: instead of ``input_change``: a function of the attack's seed that returns the input change
    #: (an attacker who picks one preprocessing from a family of them)
    input_change_from_seed: InputChangeFactory | None = None
    simulated: bool = True
    default_layers: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"name: must be an identifier-like string, got {self.name!r}")
        if self.reinit not in _REINIT:
            raise ValueError(f"reinit: must be one of {_REINIT}, got {self.reinit!r}")
        if self.freeze not in _FREEZE:
            raise ValueError(f"freeze: must be one of {_FREEZE}, got {self.freeze!r}")
        for field_name in ("param_change", "data_change", "check_model", "input_change", "input_change_from_seed"):
            value = getattr(self, field_name)
            if value is not None and not callable(value):
                raise TypeError(f"{field_name}: expected a callable or None, got {type(value).__name__}")
        if self.input_change is not None and self.input_change_from_seed is not None:
            raise ValueError("input_change_from_seed: give input_change or input_change_from_seed, not both")

    # -- what the method touches ------------------------------------------------------------
    @property
    def needs_layers(self) -> bool:
        return "layers" in self.reinit or self.freeze == "layers"

    @property
    def needs_head(self) -> bool:
        return "head" in self.reinit or self.freeze == "all_but_head"

    @property
    def needs_inputs(self) -> bool:
        return self.data_change is not None

    @property
    def continuable(self) -> bool:
        return self.simulated and self.freeze == "none"

    def refusal(self, model: nn.Module) -> str | None:
        """Why the method cannot change ``model`` (what :attr:`check_model` raised), or None."""
        if self.check_model is not None:
            try:
                self.check_model(model)
            except ValueError as exc:
                return str(exc)
        return None

    def supports(self, model: nn.Module) -> bool:
        return self.refusal(model) is None

    def targets(self, model: nn.Module, layers=None, head: str | None = None) -> tuple[list[str], list[str]]:
        """(module names to re-initialise, parameter names to freeze) on ``model``; raises
        ValueError when the method cannot change ``model``."""
        if self.check_model is not None:
            self.check_model(model)
        if layers is None:
            layers = self.default_layers
        if self.needs_layers and layers is None:
            raise ValueError(f"layers: method {self.name!r} needs a count of first layers or module names")
        reinit: list[str] = []
        if "head" in self.reinit:
            reinit.append(surgery.find_head(model, head))
        if "layers" in self.reinit:
            reinit += [m for m in surgery.resolve_layers(model, layers) if m not in reinit]
        frozen: list[str] = []
        if self.freeze == "all_but_head":
            trainable = set(surgery.parameter_names(model, [surgery.find_head(model, head)]))
            frozen = [n for n, _ in model.named_parameters() if n not in trainable]
        elif self.freeze == "layers":
            frozen = surgery.parameter_names(model, surgery.resolve_layers(model, layers))
        return reinit, frozen

    # -- the two forms ----------------------------------------------------------------------
    def simulated_start(self, model: nn.Module, theta: dict[str, Tensor], reinit: list[str],
                        generator: torch.Generator, inputs: Tensor | None = None) -> dict[str, Tensor]:
        """The trajectory's starting parameters as a function of ``theta`` (autograd sees through
        ``param_change`` and ``data_change``; re-initialised values are constants). ``inputs``:
        restricted inputs for ``data_change``."""
        start = dict(theta)
        modules = dict(model.named_modules())
        for module in reinit:  # same order and generator as the real form
            for local, value in surgery.fresh_parameters(modules[module], generator).items():
                start[f"{module}.{local}" if module else local] = value.to(theta[f"{module}.{local}" if module else local].dtype)
        start.update(self._changes(dict(start), model, inputs, generator))
        return start

    @torch.no_grad()
    def apply_to_module(self, model: nn.Module, reinit: list[str], generator: torch.Generator,
                        inputs: Tensor | None = None) -> None:
        """The same change on a real model, in place (re-initialisation, then ``param_change``,
        then ``data_change`` on ``inputs``)."""
        surgery.reinitialise(model, reinit, generator)
        params = dict(model.named_parameters())
        for name, value in self._changes({n: p.detach() for n, p in params.items()}, model, inputs, generator).items():
            params[name].copy_(value)

    def _changes(self, params: dict, model: nn.Module, inputs: Tensor | None, generator: torch.Generator) -> dict:
        """What ``param_change`` and then ``data_change`` change, from ``params`` (the values after re-initialisation)."""
        changed: dict = {}
        if self.param_change is not None:
            changed = check_param_values(self.param_change(dict(params), model), params, f"method {self.name!r}: param_change")
        if self.data_change is not None:
            if inputs is None:
                raise ValueError(f"method {self.name!r}: needs restricted inputs for its data_change")
            current = {**params, **changed}
            changed.update(check_param_values(self.data_change(dict(current), model, inputs, generator), current,
                                              f"method {self.name!r}: data_change"))
        return changed

    def input_change_for(self, seed: int) -> InputChange | None:
        """The input change an attack with ``seed`` applies (the same on both sides)."""
        if self.input_change_from_seed is not None:
            return self.input_change_from_seed(seed)
        return self.input_change

    def simulated_input_transform(self, seed: int = 0) -> Callable | None:
        """The input change as the simulator's transform of the model-input tuple."""
        change = self.input_change_for(seed)
        if change is None:
            return None
        return lambda inputs: (change(inputs[0]), *inputs[1:])


def check_param_values(out, params: dict, what: str) -> dict:
    """``out`` (what a parameter change returned) must map parameter names to tensors of their shapes."""
    if not isinstance(out, dict):
        raise TypeError(f"{what}: must return a dict name -> tensor, got {type(out).__name__}")
    for name, value in out.items():
        if name not in params:
            raise ValueError(f"{what}: returned {name!r}, not a parameter of the model; parameters: {list(params)}")
        if not isinstance(value, Tensor) or value.shape != params[name].shape:
            raise ValueError(f"{what}: value for {name!r} must be a tensor of shape {tuple(params[name].shape)}")
    return out


class InputChanged(nn.Module):
    """``model`` behind a fixed change of its first input (the real form of ``input_change``)."""

    def __init__(self, model: nn.Module, change: InputChange):
        super().__init__()
        self.model = model
        self.change = change

    def forward(self, x, *rest):
        return self.model(self.change(x), *rest)


# -- built-in changes ---------------------------------------------------------------------------


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv and linear layers, in registration order (what the built-in changes act on)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def renormalise_layers(params: dict, model: nn.Module) -> dict:
    """Every conv/linear weight scaled to the Frobenius norm a default-initialised layer of its
    shape has on average (keeping the filter directions), its bias set to zero: undoes any
    protection that lives in the scale of the weights or in large (negative) biases."""
    out = {}
    for name, module in weighted_layers(model):
        weight_name = f"{name}.weight" if name else "weight"
        weight = params[weight_name]
        fan_in = weight[0].numel()
        # kaiming_uniform(a=sqrt(5)) draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1 / (3 fan_in)
        target = math.sqrt(weight.numel() / (3.0 * fan_in))
        out[weight_name] = weight * (target / weight.norm().clamp_min(1e-12))
        if module.bias is not None:
            bias_name = f"{name}.bias" if name else "bias"
            out[bias_name] = torch.zeros_like(params[bias_name])
    return out


def standardise_inputs(x: Tensor) -> Tensor:
    """Each sample shifted and scaled to zero mean and unit standard deviation (a common,
    label-preserving preprocessing an attacker may put in front of the model)."""
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (x - mean) / std


def random_reframing(seed: int) -> InputChange:
    """One fixed, label-preserving re-framing of image inputs, drawn from ``seed``: a gamma curve
    (gamma in [0.4, 2.5]) on each sample's [min, max] range, a contrast and brightness change
    (x a in [0.6, 1.6], + b in [-0.2, 0.2]), and a 3x3 blur (t > 0) or sharpening (t < 0) of
    strength |t| <= 0.8 -- the kind of preprocessing an attacker tries to move restricted inputs
    towards the distribution the model was trained on."""
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
    gamma = math.exp(math.log(0.4) + u[0] * (math.log(2.5) - math.log(0.4)))
    scale, shift, blur = 0.6 + u[1], -0.2 + 0.4 * u[2], -0.8 + 1.6 * u[3]

    def reframe(x: Tensor) -> Tensor:
        dims = tuple(range(1, x.dim()))
        low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        span = (high - low).clamp_min(1e-6)
        out = ((x - low) / span).clamp(0, 1) ** gamma * span + low
        out = out * scale + shift
        if x.dim() == 4:  # (B, C, H, W): blur or sharpen each channel
            channels = x.shape[1]
            box = torch.full((3, 3), 1.0 / 9.0, dtype=x.dtype, device=x.device)
            identity = torch.zeros(3, 3, dtype=x.dtype, device=x.device)
            identity[1, 1] = 1.0
            kernel = ((1.0 - blur) * identity + blur * box).expand(channels, 1, 3, 3)
            out = torch.nn.functional.conv2d(torch.nn.functional.pad(out, (1, 1, 1, 1), mode="replicate"), kernel,
                                             groups=channels)
        return out

    return reframe


def chained_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers in registration order, checked to feed each other in that order."""
    if any(isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) for m in model.modules()):
        raise ValueError("ReDo: models with normalisation layers are not supported "
                         "(a unit's activity is read after its conv/linear layer and a ReLU)")
    layers = weighted_layers(model)
    for (name, layer), (next_name, following) in zip(layers, layers[1:]):
        width, fed = layer.weight.shape[0], following.weight.shape[1]  # (out, in, ...) for conv and linear
        if width != fed:
            raise ValueError(f"ReDo: needs conv/linear layers that feed each other in order; "
                             f"{name!r} has {width} outputs but the next one, {next_name!r}, takes {fed}")
    return layers


def recycle_dormant_units(params: dict, model: nn.Module, inputs: Tensor, generator: torch.Generator,
                          threshold: float = 0.0) -> dict:
    """ReDo (Sokar et al., ICML 2023, "The dormant neuron phenomenon in deep reinforcement
    learning"): a unit of a conv/linear layer (the last layer excepted) is dormant when its mean
    ReLU output on ``inputs``, divided by its layer's mean over units, is at most ``threshold``
    (0: exactly dead). A dormant unit's incoming weights and bias get fresh values (the layer's
    own initialisation, from ``generator``) and its outgoing weights in the next layer become
    zero, so at threshold 0 the model's outputs do not change; fine-tuning then trains the
    recycled units. What a decay with an adaptive optimizer does to dead units over many steps
    (their only gradient shrinks them in sign-like steps), at once. For a chain of conv/linear
    layers with a ReLU after each (SmallCNN); the masks are constants, the kept values stay
    functions of ``params``."""
    layers = chained_layers(model)
    captured: dict[str, Tensor] = {}
    handles = [layer.register_forward_hook(lambda m, i, o, n=name: captured.__setitem__(n, o.detach()))
               for name, layer in layers[:-1]]
    try:
        with torch.no_grad():
            torch.func.functional_call(model, {n: v.detach() for n, v in params.items()}, (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    out: dict[str, Tensor] = {}
    for (name, layer), (next_name, _) in zip(layers, layers[1:]):
        activity = torch.relu(captured[name]).mean(dim=[d for d in range(captured[name].dim()) if d != 1])
        dormant = activity <= threshold * activity.mean()
        if not bool(dormant.any()):
            continue
        fresh = surgery.fresh_parameters(layer, generator)
        for local, value in fresh.items():
            key = f"{name}.{local}"
            current = out.get(key, params[key])
            mask = dormant.view(-1, *([1] * (current.dim() - 1)))
            out[key] = torch.where(mask, value.to(current), current)
        key = f"{next_name}.weight"
        current = out.get(key, params[key])
        out[key] = current * (~dormant).to(current.dtype).view(1, -1, *([1] * (current.dim() - 2)))
    return out


_REGISTRY: dict[str, FineTuneMethod] = {}


def register_method(method: FineTuneMethod, *, replace: bool = False) -> FineTuneMethod:
    """Add ``method`` to the registry (the simulator, configs and the attack harness then know it)."""
    if not isinstance(method, FineTuneMethod):
        raise TypeError(f"method: expected a FineTuneMethod, got {type(method).__name__}")
    if method.name == "custom":
        raise ValueError("name: 'custom' is reserved for a strategy's own surgery function")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"name: method {method.name!r} is already registered (pass replace=True to redefine it)")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> FineTuneMethod:
    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; choose one of {method_names()}")
    return _REGISTRY[name]


def method_names(simulated: bool | None = None) -> tuple[str, ...]:
    """Registered names (``simulated=True``: those the protection can simulate; False: harness-only)."""
    return tuple(n for n, m in _REGISTRY.items() if simulated is None or m.simulated == simulated)


for _method in (
    FineTuneMethod("full", "every parameter fine-tuned"),
    FineTuneMethod("reinit_head", "classifier head re-initialised, then full fine-tuning", reinit="head"),
    FineTuneMethod("reinit_layers", "first `layers` layers re-initialised, then full fine-tuning", reinit="layers",
                   default_layers=1),
    FineTuneMethod("reinit_head_layers", "head and first `layers` layers re-initialised, then full fine-tuning",
                   reinit="head+layers", default_layers=1),
    FineTuneMethod("head_only", "only the classifier head trains", freeze="all_but_head"),
    FineTuneMethod("freeze_first", "first `layers` layers frozen, the rest trains", freeze="layers", default_layers=1),
    FineTuneMethod("renorm", "layer-wise re-normalisation (weights to init scale, biases zeroed), then full",
                   param_change=renormalise_layers),
    FineTuneMethod("standardise", "inputs standardised per sample, then full fine-tuning", input_change=standardise_inputs),
    FineTuneMethod("reframe", "inputs re-framed by a seeded gamma/contrast/blur-or-sharpen change, then full",
                   input_change_from_seed=random_reframing),
    # the two changes together: a new head learns on features the input or weight change revives
    FineTuneMethod("reframe_head", "inputs re-framed (as `reframe`) and head re-initialised, then full",
                   reinit="head", input_change_from_seed=random_reframing),
    FineTuneMethod("renorm_head", "layer-wise re-normalisation (as `renorm`) and head re-initialised, then full",
                   reinit="head", param_change=renormalise_layers),
    # an attacker who notices units that are dead on the restricted inputs and recycles them (ReDo)
    FineTuneMethod("redo", "units dead on restricted inputs recycled (ReDo), then full fine-tuning",
                   data_change=recycle_dormant_units, check_model=chained_layers),
    FineTuneMethod("redo_head", "units dead on restricted inputs recycled (ReDo) and head re-initialised, then full",
                   reinit="head", data_change=recycle_dormant_units, check_model=chained_layers),
    FineTuneMethod("probe", "a new linear layer on a frozen intermediate layer (harness only)", simulated=False),
    FineTuneMethod("lora", "low-rank adapters on linear/conv/attention projections (harness only)", simulated=False),
):
    register_method(_method)

__all__ = ["FineTuneMethod", "InputChanged", "register_method", "get_method", "method_names",
           "random_reframing", "recycle_dormant_units", "renormalise_layers", "standardise_inputs"]
