#!/usr/bin/env python
"""Linear probe of a frozen EDM2 denoiser: pooled decoder-block features at a fixed noise level → linear classifier.

Two protocols:

* ``edm2-multi-gpu`` (the default for runs of the seed configs configs/cifar10, cifar100, tinyimagenet): that
  project's linear.py — the run's EMA model, σ from its 18-step schedule (≈ 0.0599 on CIFAR, ≈ 0.1395 on
  Tiny-ImageNet), the 6th decoder block (8x8_block1 / 16x16_up), raw pooled features with fresh noise every batch and
  random flips, Adam at 1e-3 × processes, batch 128 per process, 15 epochs on a per-epoch cosine, scored on CIFAR's
  test split or Tiny-ImageNet's validation split;
* ``package`` (the default otherwise): features computed once with a fixed noise draw, standardised, then Adam on a
  per-step cosine (``--learning_rate``, ``--sigma``, ``--block``).

Examples:
    # a CIFAR-10 seed-config run: dataset, image column (img), label column and splits from RUN/config.yaml; the model
    # is the run's exported EMA (RUN/pipeline) unless --ema_std reconstructs one from its snapshots
    accelerate launch --num_processes 4 examples/linear_probe.py --run_dir runs/cifar10-E

    # the digits quickstart (offline; the fixed 75/25 split of scikit-learn's digits), an EMA reconstruction
    python examples/linear_probe.py --run_dir runs/digits --ema_std 0.10

    # an exported pipeline against a Hub dataset
    python examples/linear_probe.py --pipeline out/cifar10-G --dataset_name uoft-cs/cifar10 --image_column img \\
        --test_split test --protocol package --block 16x16_block1 --sigma 0.1

Prints the test accuracy as text and as JSON. The model's class input stays empty, so a class-conditional model cannot
pass its label through.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from accelerate import Accelerator

from edm2_diffusers.distributed import cpu_process_group
from edm2_diffusers.evaluation.evaluate import fill_dataset_args
from edm2_diffusers.evaluation.linear_probe import DEFAULT_SIGMA, linear_probe, probe_dataset
from edm2_diffusers.evaluation.seed_probe import (
    SeedProbeProtocol,
    protocol_with,
    seed_linear_probe,
    seed_probe_protocol,
    seed_probe_sigma,
)
from edm2_diffusers.runs import pipeline_dir, read_run_config, sampling_settings


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run_dir", help="training run: its config names the data; its EMA is probed")
    source.add_argument("--pipeline", help="saved EDM2Pipeline folder or Hub repo id")
    parser.add_argument("--subfolder", default=None, help="the pipeline's folder inside --pipeline")
    parser.add_argument("--protocol", default="auto", choices=["auto", "edm2-multi-gpu", "package"])
    parser.add_argument("--ema_std", type=float, default=None, help="reconstruct this EMA length from --run_dir")
    parser.add_argument("--step", type=int, default=None, help="snapshot step for --ema_std (default: the last)")
    parser.add_argument("--block", default=None, help="decoder block, e.g. 8x8_block1 (default: the protocol's)")
    parser.add_argument("--sigma", type=float, default=None, help="noise level (default: the protocol's)")
    parser.add_argument("--num_epochs", type=int, default=None, help="default 15")
    parser.add_argument("--batch_size", type=int, default=None, help="default 128 (per process)")
    parser.add_argument("--learning_rate", type=float, default=None, help="default 1e-3 (× processes) / 3e-3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_name", default=None, help="'digits' (offline) or a Hub dataset with labels")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--train_split", default=None, help="default: the run's training split, else train")
    parser.add_argument("--test_split", default=None, help="default: the protocol's (test; valid on Tiny-ImageNet)")
    parser.add_argument("--image_column", default=None, help="default: the run's, else image")
    parser.add_argument("--label_column", default=None, help="default: the run's, else the dataset's, else label")
    parser.add_argument("--resolution", type=int, default=None, help="resize/crop images (default: the run's)")
    parser.add_argument("--max_images", type=int, default=None, help="use at most this many images per split")
    parser.add_argument("--device", default=None, help="default: the accelerator's")
    args = parser.parse_args(argv)
    if args.num_epochs is not None and args.num_epochs < 1:
        parser.error("--num_epochs must be at least 1")
    if args.sigma is not None and not args.sigma > 0:
        parser.error("--sigma must be positive")
    return args


def resolve(args) -> tuple[SeedProbeProtocol | None, dict]:
    """The seed protocol (``None`` for the package's) and the run's config; fills the dataset options."""
    cfg = read_run_config(args.run_dir)[1] if args.run_dir else {}
    label_column, args.train_data_dir = args.label_column, None
    run_data = fill_dataset_args(args, args.run_dir)
    if args.train_data_dir is not None:
        raise ValueError("the linear probe reads Hub datasets or the digits; give --dataset_name with labels")
    args.dataset_name = args.dataset_name or "digits"
    known = seed_probe_protocol(args.dataset_name)
    use_seed = args.protocol == "edm2-multi-gpu" or (args.protocol == "auto" and known is not None)
    protocol = (known or SeedProbeProtocol()) if use_seed else None
    if label_column is None and run_data.get("label_column") is None and known is not None:
        args.label_column = known.label_column  # the seed configs train unconditionally: the dataset's classes
    if args.train_split is None:
        args.train_split = run_data.get("dataset_split") or "train"
    if args.test_split is None:
        args.test_split = protocol.test_split if protocol is not None else "test"
    if protocol is not None:
        protocol = protocol_with(
            protocol, num_epochs=args.num_epochs, batch_size=args.batch_size, learning_rate=args.learning_rate
        )
    return protocol, cfg


def load_unet(args, protocol):
    """The network to probe: an EMA reconstruction (``--ema_std``), the run's export, or a saved pipeline."""
    from edm2_diffusers.ema import reconstruct
    from edm2_diffusers.hub.loading import load_pipeline

    if args.run_dir and (args.ema_std is not None or protocol is None):
        std = 0.10 if args.ema_std is None else args.ema_std
        rec = reconstruct(args.run_dir, [std], step=args.step)
        print(f"reconstructed EMA std {std:.3f} at step {rec.step}")
        return rec.model(0)
    # The seed protocol probes the run's EMA model: the one the run exported (a traditional EMA for the seed configs).
    pipe = load_pipeline(pipeline_dir(args.run_dir) if args.run_dir else args.pipeline, args.subfolder)
    if pipe.vae is not None:
        raise ValueError("the linear probe works on pixel-space models; this pipeline has a VAE (a latent model)")
    return pipe.unet


def main(argv=None):
    args = parse_args(argv)
    protocol, cfg = resolve(args)
    accelerator = Accelerator(cpu=cpu_process_group())
    unet = load_unet(args, protocol).to(args.device or accelerator.device).requires_grad_(False)
    channels, size = unet.config.in_channels, unet.config.sample_size
    data = {}
    for split in (args.train_split, args.test_split):
        data[split] = probe_dataset(
            args.dataset_name, split, args.label_column, args.image_column, args.dataset_config_name,
            args.resolution, channels, args.max_images,
        )  # fmt: skip
        if tuple(data[split][0].shape[1:]) != (channels, size, size):
            raise ValueError(
                f"dataset images have shape {tuple(data[split][0].shape[1:])} but the model takes "
                f"{channels}x{size}x{size} (set --resolution)"
            )
    train, test = data[args.train_split], data[args.test_split]
    sigma_data = float((cfg.get("training") or {}).get("sigma_data") or 0.5)
    if protocol is None:
        sigma = args.sigma or DEFAULT_SIGMA
        kw = dict(num_epochs=args.num_epochs or 15, batch_size=args.batch_size or 128, lr=args.learning_rate or 3e-3)
        out = linear_probe(unet, *train, *test, block=args.block, sigma=sigma, seed=args.seed, **kw)
        result = dict(out, protocol="package")
    else:
        schedule = sampling_settings(cfg)
        sigma = args.sigma or seed_probe_sigma(
            protocol.timestep, protocol.num_steps, schedule["sigma_min"], schedule["sigma_max"], schedule["rho"]
        )
        out = seed_linear_probe(
            unet, *train, *test, protocol, sigma, args.block, seed=args.seed, sigma_data=sigma_data,
            accelerator=accelerator,
        )  # fmt: skip
        result = dict(out, protocol="edm2-multi-gpu", timestep=protocol.timestep)
    result.update(train_split=args.train_split, test_split=args.test_split, num_processes=accelerator.num_processes)
    if accelerator.is_main_process:
        print(
            f"linear probe accuracy: {out.accuracy:.4f} ({result['protocol']} protocol; block {out.block}, "
            f"sigma {out.sigma:.4g}, {out.num_features} features, test split {args.test_split})"
        )
        print(json.dumps(result))
    accelerator.end_training()
    return out


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
