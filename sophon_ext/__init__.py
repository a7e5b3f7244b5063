"""sophon_ext: SOPHON non-fine-tunable learning as a PyTorch extension."""

from ._ops import extension_info

__version__ = "0.1.0"

__all__ = ["extension_info", "__version__"]
