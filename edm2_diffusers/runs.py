"""The files of a training run's folder, read and written in one place.

A run folder (``--output_dir``) holds::

    config.yaml          the resolved training configuration        read_run_config / write_run_config
    run.json             the run's identity, branches and resumes   read_run_record / write_run_record
    latent_info.json     a latent run's standardization constants   read_run_latent_info / write_run_latent_info
    checkpoint-<step>/   Accelerate state (training.checkpoint)
    phema/               post-hoc EMA snapshots (ema.snapshots)
    samples/             sample grids
    sweep/best.json      the EMA sweep's result                    read_sweep (written by evaluation.sweep)
    pipeline/            the run's default export                  pipeline_dir

and the sampler a run's pipelines use is built from its config here (:func:`scheduler_from_config`).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import math
import os
import uuid
from pathlib import Path

import torch
import yaml

from .files import write_json_atomic, write_text_atomic
from .latents import LATENT_FINAL_STD, LatentStandardizer
from .pipelines import EDM2Pipeline
from .schedulers import EDMHeunScheduler

CONFIG_NAME = "config.yaml"
LATENT_INFO_NAME = "latent_info.json"
RUN_RECORD_NAME = "run.json"
RUN_RECORD_FORMAT = "edm2-diffusers/run"
# Where the run lives and how it starts, not how it trains: not recorded as changed on resume (a run folder may move).
_NOT_SETTINGS = ("training.output_dir", "training.resume_from_checkpoint", "training.rewind")
PIPELINE_SUBDIR = "pipeline"
SAMPLES_SUBDIR = "samples"
SWEEP_SUBDIR = "sweep"
SWEEP_BEST_NAME = "best.json"

# Keys of the config's ``sampling`` section that are arguments of the scheduler.
_SCHEDULER_KEYS = tuple(k for k in inspect.signature(EDMHeunScheduler.__init__).parameters if k != "self")
# The settings every export records; other scheduler options only when the run's config sets them.
_CORE_KEYS = ("sigma_min", "sigma_max", "rho", "sigma_data", "s_churn")


# ----------------------------------------------------------------------------------------------------------------
# config.yaml


def read_run_config(run_dir: str | os.PathLike) -> tuple[Path | None, dict]:
    """The run's ``config.yaml``, parsed: ``(path, config)``, or ``(None, {})`` when the run has none.

    Raises:
        ValueError: the file is not valid YAML or not a mapping.
    """
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return None, {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"run config {path} is not valid YAML: {err}") from None
    if cfg is None:
        return path, {}
    if not isinstance(cfg, dict):
        raise ValueError(f"run config {path} does not hold a mapping of config sections")
    return path, cfg


def write_run_config(run_dir: str | os.PathLike, cfg: dict) -> str:
    """Store the resolved configuration as ``run_dir/config.yaml`` (atomically)."""
    return write_text_atomic(Path(run_dir) / CONFIG_NAME, yaml.safe_dump(cfg, sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# run.json: who the run is, which branch writes now, what changed at each resume


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_record() -> dict:
    """The record of a run that starts now: a fresh ``run_id`` and its first branch, from step 0.

    ``lineage`` lists the branches that made the current trajectory, ``[{"branch", "from_step", "created"}]``
    oldest first (branch i made the optimizer steps after its ``from_step``); ``rewinds`` and ``resumes`` are the
    run's history (:func:`record_rewind`, :func:`record_resume`).
    """
    now = utc_now()
    return {
        "format": RUN_RECORD_FORMAT,
        "run_id": uuid.uuid4().hex,
        "created": now,
        "lineage": [{"branch": uuid.uuid4().hex[:12], "from_step": 0, "created": now}],
        "rewinds": [],
        "resumes": [],
    }


def read_run_record(run_dir: str | os.PathLike) -> dict | None:
    """The run's ``run.json`` (``None``: a run started by an older version, or no run).

    Raises:
        ValueError: the file is damaged (the message names it).
    """
    path = Path(run_dir) / RUN_RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != RUN_RECORD_FORMAT or not record["lineage"]:
            raise ValueError("not a run record of this package")
        lineage_of(record)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"run record {path} is damaged ({err}); restore it or remove it") from None
    return record


def write_run_record(run_dir: str | os.PathLike, record: dict) -> str:
    """Store the run record as ``run_dir/run.json`` (atomically)."""
    return write_json_atomic(Path(run_dir) / RUN_RECORD_NAME, record)


def lineage_of(record: dict) -> list[list]:
    """``[[branch, from_step], ...]`` of the current trajectory (what snapshots carry)."""
    return [[str(b["branch"]), int(b["from_step"])] for b in record["lineage"]]


def record_rewind(record: dict, step: int, moved_to: str, moved: list[str]) -> str:
    """A rewind to the checkpoint of ``step``: the branches after it end, a new one starts there. Returns its id."""
    now = utc_now()
    ended = [b["branch"] for b in record["lineage"] if b["from_step"] >= step] or [record["lineage"][-1]["branch"]]
    record["lineage"] = [b for b in record["lineage"] if b["from_step"] < step]
    branch = uuid.uuid4().hex[:12]
    record["lineage"].append({"branch": branch, "from_step": int(step), "created": now})
    record["rewinds"].append(
        {"step": int(step), "time": now, "abandoned_branches": ended, "moved_to": moved_to, "moved": moved}
    )
    return branch


def _flat(cfg: dict) -> dict:
    normal = yaml.safe_load(yaml.safe_dump(cfg, sort_keys=True))  # the types config.yaml stores
    out = {}
    for section, values in (normal or {}).items():
        if isinstance(values, dict):
            out.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            out[section] = values
    return out


def config_overrides(stored: dict, current: dict) -> dict:
    """The settings whose value differs between the stored ``config.yaml`` and the config of a resume, as
    ``{"section.key": {"from": old, "to": new}}`` (how to start — the checkpoint, ``rewind`` — is not a setting)."""
    old, new = _flat(stored), _flat(current)
    return {
        key: {"from": old.get(key), "to": new.get(key)}
        for key in sorted(set(old) | set(new))
        if key not in _NOT_SETTINGS and old.get(key) != new.get(key)
    }


def record_resume(record: dict, step: int, checkpoint: str, overrides: dict) -> None:
    """A resume from ``checkpoint`` (at optimizer step ``step``): its overrides hold for the steps after ``step``."""
    entry = {"step": int(step), "checkpoint": checkpoint, "time": utc_now(), "overrides": overrides}
    entry["branch"] = record["lineage"][-1]["branch"]
    record["resumes"].append(entry)


def run_history(run_dir: str | os.PathLike, step: int | None = None) -> dict | None:
    """What an export of the run records of its history: the run id, the branch, the resumes that changed settings
    and the rewinds on the trajectory up to ``step`` (``None`` for a run without ``run.json``)."""
    try:
        record = read_run_record(run_dir)
    except ValueError:
        return None
    if record is None:
        return None
    lineage = lineage_of(record)

    def made_by(step_after: int) -> str:  # the branch of the trajectory that made this optimizer step
        return [b for b, from_step in lineage if from_step < step_after][-1] if step_after > 0 else lineage[0][0]

    changes = [
        {"step": r["step"], "overrides": r["overrides"]}
        for r in record.get("resumes", [])
        if r.get("overrides") and r.get("branch") == made_by(r["step"] + 1) and (step is None or r["step"] < step)
    ]
    return {
        "run_id": record["run_id"],
        "branch": record["lineage"][-1]["branch"],
        "lineage": lineage,
        "changed_on_resume": changes,
        "rewinds": [{"step": r["step"], "moved_to": r["moved_to"]} for r in record.get("rewinds", [])],
    }


# ----------------------------------------------------------------------------------------------------------------
# latent_info.json


def write_run_latent_info(run_dir: str | os.PathLike, info: dict) -> str:
    """Record a latent run's standardization constants as ``run_dir/latent_info.json`` (atomically).

    The export reads them back (:func:`read_run_latent_info`) and gives them to the pipeline, so a pipeline decodes
    with the constants its model was trained with.

    Args:
        run_dir (`str` or `os.PathLike`): the run folder.
        info (`dict`): :func:`edm2_diffusers.data.read_latent_info` of the training dataset.
    """
    record = {k: v for k, v in info.items() if k != "standardizer"}
    record.update(info["standardizer"].to_dict())
    return write_json_atomic(Path(run_dir) / LATENT_INFO_NAME, record)


def read_run_latent_info(run_dir: str | os.PathLike) -> dict | None:
    """The constants a latent run recorded (``latent_mean``, ``latent_std``, ``final_std``, ...), ``None`` for a
    pixel-space run.

    Raises:
        ValueError: the file exists but does not hold valid constants.
    """
    path = Path(run_dir) / LATENT_INFO_NAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        LatentStandardizer.from_dict(info)  # validates
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} does not hold latent standardization constants: {err}") from None
    info.setdefault("final_std", LATENT_FINAL_STD)
    return info


# ----------------------------------------------------------------------------------------------------------------
# pipeline/ and sweep/best.json


def pipeline_dir(run_dir: str | os.PathLike) -> str:
    """Where a run's default export goes: ``run_dir/pipeline``."""
    return os.path.join(os.fspath(run_dir), PIPELINE_SUBDIR)


