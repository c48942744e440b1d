"""Training data through Hugging Face ``datasets``: Hub datasets, local image folders or parquet files, in-memory
datasets, the 8×8 handwritten digits that scikit-learn ships (the offline quickstart), and latent datasets written by
``examples/encode_latents.py`` (``save_to_disk`` folders of VAE posterior moments, see :mod:`.latents`).

The torch datasets that turn rows into tensors are in :mod:`.tensors`; streaming (``data.streaming``) is in
:mod:`.streaming`.

A corrupt image file in a local image folder stops the run before training, naming the file: silently training on
fewer images would change the run without anyone noticing.
"""

from __future__ import annotations

import io
import logging
import os

import datasets
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from .latents import LATENTS_COLUMN, load_latent_dataset, read_latent_info

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_IMAGE_COLUMN = "image"
DIGITS_LABEL_COLUMN = "label"


def load_digits_dataset():
    """scikit-learn's 1,797 8×8 UCI handwritten digits as an in-memory ``datasets.Dataset``.

    Pixel values 0..16 become 8-bit grey levels round(v·255/16) in column ``image`` (PIL images); the digit is in
    ``label`` (a ``ClassLabel`` with names "0".."9"). Nothing is downloaded: the data ship with scikit-learn.
    """
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    features = datasets.Features(
        {
            DIGITS_IMAGE_COLUMN: datasets.Image(),
            DIGITS_LABEL_COLUMN: datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )
    return datasets.Dataset.from_dict(
        {
            DIGITS_IMAGE_COLUMN: [Image.fromarray(p, mode="L") for p in pixels],
            DIGITS_LABEL_COLUMN: digits.target.astype(np.int64).tolist(),
        },
        features=features,
    )


def is_saved_dataset(folder: str) -> bool:
    """Whether ``folder`` holds a ``datasets.Dataset`` written by ``save_to_disk`` (as ``encode_latents.py`` does)."""
    return os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(
        os.path.join(folder, "dataset_info.json")
    )


def _has_files(folder: str, extensions: tuple[str, ...]) -> bool:
    return any(os.path.splitext(name)[1].lower() in extensions for _, _, names in os.walk(folder) for name in names)


def resolve_source(data_cfg: dict, dataset=None) -> str:
    """Which kind of data ``data_cfg`` names: ``memory``, ``sklearn_digits``, ``imagefolder``, ``parquet``,
    ``latents`` or ``hub``.

    A ``train_data_dir`` that ``save_to_disk`` wrote (``state.json`` and ``dataset_info.json``) is a latent dataset;
    one holding ``.parquet`` files and no images is read with ``datasets``' parquet builder.
    """
    if dataset is not None:
        return "memory"
    source = data_cfg.get("source")
    if source == "memory":
        raise ValueError("data.source is 'memory' but no in-memory dataset was passed to train(dataset=...)")
    if source is not None:
        return source
    if data_cfg.get("train_data_dir"):
        folder = data_cfg["train_data_dir"]
        if is_saved_dataset(folder):
            return "latents"
        parquet = os.path.isdir(folder) and _has_files(folder, (".parquet",))
        return "parquet" if parquet and not _has_files(folder, IMAGE_EXTENSIONS) else "imagefolder"
    if data_cfg.get("dataset_name"):
        return "hub"
    raise ValueError("no training data: give --dataset_name (Hub), --train_data_dir (image folder) or data.source")


def load_files_dataset(source: str, data_cfg: dict, streaming: bool = False):
    """``datasets.load_dataset`` of a Hub dataset, a local image folder or local parquet files (``source`` ``hub``,
    ``imagefolder`` or ``parquet``), after checking that the named dataset or folder is there.

    Args:
        source (`str`): ``hub``, ``imagefolder`` or ``parquet``.
        data_cfg (`dict`): the ``data`` section.
        streaming (`bool`): ``datasets``' streaming mode: an ``IterableDataset`` that reads the files as it goes.
    """
    split = data_cfg.get("dataset_split") or "train"
    if source == "hub":
        if not data_cfg.get("dataset_name"):
            raise ValueError("data.source is 'hub' but no --dataset_name was given")
        return datasets.load_dataset(
            data_cfg["dataset_name"],
            data_cfg.get("dataset_config_name"),
            split=split,
            cache_dir=data_cfg.get("cache_dir"),
            streaming=streaming,
        )
    folder = data_cfg.get("train_data_dir")
    if not folder:
        raise ValueError(f"data.source is {source!r} but no --train_data_dir was given")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--train_data_dir {folder!r} is not a directory")
    extensions = IMAGE_EXTENSIONS if source == "imagefolder" else (".parquet",)
    if not _has_files(folder, extensions):
        what = "image" if source == "imagefolder" else "parquet"
        raise ValueError(f"--train_data_dir {folder!r} holds no {what} files ({', '.join(extensions)})")
    return datasets.load_dataset(
        source, data_dir=folder, split=split, cache_dir=data_cfg.get("cache_dir"), streaming=streaming
    )


def load_train_dataset(data_cfg: dict, dataset=None):
    """Load the training split named by the ``data`` config section.

    Args:
        data_cfg (`dict`): the ``data`` section (see :data:`edm2_diffusers.training.config.SCHEMA`).
        dataset (`datasets.Dataset`, *optional*): an in-memory dataset to use as is.

    Returns:
        `datasets.Dataset`: the (map-style) training dataset.
    """
    source = resolve_source(data_cfg, dataset)
    if source == "memory":
        ds = dataset
    elif source == "sklearn_digits":
        ds = load_digits_dataset()
    elif source in ("hub", "imagefolder", "parquet"):
        ds = load_files_dataset(source, data_cfg)
    elif source == "latents":
        folder = data_cfg.get("train_data_dir")
        if not folder:
            raise ValueError("data.source is 'latents' but no --train_data_dir (the encoded dataset) was given")
        if not is_saved_dataset(folder):
            raise FileNotFoundError(
                f"--train_data_dir {folder!r} is not a latent dataset written by examples/encode_latents.py "
                "(no state.json / dataset_info.json)"
            )
        ds, _ = load_latent_dataset(folder)  # also checks that it carries the standardization constants
    else:
        raise ValueError(f"unknown data.source {source!r}")
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"expected one split, got a DatasetDict with splits {list(ds)}; set data.dataset_split")
    if isinstance(ds, datasets.IterableDataset):
        raise ValueError("an IterableDataset is read with data.streaming: true (--streaming)")
    if not isinstance(ds, datasets.Dataset):
        raise ValueError(f"expected a map-style datasets.Dataset, got {type(ds).__name__}")
    if data_cfg.get("max_train_samples") is not None and data_cfg["max_train_samples"] < len(ds):
        ds = ds.select(range(data_cfg["max_train_samples"]))
    return ds


