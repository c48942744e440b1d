#!/usr/bin/env python
"""Linear probe of a frozen EDM2 denoiser: pooled decoder-block features at a fixed noise level → linear classifier.

Examples:
    # an EMA reconstruction of a digits run (offline; the fixed 75/25 split of scikit-learn's digits)
    python examples/linear_probe.py --run_dir runs/digits --ema_std 0.10 --num_epochs 15

    # an exported CIFAR-10 pipeline, probing another block at another noise level
    python examples/linear_probe.py --pipeline out/cifar10-G --subfolder ema-0.100 --dataset_name uoft-cs/cifar10 \\
        --test_split test --block 16x16_block1 --sigma 0.1 --num_epochs 15

Prints the test-split accuracy. The model's class input stays empty, so a class-conditional model cannot pass its
label through.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from edm2_diffusers.evaluation.linear_probe import DEFAULT_SIGMA, linear_probe, probe_dataset


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir", help="training run with phema/ snapshots (an EMA profile is reconstructed)")
    source.add_argument("--pipeline", help="saved EDM2Pipeline folder or Hub repo id")
    parser.add_argument("--subfolder", default=None, help="the pipeline's folder inside --pipeline")
    parser.add_argument("--ema_std", type=float, default=0.10, help="EMA length to reconstruct from --run_dir")
    parser.add_argument("--step", type=int, default=None, help="snapshot step for --run_dir (default: the last)")
    parser.add_argument(
        "--block", default=None, help="decoder block, e.g. 8x8_up or 16x16_block1 (default: first _up)"
    )
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="noise level of the probe")
    parser.add_argument("--num_epochs", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_name", default="digits", help="'digits' (offline) or a Hub dataset with labels")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--test_split", default="test")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--resolution", type=int, default=None, help="resize/crop images (as in training)")
    parser.add_argument("--max_images", type=int, default=None, help="use at most this many images per split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.num_epochs < 1:
        parser.error("--num_epochs must be at least 1")
    if not args.sigma > 0:
        parser.error("--sigma must be positive")
    return args


def load_unet(args):
    if args.run_dir:
        from edm2_diffusers.ema import reconstruct

        rec = reconstruct(args.run_dir, [args.ema_std], step=args.step)
        print(f"reconstructed EMA std {args.ema_std:.3f} at step {rec.step}")
        return rec.model(0)
    from edm2_diffusers.hub.loading import load_pipeline

    pipe = load_pipeline(args.pipeline, args.subfolder)
    if pipe.vae is not None:
        raise ValueError(
            "the linear probe works on pixel-space models; this pipeline is a latent model (it has a VAE)"
        )
    return pipe.unet


def main(argv=None):
    args = parse_args(argv)
    unet = load_unet(args).to(args.device).requires_grad_(False)
    data = {}
    for split in (args.train_split, args.test_split):
        data[split] = probe_dataset(
            args.dataset_name,
            split,
            args.label_column,
            args.image_column,
            args.dataset_config_name,
            args.resolution,
            unet.config.in_channels,
            args.max_images,
        )
    if tuple(data[args.train_split][0].shape[1:]) != (unet.config.in_channels,) + (unet.config.sample_size,) * 2:
        raise ValueError(
            f"dataset images have shape {tuple(data[args.train_split][0].shape[1:])} but the model takes "
            f"{unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size} (set --resolution)"
        )
    out = linear_probe(
        unet,
        *data[args.train_split],
        *data[args.test_split],
        block=args.block,
        sigma=args.sigma,
        num_epochs=args.num_epochs,
        batch_size=args.batch_size,
        lr=args.learning_rate,
        seed=args.seed,
    )
    print(
        f"linear probe accuracy: {out.accuracy:.4f} (train {out.train_accuracy:.4f}; block {out.block}, "
        f"sigma {out.sigma:g}, {out.num_features} features, {args.num_epochs} epochs)"
    )
    print(json.dumps(dict(out)))
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
