"""The attack harness: real fine-tuning of a protected model, compared with the
unprotected model and training from scratch, over a grid of attacks.

Each attack (:class:`AttackSpec`) fine-tunes every starting point on the
restricted domain's training split with an ordinary ``torch.optim`` loop
(:func:`fine_tune`) and evaluates on its test split after every epoch
(:func:`run_attacks`). Command line: :func:`add_attack_arguments` /
:func:`run_attack_cli` (``sophon attack``; also ``python -m sophon_ext.attack``).

- :mod:`.spec`: :class:`AttackSpec` (one real fine-tuning recipe) and the learning-rate schedules
- :mod:`.finetune`: one fine-tuning run: the method's surgery on a copy of the model, the ``torch.optim`` loop
- :mod:`.grid`: attack grids: presets, their expansion into attacks, grid files
- :mod:`.run`: :func:`run_attacks`: records, the output directory, worker processes, shards, evaluation
- :mod:`.cli`: the ``sophon attack`` options and command; loading domains and model files
- :mod:`.lora`: low-rank adapters for Linear, Conv2d and MultiheadAttention
- :mod:`.diagnostics`: dead-activation fractions and weight norms per layer

Model surgery (heads, first layers, re-initialisation) is :mod:`sophon_ext.surgery`, below both
this harness and the method registry (:mod:`sophon_ext.methods`) that the simulator shares.
"""

from .cli import (
    CLI_DEFAULTS, add_attack_arguments, load_domain, load_model_file, main, resolved_options, run_attack_cli,
    run_config_of,
)
from .finetune import fine_tune, prepare_attack_model
from .grid import GRID_PRESETS, GridError, GridTypeError, expand_grid, load_grid
from .run import (
    DIAGNOSTIC_SAMPLES, INSPECTION_REFERENCE, REPORT_FILES, default_scratch_factory, run_attacks, state_fingerprint,
)
from .spec import ATTACK_METHODS, SCHEDULES, AttackSpec

__all__ = [
    "ATTACK_METHODS", "SCHEDULES", "GRID_PRESETS", "AttackSpec", "expand_grid", "load_grid", "run_attacks",
    "fine_tune", "prepare_attack_model", "state_fingerprint", "default_scratch_factory",
    "add_attack_arguments", "run_attack_cli",
]
