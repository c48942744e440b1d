"""Latent datasets for latent EDM2 models (the paper's ImageNet-512 models run in the Stable Diffusion VAE's space).

Images are encoded once. Each row keeps the VAE posterior's per-pixel mean and standard deviation (2·C channels, mean
first) rather than one latent, so that training can draw a fresh latent z = mean + std·ε every time it reads the row.
The drawn latent is then standardized per channel to std 0.5 = σ_data. Standardizing and undoing it are the pipeline's
own functions (:func:`~edm2_diffusers.pipelines.pipeline_edm2.standardize_latents` and ``unstandardize_latents``):
what training feeds the model and what :class:`~edm2_diffusers.EDM2Pipeline` decodes use one formula.

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
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..pipelines.pipeline_edm2 import (
    LATENT_FINAL_STD,
    SD_VAE_LATENT_MEAN,
    SD_VAE_LATENT_STD,
    standardize_latents,
    unstandardize_latents,
)

logger = logging.getLogger(__name__)

LATENT_INFO_KEY = "edm2_latents"
RUN_LATENT_INFO_NAME = "latent_info.json"  # a latent training run's constants, next to its config.yaml
LATENTS_COLUMN = "latents"
LABEL_COLUMN = "label"
STORAGE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class LatentStandardizer:
    """Per-channel standardization of raw VAE latents: x = (raw − mean)·(final_std / std), and its inverse.

    A thin holder of the constants around the pipeline's :func:`standardize_latents` / :func:`unstandardize_latents`.

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
        return {
            "latent_mean": list(self.latent_mean),
            "latent_std": list(self.latent_std),
            "latent_final_std": self.final_std,
        }

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
    import datasets

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
):
    """Encode an image dataset into a latent ``datasets.Dataset`` (columns ``latents`` and, with labels, ``label``).

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

    Returns:
        `datasets.Dataset`: ``latents`` `(2C, h, w)` per row (posterior mean, then std) and ``label``; the
        constants are in ``info.description`` (see :func:`read_latent_info`).
    """
    import datasets

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
    columns = [image_column] + ([label_column] if label_column else [])
    source = dataset.select_columns(columns)

    def rows():
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(source), desc="encoding", unit="img")
        for batch in source.iter(batch_size=batch_size):
            moments = encode_images(vae, images_to_tensor(batch[image_column], resolution))
            stats.update(moments)
            stored = moments.numpy().astype(np_dtype)
            labels = batch[label_column] if label_column else [None] * len(stored)
            for row, label in zip(stored, labels):
                yield {LATENTS_COLUMN: row} if label_column is None else {LATENTS_COLUMN: row, LABEL_COLUMN: label}
            if bar is not None:
                bar.update(len(stored))
        if bar is not None:
            bar.close()

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
    import datasets

    if not os.path.isdir(path):
        raise FileNotFoundError(f"latent dataset folder {os.fspath(path)!r} does not exist")
    ds = datasets.load_from_disk(os.fspath(path))
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{os.fspath(path)!r} holds a DatasetDict with splits {list(ds)}, not one latent dataset")
    return ds, read_latent_info(ds)


def write_run_latent_info(output_dir: str | os.PathLike, info: dict) -> str:
    """Record a latent run's standardization constants as ``output_dir/latent_info.json`` (atomically).

    The export reads them back (:func:`read_run_latent_info`) and gives them to the pipeline, so a pipeline decodes
    with the constants its model was trained with.

    Args:
        output_dir (`str` or `os.PathLike`): the run folder.
        info (`dict`): :func:`read_latent_info` of the training dataset.
    """
    record = {k: v for k, v in info.items() if k != "standardizer"}
    record.update(info["standardizer"].to_dict())
    path = os.path.join(os.fspath(output_dir), RUN_LATENT_INFO_NAME)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_run_latent_info(run_dir: str | os.PathLike) -> dict | None:
    """The constants a latent run recorded (``latent_mean``, ``latent_std``, ``final_std``, ...), ``None`` for a
    pixel-space run.

    Raises:
        ValueError: the file exists but does not hold valid constants.
    """
    path = os.path.join(os.fspath(run_dir), RUN_LATENT_INFO_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        LatentStandardizer.from_dict(info)  # validates
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} does not hold latent standardization constants: {err}") from None
    info.setdefault("final_std", LATENT_FINAL_STD)
    return info


__all__ = [
    "LATENTS_COLUMN",
    "LATENT_INFO_KEY",
    "RUN_LATENT_INFO_NAME",
    "LatentStandardizer",
    "LatentStatistics",
    "build_latent_dataset",
    "center_crop",
    "encode_images",
    "images_to_tensor",
    "load_latent_dataset",
    "read_latent_info",
    "read_run_latent_info",
    "save_latent_dataset",
    "write_run_latent_info",
]
