"""Task plug-ins: what differs between classification and generation, nothing else."""

from .base import Task, check_model_on, evaluate_dataset, weighted_mean
from .classification import ClassificationTask

__all__ = ["Task", "ClassificationTask", "weighted_mean", "make_task", "evaluate_dataset", "check_model_on"]


def make_task(mode: str, **kwargs) -> Task:
    """Build the task for a mode name ("classification" or "generation")."""
    if mode == "classification":
        return ClassificationTask(**kwargs)
    if mode == "generation":
        from .generation import GenerationTask

        return GenerationTask(**kwargs)
    raise ValueError(f"mode: unknown mode {mode!r}; choose 'classification' or 'generation'")
