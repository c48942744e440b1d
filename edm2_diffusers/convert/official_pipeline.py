"""Whole :class:`~edm2_diffusers.EDM2Pipeline` folders from NVIDIA's official EDM2 network pickles.

Building and saving are separate steps: :func:`convert_official_pipeline` reads the pickle(s) safely and returns the
pipeline with its provenance (:class:`ConvertedOfficialPipeline`), writing nothing; :func:`save_converted_pipeline`
writes one to a folder (``save_pretrained`` with safetensors, ``conversion.json`` and a README), replacing an earlier
pipeline folder only once the new one is complete. A hub-level exporter can take the built pipeline instead.

Of the package this module imports only :mod:`.official_network`, :mod:`.official`, :mod:`edm2_diffusers.pipelines`
and :mod:`edm2_diffusers.schedulers`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from ..files import staged_folder
from ..latents import load_vae
from ..pipelines import EDM2Pipeline
from ..schedulers import EDMHeunScheduler
from .official import from_official
from .official_network import extract_official_network, official_latent_encoder
from .safe_unpickler import load_official_pickle

__all__ = ["CONVERSION_INFO_NAME", "ConvertedOfficialPipeline", "convert_official_pipeline", "save_converted_pipeline"]

CONVERSION_INFO_NAME = "conversion.json"


@dataclass
class ConvertedOfficialPipeline:
    """An :class:`~edm2_diffusers.EDM2Pipeline` built from official pickles, with what is known about its sources.

    Args:
        pipeline (`EDM2Pipeline`): the pipeline (``guidance_unet`` set when a guiding network was given).
        info (`dict`): JSON-ready provenance: source files, official configs, ``guidance_scale``, latent settings.
    """

    pipeline: Any
    info: dict


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _source_name(path_or_file) -> str:
    if isinstance(path_or_file, (str, os.PathLike)):
        return os.path.basename(os.fspath(path_or_file))
    return getattr(path_or_file, "name", "<file object>")


def _cast(model, dtype):
    return model if model.dtype == dtype else model.to(dtype)


def _read_network(path_or_file, torch_dtype: torch.dtype):
    """The official network of one pickle, converted: ``(OfficialNetwork, EDM2UNet2DModel, latent settings)``.

    Errors past reading the file (no network in it, a network that does not convert) name the file too.
    """
    data = load_official_pickle(path_or_file)
    try:
        network = extract_official_network(data)
        unet = _cast(from_official(network.state_dict, network.config), torch_dtype)
        return network, unet, official_latent_encoder(data)
    except ValueError as err:
        where = os.fspath(path_or_file) if isinstance(path_or_file, (str, os.PathLike)) else _source_name(path_or_file)
        raise ValueError(f"{where}: {err}") from err


def convert_official_pipeline(
    pickle_path,
    guidance_pickle=None,
    guidance_scale: float | None = None,
    vae=None,
    vae_subfolder: str | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> ConvertedOfficialPipeline:
    """Build an :class:`~edm2_diffusers.EDM2Pipeline` from NVIDIA's EDM2 network pickle(s), safely.

    The networks are read with :func:`load_official_pickle` (nothing stored in the files runs) and converted with
    :func:`edm2_diffusers.convert.from_official`; the scheduler is :class:`~edm2_diffusers.EDMHeunScheduler` with
    EDM2's sampling defaults (σ ∈ [0.002, 80], ρ = 7, deterministic Heun). Latent (ImageNet-512) networks carry the
    per-channel latent standardization of their pickle's encoder in the pipeline config; their Stable Diffusion VAE
    is attached only when ``vae`` is given (it cannot be read from the pickle).

    Args:
        pickle_path (`str`, `os.PathLike` or binary file): the main network pickle (``edm2-img64-*.pkl``, …).
        guidance_pickle (*optional*): a second network pickle used as ``guidance_unet`` (the unconditional or smaller
            network of EDM2's guidance / autoguidance).
        guidance_scale (`float`, *optional*): the guidance weight w meant for this pair (recorded in ``info``; the
            pipeline takes it as a call argument). Required with ``guidance_pickle``, refused without it.
        vae (`str`, `os.PathLike` or `AutoencoderKL`, *optional*): the decoder of a latent network, as a model or as a
            local folder / Hub repository for ``AutoencoderKL.from_pretrained``.
        vae_subfolder (`str`, *optional*): subfolder of ``vae`` holding the autoencoder (e.g. ``"vae"``).
        torch_dtype (`torch.dtype`): dtype of the converted networks (the official files store float16).
    """
    if (guidance_pickle is None) != (guidance_scale is None):
        raise ValueError("give a guidance pickle and a guidance scale together (or neither)")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")

    main, unet, latent = _read_network(pickle_path, torch_dtype)
    info = {
        "source": _source_name(pickle_path),
        "official_config": _jsonable(main.config),
        "guidance_source": None,
        "guidance_official_config": None,
        "guidance_scale": guidance_scale,
        "latent": latent,
        "vae": None,
    }
    guidance_unet = None
    if guidance_pickle is not None:
        guide, guidance_unet, guide_latent = _read_network(guidance_pickle, torch_dtype)
        if guide_latent != latent:
            raise ValueError(
                f"the guidance network's latent space {guide_latent} differs from the main network's {latent}"
            )
        info.update(guidance_source=_source_name(guidance_pickle), guidance_official_config=_jsonable(guide.config))

    latent_kwargs = {}
    if latent is not None:
        latent_kwargs = dict(
            latent_mean=latent["latents_mean"], latent_std=latent["latents_std"], latent_final_std=latent["final_std"]
        )
    if vae is not None:
        if latent is None and unet.config.in_channels != 4:
            raise ValueError("a VAE was given, but the network works on pixels (its pickle has no latent encoder)")
        if not isinstance(vae, AutoencoderKL):
            info["vae"] = os.fspath(vae) if vae_subfolder is None else f"{os.fspath(vae)}/{vae_subfolder}"
        else:
            info["vae"] = getattr(vae.config, "_name_or_path", None) or "AutoencoderKL"
        vae = _cast(load_vae(vae, subfolder=vae_subfolder, what="the VAE"), torch_dtype).eval()

    pipeline = EDM2Pipeline(
        unet=unet, scheduler=EDMHeunScheduler(), guidance_unet=guidance_unet, vae=vae, **latent_kwargs
    )
    return ConvertedOfficialPipeline(pipeline=pipeline, info=info)


def _conversion_readme(info: dict) -> str:
    lines = [
        "# EDM2 pipeline converted from an official network pickle",
        "",
        f"Converted by edm2-diffusers from `{info['source']}` without executing code from the pickle.",
        "",
        "```python",
        "from edm2_diffusers import EDM2Pipeline",
        "",
    ]
    latent, vae_name = info.get("latent"), (info.get("latent") or {}).get("vae_name")
    if latent is not None and info.get("vae") is None:
        lines += [
            "from diffusers import AutoencoderKL",
            "",
            f'pipe = EDM2Pipeline.from_pretrained(".", vae=AutoencoderKL.from_pretrained("{vae_name}"))',
        ]
    else:
        lines.append('pipe = EDM2Pipeline.from_pretrained(".")')
    scale = info.get("guidance_scale")
    call = f"guidance_scale={scale}, " if scale is not None else ""
    lines += [f"images = pipe(batch_size=4, {call}num_inference_steps=32).images", "```", ""]
    if scale is not None:
        lines.append(f"Guiding network: `{info['guidance_source']}`, guidance scale {scale}.")
    if latent is not None:
        lines.append(
            f"Latent model: decode with the Stable Diffusion VAE `{vae_name}`"
            + (f" (saved here from `{info['vae']}`)." if info.get("vae") else "; it is not stored in this folder.")
            + " The latent standardization (latent_mean, latent_std, latent_final_std) is in model_index.json."
        )
    lines.append("")
    lines.append(f"Provenance and the official constructor arguments: `{CONVERSION_INFO_NAME}`.")
    return "\n".join(lines) + "\n"


def save_converted_pipeline(converted: ConvertedOfficialPipeline, out_dir, overwrite: bool = False):
    """Write a converted pipeline with ``save_pretrained(safe_serialization=True)`` plus ``conversion.json`` and a
    short README.

    The folder is written next to ``out_dir`` first and moved into place when complete, so a failure leaves any earlier
    content untouched.

    Args:
        converted (`ConvertedOfficialPipeline`): from :func:`convert_official_pipeline`.
        out_dir (`str` or `os.PathLike`): the output folder.
        overwrite (`bool`): replace an earlier pipeline folder there; without it a non-empty ``out_dir`` is an error.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty; pass --overwrite to replace it. Nothing was written."
            )
        if not (out / "model_index.json").is_file():
            raise ValueError(
                f"refusing to overwrite {out}: it holds no model_index.json, so it is not a pipeline folder"
            )
    with staged_folder(out) as staging:
        converted.pipeline.save_pretrained(staging, safe_serialization=True)
        (staging / CONVERSION_INFO_NAME).write_text(json.dumps(converted.info, indent=2) + "\n")
        (staging / "README.md").write_text(_conversion_readme(converted.info))
    return out
