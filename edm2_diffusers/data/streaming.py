"""Streaming training data (``data.streaming``): a ``datasets.IterableDataset`` read as training goes, never stored
whole.

* **Sources**: a Hub dataset, a local image folder or local parquet files through ``datasets``' own streaming
  (``load_dataset(..., streaming=True)``), a latent dataset of ``examples/encode_latents.py`` (its memory-mapped
  table read as an ``IterableDataset``), or an ``IterableDataset`` passed to ``train(dataset=...)``. The digits and
  map-style in-memory datasets are not streamed (pass ``dataset.to_iterable_dataset(num_shards=N)``).
* **Sharding**: every process reads its own part, ``datasets.distributed.split_dataset_by_node``: whole files when
  the number of files divides by the number of processes, else every N-th example of the stream.
* **Order**: ``IterableDataset.shuffle(seed, buffer_size=data.shuffle_buffer_size)``, with ``set_epoch(epoch)`` at
  each pass (``datasets`` then reseeds both the file order and the buffer). ``shuffle_buffer_size: 0`` shuffles the
  file order only.
* **Epochs and batches**: an epoch is one pass of a process over its part. Batches are cut from the passes laid end
  to end, so none is partial and none is dropped (``training.drop_last`` is not read): a batch may hold the last
  examples of one pass and the first of the next.
* **Rows to tensors**: as for map-style data (:func:`~.tensors.image_to_array`; flips are drawn in the training
  loop, :func:`~.tensors.random_flip`). Images are decoded when a batch is built, not when read, so a replay (below)
  reads bytes only. Without ``data.resolution`` every image must have the size of the first.
* **Position**: :meth:`StreamReader.state_dict` holds the epoch, the examples read in it and the dataset's own
  ``state_dict()``; plain data (JSON). Resuming restores the dataset's ``state_dict()`` directly when no shuffle
  buffer is used. With a buffer, ``datasets`` does not save the buffer's content (it would refill it from later
  examples, changing the order), so the reader replays the epoch from its start up to the saved position, then
  checks that the dataset's ``state_dict()`` equals the saved one: the run continues with exactly the examples an
  uninterrupted run reads. A position belongs to one process of one process count.
"""

from __future__ import annotations

import logging

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from PIL import Image

from .sources import (
    check_dataset,
    check_label_column,
    dataset_columns,
    load_files_dataset,
    load_train_dataset,
    open_image_value,
    resolve_resolution,
)
from .tensors import image_to_array

logger = logging.getLogger(__name__)

STREAM_SOURCES = ("hub", "imagefolder", "parquet", "latents", "memory")


def load_stream(data_cfg: dict, source: str, dataset=None):
    """``(stream, table)``: the training split of ``data_cfg`` as a ``datasets.IterableDataset``
    (``max_train_samples``: its first N), and for a latent dataset the local map-style table it streams (else
    ``None``).

    Raises:
        ValueError: the source cannot be streamed, or it is not one split.
    """
    if source not in STREAM_SOURCES:
        raise ValueError(
            f"data.streaming reads a Hub dataset, local image or parquet files, a latent dataset or an "
            f"IterableDataset passed to train(); data.source {source!r} cannot be streamed (drop --streaming)"
        )
    if source == "memory":
        if not isinstance(dataset, datasets.IterableDataset):
            raise ValueError(
                f"data.streaming needs a datasets.IterableDataset, got {type(dataset).__name__}; pass "
                "dataset.to_iterable_dataset(num_shards=N) or drop --streaming"
            )
        ds = dataset
    elif source == "latents":  # memory-mapped Arrow files, streamed one file per shard
        table = load_train_dataset(data_cfg)
        return table.to_iterable_dataset(num_shards=max(1, len(table.cache_files))), table
    else:
        ds = load_files_dataset(source, data_cfg, streaming=True)
    if isinstance(ds, datasets.IterableDatasetDict):
        raise ValueError(f"expected one split, got splits {list(ds)}; set data.dataset_split")
    if data_cfg.get("max_train_samples") is not None:
        ds = ds.take(data_cfg["max_train_samples"])
    return ds, None