def sweep_best_path(run_dir: str | os.PathLike, sweep_dir: str | os.PathLike | None = None) -> Path:
    """The EMA sweep's ``best.json``: in ``sweep_dir`` (a folder, or the file itself), else ``run_dir/sweep``."""
    if sweep_dir is not None:
        path = Path(sweep_dir)
        return path if path.is_file() else path / SWEEP_BEST_NAME
    return Path(run_dir) / SWEEP_SUBDIR / SWEEP_BEST_NAME


def _as_float(value, what: str, path: Path) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} must be a number, got {value!r}") from None


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_sweep(run_dir: str | os.PathLike, sweep_dir: str | os.PathLike | None = None, required: bool = True) -> dict:
    """Read the EMA sweep's ``best.json`` (written by :func:`edm2_diffusers.evaluation.sweep.sweep_ema`).

    Format: ``{"std": 0.1, "metric": "fid", "value": 3.2, "step": 4000, "results": [{"std": 0.05, "fid": 3.9,
    "confident": 0.93}, ...], "settings": {...}}``. Every numeric key of a ``results`` row other than ``std`` is a
    metric of that std; ``metric``/``value`` give the best std's.

    Args:
        run_dir (`str` or `os.PathLike`): the run folder; the default location is ``run_dir/sweep/best.json``.
        sweep_dir (`str` or `os.PathLike`, *optional*): the sweep's folder (or its ``best.json``).
        required (`bool`): raise if the file is missing (else return ``{}``).

    Returns:
        `dict`: ``{"std": float, "metric": str | None, "step": int | None, "metrics": {std: {name: value}},
        "sampler": dict | None, "cheapest": dict | None, "samplers": list, "settings": dict, "path": str}``;
        ``sampler`` and ``cheapest`` (scheduler class name, ``num_inference_steps``, ``nfe``; ``cheapest`` also
        ``std``, ``value``, ``margin``) are ``None`` for sweeps that did not record them; ``samplers`` lists every
        evaluated std and sampler (empty for those sweeps).
    """
    path = sweep_best_path(run_dir, sweep_dir)
    if not path.is_file():
        if required:
            raise FileNotFoundError(
                f"stds='best' needs the EMA sweep's result {path}; run the sweep first (examples/sweep_ema.py), "
                "point --sweep_dir at its folder, or pass the stds explicitly"
            )
        return {}
    try:
        best = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(best, dict) or best.get("std") is None:
        raise ValueError(f"{path} names no best EMA std (expected a JSON object with a key 'std')")
    std = _as_float(best["std"], "the best std", path)
    metrics: dict[float, dict] = {}
    for row in best.get("results") or []:
        if not isinstance(row, dict) or "std" not in row:
            continue
        values = {k: float(v) for k, v in row.items() if k != "std" and _finite_number(v)}
        if values:
            metrics.setdefault(_as_float(row["std"], "std", path), {}).update(values)
    metric, value = best.get("metric"), best.get("value")
    if isinstance(metric, str) and _finite_number(value):
        metrics.setdefault(std, {})[metric] = float(value)
    step = best.get("step")
    return {
        "std": std,
        "metric": metric if isinstance(metric, str) else None,
        "step": int(step) if isinstance(step, (int, float)) else None,
        "metrics": metrics,
        "sampler": _sweep_sampler(best.get("sampler"), path),
        "cheapest": _sweep_sampler(best.get("cheapest"), path),
        "samplers": [r for r in best.get("samplers") or [] if isinstance(r, dict)],  # each std and sampler's row
        "settings": best.get("settings") if isinstance(best.get("settings"), dict) else {},
        "path": str(path),
    }


