"""Export post-hoc EMA variants of a training run as diffusers pipelines (safetensors only) with a model card.

Layout of an export (one Hub repository)::

    OUT/                       the first std: a complete EDM2Pipeline
      model_index.json         "_class_name": ["pipeline_edm2", "EDM2Pipeline"], "unet": ["unet_edm2", ...], ...
      pipeline_edm2.py         custom code (see remote_code.py)
      unet/  config.json  diffusion_pytorch_model.safetensors  unet_edm2.py
      scheduler/  scheduler_config.json  scheduling_edm_heun.py
      README.md  samples.png  export_info.json
      ema-0.100/               every further std: another complete pipeline (same layout, no card)

``DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`` loads the root variant and
``DiffusionPipeline.from_pretrained(OUT / "ema-0.100", trust_remote_code=True)`` another. diffusers 0.42 has no
``subfolder`` argument for pipelines (it ignores it with a warning and loads the root), so on the Hub a variant is
fetched with ``snapshot_download(repo, allow_patterns=["ema-0.100/*"])`` first; the model card shows both.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ..ema.reconstruct import profile_folders
from ..run_lock import writes_into
from .model_card import EXPORT_INFO_NAME, write_model_card
from .remote_code import write_custom_code

logger = logging.getLogger(__name__)

VARIANT_PREFIX = "ema-"
SAMPLE_GRID_NAME = "samples.png"
DEFAULT_LICENSE = "apache-2.0"
RUN_CONFIG_NAMES = ("config.yaml", "config.yml", "train_config.yaml", "training_config.yaml")
SWEEP_BEST_NAME = "best.json"

# What may be in an export. Anything else is refused, in particular pickle-based weights.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".py", ".md", ".png")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")

EXPORT_FORMAT = "edm2-diffusers/pipeline-export"


def variant_folder(std: float) -> str:
    """Folder name of the variant with EMA std ``std``, e.g. ``ema-0.100``."""
    return f"{VARIANT_PREFIX}{float(std):.3f}"


@dataclass
class ExportResult:
    """What :func:`export_pipelines` wrote.

    Args:
        output_dir (`Path`): the export's root folder.
        variants (`list[tuple[float, Path]]`): ``(std, pipeline folder)``; the first is the root.
        info (`dict`): the content of ``export_info.json`` (everything the model card shows).
    """

    output_dir: Path
    variants: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Reading a run.


def find_run_config(run_dir: str | os.PathLike) -> tuple[Path | None, dict]:
    """The training config a run stored next to its outputs (``config.yaml``), parsed; ``(None, {})`` if none.

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder.
    """
    run_dir = Path(run_dir)
    candidates = [run_dir / n for n in RUN_CONFIG_NAMES if (run_dir / n).is_file()]
    if not candidates:
        candidates = sorted(p for p in run_dir.glob("*.y*ml") if p.is_file())
    for path in candidates:
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"run config {path} is not valid YAML: {err}") from None
        if isinstance(cfg, dict) and ("model" in cfg or "sampling" in cfg):
            return path, cfg
    return None, {}


def sampling_settings(config: dict, num_inference_steps: int | None = None) -> dict:
    """The sampler settings an export carries: the run config's ``sampling`` section over the defaults.

    Args:
        config (`dict`): the run's training config (may be empty).
        num_inference_steps (`int`, *optional*): overrides the config's step count.
    """
    from ..pipelines.pipeline_edm2 import EDM2Pipeline
    from ..schedulers.scheduling_edm_heun import EDMHeunScheduler

    defaults = EDMHeunScheduler().config
    sampling = config.get("sampling") or {}
    training = config.get("training") or {}
    steps = num_inference_steps or sampling.get("num_inference_steps")
    if steps is None:
        steps = inspect.signature(EDM2Pipeline.__call__).parameters["num_inference_steps"].default
    out = dict(
        num_inference_steps=int(steps),
        sigma_min=float(sampling.get("sigma_min") or defaults.sigma_min),
        sigma_max=float(sampling.get("sigma_max") or defaults.sigma_max),
        rho=float(sampling.get("rho") or defaults.rho),
        sigma_data=float(training.get("sigma_data") or defaults.sigma_data),
        s_churn=float(sampling.get("s_churn") or defaults.s_churn),
    )
    if out["num_inference_steps"] < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {out['num_inference_steps']}")
    return out


def dataset_description(config: dict, dataset: str | None = None) -> dict:
    """``{"name": Hub dataset id or None, "text": prose}`` for the card, from the run config's ``data`` section.

    Args:
        config (`dict`): the run's training config.
        dataset (`str`, *optional*): a Hub dataset id that overrides the config.
    """
    if dataset:
        return {"name": dataset, "text": f"[{dataset}](https://huggingface.co/datasets/{dataset})"}
    data = config.get("data") or {}
    name = data.get("dataset_name")
    if name:
        return {"name": name, "text": f"[{name}](https://huggingface.co/datasets/{name})"}
    source = data.get("source")
    if source == "sklearn_digits":
        return {"name": None, "text": "the scikit-learn digits dataset (1,797 handwritten digits, 8×8)"}
    if data.get("train_data_dir") or source == "imagefolder":
        return {"name": None, "text": "a local image folder"}
    return {"name": None, "text": "an unspecified dataset"}


def _sweep_file(run_dir: Path, sweep_dir: str | os.PathLike | None) -> Path:
    if sweep_dir is not None:
        path = Path(sweep_dir)
        return path if path.is_file() else path / SWEEP_BEST_NAME
    return run_dir / "sweep" / SWEEP_BEST_NAME


def _as_float(value, what: str, path: Path) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} must be a number, got {value!r}") from None


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
        "settings": dict, "path": str}``.
    """
    path = _sweep_file(Path(run_dir), sweep_dir)
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
        values = {
            k: float(v)
            for k, v in row.items()
            if k != "std" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        if values:
            metrics.setdefault(_as_float(row["std"], "std", path), {}).update(values)
    metric, value = best.get("metric"), best.get("value")
    if isinstance(metric, str) and isinstance(value, (int, float)) and math.isfinite(value):
        metrics.setdefault(std, {})[metric] = float(value)
    step = best.get("step")
    return {
        "std": std,
        "metric": metric if isinstance(metric, str) else None,
        "step": int(step) if isinstance(step, (int, float)) else None,
        "metrics": metrics,
        "settings": best.get("settings") if isinstance(best.get("settings"), dict) else {},
        "path": str(path),
    }


def parse_stds(stds) -> list:
    """Normalize ``stds``: a float, a comma-separated string (``"0.05,0.10"``), ``"best"``, or a list of those.

    Returns:
        `list`: floats and at most one ``"best"``, in order, without duplicates.
    """
    if stds is None:
        raise ValueError("give the EMA stds to export, e.g. [0.05, 0.10] or 'best'")
    items = stds.split(",") if isinstance(stds, str) else list(stds) if isinstance(stds, (list, tuple)) else [stds]
    out = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
            if item.lower() == "best":
                item = "best"
            else:
                try:
                    item = float(item)
                except ValueError:
                    raise ValueError(f"EMA std {item!r} is not a number (or 'best')") from None
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise ValueError(f"EMA std {item!r} is not a number (or 'best')")
        else:
            item = float(item)
        if isinstance(item, float) and not (math.isfinite(item) and item > 0):
            raise ValueError(f"EMA std {item!r} must be a positive number")
        if item not in out:
            out.append(item)
    if not out:
        raise ValueError(f"no EMA stds in {stds!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Checks.


def check_export(export_dir: str | os.PathLike) -> list[Path]:
    """Check that an export holds only safetensors weights (no pickle-based files) and complete pipelines.

    Args:
        export_dir (`str` or `os.PathLike`): the export's root folder.

    Returns:
        `list[Path]`: the pipeline folders (those with a ``model_index.json``), root first.

    Raises:
        `ValueError`: naming the first offending file.
    """
    export_dir = Path(export_dir)
    if not (export_dir / "model_index.json").is_file():
        raise ValueError(f"{export_dir} is not a pipeline export: model_index.json is missing")
    for path in sorted(export_dir.rglob("*")):
        if path.is_symlink():
            raise ValueError(f"{path}: an export must not contain symbolic links")
        if path.is_dir():
            continue
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: exports hold safetensors weights only, never pickle-based files ({suffix})")
        if suffix not in ALLOWED_SUFFIXES:
            raise ValueError(f"{path}: unexpected file in an export (allowed: {', '.join(ALLOWED_SUFFIXES)})")
    pipelines = sorted((p.parent for p in export_dir.rglob("model_index.json")), key=lambda p: (p != export_dir, p))
    for folder in pipelines:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        for name, entry in index.items():
            # Components are [library, class] pairs; other lists (e.g. latent_mean) are pipeline settings.
            is_component = isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
            if name.startswith("_") or not is_component:
                continue
            component = folder / name
            if not component.is_dir():
                raise ValueError(f"{folder}: component folder {name}/ named in model_index.json is missing")
            if (component / "config.json").is_file() and not list(component.glob("*.safetensors")):
                raise ValueError(f"{component}: model component without safetensors weights")
    return pipelines


def _check_output_dir(output_dir: Path, run_dir: Path, overwrite: bool) -> None:
    out, run = output_dir.resolve(), run_dir.resolve()
    if out == run or out in run.parents:
        raise ValueError(f"output_dir {output_dir} would contain the run folder {run_dir}; choose another folder")
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} exists and is not a folder")
    if not any(output_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"output folder {output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace an "
            "earlier export there, or choose another folder. Nothing was written."
        )
    if not ((output_dir / EXPORT_INFO_NAME).is_file() or (output_dir / "model_index.json").is_file()):
        raise ValueError(
            f"refusing to overwrite {output_dir}: it is not a pipeline export (no {EXPORT_INFO_NAME} or "
            "model_index.json), so replacing it could destroy unrelated files. Choose another folder."
        )


def _commit_staging(staging: Path, output_dir: Path) -> None:
    """Move a finished export into place; an earlier export there is replaced only after the new one is complete."""
    if output_dir.exists() and any(output_dir.iterdir()):
        old = output_dir.with_name(f".{output_dir.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(output_dir, old)
        try:
            os.replace(staging, output_dir)
        except OSError:
            os.replace(old, output_dir)  # put the earlier export back
            raise
        shutil.rmtree(old)
    else:
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(staging, output_dir)


# ----------------------------------------------------------------------------------------------------------------
# Sample grid.


def render_sample_grid(pipe, rows: int, cols: int, num_inference_steps: int, seed: int = 0) -> Image.Image:
    """A ``rows × cols`` grid of samples (one class per row for class-conditional models), upscaled to ≥64 px tiles.

    Args:
        pipe (`EDM2Pipeline`): the pipeline to sample.
        rows (`int`), cols (`int`): grid shape.
        num_inference_steps (`int`): sampler steps.
        seed (`int`): seed of the noise (and of nothing else).
    """
    num_classes = pipe.unet.config.num_class_embeds
    labels = None
    if num_classes:
        labels = torch.arange(rows).repeat_interleave(cols) % num_classes
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=rows * cols,
        num_inference_steps=num_inference_steps,
        generator=generator,
        class_labels=labels,
        output_type="np",
    ).images
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)  # (N, H, W, C)
    n, h, w, c = images.shape
    grid = images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, math.ceil(64 / max(h, w)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image


# ----------------------------------------------------------------------------------------------------------------
# Export.


def _resolve_stds(stds, run_dir: Path, sweep_dir) -> tuple[list[float], dict]:
    items = parse_stds(stds)
    sweep = {}
    if "best" in items:
        sweep = read_sweep(run_dir, sweep_dir, required=True)
        items = [sweep["std"] if s == "best" else s for s in items]
    else:
        sweep = read_sweep(run_dir, sweep_dir, required=False)
    stds = list(profile_folders(items))  # refuses stds whose folders would collide
    return stds, sweep


def _ignore_variant_files(root: Path, folders: list[str]) -> None:
    """List the other variants' files under ``_ignore_files`` in the root ``model_index.json``.

    When diffusers downloads the root pipeline from the Hub it would otherwise fetch every safetensors file of the
    repository, the other variants' weights included; ``_ignore_files`` (exact repository paths) keeps them out.
    """
    if not folders:
        return
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["_ignore_files"] = sorted(
        p.relative_to(root).as_posix() for folder in folders for p in (root / folder).rglob("*") if p.is_file()
    )
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _metrics_note(sweep: dict) -> str:
    settings = sweep.get("settings") or {}
    parts = []
    if settings.get("num_images"):
        parts.append(f"{int(settings['num_images']):,} generated images")
    if settings.get("num_inference_steps"):
        parts.append(f"{int(settings['num_inference_steps'])} sampler steps")
    if settings.get("feature_extractor"):
        parts.append(f"{settings['feature_extractor']} features")
    how = f" ({', '.join(parts)})" if parts else ""
    return (
        f"Metrics from the post-hoc EMA sweep{how}; lower FID/FD is better. Its best EMA std was {sweep['std']:.3f}."
    )


def _metrics_for(std: float, known: dict) -> dict:
    for s, values in known.items():
        if abs(float(s) - std) < 5e-7:
            return dict(values)
    return {}


@writes_into("output_dir", "run_dir")
def export_pipelines(
    run_dir: str | os.PathLike,
    stds,
    output_dir: str | os.PathLike,
    step: int | None = None,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
    sample_grid: bool = True,
    grid_size: tuple[int, int] | None = None,
    num_inference_steps: int | None = None,
    seed: int | None = None,
    sweep_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    tags: list[str] | None = None,
    metrics: dict | None = None,
    device: str | torch.device | None = None,
    vae=None,
) -> ExportResult:
    """Export post-hoc EMA reconstructions of a run as ``EDM2Pipeline`` folders with a model card.

    For each std the U-Net is reconstructed from the run's EMA snapshots (:func:`edm2_diffusers.ema.reconstruct`),
    paired with an ``EDMHeunScheduler`` carrying the run's sampling settings and saved with
    ``save_pretrained(safe_serialization=True)``, together with standalone custom code so that it also loads without
    this package. The first std goes to ``output_dir``, each further one to ``output_dir/ema-<std>/``. The export is
    assembled in a hidden folder next to ``output_dir`` and moved into place only when complete; an existing
    non-empty ``output_dir`` is never touched unless ``overwrite`` (and then only if it is an earlier export).

    A latent run (one that recorded ``latent_info.json``) exports pipelines carrying its latent standardization
    (``latent_mean``, ``latent_std``) and, when a VAE is known, the VAE; without one the sample grid is skipped.

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder (with ``phema/`` snapshots).
        stds (`float`, `str` or `list`): EMA stds, e.g. ``[0.05, 0.1]``, ``"0.05,0.10"``, or ``"best"`` for the EMA
            sweep's best std (``run_dir/sweep/best.json`` or ``sweep_dir``). The first is the root variant.
        output_dir (`str` or `os.PathLike`): the export folder.
        step (`int`, *optional*): reconstruct at this snapshot step (default: the last one).
        overwrite (`bool`): replace an earlier export in ``output_dir``.
        license (`str`): the license named in the model card's metadata.
        sample_grid (`bool`): render a sample grid of the root variant into the export and the card.
        grid_size (`tuple[int, int]`, *optional*): grid rows and columns (default: the run's ``sampling`` config,
            else 8×8).
        num_inference_steps (`int`, *optional*): sampler steps for the grid and the card (default: the run's config).
        seed (`int`, *optional*): seed of the grid (default: the run's ``sampling.seed``, else 0).
        sweep_dir (`str` or `os.PathLike`, *optional*): folder (or file) of the EMA sweep's ``best.json``.
        repo_id (`str`, *optional*): the Hub repository the card's usage snippets name (set again on push).
        model_name (`str`, *optional*): title of the card (default: the repository or folder name).
        dataset (`str`, *optional*): Hub dataset id for the card (default: the run config's ``data.dataset_name``).
        tags (`list[str]`, *optional*): extra card tags.
        metrics (`dict`, *optional*): ``{std: {"fid": value, ...}}`` to show in the card, over those of the sweep.
        device (`str` or `torch.device`, *optional*): where the sample grid is rendered (default: CUDA if available).
        vae (`AutoencoderKL`, `str` or `bool`, *optional*): latent runs only: the VAE the pipelines carry (a model, or
            a folder / Hub id); ``None`` takes the run config's ``sampling.vae``, ``False`` exports without a VAE.

    Returns:
        `ExportResult`.
    """
    from ..ema import reconstruct

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    _check_output_dir(output_dir, run_dir, overwrite)
    std_list, sweep = _resolve_stds(stds, run_dir, sweep_dir)
    config_path, config = find_run_config(run_dir)
    sampling_settings(config, num_inference_steps)  # a bad step count fails before the reconstruction

    try:
        rec = reconstruct(str(run_dir), std_list, step=step)
    except (ValueError, FileNotFoundError) as err:
        stds_text = ", ".join(f"{s:g}" for s in std_list)
        raise type(err)(f"cannot reconstruct EMA std(s) {stds_text} from {run_dir}: {err}") from err

    # The sweep's metrics describe the weights at the sweep's step; show them only for an export at that step.
    sweep_applies = bool(sweep.get("metrics")) and sweep.get("step") in (None, rec.step)
    if sweep.get("metrics") and not sweep_applies:
        logger.warning(
            "the EMA sweep ran at step %s, this export is at step %s: its metrics are left out of the card",
            sweep.get("step"),
            rec.step,
        )
    known_metrics = {s: dict(v) for s, v in sweep["metrics"].items()} if sweep_applies else {}
    for s, values in (metrics or {}).items():
        known_metrics.setdefault(float(s), {}).update(values)
    variants = [
        {
            "std": std,
            "folder": "." if i == 0 else variant_folder(std),
            "metrics": _metrics_for(std, known_metrics),
            "build": lambda i=i: rec.model(i),
        }
        for i, std in enumerate(rec.stds)
    ]
    return _write_export(
        run_dir,
        output_dir,
        variants,
        step=rec.step,
        nimg=rec.nimg,
        model_class=rec.model_class,
        model_config=dict(rec.model_config),
        config_path=config_path,
        config=config,
        ema=None,
        metrics_note=_metrics_note(sweep) if sweep_applies else None,
        license=license,
        sample_grid=sample_grid,
        grid_size=grid_size,
        num_inference_steps=num_inference_steps,
        seed=seed,
        repo_id=repo_id,
        model_name=model_name,
        dataset=dataset,
        tags=tags,
        device=device,
        vae=vae,
    )


@writes_into("output_dir", "run_dir")
def export_model(
    run_dir: str | os.PathLike,
    unet,
    output_dir: str | os.PathLike,
    step: int,
    nimg: int,
    ema: dict | None = None,
    overwrite: bool = False,
    license: str = DEFAULT_LICENSE,
    sample_grid: bool = True,
    grid_size: tuple[int, int] | None = None,
    num_inference_steps: int | None = None,
    seed: int | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset: str | None = None,
    tags: list[str] | None = None,
    metrics: dict | None = None,
    device: str | torch.device | None = None,
    vae=None,
) -> ExportResult:
    """Export one given U-Net of a run (e.g. a traditional EMA, which has no snapshots) as an ``EDM2Pipeline``.

    The same export as :func:`export_pipelines` (layout, custom code, model card, safetensors only), with a single
    variant at the root whose weights are ``unet`` as it is.

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder (its ``config.yaml`` gives the sampling
            settings and the card's details).
        unet (`EDM2UNet2DModel`): the weights to export.
        output_dir (`str` or `os.PathLike`): the export folder.
        step (`int`), nimg (`int`): optimizer steps and training images behind ``unet``.
        ema (`dict`, *optional*): how ``unet`` was averaged, for the card, e.g. ``{"type": "traditional", "beta":
            0.9993, "warmup_steps": 0}``; ``None`` for raw training weights.
        metrics (`dict`, *optional*): ``{"fid": value, ...}`` of this model, shown in the card.
        **others: as in :func:`export_pipelines`.

    Returns:
        `ExportResult` (its single variant has ``std`` ``None``).
    """
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    _check_output_dir(output_dir, run_dir, overwrite)
    config_path, config = find_run_config(run_dir)
    from ..ema.snapshots import model_class_path, model_config_of

    variants = [{"std": None, "folder": ".", "metrics": dict(metrics or {}), "build": lambda: unet}]
    return _write_export(
        run_dir,
        output_dir,
        variants,
        step=int(step),
        nimg=int(nimg),
        model_class=model_class_path(unet),
        model_config=model_config_of(unet),
        config_path=config_path,
        config=config,
        ema=dict(ema) if ema is not None else {"type": "none"},
        metrics_note=None,
        license=license,
        sample_grid=sample_grid,
        grid_size=grid_size,
        num_inference_steps=num_inference_steps,
        seed=seed,
        repo_id=repo_id,
        model_name=model_name,
        dataset=dataset,
        tags=tags,
        device=device,
        vae=vae,
    )


def _resolve_vae(vae, config: dict, latent: dict | None):
    """The VAE an export carries: only latent runs have one; ``None`` means the run config's ``sampling.vae``."""
    if latent is None:
        if vae not in (None, False):
            raise ValueError("a VAE was given, but the run is not a latent run (it recorded no latent_info.json)")
        return None
    if vae is False:
        return None
    if vae is None:
        sampling = config.get("sampling") or {}
        if not sampling.get("vae"):
            return None
        vae, subfolder = sampling["vae"], sampling.get("vae_subfolder")
    else:
        subfolder = None
    if isinstance(vae, (str, os.PathLike)):
        from diffusers import AutoencoderKL

        try:
            vae = AutoencoderKL.from_pretrained(os.fspath(vae), subfolder=subfolder)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load the VAE {os.fspath(vae)!r} (sampling.vae): {err}") from None
    if vae.config.latent_channels != len(latent["latent_mean"]):
        raise ValueError(
            f"the VAE has {vae.config.latent_channels} latent channels, the run's latents {len(latent['latent_mean'])}"
        )
    return vae.eval()


def _write_export(
    run_dir: Path,
    output_dir: Path,
    variants: list[dict],
    *,
    step: int,
    nimg: int,
    model_class: str,
    model_config: dict,
    config_path: Path | None,
    config: dict,
    ema: dict | None,
    metrics_note: str | None,
    license: str,
    sample_grid: bool,
    grid_size,
    num_inference_steps,
    seed,
    repo_id,
    model_name,
    dataset,
    tags,
    device,
    vae,
) -> ExportResult:
    """Save ``variants`` (dicts with ``std``, ``folder``, ``metrics`` and ``build``, a function returning the U-Net)
    as pipelines in a staging folder, add the card, check, and move the export into place."""
    from .. import __version__
    from ..pipelines.pipeline_edm2 import EDM2Pipeline
    from ..schedulers.scheduling_edm_heun import EDMHeunScheduler
    from ..training.latents import read_run_latent_info

    sampling = sampling_settings(config, num_inference_steps)
    latent = read_run_latent_info(run_dir)
    vae = _resolve_vae(vae, config, latent)
    latent_kwargs = {}
    if latent is not None:
        latent_kwargs = dict(
            latent_mean=latent["latent_mean"], latent_std=latent["latent_std"], latent_final_std=latent["final_std"]
        )
        if sample_grid and vae is None:
            logger.info("latent run without a VAE (sampling.vae): the export has no sample grid")
            sample_grid = False

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.with_name(f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        root_pipe = None
        for i, variant in enumerate(variants):
            scheduler = EDMHeunScheduler(
                sigma_min=sampling["sigma_min"],
                sigma_max=sampling["sigma_max"],
                rho=sampling["rho"],
                sigma_data=sampling["sigma_data"],
                s_churn=sampling["s_churn"],
            )
            pipe = EDM2Pipeline(unet=variant["build"](), scheduler=scheduler, vae=vae, **latent_kwargs)
            target = staging if i == 0 else staging / variant["folder"]
            pipe.save_pretrained(target, safe_serialization=True)
            write_custom_code(target)
            if i == 0:
                root_pipe = pipe
        variants = [{k: v for k, v in variant.items() if k != "build"} for variant in variants]
        _ignore_variant_files(staging, [v["folder"] for v in variants[1:]])

        unet = root_pipe.unet
        train_cfg = config.get("training") or {}
        sampling_cfg = config.get("sampling") or {}
        rows, cols = grid_size or (sampling_cfg.get("grid_rows") or 8, sampling_cfg.get("grid_cols") or 8)
        grid_seed = seed if seed is not None else int(sampling_cfg.get("seed") or 0)
        grid_file = None
        if sample_grid:
            root_pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            image = render_sample_grid(root_pipe, int(rows), int(cols), sampling["num_inference_steps"], grid_seed)
            image.save(staging / SAMPLE_GRID_NAME)
            grid_file = SAMPLE_GRID_NAME

        import diffusers

        # The default export of a run (run_dir/pipeline, as training writes it) is named after the run.
        is_default = output_dir.resolve() == (run_dir / "pipeline").resolve()
        folder_name = run_dir.resolve().name if is_default else output_dir.name
        name = model_name or (repo_id.split("/")[-1] if repo_id else folder_name)
        dataset_info = dataset_description(config, dataset)
        if latent is not None and not dataset and not dataset_info.get("name"):
            count = f" ({latent['num_images']:,} encoded images)" if latent.get("num_images") else ""
            dataset_info["text"] = f"a latent dataset{count}"
        info = {
            "format": EXPORT_FORMAT,
            "format_version": 1,
            "package_version": __version__,
            "diffusers_version": diffusers.__version__,
            "model_name": name,
            "license": license,
            "tags": list(tags or []),
            "repo_id": repo_id or f"your-username/{folder_name}",
            "run": {
                "name": run_dir.resolve().name,
                "step": int(step),
                "nimg": int(nimg),
                "config_file": config_path.name if config_path else None,
            },
            "model": {
                "class": model_class,
                "config": model_config,
                "num_parameters": int(sum(p.numel() for p in unet.parameters())),
                "num_parameters_without_logvar": int(unet.num_parameters_without_logvar()),
            },
            "dataset": dataset_info,
            "sampling": sampling,
            "training": {k: v for k, v in sorted(train_cfg.items()) if isinstance(v, (int, float, str))},
            "variants": variants,
            "sample_grid": grid_file,
            "sample_seed": grid_seed,
            "metrics_note": metrics_note,
        }
        if ema is not None:
            info["ema"] = ema  # a single model that is not a post-hoc EMA reconstruction
        if latent is not None:
            info["latent"] = {
                "vae": latent.get("vae"),
                "vae_included": vae is not None,
                "resolution": latent.get("resolution"),
            }
        write_model_card(staging, info, info["repo_id"])
        check_export(staging)
        _commit_staging(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = ExportResult(
        output_dir=output_dir,
        variants=[(v["std"], output_dir if v["folder"] == "." else output_dir / v["folder"]) for v in variants],
        info=info,
    )
    logger.info("exported %d variant(s) of %s to %s", len(variants), run_dir, output_dir)
    return result


def default_stds(run_dir: str | os.PathLike, sweep_dir: str | os.PathLike | None = None) -> list:
    """The stds a run exports by default: the EMA sweep's best std if a sweep ran, else the tracked ``ema.stds``.

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder.
        sweep_dir (`str` or `os.PathLike`, *optional*): the sweep's folder.
    """
    run_dir = Path(run_dir)
    if _sweep_file(run_dir, sweep_dir).is_file():
        return ["best"]
    _, config = find_run_config(run_dir)
    stds = (config.get("ema") or {}).get("stds")
    if stds:
        return parse_stds(stds)
    from ..ema.snapshots import list_snapshots

    try:
        return sorted({s.std for s in list_snapshots(str(run_dir))})
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot export {run_dir}: {err}") from None


def export_run(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    stds=None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    **kwargs,
) -> ExportResult:
    """Export a finished training run (and optionally push it): what ``train_edm2.py`` calls at the end.

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder.
        output_dir (`str` or `os.PathLike`, *optional*): the export folder; defaults to ``run_dir/pipeline``.
        stds (*optional*): as in :func:`export_pipelines`; defaults to :func:`default_stds`.
        push_to_hub (`bool`): upload the export with :func:`edm2_diffusers.hub.push_to_hub`.
        hub_model_id (`str`, *optional*): the repository (``user/name``); required with ``push_to_hub``.
        private (`bool`): create the repository private.
        token (`str`, *optional*): Hub token (default: ``HF_TOKEN`` or the cached login).
        **kwargs: passed to :func:`export_pipelines` (``step``, ``overwrite``, ``license``, ``sample_grid``, ...).
    """
    from .push import push_to_hub as push
    from .push import resolve_repo_id

    if push_to_hub:
        hub_model_id = resolve_repo_id(hub_model_id)  # fail before any work
    output_dir = Path(run_dir) / "pipeline" if output_dir is None else output_dir
    if stds is None:
        stds = default_stds(run_dir, kwargs.get("sweep_dir"))
    result = export_pipelines(run_dir, stds, output_dir, repo_id=hub_model_id, **kwargs)
    if push_to_hub:
        push(result.output_dir, hub_model_id, private=private, token=token)
    return result


__all__ = [
    "ExportResult",
    "check_export",
    "dataset_description",
    "default_stds",
    "export_pipelines",
    "export_model",
    "export_run",
    "find_run_config",
    "parse_stds",
    "read_sweep",
    "render_sample_grid",
    "sampling_settings",
    "variant_folder",
]
