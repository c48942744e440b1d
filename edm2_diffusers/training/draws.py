"""The random draws of a training micro-step: one seed per (seed, step, micro-step), drawn for the global batch.

Every random draw of a micro-step (flips, σ, ε, the latent sample) comes from a seed derived from (seed, step,
micro-step), so a resumed run continues bit-for-bit, and is made for the whole global micro-batch with each process
keeping its rows, so two processes draw what one draws for the same global batch.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import random_flip
from .loss import sigma_from_normal


def micro_step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """A 63-bit seed for one micro-step of one process, independent of everything that ran before it."""
    state = np.random.SeedSequence([seed, step, micro, process]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class GlobalBatchDraws:
    """The random draws of one micro-step, made for the whole global micro-batch; each process keeps its rows.

    Every process seeds the same stream (:func:`micro_step_seed` of process 0) and draws the rows of all processes,
    so that a sample's flip, σ and ε do not depend on how the global batch is split across processes: a run on two
    processes sees the draws of a run on one with the same global batch (and a one-process run draws exactly what it
    drew before, when each process had its own stream).

    Args:
        world (`int`), rank (`int`): number of processes and this process's index.
        rows (`int`): this process's rows (the same on every process).
        device (`torch.device`): where to draw.
    """

    def __init__(self, world: int, rank: int, rows: int, device):
        self.world, self.rank, self.rows, self.device = world, rank, rows, device

    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        return full[self.rank * self.rows : (self.rank + 1) * self.rows]

    def rand(self, *shape: int) -> torch.Tensor:
        """Uniform draws in [0, 1) of shape ``(rows, *shape)``."""
        return self._mine(torch.rand((self.world * self.rows, *shape), device=self.device))

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal draws of shape ``(rows, *shape)``."""
        return self._mine(torch.randn((self.world * self.rows, *shape), device=self.device))


def micro_batch(cfg: dict, batch: dict, standardizer, step: int, micro: int, world: int, rank: int) -> tuple:
    """Images (a fresh latent z = mean + std·ε for latent data, flipped), σ and ε of one micro-step.

    The draws of the global micro-batch come from one seed, each process keeping its rows (:class:`GlobalBatchDraws`).
    """
    train_cfg = cfg["training"]
    torch.manual_seed(micro_step_seed(train_cfg["seed"], step, micro, 0))
    images = batch["latent_moments"] if standardizer is not None else batch["pixel_values"]
    draws = GlobalBatchDraws(world, rank, images.shape[0], images.device)
    if standardizer is not None:
        images = standardizer.sample(images, noise=draws.randn(images.shape[1] // 2, *images.shape[2:]))
    if cfg["data"]["random_flip"]:
        images = random_flip(images, uniform=draws.rand())
    sigma = sigma_from_normal(draws.randn(), train_cfg["P_mean"], train_cfg["P_std"])
    noise = draws.randn(*images.shape[1:])
    if world > 1:  # dropout draws from the process's own stream
        torch.manual_seed(micro_step_seed(train_cfg["seed"], step, micro, rank))
    return images, sigma, noise


__all__ = ["GlobalBatchDraws", "micro_batch", "micro_step_seed"]
