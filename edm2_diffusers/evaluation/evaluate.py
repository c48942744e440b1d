"""Evaluate a pipeline: generated-image features against cached reference statistics of a dataset.

The pieces: :func:`reference_stats` (dataset → (μ, Σ), computed once and cached to an ``.npz``),
:func:`evaluate_pipeline` (images from disjoint seed ranges on every Accelerate process, optionally resumable through a
feature cache, then the Fréchet distance). Saved pipelines are loaded with
:func:`edm2_diffusers.hub.loading.load_pipeline`.

With several processes, both the reference images and the generated ones are dealt out by whole batches; each process
adds its features to float64 sums (of features and of their outer products) and the sums are added up once over the
processes (:meth:`~.fid.FeatureFrechetDistance.reduce_state`). Only the main process reads and writes the reference
statistics file (the others receive the statistics from it), and only it writes results.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from accelerate.utils import broadcast_object_list
from diffusers.utils import BaseOutput
from torch import nn

from ..data import EDM2ImageDataset, dataset_columns, load_train_dataset, resolve_source
from ..runs import read_run_config
from .digits import default_cache_dir, load_digits_split
from .extractors import extractor_name, get_feature_extractor
from .fid import FeatureFrechetDistance, FeatureStats
from .generation import FeatureCache, iter_generated_features, model_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class EvaluationOutput(BaseOutput):
    """Result of :func:`evaluate_pipeline`.

    Args:
        fd (`float`): Fréchet distance between generated and reference features (FID for Inception features).
        num_images (`int`): generated images the distance is computed from.
        feature_extractor (`str`): name of the extractor.
        confident (`float`, *optional*): share of images classified with top probability above the threshold (only
            for classifier extractors such as ``digits``).
    """

    fd: float
    num_images: int
    feature_extractor: str
    confident: float | None = None


def dataset_image_batches(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    split: str = "train",
    dataset_config_name: str | None = None,
    image_column: str = "image",
    resolution: int | None = None,
    channels: int = 3,
    batch_size: int = 250,
    max_images: int | None = None,
    process_index: int = 0,
    num_processes: int = 1,
) -> Iterator[torch.Tensor]:
    """Real images of a dataset as (N, C, H, W) float batches in [0, 1], through the training data code.

    Batch ``b`` (images ``b·batch_size ...``) belongs to process ``b % num_processes``; only this process's batches
    are decoded and yielded.

    Args:
        dataset_name (`str`, *optional*): a Hub dataset, or ``"digits"`` for scikit-learn's digits (offline).
        train_data_dir (`str`, *optional*): a local image folder instead.
        split (`str`): dataset split.
        dataset_config_name (`str`, *optional*): Hub dataset configuration.
        image_column (`str`): column holding the images.
        resolution (`int`, *optional*): resize and centre-crop to this size (as in training).
        channels (`int`): 1 or 3.
        batch_size (`int`): images per yielded batch.
        max_images (`int`, *optional*): stop after this many images.
        process_index (`int`), num_processes (`int`): this process's share of the batches.
    """
    if dataset_name in ("digits", "sklearn_digits"):
        cfg = {"source": "sklearn_digits"}
        image_column = "image"
    elif train_data_dir:
        cfg = {"source": "imagefolder", "train_data_dir": train_data_dir, "dataset_split": split}
    elif dataset_name:
        cfg = {"source": "hub", "dataset_name": dataset_name, "dataset_config_name": dataset_config_name}
        cfg["dataset_split"] = split
    else:
        raise ValueError(
            "reference statistics need a dataset: give --dataset_name (Hub or 'digits') or --train_data_dir"
        )
    ds = load_train_dataset(cfg)
    if image_column not in ds.column_names:
        raise ValueError(f"the dataset has no image column {image_column!r}; its columns are {ds.column_names}")
    images = EDM2ImageDataset(ds, image_column, None, resolution=resolution, channels=channels)
    total = len(images) if max_images is None else min(len(images), max_images)
    for start in range(process_index * batch_size, total, num_processes * batch_size):
        items = images.__getitems__(list(range(start, min(start + batch_size, total))))
        yield (torch.stack([it["pixel_values"] for it in items]) + 1) / 2


@torch.no_grad()
def compute_reference_stats(
    image_batches: Iterable[torch.Tensor],
    feature_extractor: nn.Module,
    device: torch.device | str = "cpu",
    accelerator=None,
) -> FeatureStats:
    """Feature statistics of real images given as (N, C, H, W) batches in [0, 1].

    With an ``accelerator`` of several processes, each process passes its own share of the images and every process
    gets the statistics of all of them (the float64 sums are added up once).
    """
    metric = FeatureFrechetDistance(feature_extractor).to(device)
    for batch in image_batches:
        metric.update(batch.to(device), real=True)
    metric.reduce_state(accelerator, real=True)
    stats = metric.real_stats()
    stats.feature_extractor = extractor_name(feature_extractor)
    return stats


def _from_main(accelerator, make):
    """``make()`` run on the main process only and its result (or its error) handed to every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return make()
    box = [None]
    if accelerator.is_main_process:
        try:
            box = [make()]
        except Exception as err:  # raised on every process below, so that none waits for the others forever
            box = [err]
    broadcast_object_list(box, from_process=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _digits_batches(process_index: int, num_processes: int) -> list[torch.Tensor]:
    return [torch.tensor_split(load_digits_split("all")[0], num_processes)[process_index]]


def reference_stats(
    path: str | None,
    feature_extractor: nn.Module,
    image_batches=None,
    accelerator=None,
) -> FeatureStats:
    """Reference statistics: read from ``path`` if it exists, else computed once and written there.

    With several processes, the main process looks for ``path`` and reads it (the others receive the statistics, so
    the file need only be on the main node's disk); if it must be computed, every process takes its share of the
    images, the sums are merged once, and the main process writes the file.

    Args:
        path (`str`, *optional*): the ``.npz`` cache; ``None`` computes without caching.
        feature_extractor (`nn.Module`): the extractor (its ``name`` is stored and checked).
        image_batches (callable, *optional*): ``image_batches(process_index, num_processes)`` returns an iterable of
            this process's batches of real images (see :func:`dataset_image_batches`); only called when the
            statistics must be computed. For the ``digits`` extractor it defaults to scikit-learn's digits.
        accelerator (`accelerate.Accelerator`, *optional*): for multi-process runs.
    """
    name = extractor_name(feature_extractor)

    def read():
        return FeatureStats.load(path, feature_extractor=name) if path and os.path.isfile(path) else None

    cached = _from_main(accelerator, read)
    if cached is not None:
        return cached
    if image_batches is None:
        if name != "digits":
            raise ValueError(
                "no reference statistics: pass --ref_stats FILE of an earlier run, or a dataset to compute them from"
            )
        image_batches = _digits_batches
    index = accelerator.process_index if accelerator is not None else 0
    count = accelerator.num_processes if accelerator is not None else 1
    device = accelerator.device if accelerator is not None else "cpu"
    stats = compute_reference_stats(image_batches(index, count), feature_extractor, device, accelerator)
    if path is not None and (accelerator is None or accelerator.is_main_process):
        stats.save(path)
        logger.info("reference statistics of %d images written to %s", stats.num_samples, path)
    return stats


def default_ref_stats_path(feature_extractor_name: str, dataset: str, split: str = "train", resolution=None) -> str:
    """Where reference statistics are cached when no ``--ref_stats`` is given: the package cache folder."""
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{dataset}-{split}-{resolution or 'native'}")
    return os.path.join(default_cache_dir(), "ref_stats", f"{slug}-{feature_extractor_name}.npz")


def resolve_reference(
    feature_extractor: nn.Module, ref_stats: str | None = None, accelerator=None, **dataset
) -> FeatureStats:
    """Reference statistics for the command-line tools.

    ``ref_stats`` is read if it exists, else computed from the dataset that ``dataset`` names (the arguments of
    :func:`dataset_image_batches`) and written there. Without ``ref_stats`` but with a dataset, the statistics are
    cached under :func:`default_ref_stats_path`. The ``digits`` extractor needs neither: it defaults to
    scikit-learn's digits (computed in memory).
    """
    name = extractor_name(feature_extractor)
    source = dataset.get("dataset_name") or dataset.get("train_data_dir")
    if ref_stats is None and source:
        if not dataset.get("dataset_name"):
            source = os.path.abspath(source)
        split = dataset.get("split") or "train"
        ref_stats = default_ref_stats_path(name, source, split, dataset.get("resolution"))
    if ref_stats is not None and not ref_stats.endswith(".npz"):
        raise ValueError(f"--ref_stats must name an .npz file, got {ref_stats!r}")
    if source:

        def batches(process_index, num_processes):
            return dataset_image_batches(**dataset, process_index=process_index, num_processes=num_processes)

    else:
        batches = None
    return reference_stats(ref_stats, feature_extractor, batches, accelerator)


def evaluate_pipeline(
    pipeline,
    feature_extractor: str | nn.Module,
    reference: FeatureStats,
    num_images: int,
    batch_size: int = 64,
    num_inference_steps: int = 18,
    seed: int = 0,
    accelerator=None,
    cache_dir: str | None = None,
    cache_settings: dict | None = None,
    class_labels=None,
    confidence_threshold: float = 0.9,
    progress: bool = True,
    **pipeline_kwargs,
) -> EvaluationOutput:
    """Generate ``num_images`` images over all processes and measure their Fréchet distance to ``reference``.

    Args:
        pipeline (`EDM2Pipeline`): the generator.
        feature_extractor (`str` or `nn.Module`): ``"inception"``, ``"digits"`` or a module (see :mod:`.extractors`).
        reference (`FeatureStats`): statistics of the real data (see :func:`reference_stats`).
        num_images (`int`): images in total (50,000 for the standard FID).
        batch_size (`int`): images per batch and process.
        num_inference_steps (`int`): sampler steps (EDM2 uses 18 Heun steps for 32×32 images).
        seed (`int`): seed of image 0; image i uses seed + i (see :func:`.generation.seed_ranges`).
        accelerator (`accelerate.Accelerator`, *optional*): multi-process generation; ``None`` runs on the CPU.
        cache_dir (`str`, *optional*): per-batch feature cache making the run resumable.
        cache_settings (`dict`, *optional*): anything else that identifies the run in the cache (e.g. the model's
            path); the SHA-256 of the networks' weights and the generation settings are added automatically.
        class_labels (*optional*): passed to the pipeline; ``None`` draws random classes for conditional models.
        confidence_threshold (`float`): threshold of the ``confident`` share for classifier extractors.
        progress (`bool`): show a progress bar.
        **pipeline_kwargs: further pipeline arguments (e.g. ``guidance_scale``).
    """
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2 for a covariance, got {num_images}")
    extractor = get_feature_extractor(feature_extractor)
    name = extractor_name(extractor)
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    metric = FeatureFrechetDistance(extractor).to(device)
    metric.set_reference_stats(reference)
    cache = None
    if cache_dir is not None:
        settings = dict(cache_settings or {})
        nets = {k: getattr(pipeline, k, None) for k in ("unet", "guidance_unet", "vae")}
        settings.update(
            weights={k: model_fingerprint(v) for k, v in nets.items() if isinstance(v, nn.Module)},
            batch_size=batch_size,
            num_inference_steps=num_inference_steps,
            seed=seed,
            feature_extractor=name,
            num_features=int(extractor.num_features),
            class_labels=None if class_labels is None else torch.as_tensor(class_labels).tolist(),
            pipeline_kwargs=pipeline_kwargs,
        )
        # One settings file per node: on node-local disks each node's cache must be guarded too.
        cache = FeatureCache(cache_dir, settings, accelerator is None or accelerator.is_local_main_process)
    confident = torch.zeros(2, dtype=torch.float64)  # [confident count, images with probabilities]
    for _, arrays in iter_generated_features(
        pipeline,
        extractor,
        num_images,
        batch_size,
        num_inference_steps,
        seed,
        accelerator,
        cache,
        class_labels,
        progress,
        **pipeline_kwargs,
    ):
        metric.update(features=torch.from_numpy(arrays["features"]))
        if "max_prob" in arrays:
            probs = torch.from_numpy(arrays["max_prob"]).double()
            confident += torch.stack([(probs > confidence_threshold).sum(), torch.tensor(len(probs))]).double()
    metric.reduce_state(accelerator)
    if accelerator is not None and accelerator.num_processes > 1:
        confident = accelerator.reduce(confident.to(device), reduction="sum").cpu()
    n = int(metric.fake_features_num_samples)
    if n != num_images:
        raise RuntimeError(f"generated {n} images but {num_images} were requested")
    return EvaluationOutput(
        fd=metric.frechet_distance(),
        num_images=n,
        feature_extractor=name,
        confident=float(confident[0] / confident[1]) if confident[1] > 0 else None,
    )


__all__ = [
    "EvaluationOutput",
    "compute_reference_stats",
    "dataset_image_batches",
    "evaluate_pipeline",
    "default_ref_stats_path",
    "fill_dataset_args",
    "reference_stats",
    "resolve_reference",
    "run_dataset",
]


def run_dataset(run_dir: str) -> dict:
    """The dataset a run trained on, from its ``config.yaml``, in the evaluation options' names.

    Returns ``dataset_name`` (``"digits"`` for scikit-learn's digits), ``train_data_dir``, ``dataset_config_name``,
    ``dataset_split``, ``image_column``, ``label_column`` (``None`` when the run trained unconditionally),
    ``resolution``; an empty dict for a run without a config.
    """
    path, cfg = read_run_config(run_dir)
    data = dict(cfg.get("data") or {})
    if path is None or not data:
        return {}
    source = resolve_source(data)
    if source == "latents":
        raise ValueError(f"{run_dir} trained on a latent dataset; give the image dataset with --dataset_name")
    image_column, label_column = dataset_columns(source, data)
    return {
        "dataset_name": "digits" if source == "sklearn_digits" else data.get("dataset_name"),
        "train_data_dir": data.get("train_data_dir") if source == "imagefolder" else None,
        "dataset_config_name": data.get("dataset_config_name"),
        "dataset_split": data.get("dataset_split") or "train",
        "image_column": image_column,
        "label_column": label_column,
        "resolution": data.get("resolution"),
    }


_DATASET_FALLBACKS = {"dataset_split": "train", "image_column": "image", "label_column": "label"}


def fill_dataset_args(args, run_dir: str | None) -> dict:
    """Options left unset on the command line take the run's dataset (:func:`run_dataset`), then the defaults.

    Returns the run's dataset settings (empty without a run).
    """
    settings = run_dataset(run_dir) if run_dir else {}
    for key in ("dataset_name", "train_data_dir", "dataset_config_name", "resolution", *_DATASET_FALLBACKS):
        if hasattr(args, key) and getattr(args, key) is None:
            value = settings.get(key)
            setattr(args, key, value if value is not None else _DATASET_FALLBACKS.get(key))
    return settings


def add_reference_args(parser) -> None:
    """Command-line options shared by the evaluation scripts: the feature extractor and the reference images.

    The dataset options default to the run's (``--run_dir``, see :func:`fill_dataset_args`).
    """
    parser.add_argument("--feature_extractor", default="inception", choices=["inception", "digits"])
    parser.add_argument("--inception_weights", default=None, help="local torch-fidelity Inception weights file")
    parser.add_argument("--ref_stats", default=None, help=".npz of reference statistics: read, or written if missing")
    parser.add_argument("--dataset_name", default=None, help="Hub dataset of the reference images, or 'digits'")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_data_dir", default=None, help="local image folder of the reference images instead")
    parser.add_argument("--dataset_split", default=None, help="default: the run's, else train")
    parser.add_argument("--image_column", default=None, help="default: the run's, else image (CIFAR-10's is img)")
    parser.add_argument("--resolution", type=int, default=None, help="resize/crop reference images (as in training)")


def extractor_from_args(args):
    """The feature extractor that :func:`add_reference_args`' options name."""
    kwargs = {"weights_path": args.inception_weights} if args.feature_extractor == "inception" else {}
    return get_feature_extractor(args.feature_extractor, **kwargs)


def reference_from_args(extractor, args, channels: int, accelerator=None) -> FeatureStats:
    """:func:`resolve_reference` with the options of :func:`add_reference_args`."""
    return resolve_reference(
        extractor,
        args.ref_stats,
        accelerator,
        dataset_name=args.dataset_name,
        train_data_dir=args.train_data_dir,
        split=args.dataset_split or "train",
        dataset_config_name=args.dataset_config_name,
        image_column=args.image_column or "image",
        resolution=args.resolution,
        channels=channels,
    )
