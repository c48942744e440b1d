"""Latent standardization of EDM2's latent models, written once for the pipeline, training and export.

EDM2's ImageNet-512 models run in the Stable Diffusion VAE's latent space. The raw latents (the VAE sees images in
[0, 1]) are standardized per channel to std 0.5 = σ_data: x = (raw − mean)·(final_std / std); the pipeline undoes
it before decoding. The VAE's own ``scaling_factor`` is not used.

This module sits on the ground floor with ``edm``, ``models``, ``schedulers`` and ``pipelines``: it imports only
torch, numpy and diffusers, so the pipeline's bundled custom code can carry it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

# Per-channel statistics of the raw latents of the Stable Diffusion VAE (`stabilityai/sd-vae-ft-mse`) on images in
# [0, 1], as used by EDM2's ImageNet latent models; standardized latents get std `final_std` = 0.5 = σ_data.
SD_VAE_LATENT_MEAN = (5.81, 3.25, 0.12, -2.15)
SD_VAE_LATENT_STD = (4.17, 4.62, 3.71, 3.28)
LATENT_FINAL_STD = 0.5


def _channel_view(values: Sequence[float], ref: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=ref.device).reshape(1, -1, 1, 1)
    if t.shape[1] != ref.shape[1]:
        raise ValueError(f"{t.shape[1]} per-channel latent statistics for latents with {ref.shape[1]} channels")
    return t


def standardize_latents(
    raw: torch.Tensor, latent_mean: Sequence[float], latent_std: Sequence[float], final_std: float = LATENT_FINAL_STD
) -> torch.Tensor:
    """Raw VAE latents -> the model's latents: x = (raw − mean)·(final_std / std), per channel.

    The VAE's own ``scaling_factor`` is not used: EDM2 replaces it with these per-channel statistics.

    Args:
        raw (`torch.Tensor`): raw latents `(N, C, h, w)` as sampled from the VAE posterior.
        latent_mean (`Sequence[float]`), latent_std (`Sequence[float]`): per-channel statistics of the raw latents.
        final_std (`float`): std of the standardized latents (EDM2: 0.5).
    """
    raw = raw.to(torch.float32)
    return (raw - _channel_view(latent_mean, raw)) * (final_std / _channel_view(latent_std, raw))


def unstandardize_latents(
    latents: torch.Tensor,
    latent_mean: Sequence[float],
    latent_std: Sequence[float],
    final_std: float = LATENT_FINAL_STD,
) -> torch.Tensor:
    """The inverse of :func:`standardize_latents`: raw = x·(std / final_std) + mean, per channel.

    Args:
        latents (`torch.Tensor`): the model's latents `(N, C, h, w)`.
        latent_mean (`Sequence[float]`), latent_std (`Sequence[float]`): per-channel statistics of the raw latents.
        final_std (`float`): std of the standardized latents (EDM2: 0.5).
    """
    latents = latents.to(torch.float32)
    return latents * (_channel_view(latent_std, latents) / final_std) + _channel_view(latent_mean, latents)


@dataclass(frozen=True)
class LatentStandardizer:
    """Per-channel standardization of raw VAE latents: x = (raw − mean)·(final_std / std), and its inverse.

    A holder of the constants around :func:`standardize_latents` / :func:`unstandardize_latents`.

    Args:
        latent_mean (`tuple[float]`): per-channel mean of the raw latents.
        latent_std (`tuple[float]`): per-channel standard deviation of the raw latents.
        final_std (`float`): standard deviation of the standardized latents (EDM2: 0.5 = σ_data).
    """

    latent_mean: tuple[float, ...] = SD_VAE_LATENT_MEAN
    latent_std: tuple[float, ...] = SD_VAE_LATENT_STD
    final_std: float = LATENT_FINAL_STD

    def __post_init__(self):
        mean = tuple(float(v) for v in self.latent_mean)
        std = tuple(float(v) for v in self.latent_std)
        if len(mean) != len(std) or not mean:
            raise ValueError(f"latent_mean ({len(mean)} values) and latent_std ({len(std)}) must have one per channel")
        if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
            raise ValueError(f"latent statistics must be finite with positive std; got mean {mean}, std {std}")
        if not float(self.final_std) > 0:
            raise ValueError(f"final_std must be positive, got {self.final_std}")
        object.__setattr__(self, "latent_mean", mean)
        object.__setattr__(self, "latent_std", std)
        object.__setattr__(self, "final_std", float(self.final_std))

    @property
    def channels(self) -> int:
        return len(self.latent_mean)

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents `(N, C, h, w)` → the model's latents (float32)."""
        return standardize_latents(raw, self.latent_mean, self.latent_std, self.final_std)

    def unstandardize(self, latents: torch.Tensor) -> torch.Tensor:
        """The model's latents `(N, C, h, w)` → raw latents for the VAE decoder (float32)."""
        return unstandardize_latents(latents, self.latent_mean, self.latent_std, self.final_std)

    def sample(
        self, moments: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True
    ) -> torch.Tensor:
        """Stored posterior moments `(N, 2C, h, w)` → standardized training latents `(N, C, h, w)`.

        Draws z = mean + std·ε (EDM2 draws anew each time a row is read), then standardizes it.

        Args:
            moments (`torch.Tensor`): rows of the ``latents`` column: posterior mean and std, concatenated.
            generator (`torch.Generator`, *optional*): for ε.
            sample (`bool`): ``False`` uses the posterior mean (no noise).
        """
        if moments.ndim != 4 or moments.shape[1] != 2 * self.channels:
            raise ValueError(
                f"latent moments must have shape (N, {2 * self.channels}, h, w) (mean and std of {self.channels} "
                f"channels), got {tuple(moments.shape)}"
            )
        mean, std = moments.to(torch.float32).chunk(2, dim=1)
        raw = mean
        if sample:
            raw = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.standardize(raw)

    def pipeline_kwargs(self) -> dict:
        """Keyword arguments of :class:`~edm2_diffusers.EDM2Pipeline` that decode with these constants."""
        return {("latent_final_std" if k == "final_std" else k): v for k, v in self.to_dict().items()}

    @classmethod
    def from_pipeline(cls, pipeline) -> LatentStandardizer:
        """The constants an :class:`~edm2_diffusers.EDM2Pipeline` decodes with."""
        c = pipeline.config
        if c.latent_mean is None or c.latent_std is None:
            raise ValueError("the pipeline has no latent statistics (it is a pixel-space pipeline)")
        return cls(tuple(c.latent_mean), tuple(c.latent_std), c.latent_final_std)

    def to_dict(self) -> dict:
        return {
            "latent_mean": list(self.latent_mean),
            "latent_std": list(self.latent_std),
            "final_std": self.final_std,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatentStandardizer:
        return cls(tuple(d["latent_mean"]), tuple(d["latent_std"]), d.get("final_std", LATENT_FINAL_STD))


def load_vae(
    vae, latent_channels: int | None = None, subfolder: str | None = None, what: str = "the VAE", torch_dtype=None
):
    """An ``AutoencoderKL`` for a latent model: ``vae`` as given, or loaded from a folder or Hub id, in eval mode.

    Args:
        vae (`AutoencoderKL`, `str` or `os.PathLike`): the model, or where to load it from.
        latent_channels (`int`, *optional*): the latent channels the model must have.
        subfolder (`str`, *optional*): the folder inside ``vae`` that holds it (e.g. ``"vae"``).
        what (`str`): how error messages name it (e.g. ``"sampling.vae"``).
        torch_dtype (`torch.dtype`, *optional*): the dtype to load it in.

    Raises:
        ValueError: it cannot be loaded, or has another number of latent channels.
    """
    if not isinstance(vae, AutoencoderKL):
        source = str(vae)
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=torch_dtype)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load {what} {source!r}: {err}") from None
    if latent_channels is not None and vae.config.latent_channels != latent_channels:
        raise ValueError(f"{what} has {vae.config.latent_channels} latent channels, the latents {latent_channels}")
    return vae.eval()


__all__ = [
    "LATENT_FINAL_STD",
    "SD_VAE_LATENT_MEAN",
    "SD_VAE_LATENT_STD",
    "LatentStandardizer",
    "load_vae",
    "standardize_latents",
    "unstandardize_latents",
]
