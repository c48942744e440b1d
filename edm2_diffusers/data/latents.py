"""Latent datasets for latent EDM2 models (the paper's ImageNet-512 models run in the Stable Diffusion VAE's space).

Images are encoded once. Each row keeps the VAE posterior's per-pixel mean and standard deviation (2·C channels, mean
first) rather than one latent, so that training can draw a fresh latent z = mean + std·ε every time it reads the row.
The drawn latent is then standardized per channel to std 0.5 = σ_data by
:class:`edm2_diffusers.latents.LatentStandardizer`: what training feeds the model and what
:class:`~edm2_diffusers.EDM2Pipeline` decodes use one formula.

As in EDM2, the VAE sees images in [0, 1] (not Stable Diffusion's [−1, 1]); the default per-channel statistics are the
ones EDM2 measured for ``stabilityai/sd-vae-ft-mse`` on such inputs. The encoder also measures the statistics of the
dataset it encodes, so another VAE can be standardized with its own numbers.

The constants travel with the dataset, as JSON in ``dataset.info.description`` (kept by ``save_to_disk``,
``load_from_disk`` and ``push_to_hub``); :func:`read_latent_info` reads them back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..latents import LatentStandardizer

logger = logging.getLogger(__name__)

LATENT_INFO_KEY = "edm2_latents"
LATENTS_COLUMN = "latents"
LABEL_COLUMN = "label"
STORAGE_DTYPES = ("float32", "float16")


# ------------------------------------------------------------------------------------------------ images


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """Square centre crop as ADM and EDM2 prepare ImageNet: halve with a box filter while the shorter side is at least
    twice ``resolution``, resize (bicubic) so the shorter side is ``resolution``, then cut the centre square.

    Returns:
        `np.ndarray`: uint8 RGB array `(resolution, resolution, 3)`.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def images_to_tensor(images: Iterable[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images → centre-cropped float32 tensor `(N, 3, resolution, resolution)` in [0, 1] (the VAE's input)."""
    arrays = [center_crop(img, resolution) for img in images]
    if not arrays:
        raise ValueError("no images to convert")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32) / 255.0


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → the VAE posterior's moments `(N, 2C, h, w)`: mean and std concatenated (float32, CPU).

    Args:
        vae (`AutoencoderKL`): the autoencoder (any device and dtype).
        images (`torch.Tensor`): `(N, 3, H, W)` with values in [0, 1].
    """
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(f"images must have shape (N, {vae.config.in_channels}, H, W), got {tuple(images.shape)}")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0 or hi > 1:
        raise ValueError(f"images must be in [0, 1] (EDM2 encodes [0, 1], not [-1, 1]); got values in [{lo}, {hi}]")
    dist = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).to(device="cpu", dtype=torch.float32)


def encoded_batches(vae, images, image_column: str, resolution: int, batch_size: int, state=None):
    """Posterior moments of consecutive batches of ``batch_size`` rows, in dataset order: ``(first row, moments)``.

    With several processes, batch ``b`` is encoded by process ``b % P`` and each round of P batches is gathered on
    the main process, which alone yields (the others yield nothing, but must run the generator to its end). Every
    process encodes exactly the batches one process would: the VAE's arithmetic depends on the batch a row shares
    (on the CPU a row encoded alone differs from the same row in a batch of 8 by ~1e-6), so dealing out whole
    batches keeps the values those of a one-process encoding, bit for bit (on the same device and thread count).

    Args:
        vae (`AutoencoderKL`): the autoencoder, on this process's device.
        images (`datasets.Dataset`): the rows to encode (only ``image_column`` is read).
        image_column (`str`), resolution (`int`), batch_size (`int`): as for :func:`build_latent_dataset`.
        state (`accelerate.PartialState` or `accelerate.Accelerator`, *optional*): the processes; ``None`` is one.
    """

    def encode(start):
        return encode_images(vae, images_to_tensor(images[start : start + batch_size][image_column], resolution))

    starts = range(0, len(images), batch_size)
    count = 1 if state is None else state.num_processes
    if count == 1:
        for start in starts:
            yield start, encode(start)
        return
    mine = starts[state.process_index :: count]
    shown = ", ".join(map(str, mine[:8])) + (", ..." if len(mine) > 8 else "")
    logger.info("process %d of %d encodes %d batches, from rows %s", state.process_index, count, len(mine), shown)
    shape = tuple(encode_images(vae, images_to_tensor([images[0][image_column]], resolution)).shape[1:])
    for first in range(0, len(starts), count):
        group = starts[first : first + count]
        # Fixed-size messages: a short last batch, or no batch at all in the last round, is padded with zeros.
        message = torch.zeros((batch_size, *shape), dtype=torch.float32, device=state.device)
        if state.process_index < len(group):
            moments = encode(group[state.process_index])
            message[: len(moments)] = moments.to(state.device)
        gathered = [torch.empty_like(message) for _ in range(count)] if state.is_main_process else None
        torch.distributed.gather(message, gathered, dst=0)
        if state.is_main_process:
            for start, moments in zip(group, gathered):
                yield start, moments[: min(batch_size, len(images) - start)].cpu()


class LatentStatistics:
    """Running per-channel mean and std of latents drawn from posteriors: E[z] = E[μ], E[z²] = E[μ²] + E[σ²]."""

    def __init__(self):
        self.count = 0
        self.sum = None
        self.sum_sq = None

    def update(self, moments: torch.Tensor) -> None:
        mean, std = moments.to(torch.float64).chunk(2, dim=1)
        s = mean.sum(dim=(0, 2, 3))
        sq = (mean.square() + std.square()).sum(dim=(0, 2, 3))
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.count += mean.shape[0] * mean.shape[2] * mean.shape[3]

    def result(self) -> tuple[list[float], list[float]]:
        if not self.count:
            raise ValueError("no latents were measured")
        mean = self.sum / self.count
        var = (self.sum_sq / self.count - mean.square()).clamp_min(0)
        return mean.tolist(), var.sqrt().tolist()


# ------------------------------------------------------------------------------------------------ datasets


def _label_feature(dataset, label_column: str | None):
    if label_column is None:
        return None
    if label_column not in dataset.column_names:
        raise ValueError(f"the dataset has no label column {label_column!r}; its columns are {dataset.column_names}")
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature
    if isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
        return datasets.Value("int64")
    raise ValueError(f"label column {label_column!r} must hold integer class ids, its feature is {feature}")


def _check_encoding(dataset, image_column: str, batch_size: int, storage_dtype: str) -> None:
    if image_column not in dataset.column_names:
        raise ValueError(f"the dataset has no image column {image_column!r}; its columns are {dataset.column_names}")
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(
            f"column {image_column!r} does not hold images (its feature is {dataset.features[image_column]})"
        )
    if len(dataset) == 0:
        raise ValueError("the image dataset is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype!r}")


def build_latent_dataset(
    vae,
    dataset,
    resolution: int,
    image_column: str = "image",
    label_column: str | None = None,
    batch_size: int = 8,
    storage_dtype: str = "float32",
    standardizer: LatentStandardizer | None = None,
    use_measured_statistics: bool = False,
    cache_dir: str | None = None,
    vae_name: str | None = None,
    progress: bool = False,
    state=None,
):
    """Encode an image dataset into a latent ``datasets.Dataset`` (columns ``latents`` and, with labels, ``label``).

    With several processes (``state``), every process calls this on the same dataset: each encodes its share of the
    batches (:func:`encoded_batches`) and the main process gathers them in order, measures and writes; the result is
    that of one process, bit for bit.

    Args:
        vae (`AutoencoderKL`): the autoencoder, in eval mode on the device to encode on.
        dataset (`datasets.Dataset`): images (any size; centre-cropped to ``resolution``) and optional labels.
        resolution (`int`): image size fed to the VAE; latents are ``resolution / 2^(VAE levels − 1)`` wide.
        image_column (`str`), label_column (`str`, *optional*): columns to read.
        batch_size (`int`): images per VAE call.
        storage_dtype (`str`): ``"float32"`` or ``"float16"`` for the stored moments.
        standardizer (`LatentStandardizer`, *optional*): the constants to record; the Stable Diffusion VAE's EDM2
            values by default.
        use_measured_statistics (`bool`): record the statistics measured on this dataset instead.
        cache_dir (`str`, *optional*): where ``datasets`` writes the Arrow file while encoding.
        vae_name (`str`, *optional*): recorded in the dataset's info.
        progress (`bool`): show a progress bar.
        state (`accelerate.PartialState` or `accelerate.Accelerator`, *optional*): the processes to share the work.

    Returns:
        `datasets.Dataset`: ``latents`` `(2C, h, w)` per row (posterior mean, then std) and ``label``; the
        constants are in ``info.description`` (see :func:`read_latent_info`). ``None`` on the processes other than
        the main one.
    """
    _check_encoding(dataset, image_column, batch_size, storage_dtype)
    label_feature = _label_feature(dataset, label_column)
    standardizer = standardizer or LatentStandardizer()
    channels = vae.config.latent_channels
    if standardizer.channels != channels:
        raise ValueError(f"{standardizer.channels} latent statistics for a VAE with {channels} latent channels")
    vae.eval()

    # One probe image fixes the latent shape before anything is written.
    probe = encode_images(vae, images_to_tensor([dataset[0][image_column]], resolution))
    shape = tuple(probe.shape[1:])
    features = {LATENTS_COLUMN: datasets.Array3D(shape=shape, dtype=storage_dtype)}
    if label_feature is not None:
        features[LABEL_COLUMN] = label_feature
    stats = LatentStatistics()
    np_dtype = np.dtype(storage_dtype)
    batches = encoded_batches(vae, dataset.select_columns([image_column]), image_column, resolution, batch_size, state)
    if state is not None and not state.is_main_process:
        for _ in batches:  # take part in every round of the gather; the main process writes
            pass
        return None
    labels = dataset.select_columns([label_column]) if label_column else None

    def rows():
        with tqdm(total=len(dataset), desc="encoding", unit="img", disable=not progress) as bar:
            for start, moments in batches:
                stats.update(moments)
                stored = moments.numpy().astype(np_dtype)
                if labels is None:
                    for row in stored:
                        yield {LATENTS_COLUMN: row}
                else:
                    for row, label in zip(stored, labels[start : start + len(stored)][label_column]):
                        yield {LATENTS_COLUMN: row, LABEL_COLUMN: label}
                bar.update(len(stored))

    # A fresh fingerprint: never reuse a cached encoding of another VAE or image set.
    latents = datasets.Dataset.from_generator(
        rows, features=datasets.Features(features), cache_dir=cache_dir, fingerprint=uuid.uuid4().hex
    )
    measured_mean, measured_std = stats.result()
    if use_measured_statistics:
        standardizer = LatentStandardizer(tuple(measured_mean), tuple(measured_std), standardizer.final_std)
    info = {
        "layout": "posterior mean and std concatenated on the channel axis (mean first)",
        "latent_channels": channels,
        "latent_shape": [channels, shape[1], shape[2]],
        "resolution": resolution,
        "image_range": [0.0, 1.0],
        "vae": vae_name,
        "num_images": len(latents),
        **standardizer.to_dict(),
        "measured_mean": measured_mean,
        "measured_std": measured_std,
    }
    latents.info.description = json.dumps({LATENT_INFO_KEY: info})
    return latents


def read_latent_info(dataset) -> dict:
    """The constants :func:`build_latent_dataset` recorded, with ``standardizer`` (a :class:`LatentStandardizer`).

    Raises:
        ValueError: the dataset carries no EDM2 latent information.
    """
    try:
        info = json.loads(dataset.info.description or "")[LATENT_INFO_KEY]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(
            "the dataset carries no EDM2 latent information (info.description); encode it with "
            "examples/encode_latents.py"
        ) from None
    return {**info, "standardizer": LatentStandardizer.from_dict(info)}


def save_latent_dataset(dataset, output_dir: str | os.PathLike) -> str:
    """``save_to_disk`` into a new folder; never touches an existing one (writes beside it, then renames).

    Raises:
        FileExistsError: ``output_dir`` exists.
    """
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir):
        raise FileExistsError(f"{output_dir!r} already exists; choose a new --output_dir (nothing was written)")
    partial = f"{output_dir}.partial-{uuid.uuid4().hex[:8]}"
    try:
        dataset.save_to_disk(partial)
        os.replace(partial, output_dir)
    finally:
        if os.path.exists(partial):
            shutil.rmtree(partial, ignore_errors=True)
    return output_dir


def load_latent_dataset(path: str | os.PathLike):
    """``(dataset, info)`` of a folder written by :func:`save_latent_dataset` (``info`` from :func:`read_latent_info`).

    Raises:
        FileNotFoundError: no such folder.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"latent dataset folder {os.fspath(path)!r} does not exist")
    ds = datasets.load_from_disk(os.fspath(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{os.fspath(path)!r} holds a DatasetDict with splits {list(ds)}, not one latent dataset")
    return ds, read_latent_info(ds)


__all__ = [
    "LATENTS_COLUMN",
    "LATENT_INFO_KEY",
    "LatentStatistics",
    "build_latent_dataset",
    "center_crop",
    "encode_images",
    "encoded_batches",
    "images_to_tensor",
    "load_latent_dataset",
    "read_latent_info",
    "save_latent_dataset",
]
