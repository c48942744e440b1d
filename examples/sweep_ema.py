#!/usr/bin/env python
"""EMA-length sweep (the EDM2 paper's Figure 5): reconstruct many post-hoc EMA profiles, evaluate each, keep the best.

Examples:
    # the digits quickstart, offline
    python examples/sweep_ema.py --run_dir runs/digits --stds 0.02:0.20:0.02 --num_images 1000 \\
        --num_inference_steps 18 --feature_extractor digits

    # the sampler too: equal quality for fewer network evaluations (NFE: Heun 2N-1, DPM-Solver and Euler N)
    python examples/sweep_ema.py --run_dir runs/digits --stds 0.05,0.10 --num_images 512 --feature_extractor digits \
        --samplers heun:18,dpmsolver:18,dpmsolver:10 --margin 2%

    # CIFAR-10 FID on 8 GPUs (each std's images spread over the processes)
    accelerate launch --num_processes 8 examples/sweep_ema.py --run_dir runs/cifar10-G --stds 0.05,0.10,0.15 \\
        --num_images 10000 --dataset_name uoft-cs/cifar10 --ref_stats cifar10-train.npz

Writes OUT/sweep.csv (one row per std and sampler, with its NFE), OUT/sweep.png (metric against EMA std, best marked),
OUT/sweep_nfe.png (metric against NFE at the best std, with several samplers) and OUT/best.json, which
`examples/export_pipeline.py --stds best` reads (OUT defaults to RUN/sweep, where the export looks); best.json also
names the cheapest sampler within --margin of the best. The reconstructed weights stay in memory.
"""

from __future__ import annotations

import argparse
import os
import sys

from accelerate import Accelerator

from edm2_diffusers.distributed import cpu_process_group
from edm2_diffusers.ema import list_snapshots, parse_stds
from edm2_diffusers.evaluation.evaluate import (
    add_reference_args,
    extractor_from_args,
    fill_dataset_args,
    reference_from_args,
)
from edm2_diffusers.evaluation.sweep import DEFAULT_MARGIN, parse_margin, sweep_ema
from edm2_diffusers.schedulers.samplers import parse_samplers


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="training output folder with phema/ snapshots")
    parser.add_argument("--stds", required=True, help="start:stop:step (stop included) or a comma-separated list")
    parser.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct at (default: the last)")
    parser.add_argument("--num_images", type=int, default=1000, help="generated images per std")
    parser.add_argument("--num_inference_steps", type=int, default=18)
    parser.add_argument("--samplers", default=None, help="e.g. heun:18,dpmsolver:18,dpmsolver:10,euler:18")
    parser.add_argument("--margin", default=DEFAULT_MARGIN, help="cheapest sampler within: 2%% of the best, or 0.5")
    parser.add_argument("--batch_size", type=int, default=64, help="images per batch and process")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0 (the same noise for every std)")
    parser.add_argument("--output_dir", default=None, help="where the CSV, plot and best.json go (default RUN/sweep)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier sweep")
    parser.add_argument("--chunk_size", type=int, default=4, help="stds reconstructed at once (memory bound)")
    add_reference_args(parser)
    args = parser.parse_args(argv)
    try:
        args.stds = parse_stds(args.stds, sort=True)
        args.samplers = parse_samplers(args.samplers or "heun", args.num_inference_steps)
        parse_margin(args.margin)
    except ValueError as e:
        parser.error(str(e))
    if args.num_images < 2:
        parser.error("--num_images must be at least 2")
    if args.output_dir is None:
        args.output_dir = os.path.join(args.run_dir, "sweep")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.run_dir):
        raise FileNotFoundError(f"--run_dir {args.run_dir!r} is not a directory")
    # The reference images are the run's dataset (its config.yaml); the digits extractor has its own reference.
    fill_dataset_args(args, args.run_dir if args.feature_extractor != "digits" else None)
    accelerator = Accelerator(cpu=cpu_process_group())
    extractor = extractor_from_args(args)
    channels = list_snapshots(args.run_dir)[0].model_config.get("in_channels", 3)
    reference = reference_from_args(extractor, args, channels, accelerator)
    result = sweep_ema(
        args.run_dir,
        args.stds,
        extractor,
        reference,
        args.num_images,
        args.num_inference_steps,
        args.batch_size,
        args.seed,
        args.step,
        accelerator,
        args.output_dir,
        args.overwrite,
        args.chunk_size,
        samplers=args.samplers,
        margin=args.margin,
    )
    if accelerator.is_main_process:
        name, cheap = result.metric_name, result.cheapest
        for row in result.rows:
            extra = f"  confident {row['confident']:.3f}" if "confident" in row else ""
            sampler = f"{row['scheduler']} {row['num_inference_steps']} steps, NFE {row['nfe']}"
            print(f"std {row['std']:.4f}  {sampler}  {name} {row[name]:.4f}{extra}")
        print(f"best EMA std {result.best_std:.4f} ({name} {result.best_metric:.4f}) at step {result.step}")
        print(
            f"cheapest within {cheap['margin']}: {cheap['scheduler']} {cheap['num_inference_steps']} steps "
            f"(NFE {cheap['nfe']}, {name} {cheap['value']:.4f})"
        )
        for path in result.files.values():
            print(f"wrote {path}")
    accelerator.end_training()
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, ModuleNotFoundError) as e:
        sys.exit(f"error: {e}")
