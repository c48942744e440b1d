"""The EDM2 training loss (EDM2 paper, Eq. 21): denoising loss weighted by λ(σ), with learned uncertainty u(σ).

    L = E_{σ, y, ε} [ λ(σ)/e^{u(σ)} · ‖D(y + σε; σ) − y‖² + u(σ) ],   ln σ ~ N(P_mean, P_std²)

λ(σ) and D come from :mod:`edm2_diffusers.edm`, the one home of the EDM formulas. The expectation is estimated by
averaging over every element of the batch (``reduction="mean"``), or, as NVIDIA's training loop does, by summing each
image's C·H·W elements and averaging over the images (``"sum_per_image"``): the gradient is then C·H·W times larger,
which changes the effective ε of Adam (not the rest of its update, which is scale-invariant).

u(σ) is evaluated in float32 with autocast off (both reference implementations keep it out of fp16).
"""

from __future__ import annotations

import torch
from torch import nn

from ..edm import denoise, edm_precondition, loss_weight

REDUCTIONS = ("mean", "sum_per_image")


def sample_sigma(
    batch_size: int,
    P_mean: float,
    P_std: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels σ = exp(P_mean + P_std·n), n ~ N(0, 1) (log-normal, EDM Sec. 5)."""
    n = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
    return (P_mean + P_std * n).exp()


def edm2_loss(
    unet: nn.Module,
    images: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    sigma_data: float = 0.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """The EDM2 loss for given noise levels and noise, reduced over the batch as ``reduction`` says.

    Args:
        unet: an :class:`~edm2_diffusers.EDM2UNet2DModel` (F_θ and u(σ)).
        images (`torch.Tensor`): clean images y in [-1, 1], shape (N, C, H, W).
        sigma (`torch.Tensor`): σ per image, shape (N,).
        noise (`torch.Tensor`): ε ~ N(0, I), same shape as ``images``.
        class_labels (`torch.Tensor`, *optional*): class indices (N,) of a class-conditional model.
        sigma_data (`float`): σ_data.
        reduction (`str`): ``"mean"`` over images and elements, or ``"sum_per_image"``: the sum over each image's
            elements, averaged over the images.

    Returns:
        `torch.Tensor`: the scalar loss of λ/e^u·(D − y)² + u per element, reduced.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    images = images.to(torch.float32)
    sigma = sigma.to(torch.float32)
    view = (-1,) + (1,) * (images.ndim - 1)
    noisy = images + sigma.view(view) * noise.to(torch.float32)
    denoised = denoise(unet, noisy, sigma, class_labels, sigma_data=sigma_data)
    with torch.autocast(images.device.type, enabled=False):  # u(σ) in float32 under mixed precision
        logvar = unet.logvar(edm_precondition(sigma, sigma_data).c_noise).to(torch.float32)
    weight = loss_weight(sigma, sigma_data)
    per_element = (weight / logvar.exp()).view(view) * (denoised - images).square() + logvar.view(view)
    if reduction == "sum_per_image":
        return per_element.flatten(1).sum(dim=1).mean()
    return per_element.mean()


class EDM2TrainingLoss(nn.Module):
    """The module Accelerate wraps for training: holds the U-Net, computes :func:`edm2_loss` in ``forward``.

    Wrapping both F_θ and u(σ) in one ``forward`` lets DistributedDataParallel see every parameter used in the loss.
    Its state dict is the U-Net's with the prefix ``unet.``, also when compiled: ``compile_options`` compile the loss
    function (and the U-Net's forward inside it), not the module.

    Args:
        unet: the :class:`~edm2_diffusers.EDM2UNet2DModel` to train.
        sigma_data (`float`): σ_data.
        reduction (`str`): ``"mean"`` or ``"sum_per_image"`` (see :func:`edm2_loss`).
        compile_options (`dict`, *optional*): ``torch.compile`` keyword arguments (``None``: eager).
    """

    def __init__(
        self, unet: nn.Module, sigma_data: float = 0.5, reduction: str = "mean", compile_options: dict | None = None
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.unet = unet
        self.sigma_data = sigma_data
        self.reduction = reduction
        self._loss = torch.compile(edm2_loss, **compile_options) if compile_options is not None else edm2_loss

    def forward(
        self,
        images: torch.Tensor,
        sigma: torch.Tensor,
        noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._loss(
            self.unet,
            images,
            sigma,
            noise,
            class_labels=class_labels,
            sigma_data=self.sigma_data,
            reduction=self.reduction,
        )


@torch.no_grad()
def zero_nonfinite_grads_(module: nn.Module) -> None:
    """Set NaN and ±inf gradient elements of ``module``'s parameters to 0 in place (NVIDIA's ``force_finite``)."""
    for param in module.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0.0, posinf=0.0, neginf=0.0, out=param.grad)


__all__ = ["EDM2TrainingLoss", "edm2_loss", "sample_sigma", "zero_nonfinite_grads_"]
