"""What an export reads from a training run: the stds to export, the sweep's metrics, the dataset, the VAE.

The run folder's files themselves are read by :mod:`edm2_diffusers.runs`; this module turns them into the parts of
an export (:class:`~edm2_diffusers.hub.writing.ExportSource`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..ema import list_snapshots, parse_stds
from ..latents import load_vae
from ..runs import read_run_config, read_run_latent_info, read_sweep, run_history, sampling_settings, sweep_best_path
from .layout import variant_names
from .writing import ExportOptions, ExportSource, Variant

logger = logging.getLogger(__name__)


def dataset_description(config: dict, dataset: str | None = None) -> dict:
    """``{"name": Hub dataset id or None, "text": prose}`` for the card, from the run config's ``data`` section.

    Args:
        config (`dict`): the run's training config.
        dataset (`str`, *optional*): a Hub dataset id that overrides the config.
    """
    data = config.get("data") or {}
    name = dataset or data.get("dataset_name")
    if name:
        return {"name": name, "text": f"[{name}](https://huggingface.co/datasets/{name})"}
    source = data.get("source")
    if source == "sklearn_digits":
        return {"name": None, "text": "the scikit-learn digits dataset (1,797 handwritten digits, 8×8)"}
    if data.get("train_data_dir") or source == "imagefolder":
        return {"name": None, "text": "a local image folder"}
    return {"name": None, "text": "an unspecified dataset"}


def resolve_stds(stds, run_dir: Path, sweep_dir=None) -> tuple[list[float], dict]:
    """The stds to export (``"best"`` replaced by the sweep's best std) and the sweep (``{}`` when none ran).

    Raises:
        ValueError: for a bad std or two stds sharing a variant name; `FileNotFoundError` for ``best`` without a
            sweep.
    """
    items = parse_stds(stds, allow_best=True)
    sweep = read_sweep(run_dir, sweep_dir, required="best" in items)
    stds = list(dict.fromkeys(sweep["std"] if s == "best" else s for s in items))
    variant_names(stds)
    return stds, sweep


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


def sweep_metrics(sweep: dict, step: int, metrics: dict | None = None) -> tuple[dict, str | None]:
    """``({std: {metric: value}}, note)``: the sweep's metrics when it ran at ``step``, under the given ones.

    The sweep's metrics describe the weights at the sweep's step, so they are shown only for an export at that step.
    """
    applies = bool(sweep.get("metrics")) and sweep.get("step") in (None, step)
    if sweep.get("metrics") and not applies:
        logger.warning(
            "the EMA sweep ran at step %s, this export is at step %s: its metrics are left out of the card",
            sweep.get("step"),
            step,
        )
    known = {float(s): dict(v) for s, v in sweep["metrics"].items()} if applies else {}
    for s, values in (metrics or {}).items():
        known.setdefault(float(s), {}).update(values)
    if not applies:
        return known, None
    settings = sweep.get("settings") or {}
    parts = []
    if settings.get("num_images"):
        parts.append(f"{int(settings['num_images']):,} generated images")
    if settings.get("num_inference_steps"):
        scheduler = (sweep.get("sampler") or {}).get("scheduler")  # the best's sampler, of the metrics shown
        steps = int(settings["num_inference_steps"])
        parts.append(f"{steps} steps of {scheduler}" if scheduler else f"{steps} sampler steps")
    if settings.get("feature_extractor"):
        parts.append(f"{settings['feature_extractor']} features")
    how = f" ({', '.join(parts)})" if parts else ""
    note = (
        f"Metrics from the post-hoc EMA sweep{how}; lower FID/FD is better. Its best EMA std was {sweep['std']:.3f}."
    )
    return known, note


def metrics_for(std: float, known: dict) -> dict:
    """The metrics of ``std`` in ``{std: metrics}`` (stds compared to 6 decimals)."""
    return next((dict(v) for s, v in known.items() if abs(float(s) - std) < 5e-7), {})


def run_vae(vae, config: dict, latent: dict | None):
    """The VAE an export carries: only latent runs have one; ``None`` means the run config's ``sampling.vae``."""
    if latent is None:
        if vae not in (None, False):
            raise ValueError("a VAE was given, but the run is not a latent run (it recorded no latent_info.json)")
        return None
    if vae is False:
        return None
    subfolder = None
    if vae is None:
        sampling = config.get("sampling") or {}
        if not sampling.get("vae"):
            return None
        vae, subfolder = sampling["vae"], sampling.get("vae_subfolder")
    return load_vae(vae, len(latent["latent_mean"]), subfolder, what="the VAE (sampling.vae)")


def run_source(
    run_dir: Path,
    output_dir: Path,
    variants: list[Variant],
    model: dict,
    run: dict,
    options: ExportOptions,
    ema: dict | None = None,
    metrics_note: str | None = None,
) -> ExportSource:
    """Everything besides the U-Net weights that an export of a run needs: scheduler settings, latent
    standardization and VAE, sample-grid settings and the card's run, dataset and training sections.

    Args:
        run_dir (`Path`): the run folder; output_dir (`Path`): the export folder (names the card by default).
        variants (`list[Variant]`): the U-Nets; model (`dict`): ``{"class", "config"}`` of the U-Net.
        run (`dict`): ``{"step", "nimg"}``; options (`ExportOptions`); ema (`dict`, *optional*): how a single model
            was averaged; metrics_note (`str`, *optional*): where the metrics come from.
    """
    config_path, config = read_run_config(run_dir)
    sampling = sampling_settings(config, options.num_inference_steps)
    latent = read_run_latent_info(run_dir)
    vae = run_vae(options.vae, config, latent)
    pipeline_kwargs = {}
    info = {}
    if latent is not None:
        pipeline_kwargs = dict(
            latent_mean=latent["latent_mean"], latent_std=latent["latent_std"], latent_final_std=latent["final_std"]
        )
        info["latent"] = {
            "vae": latent.get("vae"),
            "vae_included": vae is not None,
            "resolution": latent.get("resolution"),
        }
    if vae is not None:
        pipeline_kwargs["vae"] = vae
    dataset = dataset_description(config, options.dataset)
    if latent is not None and not dataset["name"]:
        count = f" ({latent['num_images']:,} encoded images)" if latent.get("num_images") else ""
        dataset["text"] = f"a latent dataset{count}"
    # The default export of a run (run_dir/pipeline, as training writes it) is named after the run.
    is_default = output_dir.resolve() == (run_dir / "pipeline").resolve()
    train_cfg, sampling_cfg = config.get("training") or {}, config.get("sampling") or {}
    rows, cols = options.grid_size or (sampling_cfg.get("grid_rows") or 8, sampling_cfg.get("grid_cols") or 8)
    seed = options.seed if options.seed is not None else int(sampling_cfg.get("seed") or 0)
    info.update(
        run={
            "name": run_dir.resolve().name,
            "step": int(run["step"]),
            "nimg": int(run["nimg"]),
            "config_file": config_path.name if config_path else None,
            "history": run_history(run_dir, int(run["step"])),  # run id, branch, settings changed on resume
        },
        model=model,
        dataset=dataset,
        training={k: v for k, v in sorted(train_cfg.items()) if isinstance(v, (int, float, str))},
        metrics_note=metrics_note,
    )
    if ema is not None:
        info["ema"] = ema  # a single model that is not a post-hoc EMA reconstruction
    if train_cfg.get("pretrained_model_name_or_path"):
        info["base_model"] = train_cfg["pretrained_model_name_or_path"]
    return ExportSource(
        variants=variants,
        sampling=sampling,
        pipeline_kwargs=pipeline_kwargs,
        info=info,
        grid=(int(rows), int(cols), seed),
        name=run_dir.resolve().name if is_default else output_dir.name,
    )


__all__ = [
    "dataset_description",
    "default_stds",
    "metrics_for",
    "resolve_stds",
    "run_source",
    "run_vae",
    "sweep_metrics",
]
