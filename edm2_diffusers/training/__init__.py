"""EDM2 training on Accelerate and Hugging Face datasets: config, loss, learning-rate schedule, the loop.

The dataset readers are in :mod:`edm2_diffusers.data`."""

from .checkpoint import list_checkpoints, resolve_resume
from .config import SCHEMA, apply_overrides, default_config, load_config, merge_config, validate_config
from .loop import NonFiniteLossError, TrainingResult, TrainingState, train
from .loss import EDM2TrainingLoss, edm2_loss, sample_sigma
from .schedule import learning_rate, schedule_in_images

__all__ = [
    "SCHEMA",
    "EDM2TrainingLoss",
    "NonFiniteLossError",
    "TrainingResult",
    "TrainingState",
    "apply_overrides",
    "default_config",
    "edm2_loss",
    "learning_rate",
    "list_checkpoints",
    "load_config",
    "merge_config",
    "resolve_resume",
    "sample_sigma",
    "schedule_in_images",
    "train",
    "validate_config",
]