def stream_length(ds, data_cfg: dict) -> int | None:
    """The number of examples of the stream when known (the split's ``num_examples`` in the dataset's info, capped by
    ``data.max_train_samples``), else ``None``."""
    splits = ds.info.splits if ds.info is not None else None
    split = splits.get(data_cfg.get("dataset_split") or "train") if splits else None
    known = split.num_examples if split is not None and split.num_examples else None
    cap = data_cfg.get("max_train_samples")
    return known if cap is None else (cap if known is None else min(known, cap))


def _columns_of(ds, first: dict) -> list[str]:
    return list(ds.features) if ds.features is not None else list(first)


def check_stream(ds, data_cfg: dict, model_cfg: dict, source: str, table=None) -> int:
    """Checks of a stream before training, from its features and first example; returns the resolution.

    Images of another size than the first (without ``data.resolution``) and class ids out of range are caught when a
    batch is built (:class:`StreamReader`), naming the example.
    """
    if table is not None:  # a latent dataset is local: checked whole
        return check_dataset(table, data_cfg, model_cfg, source)
    image_column, label_column = dataset_columns(source, data_cfg)
    check_label_column(label_column, model_cfg)
    first = next(iter(ds), None)
    if first is None:
        raise ValueError("the training dataset is empty")
    columns = _columns_of(ds, first)
    if image_column not in columns:
        raise ValueError(
            f"the dataset has no image column {image_column!r}; its columns are {columns} (set --image_column)"
        )
    if label_column is not None and label_column not in columns:
        raise ValueError(f"the dataset has no label column {label_column!r}; its columns are {columns}")
    if model_cfg.get("in_channels", 3) not in (1, 3):
        raise ValueError(f"image data needs a model with 1 or 3 input channels, got {model_cfg.get('in_channels')}")
    image = _image(first[image_column], "the first example")
    return resolve_resolution({image.size}, data_cfg, model_cfg)


def _image(value, where: str) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        try:
            image = open_image_value(value)[0]
            image.load()  # decode here, so that a broken file is named
            return image
        except Exception as err:  # PIL raises many types for broken files
            raise ValueError(
                f"cannot read the image of {where} ({value.get('path') or 'bytes'}): {err}. Corrupt files stop the "
                "run (the checkpoints written before stay); remove or repair it"
            ) from None
    raise ValueError(f"{where} holds no image but a {type(value).__name__}")