def dataset_columns(source: str, data_cfg: dict) -> tuple[str, str | None]:
    if source == "sklearn_digits":
        return DIGITS_IMAGE_COLUMN, data_cfg.get("label_column")
    if source == "latents":
        column = data_cfg.get("image_column")
        return (LATENTS_COLUMN if column in (None, "image") else column), data_cfg.get("label_column")
    return data_cfg.get("image_column") or "image", data_cfg.get("label_column")


def open_image_value(value) -> tuple[Image.Image, str]:
    """Open an undecoded ``datasets.Image`` value ({"bytes", "path"}) lazily; return the image and a name for it."""
    path = value.get("path")
    name = path or "<in-memory image>"
    if value.get("bytes") is not None:
        return Image.open(io.BytesIO(value["bytes"])), name
    if path is None:
        raise ValueError("an image entry holds neither bytes nor a path")
    return Image.open(path), name


def check_label_column(label_column: str | None, model_cfg: dict) -> None:
    """A label column is given exactly when the model is class-conditional."""
    num_classes = model_cfg.get("num_class_embeds")
    if label_column is not None and not num_classes:
        raise ValueError(
            f"label column {label_column!r} was given but the model is unconditional (model.num_class_embeds is "
            "null): set model.num_class_embeds for a class-conditional model, or drop --label_column"
        )
    if num_classes and label_column is None:
        raise ValueError(
            f"the model is class-conditional (model.num_class_embeds={num_classes}) but no label column was given "
            "(set --label_column)"
        )


def _check_labels(ds, label_column: str | None, model_cfg: dict) -> None:
    """A label column exactly when the model is class-conditional, holding class ids in range."""
    check_label_column(label_column, model_cfg)
    num_classes = model_cfg.get("num_class_embeds")
    if label_column is not None:
        if label_column not in ds.column_names:
            raise ValueError(f"the dataset has no label column {label_column!r}; its columns are {ds.column_names}")
        labels = np.asarray(ds[label_column])
        if labels.dtype.kind not in "iu":
            raise ValueError(f"label column {label_column!r} must hold integer class ids, got dtype {labels.dtype}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(
                f"label column {label_column!r} holds ids in [{labels.min()}, {labels.max()}] but the model has "
                f"{num_classes} classes (model.num_class_embeds)"
            )


