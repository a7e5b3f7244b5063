"""The config checks that need a registry, installed into :mod:`sophon_ext.config`.

``config.py`` knows the shape of a config and its plain ranges; the names it
accepts (optimizers, fine-tuning methods, tasks, models, built-in data sets)
and what makes an attack recipe valid belong to the modules that own them.
This module connects the two; the package imports it after every registry.
"""

from __future__ import annotations

from .attack import AttackSpec
from .config import Registry, install_registry
from .data import BUILTIN_DATASETS
from .families import check_family
from .methods import method_names
from .models import check_model_choice
from .optim.presets import PRESETS
from .tasks import make_task, task_names


def _simulated_methods() -> tuple[str, ...]:
    return method_names(simulated=True)


install_registry(Registry(
    optimizers=sorted(PRESETS),
    simulated_methods=_simulated_methods,
    builtin_datasets=BUILTIN_DATASETS,
    task_names=task_names,
    make_task=make_task,
    check_model=check_model_choice,
    check_family=check_family,
    attack_spec=AttackSpec,
))
