"""Sample grids in the experiment trackers (TensorBoard, Weights & Biases), next to the PNG files of the run."""

from __future__ import annotations

import numpy as np
from accelerate.logging import get_logger
from PIL import Image

logger = get_logger(__name__)

SAMPLES_TAG = "samples"


def log_sample_grid(accelerator, image: Image.Image, step: int) -> list[str]:
    """Log a sample grid as an image to each tracker of ``accelerator`` at ``step``; return the trackers' names.

    TensorBoard gets it through ``SummaryWriter.add_images`` (an image summary under the tag ``samples``), W&B as a
    ``wandb.Image``; both through the trackers' ``log_images``. Other trackers are skipped with a note.
    """
    logged = []
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            array = np.asarray(image.convert("RGB"))[None]  # (1, H, W, 3) uint8
            tracker.log_images({SAMPLES_TAG: array}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({SAMPLES_TAG: [image]}, step=step)
        else:
            logger.info("tracker %s does not get sample grids", tracker.name)
            continue
        logged.append(tracker.name)
    return logged


__all__ = ["SAMPLES_TAG", "log_sample_grid"]