def _check_latent_dataset(ds, column: str, label_column: str | None, data_cfg: dict, model_cfg: dict) -> int:
    """Checks of a latent dataset: moments of ``in_channels`` latent channels at the model's ``sample_size``."""
    feature = ds.features[column]
    if not isinstance(feature, datasets.Array3D):
        raise ValueError(
            f"column {column!r} does not hold latent moments (its feature is {feature}); a latent dataset written by "
            "examples/encode_latents.py has a column 'latents' of shape (2C, h, w)"
        )
    if len(ds) == 0:
        raise ValueError("the training dataset is empty")
    standardizer = read_latent_info(ds)["standardizer"]
    moments, height, width = feature.shape
    if moments != 2 * standardizer.channels:
        raise ValueError(
            f"column {column!r} holds {moments} channels per row, but the dataset's constants describe "
            f"{standardizer.channels} latent channels (posterior mean and std: {2 * standardizer.channels})"
        )
    for key in ("in_channels", "out_channels"):
        if model_cfg.get(key, 3) != standardizer.channels:
            raise ValueError(
                f"the latents have {standardizer.channels} channels but model.{key} is {model_cfg.get(key, 3)}; "
                f"set model.{key}: {standardizer.channels}"
            )
    if height != width:
        raise ValueError(f"the latents are {width}x{height}, not square")
    resolution = data_cfg.get("resolution")
    if resolution is not None and resolution != height:
        raise ValueError(
            f"the latents are stored at {height}x{height}; --resolution {resolution} cannot resize them (drop it)"
        )
    sample_size = model_cfg.get("sample_size")
    if sample_size is not None and sample_size != height:
        raise ValueError(f"the latents are {height}x{height} but the model's sample_size is {sample_size}")
    _check_labels(ds, label_column, model_cfg)
    return height


def check_dataset(ds, data_cfg: dict, model_cfg: dict, source: str) -> int:
    """Fail fast on data the model cannot train on; return the image resolution used for training.

    Checks that the image column exists and holds images, that the label column is given exactly when the model is
    class-conditional and holds class ids in range, that images have one size (or ``resolution`` is set) matching the
    model's ``sample_size``, and that every file of a local image folder opens and decodes.

    Raises:
        ValueError: naming the problem (and the file, for a corrupt image).
    """
    image_column, label_column = dataset_columns(source, data_cfg)
    if image_column not in ds.column_names:
        raise ValueError(
            f"the dataset has no image column {image_column!r}; its columns are {ds.column_names} (set --image_column)"
        )
    if source == "latents":
        return _check_latent_dataset(ds, image_column, label_column, data_cfg, model_cfg)
    feature = ds.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(f"column {image_column!r} does not hold images (its feature is {feature})")
    if len(ds) == 0:
        raise ValueError("the training dataset is empty")
    _check_labels(ds, label_column, model_cfg)

    in_channels = model_cfg.get("in_channels", 3)
    if in_channels not in (1, 3):
        raise ValueError(f"image data needs a model with 1 or 3 input channels, got in_channels={in_channels}")

    resolution = data_cfg.get("resolution")
    verify = source == "imagefolder"
    sizes: set[tuple[int, int]] = set()
    if resolution is None or verify:
        raw = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        row = 0
        for batch in raw.iter(batch_size=1024):
            for value in batch[image_column]:
                try:
                    img, name = open_image_value(value)
                    sizes.add(img.size)
                    if verify:
                        # verify() checks the file's structure and checksums only; decoding it (after a fresh
                        # open, as verify() leaves the image unusable) catches pixel data that does not decode.
                        img.verify()
                        open_image_value(value)[0].load()
                except Exception as err:  # PIL raises many types for broken files
                    where = value.get("path") or "<in-memory image>"
                    raise ValueError(
                        f"cannot read image {where!r} (dataset row {row}): {err}. Corrupt files stop the run; "
                        "remove or repair it"
                    ) from None
                row += 1
    return resolve_resolution(sizes, data_cfg, model_cfg)


def resolve_resolution(sizes: set[tuple[int, int]], data_cfg: dict, model_cfg: dict) -> int:
    """The training resolution: ``data.resolution``, else the one square size of the images (``sizes``, (w, h)),
    checked against the model's ``sample_size``."""
    resolution = data_cfg.get("resolution")
    if resolution is None:
        if len(sizes) > 1:
            shown = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:5])
            raise ValueError(
                f"the images have {len(sizes)} different sizes ({shown}{', ...' if len(sizes) > 5 else ''}); "
                "pass --resolution to resize and centre-crop them to one size"
            )
        width, height = next(iter(sizes))
        if width != height:
            raise ValueError(f"the images are {width}x{height}, not square; pass --resolution to centre-crop them")
        resolution = width
    sample_size = model_cfg.get("sample_size")
    if sample_size is not None and resolution != sample_size:
        raise ValueError(
            f"training resolution {resolution} does not match the model's sample_size {sample_size} "
            "(set --resolution or model.sample_size)"
        )
    return resolution


__all__ = [
    "check_dataset",
    "check_label_column",
    "dataset_columns",
    "is_saved_dataset",
    "load_digits_dataset",
    "load_files_dataset",
    "load_train_dataset",
    "open_image_value",
    "resolve_resolution",
    "resolve_source",
]
