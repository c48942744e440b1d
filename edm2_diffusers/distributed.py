"""Process-group set-up shared by training and evaluation."""

from __future__ import annotations

import os

import torch


def cpu_process_group() -> bool:
    """Whether Accelerate must be told it runs on CPU.

    Several launched processes without CUDA only form a (gloo) process group when the ``Accelerator`` is created
    with ``cpu=True``; ``accelerate launch --multi_gpu --num_processes 2`` on a CPU machine relies on this.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
