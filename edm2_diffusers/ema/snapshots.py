"""EMA snapshot files: the raw material of post-hoc EMA reconstruction.

Every `snapshot_every_steps` optimizer steps the trainer's main process writes each tracked power-function profile
as `<output_dir>/phema/phema-<step:09d>-<std:.3f>.safetensors`. A file holds the averaged parameters (optionally in
float16) and buffers; its safetensors metadata records what reconstruction needs: the training step, the images
seen, the EMA clock value the profile was tracked with (`time`), the profile's std, the model class, the full model
config and a fingerprint of that config (so snapshots of different models never get mixed). A trainer's snapshots
also carry the run's identity (`run_id`, written once when the run starts) and its branch (`branch`, new at each
rewind to an earlier checkpoint, with the `lineage` of branches that led to it), so that reconstruction never mixes
two runs or two trajectories of one run, even of the same architecture (:func:`snapshot_tags`, :func:`branch_at`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files import atomic_path

SNAPSHOT_SUBDIR = "phema"
SNAPSHOT_FORMAT = "edm2-diffusers/phema-snapshot"
SNAPSHOT_FORMAT_VERSION = "1"
SNAPSHOT_NAME_RE = re.compile(r"phema-(\d+)-(\d+\.\d+)\.safetensors")
_REQUIRED_KEYS = ("format", "step", "nimg", "time", "count_by", "std", "model_class", "model_config", "fingerprint")

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype, name: str = "snapshot dtype") -> torch.dtype:
    """Map `"float32"`/`"float16"`/`"bfloat16"` (or a `torch.dtype`) to the `torch.dtype` snapshots are stored in."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported {name} {dtype!r}; choose one of {sorted(set(DTYPES))}")


def snapshot_filename(step: int, std: float) -> str:
    """File name of the snapshot of profile `std` at optimizer step `step`."""
    return f"phema-{int(step):09d}-{float(std):.3f}.safetensors"


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def model_config_of(model: torch.nn.Module) -> dict:
    """The constructor config of a diffusers-style model (public keys only), or `{}` for a plain `nn.Module`."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        return {}
    return _jsonable({k: v for k, v in config.items() if not str(k).startswith("_")})


def canonical_config_json(config: dict) -> str:
    """Canonical JSON of a model config: sorted keys, no whitespace. Its sha256 is the config fingerprint."""
    return json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"), allow_nan=False)


def config_fingerprint(config: dict) -> str:
    """sha256 hex digest of `canonical_config_json(config)`."""
    return hashlib.sha256(canonical_config_json(config).encode("utf-8")).hexdigest()


def model_class_path(model: torch.nn.Module) -> str:
    """Qualified class name (`module.Class`) recorded in snapshots so reconstruction can rebuild the model."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def snapshot_tags(run_id: str, lineage: list) -> dict[str, str]:
    """The metadata that ties a snapshot to its run and branch.

    Args:
        run_id (`str`): the run's identity.
        lineage (`list`): ``[[branch, from_step], ...]``, oldest first: branch ``lineage[i][0]`` made the optimizer
            steps after ``lineage[i][1]`` (up to the next entry's); the last entry is the branch writing now.
    """
    lineage = [[str(b), int(k)] for b, k in lineage]
    return {"run_id": str(run_id), "branch": lineage[-1][0], "lineage": canonical_config_json(lineage)}


def branch_at(lineage: list, step: int) -> str:
    """The branch of ``lineage`` that made optimizer step ``step`` (the weights after it)."""
    branch = lineage[0][0]
    for name, from_step in lineage:
        if from_step < step:
            branch = name
    return branch


