"""Checkpoint folders of a training run: ``output_dir/checkpoint-<step>/``, written atomically.

A checkpoint is an ``accelerator.save_state`` folder (model weights as safetensors, optimizer, RNG states of every
process) plus files this module writes itself: ``unet_config.json`` (the model's architecture, compared on resume),
``training_state.json`` (the step and data position) and the EMA as ``ema.safetensors`` (its averaged weights) and
``ema_state.json`` (its counters). Nothing is registered with ``accelerator.register_for_checkpointing``, whose
``custom_checkpoint_*.pkl`` files Accelerate unpickles with ``weights_only=False``. It is written under a temporary
name and renamed when complete, so an interrupted save never looks like a checkpoint.

Resuming never runs code from the checkpoint: before ``accelerator.load_state`` every file is checked
(:func:`verify_checkpoint`): safetensors must parse, JSON must parse, torch files must load with
``torch.load(weights_only=True)`` and only the numpy types RNG states need allowed, and any other file is refused.
"""

from __future__ import annotations

import _codecs
import json
import logging
import os
import re
import shutil

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..ema.snapshots import SNAPSHOT_SUBDIR
from ..files import follow_umask, fsync_dir, raise_if_disk_full, remove_leftovers
from ..runs import SAMPLES_SUBDIR

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
UNET_CONFIG_NAME = "unet_config.json"
STATE_NAME = "training_state.json"
EMA_WEIGHTS_NAME = "ema.safetensors"
EMA_STATE_NAME = "ema_state.json"
# What every complete checkpoint holds (Accelerate's model and optimizer, and ours), with the RNG state of at least one
# process: ``random_states_<i>.pkl`` of each process that wrote into it (a node-local copy holds its node's only).
REQUIRED_FILES = (UNET_CONFIG_NAME, STATE_NAME, "model.safetensors", "optimizer.bin")
_RNG_STATE_RE = re.compile(r"^random_states_\d+\.pkl$")
# Accelerate's torch files, loaded with weights_only=True; anything not named here or below is refused.
_TORCH_FILE_RE = re.compile(
    r"^(optimizer|scheduler|sampler|dl_state_dict|pytorch_model|model)(_\d+)?\.bin$|^random_states_\d+\.pkl$|^scaler\.pt$"
)
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


