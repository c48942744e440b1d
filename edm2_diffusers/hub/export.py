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

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch

from .. import __version__
from ..ema import list_snapshots, parse_stds, reconstruct
from ..ema.reconstruct import profile_folders
from ..ema.snapshots import model_class_path, model_config_of
from ..files import commit_folder, raise_if_disk_full, staging_path
from ..grids import render_sample_grid
from ..latents import load_vae
from ..pipelines import EDM2Pipeline
from ..run_lock import writes_into
from ..runs import read_run_config, read_run_latent_info, read_sweep, run_history, sampling_settings, sweep_best_path
from ..schedulers import EDMHeunScheduler
from .checks import check_export, check_output_dir
from .model_card import write_model_card
from .push import push_to_hub as push
from .push import resolve_repo_id
from .remote_code import write_custom_code

logger = logging.getLogger(__name__)

VARIANT_PREFIX = "ema-"
SAMPLE_GRID_NAME = "samples.png"
DEFAULT_LICENSE = "apache-2.0"

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


# ----------------------------------------------------------------------------------------------------------------
# Export.


def _resolve_stds(stds, run_dir: Path, sweep_dir) -> tuple[list[float], dict]:
    items = parse_stds(stds, allow_best=True)
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
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    check_output_dir(output_dir, run_dir, overwrite)
    std_list, sweep = _resolve_stds(stds, run_dir, sweep_dir)
    config_path, config = read_run_config(run_dir)
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
    check_output_dir(output_dir, run_dir, overwrite)
    config_path, config = read_run_config(run_dir)
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
    return load_vae(vae, len(latent["latent_mean"]), subfolder, what="the VAE (sampling.vae)")


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
    staging = staging_path(output_dir)
    staging.mkdir()
    try:
        root_pipe = None
        for i, variant in enumerate(variants):
            scheduler = EDMHeunScheduler(**{k: v for k, v in sampling.items() if k != "num_inference_steps"})
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
                "history": run_history(run_dir, step),  # run id, branch, settings changed on resume (run.json)
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
        commit_folder(staging, output_dir)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise_if_disk_full(err, output_dir)
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
    if sweep_best_path(run_dir, sweep_dir).is_file():
        return ["best"]
    _, config = read_run_config(run_dir)
    stds = (config.get("ema") or {}).get("stds")
    if stds:
        return parse_stds(stds)
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
    "variant_folder",
]
