"""Generation mode (DDPM noise prediction): the task plug-in and the pieces it is built on.

- :mod:`.task`: :class:`GenerationTask`, the task plug-in (denoising loss to adapt and to keep,
  DoS / negated MSE to suppress), and ``DEFAULT_CONFIG_OVERRIDES``, the built-in generation default.
- :mod:`.diffusion`: the DDPM noise schedule, the denoising loss, the DDPM and DDIM samplers.
- :mod:`.unet`: :class:`~.unet.TinyUNet`, the noise predictor ``model(x_t, t)``
  (registered as ``"tiny_unet"`` in :mod:`sophon_ext.models`).
- :mod:`.metrics`: sample grids as PNG and MMD^2 distances between generated and real images.

The task's names are imported on first use: :mod:`sophon_ext.models` imports :mod:`.unet` when it
is imported, and that must not load the task, the samplers or the metrics as well.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .task import DEFAULT_CONFIG_OVERRIDES, SUPPRESSION_LOSSES, GenerationTask

__all__ = ["GenerationTask", "DEFAULT_CONFIG_OVERRIDES", "SUPPRESSION_LOSSES"]


def __getattr__(name: str):
    if name in __all__:
        from . import task

        value = getattr(task, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
