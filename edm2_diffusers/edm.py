"""EDM preconditioning, noise schedule and loss weighting: the one home of this math.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"), Table 1, and the EDM2 paper
(Karras et al. 2024), Eq. 21. Every other module (loss, scheduler, pipeline, guidance, converters) calls these.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Preconditioning(NamedTuple):
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def edm_precondition(sigma: torch.Tensor | float, sigma_data: float = 0.5) -> Preconditioning:
    """c_skip, c_out, c_in and c_noise of EDM (Table 1 of Karras et al. 2022) for noise level(s) ``sigma``.

    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ)), with c_noise = ¼·ln σ.
    """
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    var = sigma**2 + sigma_data**2
    return Preconditioning(
        c_skip=sigma_data**2 / var,
        c_out=sigma * sigma_data / var.sqrt(),
        c_in=1 / var.sqrt(),
        c_noise=sigma.log() / 4,
    )


def sigma_from_c_noise(c_noise: torch.Tensor | float) -> torch.Tensor:
    """Inverse of c_noise = ¼·ln σ."""
    return torch.exp(4 * torch.as_tensor(c_noise))


def karras_sigmas(
    num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dtype=torch.float64
) -> torch.Tensor:
    """The ρ-schedule σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..N−1 (Eq. 5, EDM)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=dtype)
    ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).to(dtype)


def loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """λ(σ) = (σ² + σ_data²)/(σ·σ_data)², the EDM loss weight (Karras et al. 2022, Table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _as_batch(sigma, batch: int, ref: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=ref.device)
    if not sigma.is_floating_point():
        sigma = sigma.float()
    sigma = sigma.to(torch.float32).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch} samples")
    return sigma


def denoise(
    unet,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    class_labels: torch.Tensor | None = None,
    sigma_data: float = 0.5,
    return_logvar: bool = False,
):
    """The denoiser D(x; σ) = c_skip·x + c_out·F_θ(c_in·x; c_noise) of an ``EDM2UNet2DModel``-like network.

    Computed in float32 like the reference implementations. With ``return_logvar`` also returns u(σ) (EDM2 Eq. 21).
    """
    x = x.to(torch.float32)
    sigma = _as_batch(sigma, x.shape[0], x)
    c = edm_precondition(sigma, sigma_data)
    view = (-1,) + (1,) * (x.ndim - 1)
    model_dtype = getattr(unet, "dtype", torch.float32)
    model_in = (c.c_in.view(view) * x).to(model_dtype)
    F = unet(model_in, c.c_noise.to(model_dtype), class_labels=class_labels).sample
    D = c.c_skip.view(view) * x + c.c_out.view(view) * F.to(torch.float32)
    if return_logvar:
        return D, unet.logvar(c.c_noise).to(torch.float32)
    return D


__all__ = [
    "Preconditioning",
    "edm_precondition",
    "sigma_from_c_noise",
    "karras_sigmas",
    "loss_weight",
    "denoise",
]
