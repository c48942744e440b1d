"""Checkpoint folders of a training run: ``output_dir/checkpoint-<step>/``, written atomically.

A checkpoint is an ``accelerator.save_state`` folder (model weights as safetensors, optimizer, RNG states of every
process, the registered training and EMA state) plus ``unet_config.json`` (the model's architecture, compared on
resume) and ``training_state.json`` (the step and data position, for people). It is written under a temporary name
and renamed when complete, so an interrupted save never looks like a checkpoint and ``latest`` skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
UNET_CONFIG_NAME = "unet_config.json"
STATE_NAME = "training_state.json"
# Keys of a diffusers config that are bookkeeping, not architecture.
_NOT_ARCHITECTURE = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"}


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names, or ``None`` to start from scratch.

    ``latest`` picks the newest complete checkpoint in ``output_dir`` (none yet: start from scratch, as diffusers'
    examples do, so the same command can start and restart a job). A path must be a checkpoint folder.

    Raises:
        FileNotFoundError: the path does not exist or is not a checkpoint of this package.
    """
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = resume
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, resume)):
        path = os.path.join(output_dir, resume)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r}: no such checkpoint folder")
    for name in (UNET_CONFIG_NAME, STATE_NAME):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume!r} is not a complete training checkpoint (no {name} in it)"
            )
    return path


def architecture(config: dict) -> dict:
    """The architecture-defining part of a model config (JSON-normalised, bookkeeping keys dropped)."""
    return {k: v for k, v in json.loads(json.dumps(dict(config))).items() if k not in _NOT_ARCHITECTURE}


def check_architecture(checkpoint_dir: str, model_config: dict) -> None:
    """Raise ``ValueError`` if the checkpoint was written for a different model than ``model_config``."""
    with open(os.path.join(checkpoint_dir, UNET_CONFIG_NAME), encoding="utf-8") as f:
        stored = architecture(json.load(f))
    current = architecture(model_config)
    diffs = [
        f"{key}: checkpoint {stored.get(key)!r} vs config {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {checkpoint_dir!r} holds a different architecture than the config: " + "; ".join(diffs)
        )


def read_state(checkpoint_dir: str) -> dict:
    """The human-readable training state stored with a checkpoint."""
    with open(os.path.join(checkpoint_dir, STATE_NAME), encoding="utf-8") as f:
        return json.load(f)


def save_checkpoint(accelerator, output_dir: str, step: int, model_config: dict, state: dict) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>`` via a temporary folder; call on every process.

    Returns:
        `str`: the checkpoint folder.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left over by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        _write_json(os.path.join(tmp, UNET_CONFIG_NAME), dict(model_config))
        _write_json(os.path.join(tmp, STATE_NAME), state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = None
        if os.path.exists(final):  # resumed from an earlier checkpoint: replace the later one
            old = os.path.join(output_dir, f".old-checkpoint-{step}")
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
        if old is not None:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str, total_limit: int | None) -> list[str]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain; return the deleted folders."""
    if not total_limit:
        return []
    found = list_checkpoints(output_dir)
    removed = []
    for _, path in found[: max(len(found) - total_limit, 0)]:
        shutil.rmtree(path)
        removed.append(path)
    return removed


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "check_architecture",
    "list_checkpoints",
    "prune_checkpoints",
    "read_state",
    "resolve_resume",
    "save_checkpoint",
]