def _sweep_sampler(entry, path: Path) -> dict | None:
    """A sampler of ``best.json`` (``sampler``: the best's; ``cheapest``: the fewest network evaluations within the
    sweep's margin of the best): ``{"scheduler": class name, "num_inference_steps", "nfe", ...}``, or ``None``."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("scheduler"), str):
        raise ValueError(f"{path}: a sampler entry must name its scheduler, got {entry!r}")
    out = dict(entry)
    for key in ("num_inference_steps", "nfe"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1):
            raise ValueError(f"{path}: the sampler's {key} must be a positive integer, got {out[key]!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# The sampler of a run.


def sampling_settings(config: dict, num_inference_steps: int | None = None) -> dict:
    """The sampler settings a run's pipelines use: its ``sampling`` section over the scheduler's defaults.

    Returns ``num_inference_steps`` and the scheduler's arguments (σ range, ρ, σ_data from ``training``, and any
    other scheduler option the section sets).

    Args:
        config (`dict`): the run's training config (may be empty).
        num_inference_steps (`int`, *optional*): overrides the config's step count.
    """
    defaults = EDMHeunScheduler().config
    sampling = config.get("sampling") or {}
    training = config.get("training") or {}
    steps = num_inference_steps or sampling.get("num_inference_steps")
    if steps is None:
        steps = EDM2Pipeline.DEFAULT_NUM_INFERENCE_STEPS
    out = {"num_inference_steps": int(steps)}
    for key in _CORE_KEYS:
        value = training.get(key) if key == "sigma_data" else sampling.get(key)
        out[key] = float(value if value is not None else defaults[key])
    out.update({k: v for k, v in sampling.items() if k in _SCHEDULER_KEYS and k not in out and v is not None})
    if out["num_inference_steps"] < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {out['num_inference_steps']}")
    return out


def scheduler_from_config(config: dict) -> EDMHeunScheduler:
    """The EDM Heun scheduler of a run's config (:func:`sampling_settings` without the step count)."""
    settings = sampling_settings(config)
    return EDMHeunScheduler(**{k: v for k, v in settings.items() if k in _SCHEDULER_KEYS})


