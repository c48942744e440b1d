"""Training on a stream (``data.streaming``, :mod:`edm2_diffusers.data.streaming`): the loop's side.

The stream does not go through ``accelerator.prepare``: Accelerate would read the whole stream on every process and
keep every N-th batch (or read it on the main process and send the batches), where each process here reads only its
own shard (``split_dataset_by_node``). Its batches are moved to the device by :class:`StreamLoader`.

* **Length**: ``training.max_train_steps``, or ``training.num_epochs`` when the stream tells its number of examples
  N (the split's ``num_examples`` in its info, a latent dataset's rows, or ``data.max_train_samples`` if smaller):
  then floor(num_epochs · N / global batch) steps, each of a full global batch. ``training.lr_schedule: epochs`` and
  ``training.dataloader_num_workers`` are not used with a stream.
* **Checkpoint**: every process writes its position (:meth:`~edm2_diffusers.data.streaming.StreamReader.state_dict`)
  as ``stream_state_<rank>.json`` into the checkpoint folder while Accelerate saves it (a save-state hook, so it is
  inside the folder before the folder is renamed into place); JSON like the rest of our state, checked by
  :func:`~edm2_diffusers.training.checkpoint.verify_checkpoint` before anything is loaded. Resuming reads it back
  through a load-state hook, on the same number of processes only; a run without ``data.streaming`` refuses such a
  checkpoint (:func:`refuse_stream_checkpoint`), and a streaming run one without positions.
"""

from __future__ import annotations

import json
import os

from accelerate.logging import get_logger

from ..data.streaming import StreamReader, open_stream, stream_length
from ..files import write_json_atomic

logger = get_logger(__name__)

STREAM_STATE_NAME = "stream_state_{rank}.json"
# The per-process batches of an epoch when a stream does not tell its length: the epoch is unknown to the step
# counter (training_state.json then counts all batches as epoch 0; stream_state_<rank>.json holds the real epoch).
UNKNOWN_EPOCH_BATCHES = 2**53


def check_streaming_config(cfg: dict) -> None:
    """The settings a streaming run cannot honour, refused before anything is read."""
    data_cfg, train_cfg = cfg["data"], cfg["training"]
    if data_cfg["shuffle_buffer_size"] < 0:
        raise ValueError(f"data.shuffle_buffer_size must not be negative, got {data_cfg['shuffle_buffer_size']}")
    if train_cfg["lr_schedule"] == "epochs":
        raise ValueError("training.lr_schedule epochs counts epochs of a known length; a stream uses the images one")
    if train_cfg["dataloader_num_workers"]:
        raise ValueError(
            "data.streaming reads in the training process (its position must be exact for resuming): set "
            "training.dataloader_num_workers to 0"
        )


class StreamLoader:
    """The loop's data loader over a :class:`StreamReader`: endless batches on ``device``; ``len()`` is the
    per-process batches of an epoch (rounded down; :data:`UNKNOWN_EPOCH_BATCHES` when the length is unknown)."""

    def __init__(self, reader: StreamReader, device, length: int | None):
        self.reader, self.device, self.length = reader, device, length

    def __len__(self) -> int:
        if self.length is None:
            return UNKNOWN_EPOCH_BATCHES
        return max(1, self.length // (self.reader.world * self.reader.batch_size))

    def describe(self) -> str:
        """The stream's size for the log: "N streamed" or "streamed" (unknown)."""
        return "streamed" if self.length is None else f"{self.length} streamed"

    def __iter__(self):
        for batch in self.reader.batches():
            yield {key: value.to(self.device) for key, value in batch.items()}

    def save(self, folder: str) -> None:
        path = os.path.join(folder, STREAM_STATE_NAME.format(rank=self.reader.rank))
        write_json_atomic(path, self.reader.state_dict())

    def load(self, folder: str) -> None:
        path = os.path.join(folder, STREAM_STATE_NAME.format(rank=self.reader.rank))
        if not os.path.isfile(path):
            found = sorted(n for n in os.listdir(folder) if n.startswith("stream_state_"))
            raise ValueError(
                f"checkpoint {folder} holds no stream position for process {self.reader.rank} "
                f"({os.path.basename(path)}; it holds {len(found)}): "
                + (
                    f"it was written by {len(found)} processes and a streaming run resumes on as many"
                    if found
                    else "it was not written by a streaming run (resume it without --streaming)"
                )
            )
        with open(path, encoding="utf-8") as f:
            self.reader.load_state_dict(json.load(f))  # refuses another number of processes
        self.reader.seek()  # replays a buffered epoch now: changed data stops the resume before training


def refuse_stream_checkpoint(resume_dir: str | None) -> None:
    """A run of map-style data does not continue a streaming run's checkpoint: its data order would differ silently.

    Raises:
        ValueError: ``resume_dir`` holds stream positions.
    """
    if resume_dir is not None and os.path.isfile(os.path.join(resume_dir, STREAM_STATE_NAME.format(rank=0))):
        raise ValueError(
            f"checkpoint {resume_dir} was written by a streaming run; resume it with --streaming "
            "(data.streaming: true)"
        )


def open_training_stream(cfg: dict, dataset, source: str, accelerator, per_device: int, global_batch: int):
    """``(dataset, loader)`` of a streaming run: the checked stream (a latent run: its table, which carries the
    constants) and its :class:`StreamLoader`, registered to save and load its position with every checkpoint.

    A ``num_epochs`` run is converted to ``max_train_steps`` in ``cfg`` (see the module's notes).

    Raises:
        ValueError: a setting a stream cannot honour, a stream shorter than one global batch, or a ``num_epochs``
            run on a stream of unknown length.
    """
    check_streaming_config(cfg)
    data_cfg, train_cfg = cfg["data"], cfg["training"]
    ds, resolution, table = open_stream(data_cfg, cfg["model"], source, dataset)
    length = len(table) if table is not None else stream_length(ds, data_cfg)
    if length is not None and length < global_batch:
        raise ValueError(f"the dataset has {length} images, fewer than one global batch of {global_batch}")
    if train_cfg["max_train_steps"] is None:
        if length is None:
            raise ValueError(
                "--num_epochs needs the number of examples, which this stream does not tell (no num_examples in "
                "its info): set --max_train_steps, or --max_train_samples to bound the stream"
            )
        train_cfg["max_train_steps"] = max(1, train_cfg["num_epochs"] * length // global_batch)
    reader = StreamReader(
        ds,
        data_cfg,
        cfg["model"],
        source,
        resolution,
        accelerator.process_index,
        accelerator.num_processes,
        per_device,
        train_cfg["seed"],
    )
    loader = StreamLoader(reader, accelerator.device, length)
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: loader.save(folder))
    accelerator.register_load_state_pre_hook(lambda models, folder: loader.load(folder))
    if accelerator.is_main_process:
        logger.info(
            "streaming %s: %s examples, shuffle buffer %d per process",
            source,
            length if length is not None else "an unknown number of",
            data_cfg["shuffle_buffer_size"],
        )
    return (table if table is not None else ds), loader


__all__ = [
    "STREAM_STATE_NAME",
    "StreamLoader",
    "check_streaming_config",
    "open_training_stream",
    "refuse_stream_checkpoint",
]