def writes_checkpoints(accelerator) -> bool:
    """Whether this process writes the run folder's checkpoints (and keeps the EMA they hold): the main process, or
    with ``ProjectConfiguration(save_on_each_node=True)`` (``training.save_on_each_node``, node-local disks) the first
    process of every node, each into its own node's ``output_dir``."""
    if accelerator.project_configuration.save_on_each_node:
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def missing_files(checkpoint_dir: str | os.PathLike) -> list[str]:
    """What a checkpoint folder lacks to be complete (an empty list: complete)."""
    missing = [n for n in REQUIRED_FILES if not os.path.isfile(os.path.join(checkpoint_dir, n))]
    if not any(_RNG_STATE_RE.match(n) for n in os.listdir(checkpoint_dir)):
        missing.append("random_states_<process>.pkl")
    has_weights = os.path.isfile(os.path.join(checkpoint_dir, EMA_WEIGHTS_NAME))
    has_state = os.path.isfile(os.path.join(checkpoint_dir, EMA_STATE_NAME))
    if has_weights != has_state:  # the EMA is optional (ema: null), but never half there
        missing.append(EMA_STATE_NAME if has_weights else EMA_WEIGHTS_NAME)
    return missing


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names, or ``None`` to start from scratch.

    ``latest`` picks the newest complete checkpoint in ``output_dir`` (:func:`missing_files`), logging the incomplete
    ones it skips (none at all: start from scratch, as diffusers' examples do, so the same command can start and
    restart a job). A path must be a complete checkpoint folder. The folder found is checked with
    :func:`verify_checkpoint` before it is returned.

    Raises:
        FileNotFoundError: the path does not exist or is not a complete checkpoint (the message names what is missing).
        UnsafeCheckpointError: a file of the checkpoint is not what it should be.
    """
    if not resume:
        return None
    if resume == "latest":
        for _, path in reversed(list_checkpoints(output_dir)):
            missing = missing_files(path)
            if not missing:
                verify_checkpoint(path)
                return path
            logger.warning("skipping the incomplete checkpoint %s (no %s in it)", path, ", ".join(missing))
        return None
    path = resume
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, resume)):
        path = os.path.join(output_dir, resume)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume!r}: no such checkpoint folder")
    missing = missing_files(path)
    if missing:
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume!r} is not a complete training checkpoint "
            f"(no {', '.join(missing)} in it)"
        )
    verify_checkpoint(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Safe loading.


class UnsafeCheckpointError(ValueError):
    """A checkpoint file is not plain data (or not a file a checkpoint holds); nothing of it was loaded."""


def _rng_safe_globals() -> list:
    """The exact non-torch types Accelerate's RNG states pickle: numpy's RNG state array and ``codecs.encode``."""
    found = [_reconstruct, np.ndarray, np.dtype, _codecs.encode]
    if hasattr(np, "dtypes"):
        found.append(np.dtypes.UInt32DType)
    return found


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> None:
    """Check every file of a checkpoint before anything of it is loaded.

    safetensors files must parse as safetensors, JSON files as JSON, Accelerate's torch files (``optimizer.bin``,
    ``random_states_*.pkl``, ``scaler.pt``, ...) must load with ``torch.load(weights_only=True)`` (allowing only
    the numpy types an RNG state needs); any other file or folder is refused, ``custom_checkpoint_*.pkl`` included.

    Raises:
        UnsafeCheckpointError: names the first file that fails and why.
    """
    for name in sorted(os.listdir(checkpoint_dir)):
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path) or os.path.islink(path):
            raise UnsafeCheckpointError(f"checkpoint {checkpoint_dir}: {name} is not a plain file; refusing to resume")
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, "pt") as f:
                    f.metadata()
                    for key in f.keys():
                        f.get_slice(key)
            elif name.endswith(".json"):
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            elif _TORCH_FILE_RE.match(name):
                # numpy's types are allowed for the RNG states alone; every other torch file holds tensors only
                allowed = _rng_safe_globals() if name.startswith("random_states_") else []
                with torch.serialization.safe_globals(allowed):
                    torch.load(path, map_location="cpu", weights_only=True)
            else:
                hint = (
                    " (Accelerate unpickles it with weights_only=False: a checkpoint of an older version of this "
                    "package, or a planted file)"
                    if name.startswith("custom_checkpoint_")
                    else ""
                )
                raise UnsafeCheckpointError(
                    f"checkpoint {checkpoint_dir} holds {name}, which is not a file a checkpoint holds{hint}; "
                    "refusing to resume"
                )
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            globals_named = [line for line in lines if "GLOBAL" in line]  # torch's weights_only refusal
            if globals_named:
                raise UnsafeCheckpointError(
                    f"checkpoint file {path} holds objects that are not tensors or plain data "
                    f"({globals_named[0].rstrip('.')}); loading it would run code, refusing to resume"
                ) from None
            first = lines[0] if lines else type(err).__name__
            raise UnsafeCheckpointError(
                f"checkpoint file {path} is not plain data or is damaged ({type(err).__name__}: {first}); "
                "refusing to resume"
            ) from None


# ----------------------------------------------------------------------------------------------------------------
# The EMA state: tensors in safetensors, everything else in JSON.


def _split(obj, prefix: str, tensors: dict):
    """``obj`` with every tensor replaced by ``{"__tensor__": key}`` and stored in ``tensors[key]``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"EMA state {prefix or '/'} has non-string keys")
        return {k: _split(v, f"{prefix}/{k}" if prefix else k, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{prefix}/{i}" if prefix else str(i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"EMA state {prefix} holds a {type(obj).__name__}, neither a tensor nor plain data")


def _join(obj, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_ema_state(ema, folder: str) -> None:
    """Write ``ema.state_dict()`` as ``ema.safetensors`` (its tensors) and ``ema_state.json`` (the rest)."""
    tensors: dict = {}
    plain = _split(ema.state_dict(), "", tensors)
    save_file(tensors, os.path.join(folder, EMA_WEIGHTS_NAME))
    _write_json(os.path.join(folder, EMA_STATE_NAME), plain)


def load_ema_state(ema, folder: str) -> None:
    """Restore an EMA tracker saved by :func:`save_ema_state` (the files were checked by :func:`verify_checkpoint`)."""
    path = os.path.join(folder, EMA_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {folder} holds no EMA state ({EMA_STATE_NAME}); this run tracks an EMA")
    with open(path, encoding="utf-8") as f:
        plain = json.load(f)
    tensors = load_file(os.path.join(folder, EMA_WEIGHTS_NAME))
    try:
        state = _join(plain, tensors)
    except KeyError as err:
        raise ValueError(f"{path} names tensor {err} that {EMA_WEIGHTS_NAME} does not hold") from None
    ema.load_state_dict(state)


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


def save_checkpoint(accelerator, output_dir: str, step: int, model_config: dict, state: dict, ema=None) -> str:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>`` via a temporary folder; call on every process.

    ``state`` (the training state, plain data) and ``ema`` (the EMA tracker of a writing process, if any) are written
    by this module as JSON and safetensors, never pickled. Every process writes its ``random_states_<i>.pkl``; the
    rest, and the rename, is the main process's, or each node's first process's with ``save_on_each_node``
    (:func:`writes_checkpoints`).

    Returns:
        `str`: the checkpoint folder.
    """
    writer = writes_checkpoints(accelerator)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if writer and os.path.exists(tmp):
        shutil.rmtree(tmp)  # left over by a run killed while saving
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        if writer:
            _write_json(os.path.join(tmp, UNET_CONFIG_NAME), dict(model_config))
            _write_json(os.path.join(tmp, STATE_NAME), state)
            if ema is not None:
                save_ema_state(ema, tmp)
            follow_umask(tmp)  # safetensors writes 0600; files follow the umask like save_pretrained's
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)  # the earlier checkpoints are untouched
        raise_if_disk_full(err, final)
        raise
    accelerator.wait_for_everyone()
    if writer:
        old = None
        if os.path.exists(final):  # resumed from an earlier checkpoint: replace the later one
            old = os.path.join(output_dir, f".old-checkpoint-{step}")
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(output_dir)
        if old is not None:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_run_leftovers(output_dir: str) -> list[str]:
    """What killed runs left in a run folder whose lock this process holds: ``.tmp-checkpoint-*`` folders, and the
    temporary files and staging folders of dead writers in it, ``phema/`` and ``samples/``
    (:func:`edm2_diffusers.files.remove_leftovers`); returns what was removed."""
    removed = []
    if os.path.isdir(output_dir):
        for name in sorted(os.listdir(output_dir)):
            if name.startswith(".tmp-checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                removed.append(os.path.join(output_dir, name))
    for folder in (output_dir, os.path.join(output_dir, SNAPSHOT_SUBDIR), os.path.join(output_dir, SAMPLES_SUBDIR)):
        removed += remove_leftovers(folder, locked=True)
    return removed


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


__all__ = [
    "UnsafeCheckpointError",
    "check_architecture",
    "list_checkpoints",
    "load_ema_state",
    "missing_files",
    "prune_checkpoints",
    "read_state",
    "remove_run_leftovers",
    "resolve_resume",
    "save_checkpoint",
    "save_ema_state",
    "verify_checkpoint",
    "writes_checkpoints",
]
