"""Export NVIDIA's official EDM2 network pickles through the same exporter as a training run.

Several pickles of one run (the same network at different EMA lengths, e.g. ``edm2-img64-s-1073741-0.045.pkl`` and
``...-0.100.pkl``) become weight variants of one pipeline, named by their EMA std as in a run's export; a guiding
network (EDM2 guidance / autoguidance) becomes ``guidance_unet`` with its scale as the pipeline's default. The card
names the source pickles and carries NVIDIA's license for the weights (CC BY-NC-SA 4.0).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..convert.official_pipeline import convert_official_pipeline
from ..run_lock import writes_into
from ..runs import sampling_settings
from .checks import check_output_dir
from .run_info import dataset_description
from .writing import ExportOptions, ExportResult, ExportSource, Variant, write_export

OFFICIAL_LICENSE = "cc-by-nc-sa-4.0"
OFFICIAL_LICENSE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"
# NVIDIA's release names a network pickle edm2-<dataset>-<size>-<training kimg>-<EMA std>.pkl.
OFFICIAL_NAME = re.compile(r"-(?P<kimg>\d+)-(?P<std>\d+\.\d+)\.pkl$")


def _name(path) -> str:
    return os.path.basename(os.fspath(path))


def official_std(path) -> float | None:
    """The EMA std in an official pickle's name (``...-0.045.pkl`` → 0.045), or ``None``."""
    match = OFFICIAL_NAME.search(_name(path))
    return float(match["std"]) if match else None


def _stds(pickles: list, stds) -> list[float | None]:
    if stds is not None:
        stds = [float(s) for s in stds]
        if len(stds) != len(pickles):
            raise ValueError(f"got {len(stds)} EMA stds for {len(pickles)} pickles; give one per pickle")
        return stds
    found = [official_std(p) for p in pickles]
    if len(pickles) > 1 and None in found:
        bad = pickles[found.index(None)]
        raise ValueError(
            f"{bad}: its name gives no EMA std (NVIDIA's names end in -<kimg>-<std>.pkl); several pickles become "
            "variants named by their std, so pass the stds (--stds)"
        )
    return found


@writes_into("output_dir", None)
def export_converted(
    pickles,
    output_dir: str | os.PathLike,
    guidance_pickle=None,
    guidance_scale: float | None = None,
    vae=None,
    vae_subfolder: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
    stds=None,
    base_model: str | None = None,
    options: ExportOptions | None = None,
    **option_kwargs,
) -> ExportResult:
    """Convert official EDM2 pickles and write them as one export (weight variants, code, card, license).

    Args:
        pickles (path or `list` of paths): network pickles of one run; the first is the default weights, and with
            several each is a weight variant named by its EMA std (read from NVIDIA's file names, or ``stds``).
        output_dir (`str` or `os.PathLike`): the export folder.
        guidance_pickle, guidance_scale, vae, vae_subfolder, torch_dtype: as in
            :func:`edm2_diffusers.convert.convert_official_pipeline`.
        stds (`list[float]`, *optional*): the EMA std of each pickle, when their names do not give it.
        base_model (`str`, *optional*): the Hub model the card's ``base_model`` names.
        options (`ExportOptions`, *optional*), **option_kwargs: how the export is written; ``license`` defaults to
            NVIDIA's CC BY-NC-SA 4.0.

    Returns:
        `ExportResult`.
    """
    pickles = [pickles] if isinstance(pickles, (str, os.PathLike)) else list(pickles)
    if not pickles:
        raise ValueError("give at least one network pickle")
    option_kwargs.setdefault("license", OFFICIAL_LICENSE)
    options = ExportOptions.of(options, **option_kwargs)
    output_dir = Path(output_dir)
    check_output_dir(output_dir, None, options.overwrite)
    std_list = _stds(pickles, stds)
    first = convert_official_pipeline(
        pickles[0], guidance_pickle, guidance_scale, vae=vae, vae_subfolder=vae_subfolder, torch_dtype=torch_dtype
    )
    pipe, info = first.pipeline, first.info
    unets = [pipe.unet]
    for path in pickles[1:]:
        unet = convert_official_pipeline(path, torch_dtype=torch_dtype).pipeline.unet
        if dict(unet.config) != dict(pipe.unet.config):
            raise ValueError(f"{path}: not the network of {pickles[0]} (another architecture); one run per export")
        unets.append(unet)
    variants = [Variant(std=s, build=lambda u=u: u, source=_name(p)) for s, u, p in zip(std_list, unets, pickles)]
    if len(variants) == 1 and variants[0].std is None:
        variants[0].source = _name(pickles[0])
    pipeline_kwargs = {k: getattr(pipe, k) for k in ("guidance_unet", "vae") if getattr(pipe, k) is not None}
    pipeline_kwargs.update(
        latent_mean=pipe.config.latent_mean,
        latent_std=pipe.config.latent_std,
        latent_final_std=pipe.config.latent_final_std,
        default_guidance_scale=guidance_scale,
    )
    source_info = {
        "conversion": {
            "sources": [_name(p) for p in pickles],
            "official_config": info["official_config"],
            "license_url": OFFICIAL_LICENSE_URL,
        },
        "model": {
            "class": f"{type(pipe.unet).__module__}.{type(pipe.unet).__name__}",
            "config": dict(pipe.unet.config),
        },
    }
    if guidance_pickle is not None:
        source_info["guidance"] = {"source": info["guidance_source"], "scale": guidance_scale}
    if info["latent"] is not None:
        source_info["latent"] = {"vae": info["latent"].get("vae_name"), "vae_included": pipe.vae is not None}
    if base_model:
        source_info["base_model"] = base_model
    if options.dataset:
        source_info["dataset"] = dataset_description({}, options.dataset)
    rows, cols = options.grid_size or (4, 4)
    source = ExportSource(
        variants=variants,
        sampling=sampling_settings({}, options.num_inference_steps),
        pipeline_kwargs=pipeline_kwargs,
        info=source_info,
        grid=(rows, cols, options.seed or 0),
        name=output_dir.name,
    )
    return write_export(source, output_dir, options)


__all__ = ["OFFICIAL_LICENSE", "export_converted", "official_std"]
