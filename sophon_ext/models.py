"""Models by name: the registry's small models, and any model given by reference.

A model name is a registry name (``small_cnn``, ``resnet``, ``tiny_unet``) or a
reference: ``package.module:callable`` (imported, then called with the
config's kwargs), ``torchvision:NAME`` (a builder of ``torchvision.models``)
or ``timm:NAME`` (``timm.create_model(NAME, ...)``). A model built by
reference gets the :class:`LogitsOutput` adapter, so one returning a mapping
or an object with ``logits`` (Hugging Face style) looks like one returning a
tensor to every caller: ``functional_call``, ``vmap`` and the stacked path's
trace included.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Mapping
from typing import Callable

import torch
import torch.fx
from torch import nn

from .errors import UserInputError
from .references import attribute_of, import_module, is_python_reference
from .tasks.generation.unet import TinyUNet  # generation mode's noise predictor, registered below
from .resnet import ResNet  # the CIFAR-style ResNet scenario, registered below


class SmallCNN(nn.Module):
    """``depth`` conv3x3 blocks of ``width`` channels (ReLU, 2x2 max-pool after each
    of the first two), global average pooling, and a linear ``head``.

    ``norm="batch"`` adds BatchNorm after every conv (to exercise the BatchNorm
    handling); the default has none.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, depth: int = 3, norm: str = "none"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth: must be >= 1, got {depth}")
        if norm not in ("none", "batch"):
            raise ValueError(f"norm: must be 'none' or 'batch', got {norm!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(depth):
            layers.append(nn.Conv2d(channels, width, 3, padding=1))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            if i < 2:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a model by registry name or reference (see the module docstring); a registry spec is
    checked first. A reference's output adapter reads the default key ``"logits"``."""
    return model_from_spec({"name": name, "kwargs": kwargs})


def model_from_spec(spec: dict) -> nn.Module:
    """The model a spec ``{"name", "kwargs", "output_key" (optional)}`` describes, as configs,
    model files and checkpoints record it. Raises :class:`UserInputError` naming what is wrong."""
    name, kwargs = spec["name"], spec.get("kwargs", {})
    if name in MODEL_REGISTRY:
        check_model_spec(name, kwargs)
        return MODEL_REGISTRY[name](**kwargs)
    factory = resolve_reference(name)
    _check_reference_kwargs(name, factory, kwargs, "model.kwargs")
    return logits_output(_call_factory(name, factory, kwargs), spec.get("output_key", DEFAULT_OUTPUT_KEY))


#: the largest value of each size argument of the registry's models; beyond these a model
#: does not fit in memory or is a typo (``width: 1000000``)
SIZE_LIMITS = {"in_channels": 4096, "num_classes": 100_000, "width": 4096, "depth": 64, "base_channels": 4096,
               "num_res_blocks": 16, "image_size": 4096, "groups": 4096,
               "blocks_per_stage": 64}
#: list arguments: each entry an int in [1, limit]
SIZE_LIST_LIMITS = {"channel_mults": 64, "attention_resolutions": 4096}
#: parameters a registry model may have (4 GB of float32 weights)
MAX_PARAMETERS = 1_000_000_000


def check_model_spec(name: str, kwargs: dict, where: str = "model.kwargs") -> None:
    """Check a registry spec before anything is allocated: known name and arguments, sizes that are
    ints in range, and a parameter count that fits in memory. Raises :class:`UserInputError`
    naming ``where.<argument>``."""
    if name not in MODEL_REGISTRY:
        raise UserInputError(_unknown_model(name))
    if not isinstance(kwargs, dict):
        raise UserInputError(f"{where}: expected a mapping of {name} arguments, got {type(kwargs).__name__}")
    accepted = inspect.signature(MODEL_REGISTRY[name]).parameters
    for key, value in kwargs.items():
        if key not in accepted:
            raise UserInputError(f"{where}.{key}: not an argument of {name}; it takes {sorted(accepted)}")
        if key in SIZE_LIMITS:
            _check_size(f"{where}.{key}", value, SIZE_LIMITS[key])
        elif key in SIZE_LIST_LIMITS:
            if not isinstance(value, (list, tuple)):
                raise UserInputError(f"{where}.{key}: expected a list of ints, got {_describe(value)}")
            for i, item in enumerate(value):
                _check_size(f"{where}.{key}[{i}]", item, SIZE_LIST_LIMITS[key])
    count = _parameter_count(name, kwargs, where)
    if count > MAX_PARAMETERS:
        raise UserInputError(f"{where}: {name} with {kwargs} would have {count:,} parameters; at most "
                             f"{MAX_PARAMETERS:,} are allowed")


def _check_size(field: str, value, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UserInputError(f"{field}: expected an int in [1, {limit}], got {_describe(value)}")


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _parameter_count(name: str, kwargs: dict, where: str) -> int:
    # Built on the meta device: shapes only, nothing allocated. The constructor's own
    # argument checks (e.g. an image size the UNet levels cannot halve) surface here.
    try:
        with torch.device("meta"):
            model = MODEL_REGISTRY[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{where}: {name} rejects these arguments: {exc}") from None
    return sum(p.numel() for p in model.parameters())


MODEL_REGISTRY = {"small_cnn": SmallCNN, "tiny_unet": TinyUNet, "resnet": ResNet}


# ----------------------------------------------------------------------------- models by reference

#: where a model built by reference keeps its logits when it returns a mapping or an object
DEFAULT_OUTPUT_KEY = "logits"
#: what the data fills in when the config leaves it out: role -> argument name, per model hub
_HUB_DATA_ARGUMENTS = {"torchvision": {"num_classes": "num_classes"},
                       "timm": {"in_channels": "in_chans", "num_classes": "num_classes"}}
_DATA_ROLES = ("in_channels", "num_classes")


def is_reference(name: str) -> bool:
    """Whether ``name`` is a reference (``package.module:callable``, ``torchvision:NAME``, ``timm:NAME``)."""
    return isinstance(name, str) and name not in MODEL_REGISTRY and is_python_reference(name)


def _unknown_model(name) -> str:
    return (f"model.name: unknown model {name!r}; choose one of {sorted(MODEL_REGISTRY)} or give a reference: "
            "package.module:callable, torchvision:NAME or timm:NAME")


def check_model_choice(name: str, kwargs, where: str = "model") -> None:
    """Check a config's model before anything is built: a registry spec by :func:`check_model_spec`;
    a reference is resolved (its module imported) and its kwargs must be a mapping the callable
    accepts. A reference is not built here: its size is known only once it is built."""
    if name in MODEL_REGISTRY:
        check_model_spec(name, kwargs, where=f"{where}.kwargs")
        return
    factory = resolve_reference(name)
    _check_reference_kwargs(name, factory, kwargs, f"{where}.kwargs")


MODEL_BUILDER = "a callable that builds a model"


def resolve_reference(name: str) -> Callable[..., nn.Module]:
    """The callable a reference names, importing its module. Raises :class:`UserInputError`
    for an unknown name, a missing module, hub or callable, or an attribute that is not callable."""
    if not is_reference(name):
        raise UserInputError(_unknown_model(name))
    hub, _, attribute = name.partition(":")
    if hub == "torchvision":
        return attribute_of(name, _import_hub(name, "torchvision.models", "torchvision"), "torchvision.models", attribute,
                            "model.name", MODEL_BUILDER)
    if hub == "timm":
        timm = _import_hub(name, "timm", "timm")
        if hasattr(timm, "is_model") and not timm.is_model(attribute):
            raise UserInputError(f"model.name: {name!r}: timm has no model {attribute!r} (timm.list_models() lists them)")
        return functools.partial(timm.create_model, attribute)
    return attribute_of(name, import_module(name, hub, "model.name"), hub, attribute, "model.name", MODEL_BUILDER)


def _import_hub(name: str, module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] == package:
            raise UserInputError(f"model.name: {name} needs {package}: pip install {package}") from None
        raise UserInputError(f"model.name: {name}: importing {module} failed ({exc})") from exc


def _check_reference_kwargs(name: str, factory: Callable, kwargs, where: str) -> None:
    if not isinstance(kwargs, dict):
        raise UserInputError(f"{where}: expected a mapping of {name} arguments, got {_describe(kwargs)}")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return  # no signature to check against (a builtin); calling it will tell
    try:
        signature.bind_partial(**kwargs)
    except TypeError as exc:
        raise UserInputError(f"{where}: {name} does not take these arguments ({exc}); "
                             f"it takes {list(signature.parameters)}") from None


def _call_factory(name: str, factory: Callable, kwargs: dict) -> nn.Module:
    try:
        model = factory(**kwargs)
    except UserInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's constructor failed on these arguments
        raise UserInputError(f"model: {name} with kwargs {kwargs} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UserInputError(f"model.name: {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def data_arguments(name: str) -> dict[str, str]:
    """Which constructor arguments take the data's channel count and class count:
    ``{"in_channels": argument, "num_classes": argument}``, those the model has. Registry models
    and ``module:callable`` references: the parameters of those names in their signature (not a
    ``**kwargs``); ``torchvision:`` models take ``num_classes``, ``timm:`` ones ``in_chans`` and
    ``num_classes``."""
    hub = name.partition(":")[0] if is_reference(name) else None
    if hub in _HUB_DATA_ARGUMENTS:
        return dict(_HUB_DATA_ARGUMENTS[hub])
    factory = MODEL_REGISTRY[name] if name in MODEL_REGISTRY else resolve_reference(name)
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {role: role for role in _DATA_ROLES if role in accepted}


# ----------------------------------------------------------------------------- output adapter


class ModelOutputError(UserInputError):
    """A model's output holds no logits where ``model.output_key`` says."""


def select_logits(output, key: str = DEFAULT_OUTPUT_KEY):
    """The logits in a model's output: a tensor as it is, else ``output[key]`` of a mapping or
    ``output.key`` of an object (a Hugging Face ``ModelOutput`` is both)."""
    if isinstance(output, (torch.Tensor, torch.fx.Proxy)):  # a Proxy: the stacked path's trace of a tensor
        return output
    if isinstance(output, Mapping):
        if key in output:
            return output[key]
        raise ModelOutputError(f"model.output_key: the model returns a {type(output).__name__} without key {key!r} "
                               f"(its keys: {list(output)[:8]}); set model.output_key to the key of its logits")
    if hasattr(output, key):
        return getattr(output, key)
    raise ModelOutputError(f"model.output_key: the model returns a {type(output).__name__}; expected a tensor, "
                           f"or a mapping or object holding the logits under {key!r}")


class LogitsOutput:
    """The adapter :func:`logits_output` puts in front of a model's class: ``forward`` returns
    :func:`select_logits` of the class's own ``forward``. The model stays the same object with the
    same modules, so parameter names (state dicts, checkpoints, head and layer names) are its own;
    ``functional_call``, ``vmap`` and the stacked path's ``torch.fx`` trace all see a tensor.
    ``copy.deepcopy`` and pickling keep the adapter (the model's own class must be importable)."""

    _sophon_output_key = DEFAULT_OUTPUT_KEY

    def __reduce_ex__(self, protocol):
        # as the default reduction, but naming the model's own class (the adapted one is made at run time)
        return (_new_adapted, (type(self)._sophon_base,), self.__dict__)


@functools.cache
def _adapted_class(cls: type) -> type:
    base_forward = cls.forward

    # wraps: torch.fx reads the arguments to trace from the wrapped forward's signature
    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        return select_logits(base_forward(self, *args, **kwargs), self._sophon_output_key)

    return type(cls.__name__, (LogitsOutput, cls),
                {"_sophon_base": cls, "__qualname__": cls.__qualname__, "forward": forward})


def _new_adapted(cls: type) -> nn.Module:
    adapted = _adapted_class(cls)
    return adapted.__new__(adapted)


def logits_output(model: nn.Module, key: str = DEFAULT_OUTPUT_KEY) -> nn.Module:
    """Make ``model(...)`` return its logits tensor, read under ``key`` from a mapping or an
    object output (see :class:`LogitsOutput`); returns ``model`` itself. Calling it again changes
    the key. Models built by reference have it already; apply it to a model of your own that
    returns a mapping or an object before passing it to the Python API."""
    if not isinstance(model, LogitsOutput):
        model.__class__ = _adapted_class(type(model))
    model._sophon_output_key = key
    return model