class StreamReader:
    """One process's endless batches of a stream, and its position (see the module's notes).

    Args:
        ds (`datasets.IterableDataset`): the whole stream (every process passes the same).
        data_cfg (`dict`), model_cfg (`dict`): the config sections.
        source (`str`): the data source (:func:`~.sources.resolve_source`).
        resolution (`int`): the checked training resolution.
        rank (`int`), world (`int`): this process and the number of processes.
        batch_size (`int`): examples per batch of this process.
        seed (`int`): seed of the shuffle and of random crops.
    """

    def __init__(self, ds, data_cfg, model_cfg, source, resolution, rank, world, batch_size, seed):
        self.column, self.label_column = dataset_columns(source, data_cfg)
        self.latents = source == "latents"
        if not self.latents and ds.features is not None and isinstance(ds.features.get(self.column), datasets.Image):
            ds = ds.cast_column(self.column, datasets.Image(decode=False))  # decoded per batch, not when read
        self.buffer_size = data_cfg.get("shuffle_buffer_size", 1000)
        ds = ds.shuffle(seed=seed, buffer_size=max(1, self.buffer_size))
        self.dataset = split_dataset_by_node(ds, rank=rank, world_size=world)
        self.data_cfg, self.resolution, self.channels = data_cfg, resolution, model_cfg.get("in_channels", 3)
        self.num_classes = model_cfg.get("num_class_embeds")
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, seed
        self.epoch, self.position = 0, 0  # the pass, and the examples of it read so far
        self._resume: dict | None = None  # a loaded dataset state, applied when the epoch is opened
        self._opened = None  # an iterator already at the position (seek)

    def state_dict(self) -> dict:
        """The position after the last batch yielded: plain data (JSON)."""
        return {
            "epoch": self.epoch,
            "examples_in_epoch": self.position,
            "dataset_state": self.dataset.state_dict(),
            "rank": self.rank,
            "num_processes": self.world,
            "shuffle_buffer_size": self.buffer_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position of :meth:`state_dict` (checked: same process, count, buffer, seed and batch).

        Raises:
            ValueError: the position was written by another layout.
        """
        for key, mine in (
            ("num_processes", self.world),
            ("rank", self.rank),
            ("shuffle_buffer_size", self.buffer_size),
            ("seed", self.seed),
            ("batch_size", self.batch_size),
        ):
            if state.get(key) != mine:
                raise ValueError(
                    f"the checkpoint's stream position was written with {key} {state.get(key)}, this run has "
                    f"{mine}: a streaming run resumes with the same processes, batch, seed and "
                    "data.shuffle_buffer_size"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["examples_in_epoch"])
        self._resume = state["dataset_state"]

    def _open_epoch(self):
        """An iterator over the current epoch from the current position (a resumed position: restored or replayed)."""
        self.dataset.set_epoch(self.epoch)
        saved, self._resume = self._resume, None
        if saved is not None and self.buffer_size <= 1:
            self.dataset.load_state_dict(saved)  # nothing buffered: the dataset's own state is the position
            return iter(self.dataset)
        iterator = iter(self.dataset)
        for _ in range(self.position):  # replay up to the saved position (bytes only: images decode per batch)
            if next(iterator, None) is None:
                raise ValueError(
                    f"the stream ended before the checkpoint's position (epoch {self.epoch}, {self.position} "
                    "examples): the data changed since; resume on the same data"
                )
        if saved is not None and self.dataset.state_dict() != saved:
            raise ValueError(
                f"the stream read again up to the checkpoint's position (epoch {self.epoch}, {self.position} "
                "examples) is not where the checkpoint left it: the data changed since; resume on the same data"
            )
        return iterator

    def seek(self) -> None:
        """Go to the current position now (after :meth:`load_state_dict`), so that a resume fails before training
        if the data changed."""
        self._opened = self._open_epoch()

    def _examples(self):
        """The examples of the passes, from the current position on, forever."""
        while True:
            iterator, self._opened = self._opened or self._open_epoch(), None
            start, read = self.position, 0
            for example in iterator:
                read += 1
                self.position += 1
                yield example
            if read == 0 and start == 0:
                raise ValueError(
                    f"process {self.rank} of {self.world} got no examples of the stream: it has fewer examples "
                    "(or files) than processes"
                )
            self.epoch, self.position = self.epoch + 1, 0

    def _item(self, example: dict) -> dict:
        where = f"example {self.position - 1} of epoch {self.epoch} on process {self.rank}"
        if self.latents:
            item = {"latent_moments": torch.from_numpy(np.asarray(example[self.column], dtype=np.float32))}
        else:
            image = _image(example[self.column], where)
            if self.data_cfg.get("resolution") is None and image.size != (self.resolution, self.resolution):
                raise ValueError(
                    f"{where} is {image.size[0]}x{image.size[1]}, the first was {self.resolution}x{self.resolution}; "
                    "pass --resolution to resize and centre-crop the images to one size"
                )
            rng = None
            if not self.data_cfg.get("center_crop", True):  # a random crop of (seed, epoch, process, position)
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, self.position - 1])
            array = image_to_array(image, self.resolution, self.channels, rng, self.data_cfg.get("crop"))
            item = {"pixel_values": torch.from_numpy(array)}
        if self.label_column is not None:
            label = example[self.label_column]
            if not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_classes:
                raise ValueError(
                    f"{where}: label {label!r} is not a class id in [0, {self.num_classes}) (model.num_class_embeds)"
                )
            item["class_labels"] = torch.tensor(int(label))
        return item

    def batches(self):
        """Endless batches (dicts of stacked tensors) of ``batch_size`` examples, from the current position."""
        items = []
        for example in self._examples():
            items.append(self._item(example))
            if len(items) == self.batch_size:
                yield {key: torch.stack([item[key] for item in items]) for key in items[0]}
                items = []


def open_stream(data_cfg: dict, model_cfg: dict, source: str, dataset=None):
    """``(stream, resolution, latent_table)``: the loaded and checked stream (``latent_table``: the map-style latent
    dataset it streams, whose info carries the standardization constants; else ``None``)."""
    ds, table = load_stream(data_cfg, source, dataset)
    return ds, check_stream(ds, data_cfg, model_cfg, source, table), table


__all__ = ["STREAM_SOURCES", "StreamReader", "check_stream", "load_stream", "open_stream", "stream_length"]
