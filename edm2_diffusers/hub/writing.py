"""Writing an export: one ``EDM2Pipeline`` saved with diffusers, the U-Net's EMA variants, code, grid and card.

Every kind of export goes through :func:`write_export`: post-hoc EMA reconstructions of a run, one given model of a
run, and NVIDIA's converted pickles. What differs between them is an :class:`ExportSource` (the U-Nets and what the
card says about where they come from); how the export is written is an :class:`ExportOptions`. The export is assembled
in a staging folder and moved into place only when complete and checked (:func:`edm2_diffusers.files.staged_folder`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from .. import __version__
from ..files import staged_folder
from ..grids import render_sample_grid
from ..pipelines import EDM2Pipeline
from .checks import check_export
from .layout import EXPORT_FORMAT, FORMAT_VERSION, SAMPLE_GRID_NAME, variant_names
from .model_card import write_model_card
from .remote_code import write_custom_code
from .sampler_choice import DEFAULT_SAMPLER, build_scheduler, check_sampler_choice

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "apache-2.0"


@dataclass
class ExportOptions:
    """How an export is written and described; the same for every source.

    Args:
        overwrite (`bool`): replace an earlier export in the output folder (never anything else).
        license (`str`): the license named in the model card's metadata.
        sample_grid (`bool`): render a sample grid of the default variant into the export and the card.
        grid_size (`tuple[int, int]`, *optional*): grid rows and columns (default: the run's ``sampling`` config,
            else 8×8).
        num_inference_steps (`int`, *optional*): sampler steps for the grid and the card (default: the run's config,
            or the EMA sweep's chosen setting); given, the run's Heun sampler is kept.
        sampler (`str`): the pipeline's default sampler: ``"cheapest"`` (the EMA sweep's cheapest setting within its
            margin of the best), ``"best"`` (the sweep's best setting) or ``"heun"`` (the run's Heun sampler); the
            sweep's setting only where it applies (:mod:`edm2_diffusers.hub.sampler_choice`), else Heun.
        seed (`int`, *optional*): seed of the grid (default: the run's ``sampling.seed``, else 0).
        repo_id (`str`, *optional*): the Hub repository the card's usage snippets name (set again on push).
        model_name (`str`, *optional*): title of the card (default: the repository or folder name).
        dataset (`str`, *optional*): Hub dataset id for the card (default: the run config's ``data.dataset_name``).
        tags (`list[str]`, *optional*): extra card tags.
        device (`str` or `torch.device`, *optional*): where the sample grid is rendered (default: CUDA if available).
        vae (`AutoencoderKL`, `str` or `bool`, *optional*): latent runs only: the VAE the pipeline carries (a model,
            or a folder / Hub id); ``None`` takes the run config's ``sampling.vae``, ``False`` exports without one.
    """

    overwrite: bool = False
    license: str = DEFAULT_LICENSE
    sample_grid: bool = True
    grid_size: tuple[int, int] | None = None
    num_inference_steps: int | None = None
    sampler: str = DEFAULT_SAMPLER
    seed: int | None = None
    repo_id: str | None = None
    model_name: str | None = None
    dataset: str | None = None
    tags: list[str] | None = None
    device: str | torch.device | None = None
    vae: object = None

    @classmethod
    def of(cls, options: ExportOptions | None = None, **kwargs) -> ExportOptions:
        """``options`` (or the defaults) with ``kwargs`` replaced; an unknown name is a `TypeError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown export option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        options = dataclasses.replace(options or cls(), **kwargs)
        check_sampler_choice(options.sampler)
        return options


@dataclass
class Variant:
    """One U-Net of an export.

    Args:
        std (`float`, *optional*): its EMA std; ``None`` for a single model (no variants).
        metrics (`dict`): evaluation results shown in the card, e.g. ``{"fid": 2.1}``.
        build (`Callable`): returns the U-Net (called once, when it is saved).
        source (`str`, *optional*): where the weights come from (e.g. a converted pickle's name).
    """

    std: float | None
    build: Callable[[], torch.nn.Module]
    metrics: dict = field(default_factory=dict)
    source: str | None = None


@dataclass
class ExportSource:
    """What is exported besides the options.

    Args:
        variants (`list[Variant]`): the U-Nets; the first is the default (un-suffixed) weights.
        sampling (`dict`): ``num_inference_steps``, the run's ``EDMHeunScheduler`` settings and, optionally, the
            class name ``scheduler`` that samples (default Heun; built by :func:`.sampler_choice.build_scheduler`)
            and its ``nfe``.
        pipeline_kwargs (`dict`): other ``EDM2Pipeline`` arguments (``vae``, ``guidance_unet``, latent statistics).
        info (`dict`): the card's sections of ``export_info.json`` (``run`` or ``conversion``, ``model``,
            ``dataset``, ``training``, ``latent``, ``base_model`` ...).
        grid (`tuple[int, int, int]`): sample grid rows, columns and seed.
        name (`str`): default title and repository name.
    """

    variants: list[Variant]
    sampling: dict
    pipeline_kwargs: dict
    info: dict
    grid: tuple[int, int, int]
    name: str


@dataclass
class ExportResult:
    """What an export wrote.

    Args:
        output_dir (`Path`): the export folder (one pipeline).
        variants (`list[tuple[float, str]]`): ``(std, weight variant)``; the first is also the default weights.
        info (`dict`): the content of ``export_info.json`` (everything the model card shows).
        commit: the Hub commit when the export was pushed.
    """

    output_dir: Path
    variants: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    commit: object = None


def _save_variants(staging: Path, pipe: EDM2Pipeline, variants: list[Variant], names: list[str]) -> None:
    """Each std's U-Net as a weight variant of ``unet/`` (the first one is also the un-suffixed default)."""
    for i, (variant, name) in enumerate(zip(variants, names)):
        unet = pipe.unet if i == 0 else variant.build()
        unet.save_pretrained(staging / "unet", variant=name, safe_serialization=True)
        del unet


def _info(source: ExportSource, options: ExportOptions, pipe: EDM2Pipeline, variants: list[dict]) -> dict:
    unet = pipe.unet
    name = options.model_name or (options.repo_id.split("/")[-1] if options.repo_id else source.name)
    model = dict(source.info.get("model") or {})
    model.update(
        num_parameters=int(sum(p.numel() for p in unet.parameters())),
        num_parameters_without_logvar=int(unet.num_parameters_without_logvar()),
    )
    info = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "diffusers_version": diffusers.__version__,
        "model_name": name,
        "license": options.license,
        "tags": list(options.tags or []),
        "repo_id": options.repo_id or f"your-username/{source.name}",
        **source.info,
        "model": model,
        "sampling": source.sampling,
        "variants": variants,
        "sample_grid": None,
        "sample_seed": source.grid[2],
    }
    if pipe.guidance_unet is not None:
        info["guidance"] = {**(info.get("guidance") or {}), "class": type(pipe.guidance_unet).__name__}
    return info


def write_export(source: ExportSource, output_dir: str | os.PathLike, options: ExportOptions) -> ExportResult:
    """Write ``source`` as one ``EDM2Pipeline`` folder with weight variants, custom code, card and grid.

    Args:
        source (`ExportSource`): the U-Nets and everything else the pipeline and the card need.
        output_dir (`str` or `os.PathLike`): the export folder: new, empty, or an earlier export with ``overwrite``.
        options (`ExportOptions`): how it is written.

    Returns:
        `ExportResult`.
    """
    output_dir = Path(output_dir)
    stds = [v.std for v in source.variants]
    names = variant_names(stds) if stds != [None] else [None]
    sampling = source.sampling
    sample_grid = options.sample_grid
    if sample_grid and source.info.get("latent") and "vae" not in source.pipeline_kwargs:
        logger.info("latent model without a VAE: the export has no sample grid")
        sample_grid = False
    with staged_folder(output_dir) as staging:
        scheduler = build_scheduler(sampling)
        kwargs = {"default_num_inference_steps": sampling["num_inference_steps"], **source.pipeline_kwargs}
        pipe = EDM2Pipeline(unet=source.variants[0].build(), scheduler=scheduler, **kwargs)
        # diffusers' own save (EDM2Pipeline.save_pretrained would add a card of its own), then the code and variants.
        DiffusionPipeline.save_pretrained(pipe, staging, safe_serialization=True)
        write_custom_code(staging)
        if names != [None]:
            _save_variants(staging, pipe, source.variants, names)
        variants = [
            {"std": v.std, "variant": n, "metrics": dict(v.metrics), **({"source": v.source} if v.source else {})}
            for v, n in zip(source.variants, names)
        ]
        info = _info(source, options, pipe, variants)
        if sample_grid:
            rows, cols, seed = source.grid
            pipe.to(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            render_sample_grid(pipe, rows, cols, sampling["num_inference_steps"], seed).save(
                staging / SAMPLE_GRID_NAME
            )
            info["sample_grid"] = SAMPLE_GRID_NAME
        write_model_card(staging, info, info["repo_id"])
        check_export(staging)
    logger.info("exported %d variant(s) to %s", len(variants), output_dir)
    return ExportResult(output_dir=output_dir, variants=[(v["std"], v["variant"]) for v in variants], info=info)


__all__ = [
    "DEFAULT_LICENSE",
    "ExportOptions",
    "ExportResult",
    "ExportSource",
    "Variant",
    "write_export",
]
