"""Rows of a training dataset as tensors: images in [-1, 1] (numpy and PIL only, no torchvision) or latent moments.

Random horizontal flips are applied per batch in the training loop (:func:`random_flip`) from a seeded generator, so a
resumed run sees the same flips.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .latents import center_crop
from .sources import dataset_columns


def image_to_array(image: Image.Image, *args, **kwargs) -> np.ndarray:
    """PIL image → float32 array (C, H, W) in [-1, 1]: the 8-bit pixels of :func:`image_pixels` (same arguments:
    ``resolution``, ``channels``, ``rng``, ``crop``), resized and cropped, mapped to [-1, 1]."""
    return _to_unit_range(image_pixels(image, *args, **kwargs))


def image_pixels(
    image: Image.Image,
    resolution: int | None,
    channels: int,
    rng: np.random.Generator | None = None,
    crop: str | None = None,
) -> np.ndarray:
    """PIL image → 8-bit array (H, W) or (H, W, C), resized (shorter side) and cropped to ``resolution``.

    The crop is the middle square, or with ``rng`` a random one (diffusers' ``RandomCrop`` after ``Resize``).
    ``crop="dhariwal"`` uses ADM's centre crop (:func:`~edm2_diffusers.data.latents.center_crop`, NVIDIA's
    ``dataset_tool.py --transform=center-crop-dhariwal``) instead of one bicubic resize.
    """
    if crop == "dhariwal" and resolution is not None:
        image = Image.fromarray(center_crop(image, resolution))
    image = image.convert("L" if channels == 1 else "RGB")
    if resolution is not None and image.size != (resolution, resolution):
        w, h = image.size
        scale = resolution / min(w, h)
        new_size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
        spare_x, spare_y = new_size[0] - resolution, new_size[1] - resolution
        if rng is None:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = (int(v) for v in rng.integers(0, [spare_x + 1, spare_y + 1]))
        image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image)


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """8-bit pixels (H, W) or (H, W, C) → float32 (C, H, W) in [-1, 1]."""
    array = pixels.astype(np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return array.transpose(2, 0, 1) / 127.5 - 1.0


DECODE_CACHE_BYTES = 1 << 30  # the training set's decoded images kept in memory (EDM2ImageDataset.cache_bytes)


class EDM2ImageDataset(torch.utils.data.Dataset):
    """A map-style torch dataset over a ``datasets.Dataset``: ``{"pixel_values", "class_labels"?, "index"}``.

    Args:
        hf_dataset (`datasets.Dataset`): the source.
        image_column (`str`), label_column (`str`, *optional*): columns to read.
        resolution (`int`, *optional*): resize/crop size; ``None`` keeps images as stored.
        channels (`int`): 1 (grey) or 3 (RGB).
        crop (`str`, *optional*): ``"dhariwal"`` for ADM's centre crop (see :func:`image_to_array`).
        center_crop (`bool`): crop the middle square; ``False``: a random square drawn from (seed, epoch, index), so
            a resumed run crops alike (the loader's ``set_epoch`` reaches :meth:`set_epoch`).
        seed (`int`): seed of the random crops.
        cache_bytes (`int`): for training over many epochs: with center crops (the same pixels every epoch),
            images stay in memory as 8-bit arrays once decoded (in the main process, not in loader workers), up to
            this many bytes, so that later epochs decode no image again (CIFAR-10's 50,000 take 150 MB). 0: no cache.
    """

    def __init__(
        self,
        hf_dataset,
        image_column: str,
        label_column: str | None,
        resolution: int | None,
        channels: int,
        center_crop: bool = True,
        seed: int = 0,
        crop: str | None = None,
        cache_bytes: int = 0,
    ):
        columns = [image_column] + ([label_column] if label_column else [])
        self.dataset = hf_dataset.select_columns(columns)
        self.image_column = image_column
        self.label_column = label_column
        self.resolution = resolution
        self.channels = channels
        self.crop = crop
        self.center_crop = center_crop
        self.seed = seed
        self.epoch = 0
        self.cache_bytes = cache_bytes if center_crop else 0  # random crops differ by epoch: nothing to keep
        self._cache: dict[int, tuple] = {}  # index → (8-bit pixels, label)
        self._cached_bytes = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def _decode(self, image, label, index: int) -> tuple:
        rng = None if self.center_crop else np.random.default_rng([self.seed, self.epoch, index])
        pixels = image_pixels(image, self.resolution, self.channels, rng, self.crop)
        in_main = torch.utils.data.get_worker_info() is None  # a loader worker's cache would end with its epoch
        if in_main and self._cached_bytes + pixels.nbytes <= self.cache_bytes:
            self._cache[index] = (pixels, label)
            self._cached_bytes += pixels.nbytes
        return pixels, label

    def _item(self, pixels, label, index: int) -> dict:
        item = {"pixel_values": torch.from_numpy(_to_unit_range(pixels)), "index": index}
        if self.label_column:
            item["class_labels"] = int(label)
        return item

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        # Batched read: one Arrow access per batch (for the images not in the cache) instead of one per image.
        indices = [int(i) for i in indices]
        todo = list(dict.fromkeys(i for i in indices if i not in self._cache))
        decoded = {}
        if todo:
            rows = self.dataset[todo]
            labels = rows[self.label_column] if self.label_column else [None] * len(todo)
            decoded = {i: self._decode(img, lab, i) for img, lab, i in zip(rows[self.image_column], labels, todo)}
        return [self._item(*(decoded.get(i) or self._cache[i]), i) for i in indices]


class EDM2LatentDataset(torch.utils.data.Dataset):
    """A map-style torch dataset over a latent ``datasets.Dataset``: ``{"latent_moments", "class_labels"?, "index"}``.

    Rows hold the VAE posterior's mean and std (2C channels); the training loop draws the latent from them inside
    its seeded micro-step (:meth:`~edm2_diffusers.training.latents.LatentStandardizer.sample`), so a resumed run
    draws the same latents.

    Args:
        hf_dataset (`datasets.Dataset`): the source.
        column (`str`), label_column (`str`, *optional*): columns to read.
    """

    def __init__(self, hf_dataset, column: str, label_column: str | None):
        columns = [column] + ([label_column] if label_column else [])
        self.dataset = hf_dataset.select_columns(columns).with_format("numpy")
        self.column = column
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        rows = self.dataset[[int(i) for i in indices]]
        moments = torch.from_numpy(np.asarray(rows[self.column], dtype=np.float32))
        items = [{"latent_moments": m, "index": int(i)} for m, i in zip(moments, indices)]
        if self.label_column:
            for item, label in zip(items, rows[self.label_column]):
                item["class_labels"] = int(label)
        return items


def build_image_dataset(ds, data_cfg: dict, model_cfg: dict, source: str, resolution: int, seed: int = 0):
    """The torch dataset the training loop reads, from a checked ``datasets.Dataset`` (``seed``: random crops); images
    decoded once are kept up to ``DECODE_CACHE_BYTES``."""
    image_column, label_column = dataset_columns(source, data_cfg)
    if source == "latents":
        return EDM2LatentDataset(ds, image_column, label_column)
    channels = model_cfg.get("in_channels", 3)
    center_crop = data_cfg.get("center_crop", True)
    return EDM2ImageDataset(
        ds,
        image_column,
        label_column,
        resolution,
        channels,
        center_crop=center_crop,
        seed=seed,
        crop=data_cfg.get("crop"),
        cache_bytes=DECODE_CACHE_BYTES,
    )


def random_flip(
    images: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None
) -> torch.Tensor:
    """Flip each image horizontally with probability ½, drawing from ``generator`` (or with the given ``uniform``
    draws in [0, 1), one per image)."""
    if uniform is None:
        uniform = torch.rand(images.shape[0], generator=generator, device=images.device)
    flip = uniform < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


__all__ = [
    "EDM2ImageDataset",
    "EDM2LatentDataset",
    "build_image_dataset",
    "image_pixels",
    "image_to_array",
    "random_flip",
]
