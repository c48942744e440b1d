"""What a training run carries from step to step and returns: counters, the result, the per-micro-step seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..models import EDM2UNet2DModel


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without writing anything after the last good checkpoint."""


class TrainingState:
    """Counters saved in every checkpoint (as ``training_state.json``, see :mod:`.checkpoint`).

    Args:
        step (`int`): optimizer steps done.
        images_seen (`int`): training images seen over all processes.
        batches_per_epoch (`int`): per-process batches in one epoch (to detect a changed data layout on resume).
    """

    def __init__(self, step: int = 0, images_seen: int = 0, batches_per_epoch: int = 0):
        self.step = step
        self.images_seen = images_seen
        self.batches_per_epoch = batches_per_epoch

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen, "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.batches_per_epoch = int(state["batches_per_epoch"])


@dataclass
class TrainingResult:
    """What :func:`train` returns.

    Args:
        unet (`EDM2UNet2DModel`): the trained (raw, not averaged) model, unwrapped.
        ema: the EMA tracker on the main process (``None`` elsewhere or when disabled).
        step (`int`): optimizer steps done.
        images_seen (`int`): training images seen over all processes.
        output_dir (`str`): the run folder.
        last_checkpoint (`str`, *optional*): the newest checkpoint folder.
        sample_grids (`list[str]`): sample grid PNGs written by this call.
        pipeline_dir (`str`, *optional*): the exported pipeline (``output_dir/pipeline``; main process only).
        is_main_process (`bool`): whether this process is the main one (the one that exports).
    """

    unet: EDM2UNet2DModel
    ema: object | None
    step: int
    images_seen: int
    output_dir: str
    last_checkpoint: str | None = None
    sample_grids: list[str] = field(default_factory=list)
    pipeline_dir: str | None = None
    is_main_process: bool = True


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


__all__ = ["GlobalBatchDraws", "NonFiniteLossError", "TrainingResult", "TrainingState", "micro_step_seed"]
