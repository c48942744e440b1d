#!/usr/bin/env python
"""Evaluate a saved EDM2 pipeline: FID (Inception features) or the offline digits Fréchet distance.

Examples:
    # FID of a CIFAR-10 run's exported pipeline (RUN/pipeline), 50k images, 18 Heun steps, 8 GPUs; the reference
    # images are the run's training set (dataset, image column `img`, resolution from RUN/config.yaml), their
    # statistics cached once
    accelerate launch --num_processes 8 examples/evaluate.py --run_dir runs/cifar10-E --num_images 50000 \\
        --num_inference_steps 18 --ref_stats cifar10-train.npz --cache_dir runs/cifar10-E/fid-cache

    # any saved pipeline against a Hub dataset (name its image column)
    accelerate launch --num_processes 8 examples/evaluate.py --pipeline out/pipeline --num_images 50000 \\
        --dataset_name uoft-cs/cifar10 --image_column img --ref_stats cifar10-train.npz

    # the digits quickstart, offline, on the CPU
    python examples/evaluate.py --pipeline runs/digits/pipeline --feature_extractor digits --num_images 2000

Image i uses seed --seed + i; batches of consecutive seeds are dealt to the processes round-robin. With --cache_dir the
features of every finished batch are kept, and a rerun of the same command resumes where the last one stopped.
Inception features need `pip install "edm2-diffusers[metrics]"` (torch-fidelity downloads the weights on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from accelerate import Accelerator

from edm2_diffusers.distributed import cpu_process_group
from edm2_diffusers.evaluation import evaluate_pipeline
from edm2_diffusers.evaluation.evaluate import (
    add_reference_args,
    extractor_from_args,
    fill_dataset_args,
    reference_from_args,
)
from edm2_diffusers.files import write_json_atomic
from edm2_diffusers.hub.loading import load_pipeline
from edm2_diffusers.runs import pipeline_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", help="saved EDM2Pipeline folder or Hub repo id")
    source.add_argument("--run_dir", help="training run: its export RUN/pipeline, against its dataset (config.yaml)")
    parser.add_argument("--subfolder", default=None, help="the pipeline's folder inside --pipeline")
    parser.add_argument("--num_images", type=int, default=50000)
    parser.add_argument("--num_inference_steps", type=int, default=18)
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch and process")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="needs a pipeline with a guidance_unet")
    parser.add_argument("--cache_dir", default=None, help="per-batch feature cache: makes the run resumable")
    parser.add_argument("--output_json", default=None, help="also write the result to this file")
    add_reference_args(parser)
    args = parser.parse_args(argv)
    if args.num_images < 2:
        parser.error("--num_images must be at least 2")
    if args.batch_size < 1 or args.num_inference_steps < 1:
        parser.error("--batch_size and --num_inference_steps must be positive")
    # Dataset options left unset take the run's (the digits extractor has its own reference images).
    fill_dataset_args(args, args.run_dir if args.feature_extractor != "digits" else None)
    if args.run_dir:
        args.pipeline = pipeline_dir(args.run_dir)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=cpu_process_group())
    extractor = extractor_from_args(args)
    pipe = load_pipeline(args.pipeline, args.subfolder)
    reference = reference_from_args(extractor, args, pipe.unet.config.in_channels, accelerator)
    kwargs = {"guidance_scale": args.guidance_scale} if args.guidance_scale != 1.0 else {}
    cache_settings = {
        "pipeline": os.path.abspath(args.pipeline) if os.path.exists(args.pipeline) else args.pipeline,
        "subfolder": args.subfolder,
    }
    out = evaluate_pipeline(
        pipe,
        extractor,
        reference,
        args.num_images,
        args.batch_size,
        args.num_inference_steps,
        args.seed,
        accelerator,
        args.cache_dir,
        cache_settings,
        **kwargs,
    )
    result = {
        "fid" if out.feature_extractor == "inception" else "fd": out.fd,
        "confident": out.confident,
        "num_images": out.num_images,
        "num_processes": accelerator.num_processes,
        "num_inference_steps": args.num_inference_steps,
        "feature_extractor": out.feature_extractor,
        "pipeline": args.pipeline,
        "subfolder": args.subfolder,
    }
    if accelerator.is_main_process:
        print(json.dumps(result))
        if args.output_json:
            write_json_atomic(args.output_json, result)
    accelerator.end_training()
    return result


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        sys.exit(f"error: {e}")
