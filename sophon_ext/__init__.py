"""sophon_ext: SOPHON non-fine-tunable learning as a PyTorch extension."""

from .ops import extension_info
# Importing these registers the ops' fake kernels, autograd and fallbacks.
from . import functional, nn, optim  # noqa: E402  (isort: skip)

from ._version import __version__  # noqa: E402

__all__ = ["extension_info", "functional", "nn", "optim", "__version__"]

from .methods import FineTuneMethod, get_method, method_names, register_method  # noqa: E402
from .simulation import SimulationResult, simulate  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .families import StrategySampler  # noqa: E402
from .strategies import FineTuneStrategy  # noqa: E402

__all__ += ["FineTuneMethod", "FineTuneStrategy", "Recipe", "SimulationResult", "StrategySampler", "get_method",
            "method_names", "register_method", "simulate"]

from .config import Config, ConfigError, FamilyConfig, ProbeConfig, ProtectConfig, load_config, save_config  # noqa: E402
from .engine import ProtectionResult, Sophon, protect  # noqa: E402

__all__ += ["Config", "ConfigError", "FamilyConfig", "ProbeConfig", "ProtectConfig", "ProtectionResult", "Sophon", "load_config", "protect", "save_config"]

from .attack import AttackSpec, run_attacks  # noqa: E402
from .tasks import ClassificationTask, make_task  # noqa: E402

__all__ += ["AttackSpec", "ClassificationTask", "attack", "make_task", "run_attacks"]

# Last: the config's name checks ask the registries imported above.
from . import config_checks  # noqa: E402,F401
