"""Python references, ``package.module:attribute``: how configs and the command line name a
user's model builder, dataset function or transform. Importing runs the module's code, so
only name modules you trust (docs/USAGE.md)."""

from __future__ import annotations

import importlib
import re

from .errors import UserInputError

#: ``package.module:attribute`` (the attribute may be dotted: ``module:Class.method``)
REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def is_python_reference(text) -> bool:
    return isinstance(text, str) and REFERENCE.fullmatch(text) is not None


def import_module(reference: str, module: str, field: str):
    """Import ``module`` for ``reference``; a failure is a :class:`UserInputError` naming ``field``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or ""
        if missing and (module == missing or module.startswith(missing + ".")):
            raise UserInputError(f"{field}: {reference!r}: cannot import module {module!r} "
                                 f"(no module named {missing!r}; is it on PYTHONPATH?)") from None
        raise UserInputError(f"{field}: {reference!r}: importing module {module!r} failed ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise UserInputError(f"{field}: {reference!r}: importing module {module!r} raised "
                             f"{type(exc).__name__}: {exc}") from exc


def attribute_of(reference: str, module, module_name: str, attribute: str, field: str, wanted: str):
    """``module.attribute`` (dotted), which must be callable; ``wanted`` says what for, in errors."""
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UserInputError(f"{field}: {reference!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserInputError(f"{field}: {reference!r}: {module_name}.{attribute} is a {type(target).__name__}, "
                             f"not {wanted}")
    return target


def resolve(reference: str, field: str, wanted: str = "a callable"):
    """The callable ``package.module:attribute`` names (its module imported)."""
    if not is_python_reference(reference):
        raise UserInputError(f"{field}: expected package.module:callable, got {reference!r}")
    module_name, _, attribute = reference.partition(":")
    return attribute_of(reference, import_module(reference, module_name, field), module_name, attribute, field, wanted)
