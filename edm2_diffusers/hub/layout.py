"""The layout of a pipeline export: ONE diffusers pipeline whose U-Net carries each EMA std as a weight variant.

::

    OUT/
      model_index.json      "_class_name": ["pipeline_edm2", "EDM2Pipeline"], "unet": ["unet_edm2", ...], ...
      pipeline_edm2.py      custom code (see remote_code.py)
      unet/  config.json  unet_edm2.py
             diffusion_pytorch_model.safetensors           the default std (the first given, or the sweep's best)
             diffusion_pytorch_model.ema0050.safetensors   every exported std as a diffusers weight variant
             diffusion_pytorch_model.ema0100.safetensors
      scheduler/  scheduler_config.json  scheduling_edm_heun.py   (config only for a diffusers scheduler the EMA
                                                                sweep chose, e.g. EDMDPMSolverMultistepScheduler)
      vae/ ...              latent runs only; stored once, like the code and the scheduler
      README.md  samples.png  export_info.json

``from_pretrained(OUT, variant="ema0100")`` (diffusers' mechanism of ``variant="fp16"``) loads that std's U-Net and
fetches only its weights file from the Hub. diffusers refuses variant names with a dot and matches weight files by
name, so a std is named by its value in thousandths with four digits: fixed width, no dot, no name a prefix of
another. Two stds that round to the same name are refused.
"""

from __future__ import annotations

import re

from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

EXPORT_FORMAT = "edm2-diffusers/pipeline-export"
FORMAT_VERSION = 2
EXPORT_INFO_NAME = "export_info.json"
SAMPLE_GRID_NAME = "samples.png"
VARIANT_PREFIX = "ema"
VARIANT_RE = re.compile(rf"^{VARIANT_PREFIX}\d{{4}}$")


def variant_name(std: float) -> str:
    """The weight variant of EMA std ``std``: ``ema0050`` for 0.050, ``ema0100`` for 0.100.

    Args:
        std (`float`): the EMA std (σ_rel), in (0, 10).

    Raises:
        ValueError: when the std does not round to a name in ``ema0001`` .. ``ema9999``.
    """
    milli = round(float(std) * 1000)
    if not 1 <= milli <= 9999:
        raise ValueError(f"EMA std {std!r} has no variant name: variants name stds from 0.001 to 9.999 (3 decimals)")
    return f"{VARIANT_PREFIX}{milli:04d}"


def variant_names(stds) -> list[str]:
    """The variant names of ``stds``, refusing two stds that share one.

    Args:
        stds (`list[float]`): distinct EMA stds.
    """
    names = {}
    for std in stds:
        name = variant_name(std)
        if name in names:
            raise ValueError(
                f"EMA stds {names[name]} and {std} share the variant name {name}; variants name stds to 3 decimals"
            )
        names[name] = std
    return list(names)


def weights_name(variant: str | None = None) -> str:
    """``diffusion_pytorch_model[.<variant>].safetensors``, as diffusers names a model's (variant) weights."""
    if variant is None:
        return SAFETENSORS_WEIGHTS_NAME
    stem, suffix = SAFETENSORS_WEIGHTS_NAME.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def variants_in(files) -> list[str]:
    """The weight variants among repository paths (``unet/diffusion_pytorch_model.ema0050.safetensors`` ...)."""
    stem, suffix = SAFETENSORS_WEIGHTS_NAME.rsplit(".", 1)
    pattern = re.compile(rf"(?:^|/){re.escape(stem)}\.([^./]+)\.{re.escape(suffix)}$")
    return sorted({m.group(1) for f in files if (m := pattern.search(str(f)))})


__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_INFO_NAME",
    "FORMAT_VERSION",
    "SAMPLE_GRID_NAME",
    "variant_name",
    "variant_names",
    "variants_in",
    "weights_name",
]
