"""Several nodes: which process writes the run folder, and checks that every process sees the folder it should.

Accelerate starts the same program on every node (``accelerate launch --num_machines N --machine_rank R``); this
module makes the run folder's writers explicit (see the README, "Training on several nodes"):

* a **shared filesystem** (the default): the main process (rank 0) writes everything, every process writes its own
  ``random_states_<rank>.pkl`` into the checkpoint being saved, and every process must see the main process's run
  lock in ``output_dir`` (:func:`check_run_folder`), else the folder is not shared and the run stops;
* **node-local disks** (``training.save_on_each_node``, Accelerate's ``ProjectConfiguration(save_on_each_node=True)``):
  the first process of every node locks its node's ``output_dir`` and writes a complete checkpoint there (model,
  optimizer, training state and the EMA, which it tracks too); the main process alone writes EMA snapshots, sample
  grids, ``run.json``, ``config.yaml`` and the export. Each process must then see its own node's lock.

Every process resolves ``--resume_from_checkpoint`` in its own ``output_dir``; :func:`resolve_resume` makes them
agree on the step (and report one failure everywhere), so that no process starts from scratch while another resumes.
"""

from __future__ import annotations

import logging
import os
import socket

from accelerate.utils import gather_object

from ..run_lock import lock_path, read_holder
from . import checkpoint as ckpt
from .rewind import move_aside

logger = logging.getLogger(__name__)  # plain logging: these messages come from a node's first process

_NOT_SHARED = (
    "put output_dir on a filesystem every node mounts, or set training.save_on_each_node (--save_on_each_node) so "
    "that the first process of every node writes complete checkpoints into its own node's output_dir"
)


def _gather(accelerator, item) -> list:
    return gather_object([item]) if accelerator.num_processes > 1 else [item]


def resolve_resume(accelerator, resume: str | None, output_dir: str) -> str | None:
    """The checkpoint to resume from (:func:`.checkpoint.resolve_resume`), found in each process's ``output_dir``.

    Also refuses a fresh start in a folder that already holds checkpoints. Every process must find a checkpoint of
    the same step (a node-local copy is another path with the same step), or all stop with the same message.

    Raises:
        ValueError / FileNotFoundError / UnsafeCheckpointError: as :func:`.checkpoint.resolve_resume`, raised on
            every process (the others name the process that failed), or the processes found different checkpoints.
    """
    error, step = None, None
    try:
        path = ckpt.resolve_resume(resume, output_dir)
        if path is None and ckpt.list_checkpoints(output_dir):
            raise ValueError(
                f"{output_dir!r} already holds checkpoints of another run; pass --resume_from_checkpoint latest to "
                "continue it, or choose a fresh --output_dir"
            )
        step = int(ckpt.read_state(path)["step"]) if path is not None else None
    except Exception as err:  # every process must hear of it, whatever it is
        error, path = err, None
    where = f"process {accelerator.process_index} on {socket.gethostname()}"
    found = _gather(accelerator, (where, None if error is None else str(error), step, path))
    if error is not None:
        raise error
    failed = [(who, problem) for who, problem, _, _ in found if problem is not None]
    if failed:
        raise ValueError(f"{failed[0][0]} cannot resume: {failed[0][1]}")
    if len({s for _, _, s, _ in found}) > 1:
        listed = "; ".join(f"{who}: {p if p is not None else 'none'}" for who, _, _, p in found)
        raise ValueError(
            f"the processes found different checkpoints to resume from ({listed}). On a shared filesystem every "
            "process must see the same output_dir; with node-local disks (training.save_on_each_node) every node "
            "needs its copy of the same checkpoint"
        )
    return path


def check_run_folder(accelerator, output_dir: str) -> None:
    """After the run lock is taken: every process sees the lock of the process that writes its ``output_dir``.

    Raises:
        ValueError: on every process, naming the first that does not (a folder that is not shared by the nodes
            without ``save_on_each_node``, or one shared by them with it).
    """
    if accelerator.num_processes == 1:
        return
    per_node = accelerator.project_configuration.save_on_each_node
    holder = read_holder(lock_path(output_dir)) or {}
    me = (socket.gethostname(), os.getpid())
    seen = (holder.get("host"), holder.get("pid"))
    mine = (accelerator.process_index, accelerator.local_process_index, me, seen, os.path.abspath(output_dir))
    found = _gather(accelerator, mine)
    identity = {index: who for index, _, who, _, _ in found}
    for index, local_index, who, lock_holder, folder in found:
        writer = index - local_index if per_node else 0  # ranks are numbered node by node
        if lock_holder == identity[writer]:
            continue
        sees = f"pid {lock_holder[1]} on {lock_holder[0]}" if lock_holder[1] is not None else "no lock"
        if per_node:
            raise ValueError(
                f"process {index} on {who[0]} sees {folder} locked by {sees}, not by its node's first process "
                f"{writer}: with training.save_on_each_node every node needs its own output_dir (node-local disks); "
                "on a shared filesystem leave save_on_each_node off"
            )
        raise ValueError(
            f"process {index} on {who[0]} does not see the run lock of the main process (pid {identity[0][1]} on "
            f"{identity[0][0]}) in {folder}, it sees {sees}: output_dir is not shared by all nodes; {_NOT_SHARED}"
        )


def prepare_node_folder(output_dir: str, rewind: list[str]) -> None:
    """On a node's first process that is not the main one (``save_on_each_node``), with its folder locked: remove
    what killed runs left, and move aside what a rewind abandons (``rewind``: found in this node's folder)."""
    for path in ckpt.remove_run_leftovers(output_dir):
        logger.info("removed %s, left by an interrupted run", path)
    if rewind:
        name, moved = move_aside(output_dir, rewind)
        logger.warning("rewound this node's copy: moved %d entries into %s", len(moved), name)


__all__ = ["check_run_folder", "prepare_node_folder", "resolve_resume"]
