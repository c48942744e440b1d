#!/usr/bin/env python
"""Train an EDM2 U-Net (Config C, E or G) with Accelerate on a Hugging Face dataset, an image folder or the digits.

    python examples/train_edm2.py --config configs/digits/G.yaml --output_dir digits-G
    accelerate launch examples/train_edm2.py --config configs/cifar10/E.yaml --output_dir cifar10-E
    torchrun --nproc_per_node 8 examples/train_edm2.py --config configs/cifar10/E.yaml --output_dir cifar10-E

Flags override the YAML config; ``--resume_from_checkpoint latest`` continues a run exactly where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edm2_diffusers.training import SCHEMA, NonFiniteLossError, load_config, train

# Flags named as in diffusers' training examples, mapped to config keys.
FLAGS = {
    "output_dir": "training.output_dir",
    "dataset_name": "data.dataset_name",
    "dataset_config_name": "data.dataset_config_name",
    "dataset_split": "data.dataset_split",
    "train_data_dir": "data.train_data_dir",
    "cache_dir": "data.cache_dir",
    "image_column": "data.image_column",
    "label_column": "data.label_column",
    "resolution": "data.resolution",
    "random_flip": "data.random_flip",
    "max_train_samples": "data.max_train_samples",
    "train_batch_size": "training.train_batch_size",
    "total_batch_size": "training.total_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "num_epochs": "training.num_epochs",
    "max_train_steps": "training.max_train_steps",
    "learning_rate": "training.learning_rate",
    "lr_warmup_steps": "training.lr_warmup_steps",
    "lr_warmup_images": "training.lr_warmup_images",
    "lr_decay_ref_steps": "training.lr_decay_ref_steps",
    "lr_decay_ref_images": "training.lr_decay_ref_images",
    "adam_beta1": "training.adam_beta1",
    "adam_beta2": "training.adam_beta2",
    "adam_epsilon": "training.adam_epsilon",
    "P_mean": "training.P_mean",
    "P_std": "training.P_std",
    "mixed_precision": "training.mixed_precision",
    "seed": "training.seed",
    "checkpointing_steps": "training.checkpointing_steps",
    "checkpoints_total_limit": "training.checkpoints_total_limit",
    "resume_from_checkpoint": "training.resume_from_checkpoint",
    "sample_every_steps": "training.sample_every_steps",
    "dataloader_num_workers": "training.dataloader_num_workers",
    "cpu_threads": "training.cpu_threads",
    "report_to": "training.report_to",
    "logging_dir": "training.logging_dir",
    "num_inference_steps": "sampling.num_inference_steps",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML config (e.g. configs/digits/G.yaml)")
    for flag, dotted in FLAGS.items():
        section, key = dotted.split(".")
        _, kind, help_text = SCHEMA[section][key]
        if kind is bool:
            parser.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(f"--{flag}", type=kind, default=None, help=help_text)
    parser.add_argument(
        "--ema_snapshot_steps",
        type=int,
        default=None,
        help="write post-hoc EMA snapshots every N optimizer steps (overrides ema.snapshot_every_steps)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {dotted: getattr(args, flag) for flag, dotted in FLAGS.items() if getattr(args, flag) is not None}
    if args.ema_snapshot_steps is not None:
        overrides["ema.snapshot_every_steps"] = args.ema_snapshot_steps
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("edm2_diffusers").setLevel(logging.INFO)
    try:
        cfg = load_config(args.config, overrides)
        train(cfg)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