def write_snapshot(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write a safetensors file atomically (:func:`edm2_diffusers.files.atomic_path`), with the mode the umask gives.

    A crash mid-write leaves at most a hidden `.tmp-<pid>` file (removed when a run restarts), never a truncated
    snapshot under the real name; a full disk raises `DiskFullError` naming the file.
    """
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    return path


@dataclass
class SnapshotInfo:
    """What a snapshot's header says about it (read without loading its tensors).

    Args:
        path (`str`): the file.
        step (`int`): optimizer step the snapshot was taken at.
        nimg (`int`): training images seen at that step.
        time (`float`): value of the EMA clock the profile was tracked with (steps or images, see `count_by`).
        count_by (`str`): `"images"` or `"steps"`.
        std (`float`): relative standard deviation of the stored power-function profile.
        model_class (`str`): qualified class name of the model.
        model_config (`dict`): the model's constructor config.
        fingerprint (`str`): sha256 of the canonical config JSON.
        buffer_names (`list[str]`): keys that are buffers (copied, not averaged, by reconstruction).
        run_id (`str`, *optional*): the run that wrote it (`None`: written outside a trainer or by an older version).
        branch (`str`, *optional*): the branch of the run that wrote it.
        lineage (`list`, *optional*): the branches that led to it (see :func:`snapshot_tags`).
    """

    path: str
    step: int
    nimg: int
    time: float
    count_by: str
    std: float
    model_class: str
    model_config: dict
    fingerprint: str
    buffer_names: list = field(default_factory=list)
    run_id: str | None = None
    branch: str | None = None
    lineage: list | None = None


def read_snapshot_info(path: str) -> SnapshotInfo:
    """Read and validate the header of snapshot `path`; a truncated, corrupt or foreign file raises `ValueError`."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"EMA snapshot {path} is truncated or corrupt: {e}") from e
    missing = [k for k in _REQUIRED_KEYS if k not in meta]
    if missing or meta.get("format") != SNAPSHOT_FORMAT:
        what = missing or "format"
        raise ValueError(f"{path} is not a post-hoc EMA snapshot of this project (missing metadata {what})")
    try:
        config = json.loads(meta["model_config"])
        info = SnapshotInfo(
            path=path,
            step=int(meta["step"]),
            nimg=int(meta["nimg"]),
            time=float(meta["time"]),
            count_by=meta["count_by"],
            std=float(meta["std"]),
            model_class=meta["model_class"],
            model_config=config,
            fingerprint=meta["fingerprint"],
            buffer_names=json.loads(meta.get("buffer_names", "[]")),
            run_id=meta.get("run_id"),
            branch=meta.get("branch"),
            lineage=json.loads(meta["lineage"]) if "lineage" in meta else None,
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"EMA snapshot {path} has corrupt metadata: {e}") from e
    if config_fingerprint(info.model_config) != info.fingerprint:
        raise ValueError(f"EMA snapshot {path} is corrupt: its model config does not match its fingerprint")
    return info


def load_snapshot(path: str) -> dict[str, torch.Tensor]:
    """Load all tensors of snapshot `path` on the CPU. This is the one place reconstruction reads tensor data."""
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"EMA snapshot {path} is truncated or corrupt: {e}") from e
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"EMA snapshot {path} is corrupt: tensor {name!r} holds non-finite values")
    return tensors


def snapshot_dir(run_dir: str) -> str:
    """The folder holding a run's snapshots: `run_dir/phema`, or `run_dir` itself when it already is that folder."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    sub = os.path.join(run_dir, SNAPSHOT_SUBDIR)
    if os.path.isdir(sub):
        return sub
    if any(SNAPSHOT_NAME_RE.fullmatch(n) for n in os.listdir(run_dir)):
        return run_dir
    raise FileNotFoundError(
        f"no post-hoc EMA snapshots in {run_dir}: expected {SNAPSHOT_SUBDIR}/phema-<step>-<std>.safetensors "
        "(train with the power-function EMA and ema.snapshot_every_steps > 0)"
    )


def list_snapshots(run_dir: str) -> list[SnapshotInfo]:
    """Headers of all snapshots of a run, sorted by (step, std). Raises if there are none or one is unreadable."""
    directory = snapshot_dir(run_dir)
    names = sorted(n for n in os.listdir(directory) if SNAPSHOT_NAME_RE.fullmatch(n))
    if not names:
        raise FileNotFoundError(f"no post-hoc EMA snapshots (phema-<step>-<std>.safetensors) in {directory}")
    infos = [read_snapshot_info(os.path.join(directory, n)) for n in names]
    return sorted(infos, key=lambda s: (s.step, s.std))
