"""Sample grids: tiles of a pipeline's samples, one class per row for class-conditional models.

One renderer serves the training run's progress grids and the export's model-card grid, so both look alike: the same
seeded noise every time (a person sees the model improve), grey gaps between tiles, small images enlarged to
64-pixel tiles.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .files import atomic_path


def tile_images(
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
def render_sample_grid(pipe, rows: int, cols: int, num_inference_steps: int, seed: int = 0) -> Image.Image:
    """A ``rows × cols`` grid of samples of ``pipe`` (one class per row for class-conditional models).

    Args:
        pipe (`EDM2Pipeline`): the pipeline to sample.
        rows (`int`), cols (`int`): grid shape.
        num_inference_steps (`int`): sampler steps.
        seed (`int`): seed of the noise (and of nothing else).
    """
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=rows * cols,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(int(seed)),
        class_labels=grid_class_labels(rows, cols, pipe.unet.config.num_class_embeds),
        output_type="np",
    ).images
    scale = max(1, -(-64 // max(images.shape[1:3])))  # small images (8x8 digits) are enlarged to 64-pixel tiles
    return tile_images(images, rows, cols, scale=scale)


def save_png_atomic(image: Image.Image, path: str) -> str:
    """Write ``image`` as a PNG at ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


__all__ = ["grid_class_labels", "render_sample_grid", "save_png_atomic", "tile_images"]
