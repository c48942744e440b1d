"""Deterministic, resumable, multi-process image generation for evaluation.

Image ``i`` of an evaluation has seed ``seed + i``. The seeds are cut into batches of ``batch_size`` consecutive seeds
and the batches are dealt round-robin to the Accelerate processes (:func:`seed_ranges`), so every process owns a
disjoint set and together they cover the request exactly. A batch is generated with one ``torch.Generator`` seeded by
its first seed, which makes every batch reproducible on its own, whatever the number of processes (the images do
depend on ``batch_size``: a batch shares one generator, and the network's arithmetic depends on the batch).

With a ``cache_dir``, the features of every finished batch are written to ``cache_dir/batch-<first>-<last>.npz``
(atomically, by the process that made them) and read back instead of regenerated on the next run: an evaluation that
stops resumes where it was (on node-local disks a node finds only the batches it made; any others it is dealt are
generated again). ``cache_dir/settings.json`` records what the images depend on; a cache made with other settings
is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..files import atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"


def seed_ranges(num_images: int, num_processes: int, batch_size: int, seed: int = 0) -> list[list[range]]:
    """Batches of seeds for each process: batch ``b`` = seeds ``seed + b·batch_size ...`` goes to process ``b % P``.

    Args:
        num_images (`int`): images requested in total.
        num_processes (`int`): number of processes P.
        batch_size (`int`): images per batch (the last batch may be smaller).
        seed (`int`): seed of image 0.

    Returns:
        `list[list[range]]`: ``result[p]`` lists the seed ranges process ``p`` generates, in order.
    """
    for name, value, low in (
        ("num_images", num_images, 0),
        ("num_processes", num_processes, 1),
        ("batch_size", batch_size, 1),
    ):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out: list[list[range]] = [[] for _ in range(num_processes)]
    for b, start in enumerate(range(0, num_images, batch_size)):
        out[b % num_processes].append(range(seed + start, seed + min(start + batch_size, num_images)))
    return out


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes): ties cached features to the exact weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _batch_file(seeds: range) -> str:
    return f"batch-{seeds.start:09d}-{seeds.stop - 1:09d}.npz"


class FeatureCache:
    """Per-batch feature files in a folder, tied to the settings that produced them.

    Args:
        cache_dir (`str`): the folder (created if needed).
        settings (`dict`): JSON-serialisable description of everything the images depend on (model, steps, batch
            size, feature extractor, ...). A folder holding another description raises a ``ValueError``.
        is_main_process (`bool`): whether this process writes ``settings.json`` (one per node: every process checks
            it, and each writes its own batches' files, so on node-local disks each node's folder is guarded).
    """

    def __init__(self, cache_dir: str, settings: dict, is_main_process: bool = True):
        self.cache_dir = cache_dir
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        path = os.path.join(cache_dir, SETTINGS_FILE)
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            if stored != self.settings:
                diff = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
                raise ValueError(
                    f"the feature cache {cache_dir!r} was made with other settings (differing: {', '.join(diff)}); "
                    "use another --cache_dir or delete this one"
                )
        elif is_main_process:
            write_json_atomic(path, self.settings, sort_keys=True)

    def path(self, seeds: range) -> str:
        return os.path.join(self.cache_dir, _batch_file(seeds))

    def load(self, seeds: range) -> dict[str, np.ndarray] | None:
        """The arrays stored for this batch, or ``None`` if it is not finished (or its file is unreadable)."""
        path = self.path(seeds)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as err:  # a damaged file is regenerated, not trusted
            logger.warning("ignoring unreadable cache file %s (%s)", path, err)
            return None
        if "seeds" not in arrays or arrays["seeds"].tolist() != list(seeds):
            logger.warning("ignoring cache file %s: it holds other seeds", path)
            return None
        return arrays

    def save(self, seeds: range, arrays: dict[str, np.ndarray]) -> None:
        with atomic_path(self.path(seeds), suffix=".npz") as tmp:
            np.savez(tmp, seeds=np.asarray(list(seeds), dtype=np.int64), **arrays)

    def finished(self) -> list[range]:
        """Seed ranges of all batch files present."""
        out = []
        for name in sorted(os.listdir(self.cache_dir)) if os.path.isdir(self.cache_dir) else []:
            if name.startswith("batch-") and name.endswith(".npz"):
                first, last = name[len("batch-") : -len(".npz")].split("-")
                out.append(range(int(first), int(last) + 1))
        return out


def generate_batch(pipeline, seeds: range, num_inference_steps: int, class_labels=None, **pipeline_kwargs):
    """Images of one batch of seeds, as (N, C, H, W) floats in [0, 1].

    Args:
        pipeline (`EDM2Pipeline`): the pipeline (``output_type="pt"`` must give [0, 1] images).
        seeds (`range`): the batch's seeds; the generator is seeded by the first.
        num_inference_steps (`int`): sampler steps.
        class_labels (*optional*): passed to the pipeline; ``None`` lets a conditional pipeline draw random classes
            from the same generator.
        **pipeline_kwargs: further pipeline arguments (e.g. ``guidance_scale``).
    """
    generator = torch.Generator("cpu").manual_seed(int(seeds.start))
    images = pipeline(
        batch_size=len(seeds),
        num_inference_steps=num_inference_steps,
        generator=generator,
        class_labels=class_labels,
        output_type="pt",
        **pipeline_kwargs,
    ).images
    return images.float()


def iter_generated_features(
    pipeline,
    feature_extractor: nn.Module,
    num_images: int,
    batch_size: int = 64,
    num_inference_steps: int = 18,
    seed: int = 0,
    accelerator=None,
    cache: FeatureCache | None = None,
    class_labels=None,
    progress: bool = True,
    **pipeline_kwargs,
) -> Iterator[tuple[range, dict[str, np.ndarray]]]:
    """Generate this process's share of the images and yield their features batch by batch.

    Batches found in ``cache`` are read back instead of generated. Each yielded dict holds ``features`` `(N, D)` and,
    when the extractor has a ``probabilities`` method (the digits classifier), ``max_prob`` `(N,)`.

    Args:
        pipeline (`EDM2Pipeline`): the generator; moved to the accelerator's device.
        feature_extractor (`nn.Module`): maps [0, 1] images to features (see :mod:`.extractors`).
        num_images (`int`): images requested over all processes.
        batch_size (`int`): images per batch and process.
        num_inference_steps (`int`): sampler steps.
        seed (`int`): seed of image 0.
        accelerator (`accelerate.Accelerator`, *optional*): gives process index, count and device; ``None`` = one
            process on the CPU.
        cache (`FeatureCache`, *optional*): per-batch feature files for resuming.
        class_labels (*optional*): passed to the pipeline (``None``: random classes for conditional models).
        progress (`bool`): show a progress bar on the main process.
        **pipeline_kwargs: further pipeline arguments.

    Yields:
        `(range, dict)`: the batch's seeds and its arrays.
    """
    index = accelerator.process_index if accelerator is not None else 0
    count = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    batches = seed_ranges(num_images, count, batch_size, seed)[index]
    moved = False
    has_probs = callable(getattr(feature_extractor, "probabilities", None))
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    for seeds in tqdm(batches, desc="evaluation batches", disable=not show):
        arrays = cache.load(seeds) if cache is not None else None
        if arrays is None:
            if not moved:
                pipeline.to(device)
                pipeline.set_progress_bar_config(disable=True)
                feature_extractor.to(device)
                moved = True
            images = generate_batch(pipeline, seeds, num_inference_steps, class_labels, **pipeline_kwargs)
            with torch.no_grad():
                images = images.to(device)
                arrays = {"features": feature_extractor(images).float().cpu().numpy()}
                if has_probs:
                    arrays["max_prob"] = feature_extractor.probabilities(images).max(-1).values.float().cpu().numpy()
            if cache is not None:
                cache.save(seeds, arrays)
        arrays = {k: v for k, v in arrays.items() if k != "seeds"}
        yield seeds, arrays


__all__ = ["FeatureCache", "generate_batch", "iter_generated_features", "model_fingerprint", "seed_ranges"]
