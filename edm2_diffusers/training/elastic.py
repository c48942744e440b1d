"""Elastic resume: a checkpoint written by N processes continues on M processes with the same global sequence.

What makes the sequence of samples and noise independent of the number of processes:

* the data order: Accelerate's seedable sampler permutes the dataset from (seed, epoch) alone, and its batch sampler
  shard gives process i the underlying per-device batches i, i+N, ...: one global micro-batch (per-device batch x
  processes) is the same images in the same order for any N, and an epoch has the same number of them. The skip on
  resume (``step x accumulation`` global micro-batches into the epoch) is the same on any N;
* the draws: flips, σ, ε (and a latent's sample) come from one seed per (seed, step, micro-step) for the whole global
  micro-batch, each process keeping its rows (:mod:`.draws`);
* the optimizer state (Adam's moments, replicated by DDP), the model, the EMA and the counters are whole in every
  checkpoint; the per-process RNG states (``random_states_<i>.pkl``) carry nothing the loop needs, since it seeds
  every micro-step itself: a process without one (resuming 1 → 2) keeps its fresh state.

So a resume keeps the global batch *and* the gradient accumulation (hence the global micro-batch) of the checkpoint
and refuses others, naming both (:func:`check_resume`). What a new layout cannot keep, and a warning names:

* dropout (``dropout`` > 0): each process draws its masks from its own stream when there are several, so the masks
  depend on the layout;
* ``training.drop_last: false`` with a partial last batch: one process trains on the r images left at the end of an
  epoch, several complete that global micro-batch with the epoch's first images (Accelerate's ``even_batches``), so a
  resume between one process and several sees other tails (any N ≥ 2 to any M ≥ 2 keeps them).

The weights after a resume on another number of processes agree with an uninterrupted run to float tolerance, not bit
for bit: the gradient of a global micro-batch is summed in another order (one sum per process, then all-reduced).
"""

from __future__ import annotations

from accelerate.logging import get_logger

from . import checkpoint as ckpt

logger = get_logger(__name__)


def layout(num_processes: int, per_device: int, train_cfg: dict, num_images: int | None) -> dict:
    """How the global batch is split, recorded in ``training_state.json`` (checked by :func:`check_resume`)."""
    accum = train_cfg["gradient_accumulation_steps"]
    return {
        "num_processes": num_processes,
        "per_device_batch_size": per_device,
        "gradient_accumulation_steps": accum,
        "global_batch_size": per_device * num_processes * accum,
        "num_train_images": num_images,
        "drop_last": train_cfg.get("drop_last", True),
    }


def _processes(n) -> str:
    return "1 process" if n == 1 else f"{n} processes"


def check_resume(resume_dir: str | None, num_processes: int, per_device: int, train_cfg: dict) -> None:
    """Before anything is written: the run keeps the checkpoint's global batch and gradient accumulation.

    Raises:
        ValueError: either differs (the message names both values and the flags that keep them).
    """
    if resume_dir is None:
        return
    saved = ckpt.read_state(resume_dir)
    accum = train_cfg["gradient_accumulation_steps"]
    total, old_total = per_device * num_processes * accum, saved.get("global_batch_size")
    old_accum, old_processes = saved.get("gradient_accumulation_steps"), saved.get("num_processes", "?")
    keep = f"--total_batch_size {old_total}" + (f" --gradient_accumulation_steps {old_accum}" if old_accum else "")
    if old_total is not None and old_total != total:
        raise ValueError(
            f"{resume_dir} was trained with a global batch of {old_total} images ({_processes(old_processes)}), this "
            f"run's is {total} ({_processes(num_processes)} x {per_device} per device x {accum} accumulation): a "
            f"resume continues the same global batch; pass {keep} (leaving --train_batch_size unset)"
        )
    if old_accum is not None and old_accum != accum:
        raise ValueError(
            f"{resume_dir} was trained with gradient_accumulation_steps {old_accum}, this run has {accum}: the "
            f"noise of each micro-step depends on it, so a resume keeps it; pass {keep} (leaving --train_batch_size "
            "unset)"
        )


def load_checkpoint(accelerator, resume_dir: str, state, ema, current: dict, dropout: float) -> None:
    """``accelerator.load_state`` and this package's files of ``resume_dir`` into ``state`` and ``ema``.

    Args:
        current (`dict`): this run's :func:`layout` with ``batches_per_epoch`` (per process).
        dropout (`float`): the model's dropout probability (its masks depend on the layout).
    """
    accelerator.load_state(resume_dir)  # every file was checked by ckpt.verify_checkpoint
    saved = ckpt.read_state(resume_dir)
    state.load_state_dict(saved)
    if ema is not None:
        ckpt.load_ema_state(ema, resume_dir)
    if state.batches_per_epoch != current["batches_per_epoch"]:
        logger.warning(
            "the checkpoint was written with %d batches per epoch and process, this run has %d: the data order "
            "differs from an uninterrupted run",
            state.batches_per_epoch,
            current["batches_per_epoch"],
        )
        state.batches_per_epoch = current["batches_per_epoch"]
    old, new = saved.get("num_processes"), current["num_processes"]
    if old is not None and old != new:
        logger.info(
            "resuming a checkpoint of %d processes on %d: the same global batch of %d, data order and noise continue",
            old,
            new,
            current["global_batch_size"],
        )
        micro = current["global_batch_size"] // current["gradient_accumulation_steps"]
        if not current["drop_last"] and (current["num_train_images"] or 0) % micro and (old == 1) != (new == 1):
            logger.warning(
                "drop_last is off and each epoch of %d images ends with %d left over: one process trains on them "
                "alone, several complete the global micro-batch with the epoch's first images, so after this resume "
                "(%d -> %d processes) the epochs' last batches differ from an uninterrupted run",
                current["num_train_images"],
                current["num_train_images"] % micro,
                old,
                new,
            )
        if dropout:
            logger.warning(
                "dropout %g: its masks depend on the number of processes and differ after this resume", dropout
            )
    logger.info("resumed from %s at step %d (%d images seen)", resume_dir, state.step, state.images_seen)


__all__ = ["check_resume", "layout", "load_checkpoint"]
