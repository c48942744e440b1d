"""Sample grids during training: the same seeded noise every time, so a person sees the model improve."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def make_image_grid(
    images: np.ndarray, rows: int, cols: int, padding: int = 2, scale: int = 1, pad_value: float = 0.5
) -> Image.Image:
    """Tile ``rows·cols`` images (N, H, W, C) with values in [0, 1] into one PIL image, row-major.

    Args:
        images (`np.ndarray`): float images in [0, 1], shape (N, H, W, C) with C = 1 or 3.
        rows (`int`), cols (`int`): grid shape; N must equal rows·cols.
        padding (`int`): pixels between tiles.
        pad_value (`float`): grey level of the gaps in [0, 1] (mid-grey keeps dark-background tiles apart).
        scale (`int`): nearest-neighbour enlargement of each tile (small images are easier to judge larger).
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] != rows * cols:
        raise ValueError(f"need {rows * cols} images of shape (H, W, C), got an array of shape {images.shape}")
    pixels = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = pixels.shape
    grid = np.full(
        (rows * (h + padding) + padding, cols * (w + padding) + padding, c), round(pad_value * 255), dtype=np.uint8
    )
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = pixels[i]
    return Image.fromarray(grid[:, :, 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")


def grid_class_labels(rows: int, cols: int, num_classes: int | None) -> list[int] | None:
    """Class of each grid cell: one class per row (spread over the classes when there are more classes than rows)."""
    if not num_classes:
        return None
    per_row = [(r * num_classes) // rows if rows <= num_classes else r % num_classes for r in range(rows)]
    return [c for c in per_row for _ in range(cols)]


@torch.no_grad()
def sample_grid(
    unet,
    sampling_cfg: dict,
    sigma_data: float = 0.5,
    device: torch.device | str | None = None,
    vae=None,
    latent_kwargs: dict | None = None,
) -> Image.Image:
    """Draw a grid of samples with :class:`~edm2_diffusers.EDM2Pipeline` and the EDM Heun sampler.

    Args:
        unet: the (EMA) :class:`~edm2_diffusers.EDM2UNet2DModel` to sample from.
        sampling_cfg (`dict`): the ``sampling`` config section (steps, σ range, ρ, grid shape, seed).
        sigma_data (`float`): σ_data of the run.
        device: where to sample (defaults to the U-Net's device).
        vae (`AutoencoderKL`, *optional*): decoder of a latent model.
        latent_kwargs (`dict`, *optional*): the latent standardization of a latent model
            (:meth:`~edm2_diffusers.training.latents.LatentStandardizer.pipeline_kwargs`).
    """
    from ..pipelines import EDM2Pipeline
    from ..schedulers import EDMHeunScheduler

    rows, cols = sampling_cfg["grid_rows"], sampling_cfg["grid_cols"]
    scheduler = EDMHeunScheduler(
        sigma_min=sampling_cfg["sigma_min"],
        sigma_max=sampling_cfg["sigma_max"],
        sigma_data=sigma_data,
        rho=sampling_cfg["rho"],
    )
    pipe = EDM2Pipeline(unet=unet, scheduler=scheduler, vae=vae, **(latent_kwargs or {}))
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe = pipe.to(device)
    generator = torch.Generator("cpu").manual_seed(int(sampling_cfg["seed"]))
    labels = grid_class_labels(rows, cols, unet.config.num_class_embeds)
    images = pipe(
        batch_size=rows * cols,
        num_inference_steps=sampling_cfg["num_inference_steps"],
        generator=generator,
        class_labels=labels,
        output_type="np",
    ).images
    scale = max(1, 64 // images.shape[1])  # small images (8x8 digits) are enlarged to 64-pixel tiles
    return make_image_grid(images, rows, cols, scale=scale)


def save_grid(image: Image.Image, output_dir: str, step: int) -> str:
    """Write ``output_dir/samples/step-<step>.png`` atomically; return its path."""
    folder = os.path.join(output_dir, "samples")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:07d}.png")
    tmp = path + ".tmp"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


__all__ = ["grid_class_labels", "make_image_grid", "sample_grid", "save_grid"]
