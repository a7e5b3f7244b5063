"""scikit-build-core metadata provider: the wheel requires the torch it is built against.

The compiled library links one torch release, so a wheel pins its minor
version (``torch==2.13.*``) from the torch importable in the build (built with
``--no-build-isolation``). An sdist is built later against whatever torch is
installed then, so it only asks for the oldest supported torch.
"""

from __future__ import annotations

from typing import Any, Mapping

# The oldest torch the sources support; what an sdist asks for.
MINIMUM_TORCH = "torch>=2.4"


def torch_requirement(version: str) -> str:
    """``"2.13.0+cpu"`` -> ``"torch==2.13.*"``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


class Provider:
    def __init__(self) -> None:
        self._state = "wheel"

    def build_state(self, build_state: str) -> None:
        self._state = build_state

    def dynamic_wheel(self, settings: Mapping[str, Any]) -> dict[str, bool]:
        return {"dependencies": True}  # a wheel built from the sdist pins the torch found then

    def dynamic_metadata(self, settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, Any]:
        if self._state == "sdist":
            return {"dependencies": [MINIMUM_TORCH]}
        try:
            import torch
        except ImportError as exc:
            raise RuntimeError(
                "sophon_ext builds against the installed torch: install torch first, then build with "
                "`pip install --no-build-isolation .`"
            ) from exc
        return {"dependencies": [torch_requirement(torch.__version__)]}
