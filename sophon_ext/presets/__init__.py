"""Named protection presets: YAML files of config overrides shipped with the package.

``sophon demo --preset strong`` (or ``protect``/``config``) starts from the
built-in default, applies the preset, then ``--config``, ``--set`` and the
explicit options. :func:`preset_overrides` reads one; copy a file from this
folder to start a config of your own.
"""

from __future__ import annotations

from importlib import resources

import yaml

from ..config import ConfigError


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def preset_overrides(name: str) -> dict:
    """The config overrides of preset ``name`` (a nested dict)."""
    if name not in preset_names():
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {preset_names()}")
    data = yaml.safe_load(resources.files(__name__).joinpath(f"{name}.yaml").read_text())
    return data or {}


__all__ = ["preset_names", "preset_overrides"]
