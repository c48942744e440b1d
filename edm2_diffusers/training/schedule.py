"""Learning-rate schedule of EDM2: linear warm-up, then inverse-square-root decay (EDM2 paper, Section 2.4, Config E).

Time is counted in training images, as in the paper (t, t_ref in images): the schedule then does not depend on how a
global batch is split over devices and accumulation steps.
"""

from __future__ import annotations

import math


def learning_rate(
    images_seen: int | float,
    lr_ref: float,
    warmup_images: int | float = 0,
    decay_ref_images: int | float | None = None,
) -> float:
    r"""α(t) = α_ref · min(t / t_warm, 1) / sqrt(max(t / t_ref, 1)).

    Args:
        images_seen (`int`): t, the number of training images seen including the current step's batch (so the first
            step of a warm-up already has a non-zero rate).
        lr_ref (`float`): α_ref, the reference learning rate.
        warmup_images (`int`): t_warm, length of the linear warm-up in images; 0 disables it.
        decay_ref_images (`int`, *optional*): t_ref of the decay; ``None`` or 0 keeps α_ref after the warm-up.

    Returns:
        `float`: the learning rate for the optimizer step that brings the count to ``images_seen``.
    """
    if images_seen < 0:
        raise ValueError(f"images_seen must not be negative, got {images_seen}")
    lr = lr_ref
    if warmup_images and warmup_images > 0:
        lr *= min(images_seen / warmup_images, 1.0)
    if decay_ref_images and decay_ref_images > 0:
        lr /= math.sqrt(max(images_seen / decay_ref_images, 1.0))
    return lr


def schedule_in_images(training_cfg: dict, global_batch_size: int) -> tuple[int, int | None]:
    """(t_warm, t_ref) in images from the ``training`` config section, converting ``*_steps`` values.

    Args:
        training_cfg (`dict`): the ``training`` section (``lr_warmup_images`` / ``lr_warmup_steps``,
            ``lr_decay_ref_images`` / ``lr_decay_ref_steps``).
        global_batch_size (`int`): images per optimizer step over all processes and accumulation steps.
    """
    warm = training_cfg.get("lr_warmup_images") or 0
    if training_cfg.get("lr_warmup_steps"):
        warm = training_cfg["lr_warmup_steps"] * global_batch_size
    ref = training_cfg.get("lr_decay_ref_images") or None
    if training_cfg.get("lr_decay_ref_steps"):
        ref = training_cfg["lr_decay_ref_steps"] * global_batch_size
    return int(warm), (int(ref) if ref else None)


__all__ = ["learning_rate", "schedule_in_images"]
