#!/usr/bin/env python
"""Encode an image dataset with a diffusers ``AutoencoderKL`` into a latent dataset for training latent EDM2 models.

    python examples/encode_latents.py --train_data_dir imagenet/train --vae stabilityai/sd-vae-ft-mse \\
        --resolution 512 --output_dir imagenet512-sd-latents --batch_size 64

Images are centre-cropped as EDM2 prepares ImageNet, scaled to [0, 1] and encoded; each row of the output
(``datasets.Dataset.save_to_disk``) holds the posterior's mean and std (``latents``, 2·C channels) and the class
(``label``). The latent standardization constants go into the dataset's info (``read_latent_info``).

Under ``accelerate launch`` the processes share the work: batch b of --batch_size images is encoded by process
b mod N, the main process gathers every round of N batches and alone writes the dataset, which is the one a single
process writes (same rows in the same order, same values on the same hardware).

    accelerate launch --num_processes 8 examples/encode_latents.py --train_data_dir imagenet/train \\
        --vae stabilityai/sd-vae-ft-mse --resolution 512 --output_dir imagenet512-sd-latents --batch_size 64
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile

import torch
from accelerate import PartialState

from edm2_diffusers.data import build_latent_dataset, load_latent_dataset, load_train_dataset, save_latent_dataset
from edm2_diffusers.data.latents import STORAGE_DTYPES
from edm2_diffusers.distributed import cpu_process_group
from edm2_diffusers.latents import LatentStandardizer, load_vae

logger = logging.getLogger("encode_latents")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("images")
    src.add_argument("--dataset_name", type=str, default=None, help="a dataset on the Hugging Face Hub")
    src.add_argument("--dataset_config_name", type=str, default=None, help="the Hub dataset's configuration")
    src.add_argument("--train_data_dir", type=str, default=None, help="a local image folder (imagefolder layout)")
    src.add_argument("--dataset_split", type=str, default="train", help="split to encode")
    src.add_argument("--cache_dir", type=str, default=None, help="where `datasets` caches downloads")
    src.add_argument("--image_column", type=str, default="image", help="column holding the images")
    src.add_argument(
        "--label_column",
        type=str,
        default="auto",
        help="column holding class ids: 'auto' uses 'label' when the dataset has it, 'none' stores no labels",
    )
    src.add_argument("--max_samples", type=int, default=None, help="encode only the first N images")
    vae = p.add_argument_group("autoencoder")
    vae.add_argument("--vae", type=str, required=True, help="AutoencoderKL folder or Hub repo")
    vae.add_argument("--vae_subfolder", type=str, default=None, help="subfolder of --vae holding the VAE (e.g. vae)")
    vae.add_argument("--resolution", type=int, required=True, help="centre-crop images to this size before encoding")
    vae.add_argument("--batch_size", type=int, default=8, help="images per VAE call")
    vae.add_argument(
        "--device",
        type=str,
        default=None,
        help="cuda, cpu, ... (default: cuda when available; launched: each process's)",
    )
    vae.add_argument("--vae_dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    out = p.add_argument_group("output")
    out.add_argument("--output_dir", type=str, required=True, help="new folder for the latent dataset")
    out.add_argument("--storage_dtype", choices=STORAGE_DTYPES, default="float32", help="dtype of stored moments")
    out.add_argument(
        "--latent_stats",
        choices=("sd-vae", "measured"),
        default="sd-vae",
        help="standardization constants to record: EDM2's Stable Diffusion VAE values, or those measured here",
    )
    out.add_argument("--latent_mean", type=float, nargs="+", default=None, help="explicit per-channel raw mean")
    out.add_argument("--latent_std", type=float, nargs="+", default=None, help="explicit per-channel raw std")
    out.add_argument("--final_std", type=float, default=0.5, help="std of the standardized latents")
    return p.parse_args(argv)


def _check(args) -> None:
    if (args.dataset_name is None) == (args.train_data_dir is None):
        raise ValueError("give exactly one of --dataset_name (Hub) and --train_data_dir (image folder)")
    if args.resolution < 1 or args.batch_size < 1:
        raise ValueError("--resolution and --batch_size must be positive")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError("--max_samples must be positive")
    if (args.latent_mean is None) != (args.latent_std is None):
        raise ValueError("give --latent_mean and --latent_std together")
    if args.latent_mean is not None and args.latent_stats == "measured":
        raise ValueError("--latent_stats measured and explicit --latent_mean/--latent_std exclude each other")
    if os.path.exists(args.output_dir):
        raise FileExistsError(f"--output_dir {args.output_dir!r} already exists; nothing was written")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _check(args)
    state = PartialState(cpu=cpu_process_group())

    data_cfg = {
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "dataset_split": args.dataset_split,
        "train_data_dir": args.train_data_dir,
        "cache_dir": args.cache_dir,
    }
    with state.main_process_first():  # one download or cache preparation, then the others read it
        images = load_train_dataset(data_cfg)
    if args.max_samples is not None:
        images = images.select(range(min(args.max_samples, len(images))))
    label_column = args.label_column
    if label_column == "auto":
        label_column = "label" if "label" in images.column_names else None
    elif label_column == "none":
        label_column = None

    if state.num_processes > 1:
        device = args.device or state.device
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(args.vae, subfolder=args.vae_subfolder, what="--vae", torch_dtype=getattr(torch, args.vae_dtype))
    vae = vae.to(device)
    standardizer = None
    if args.latent_mean is not None:
        standardizer = LatentStandardizer(tuple(args.latent_mean), tuple(args.latent_std), args.final_std)
    elif args.final_std != 0.5:
        standardizer = LatentStandardizer(final_std=args.final_std)

    encode = {
        "resolution": args.resolution,
        "image_column": args.image_column,
        "label_column": label_column,
        "batch_size": args.batch_size,
        "storage_dtype": args.storage_dtype,
        "standardizer": standardizer,
        "use_measured_statistics": args.latent_stats == "measured",
        "vae_name": args.vae if args.vae_subfolder is None else f"{args.vae}/{args.vae_subfolder}",
    }
    if not state.is_main_process:
        build_latent_dataset(vae, images, **encode, state=state)  # encodes its batches for the main process
        state.wait_for_everyone()
        return 0

    # Arrow files of the encoding live beside the output until it is saved, then go away.
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".encode-latents-", dir=parent)
    try:
        latents = build_latent_dataset(vae, images, **encode, cache_dir=work, progress=True, state=state)
        path = save_latent_dataset(latents, args.output_dir)
        del latents
    finally:
        shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()

    _, info = load_latent_dataset(path)
    logger.info("wrote %d latents of shape %s to %s", info["num_images"], info["latent_shape"], path)
    logger.info("recorded standardization: mean %s, std %s, final std %s", *_fmt(info))
    logger.info(
        "measured on this data:    mean %s, std %s", _round(info["measured_mean"]), _round(info["measured_std"])
    )
    return 0


def _round(values):
    return [round(v, 3) for v in values]


def _fmt(info):
    return _round(info["latent_mean"]), _round(info["latent_std"]), info["final_std"]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