def run_scheduler(run_dir: str | os.PathLike) -> EDMHeunScheduler:
    """The EDM Heun scheduler of a run folder (its ``config.yaml``; the defaults where it has none)."""
    return scheduler_from_config(read_run_config(run_dir)[1])


def sampling_autocast(config: dict, device: torch.device | str):
    """The autocast context a run's sampling uses (``sampling.mixed_precision``): fp16 or bf16 autocast around the
    pipeline on a GPU, as edm2-multi-gpu samples with ``--use_amp``; float32 (no autocast) on a CPU or when ``no``.
    """
    precision = (config.get("sampling") or {}).get("mixed_precision") or "no"
    device = torch.device(device)
    if precision == "no" or device.type == "cpu":
        return contextlib.nullcontext()
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"sampling.mixed_precision must be no, fp16 or bf16, got {precision!r}")
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


__all__ = [
    "CONFIG_NAME",
    "LATENT_INFO_NAME",
    "RUN_RECORD_NAME",
    "config_overrides",
    "lineage_of",
    "new_run_record",
    "read_run_record",
    "record_resume",
    "record_rewind",
    "run_history",
    "write_run_record",
    "PIPELINE_SUBDIR",
    "SAMPLES_SUBDIR",
    "SWEEP_BEST_NAME",
    "SWEEP_SUBDIR",
    "pipeline_dir",
    "read_run_config",
    "read_run_latent_info",
    "read_sweep",
    "run_scheduler",
    "sampling_autocast",
    "sampling_settings",
    "scheduler_from_config",
    "sweep_best_path",
    "write_run_config",
    "write_run_latent_info",
]
