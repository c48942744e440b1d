"""EDM2 training on Accelerate and Hugging Face datasets: config, data, loss, learning-rate schedule, loop."""

from .checkpoint import list_checkpoints, resolve_resume
from .config import SCHEMA, apply_overrides, default_config, load_config, merge_config, validate_config
from .data import EDM2ImageDataset, check_dataset, image_to_array, load_digits_dataset, load_train_dataset, random_flip
from .loop import NonFiniteLossError, TrainingResult, TrainingState, train
from .loss import EDM2TrainingLoss, edm2_loss, sample_sigma
from .samples import make_image_grid, sample_grid
from .schedule import learning_rate, schedule_in_images

__all__ = [
    "SCHEMA",
    "EDM2ImageDataset",
    "EDM2TrainingLoss",
    "NonFiniteLossError",
    "TrainingResult",
    "TrainingState",
    "apply_overrides",
    "check_dataset",
    "default_config",
    "edm2_loss",
    "image_to_array",
    "learning_rate",
    "list_checkpoints",
    "load_config",
    "load_digits_dataset",
    "load_train_dataset",
    "make_image_grid",
    "merge_config",
    "random_flip",
    "resolve_resume",
    "sample_grid",
    "sample_sigma",
    "schedule_in_images",
    "train",
    "validate_config",
]
