"""What a training run carries from step to step and returns: counters, the result, the per-micro-step seed."""

from __future__ import annotations

from dataclasses import dataclass, field

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
        ema: the EMA tracker on the main process (``None`` elsewhere or when disabled; with
            ``training.save_on_each_node`` also on the first process of every node, which checkpoints it).
        step (`int`): optimizer steps done.
        images_seen (`int`): training images seen over all processes.
        output_dir (`str`): the run folder.
        last_checkpoint (`str`, *optional*): the newest checkpoint folder.
        sample_grids (`list[str]`): sample grid PNGs written by this call.
        pipeline_dir (`str`, *optional*): the exported pipeline (``output_dir/pipeline``; main process only).
        is_main_process (`bool`): whether this process is the main one (the one that exports).
        compile_stats (`dict`, *optional*): compiled runs: graphs compiled by the first training step and the first
            sample grid, and the recompilations after them (:class:`~edm2_diffusers.training.compile.CompileWatch`).
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
    compile_stats: dict | None = None


__all__ = ["NonFiniteLossError", "TrainingResult", "TrainingState"]
