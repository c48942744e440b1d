"""Learning-rate schedule of EDM2: linear warm-up, then inverse-square-root decay (EDM2 paper, Section 2.4, Config E).

Time is counted in training images, as in the paper (t, t_ref in images): the schedule then does not depend on how a
global batch is split over devices and accumulation steps. ``training.lr_schedule: epochs`` instead sets the rate once
per epoch from the epoch index, as edm2-multi-gpu does (:func:`epoch_learning_rate`).
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


def epoch_learning_rate(
    epoch: int, lr_ref: float, warmup_epochs: int = 0, decay_ref_epochs: int | None = None
) -> float:
    r"""The rate of a whole epoch ``ep`` (0-based) in the per-epoch schedule of edm2-multi-gpu.

    α(ep) = α_ref · (ep + 1) / warm while ep < warm, then α_ref / sqrt(max(ep / t_ref, 1)) (no decay without t_ref).
    Unlike :func:`learning_rate`, the warm-up's first epoch already runs at α_ref / warm and the decay counts whole
    epochs from 0.
    """
    if epoch < 0:
        raise ValueError(f"epoch must not be negative, got {epoch}")
    if warmup_epochs and epoch < warmup_epochs:
        return lr_ref * (epoch + 1) / warmup_epochs
    if decay_ref_epochs and decay_ref_epochs > 0:
        return lr_ref / math.sqrt(max(epoch / decay_ref_epochs, 1.0))
    return lr_ref


def step_epoch(step: int, micro_batches_per_step: int, batches_per_epoch: int) -> int:
    """The epoch (0-based) that optimizer step ``step`` (0-based) starts in: its first micro-batch's epoch."""
    return step * micro_batches_per_step // batches_per_epoch


def step_learning_rate(
    train_cfg: dict, step: int, images_after: int, batches_per_epoch: int, warmup_images: int, decay_ref_images
) -> float:
    """The rate of optimizer step ``step`` (0-based) under ``training.lr_schedule``.

    Args:
        train_cfg (`dict`): the ``training`` section.
        step (`int`): optimizer steps done before this one.
        images_after (`int`): images seen including this step's batch (the ``images`` schedule's t).
        batches_per_epoch (`int`): per-process micro-batches in one epoch (the ``epochs`` schedule's clock).
        warmup_images, decay_ref_images: t_warm and t_ref of the ``images`` schedule (:func:`schedule_in_images`).
    """
    lr_ref = train_cfg["learning_rate"]
    if train_cfg.get("lr_schedule", "images") == "epochs":
        epoch = step_epoch(step, train_cfg["gradient_accumulation_steps"], batches_per_epoch)
        return epoch_learning_rate(epoch, lr_ref, train_cfg["lr_warmup_epochs"], train_cfg["lr_decay_ref_epochs"])
    return learning_rate(images_after, lr_ref, warmup_images, decay_ref_images)


__all__ = ["epoch_learning_rate", "learning_rate", "schedule_in_images", "step_epoch", "step_learning_rate"]
