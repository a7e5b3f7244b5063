"""Task plug-ins: what differs between classification and generation, nothing else.

A task is registered once by name (:func:`register_task`) with a factory and, optionally, the
config overrides its mode starts from (generation's smaller model and data, its losses). The
config, the command line and the attack harness ask this registry; nothing else branches on a
mode name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .base import Task, check_model_on, evaluate_dataset, weighted_mean
from .classification import ClassificationTask

__all__ = ["Task", "ClassificationTask", "weighted_mean", "make_task", "evaluate_dataset", "check_model_on",
           "register_task", "task_names", "default_config_overrides"]


@dataclass(frozen=True)
class _Entry:
    #: a Task class or factory, or "module:attribute" imported on first use (keeps optional code unloaded)
    factory: Callable[..., Task] | str
    #: config overrides the mode starts from (a mapping, or "module:attribute" naming one)
    defaults: dict | str | None = None


_TASKS: dict[str, _Entry] = {}


def register_task(name: str, factory: Callable[..., Task] | str, default_config: dict | str | None = None) -> None:
    """Make ``name`` a mode: ``config.mode``, ``--mode`` and :func:`make_task` accept it."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: a task name must be an identifier, got {name!r}")
    _TASKS[name] = _Entry(factory, default_config)


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def _entry(mode: str) -> _Entry:
    if mode not in _TASKS:
        raise ValueError(f"mode: unknown mode {mode!r}; choose one of {list(_TASKS)}")
    return _TASKS[mode]


def _resolve(target):
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module, __name__), attribute)
    return target


def make_task(mode: str, **kwargs) -> Task:
    """Build the task registered as ``mode`` with its keyword arguments (``config.task``)."""
    return _resolve(_entry(mode).factory)(**kwargs)


def default_config_overrides(mode: str) -> dict:
    """The config overrides ``mode`` starts from (empty for classification, the built-in default)."""
    defaults = _entry(mode).defaults
    return dict(_resolve(defaults)) if defaults is not None else {}


register_task("classification", ClassificationTask)
register_task("generation", ".generation:GenerationTask", ".generation:DEFAULT_CONFIG_OVERRIDES")
