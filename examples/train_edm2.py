#!/usr/bin/env python
"""Train an EDM2 U-Net (Config C, E or G) with Accelerate on a Hugging Face dataset, an image folder or the digits.

    python examples/train_edm2.py --config configs/digits/G.yaml --output_dir digits-G
    accelerate launch examples/train_edm2.py --config configs/cifar10/E.yaml --output_dir cifar10-E
    torchrun --nproc_per_node 8 examples/train_edm2.py --config configs/cifar10/E.yaml --output_dir cifar10-E

Flags are named as in diffusers' training examples and override the YAML config; ``--resume_from_checkpoint latest``
continues a run exactly where it stopped. Mixed precision is Accelerate's (``accelerate config``, ``accelerate launch
--mixed_precision bf16``) unless the YAML or ``--mixed_precision`` sets it; ``--torch_compile`` (or Accelerate's
dynamo backend) compiles the U-Net; ``--pretrained_model_name_or_path EXPORT [--variant ema0100]`` fine-tunes an
exported pipeline's U-Net. At the end the EMA is exported as a diffusers pipeline into ``OUTPUT_DIR/pipeline``
(``--no-export_pipeline`` skips it) and pushed with ``--push_to_hub --hub_model_id USER/NAME [--hub_private_repo]``;
the token's write access is checked before training starts. ``--streaming`` reads the dataset as it trains (a
``datasets.IterableDataset``: a shard per process, a seeded ``--shuffle_buffer_size`` buffer, exact resume). The
digits quickstart ends by printing the digits metrics
of samples of the exported pipeline.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from edm2_diffusers.files import DiskFullError
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
    "center_crop": "data.center_crop",
    "random_flip": "data.random_flip",
    "max_train_samples": "data.max_train_samples",
    "streaming": "data.streaming",
    "shuffle_buffer_size": "data.shuffle_buffer_size",
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
    "pretrained_model_name_or_path": "training.pretrained_model_name_or_path",
    "variant": "training.variant",
    "torch_compile": "training.torch_compile",
    "compile_backend": "training.compile_backend",
    "checkpointing_steps": "training.checkpointing_steps",
    "checkpoints_total_limit": "training.checkpoints_total_limit",
    "resume_from_checkpoint": "training.resume_from_checkpoint",
    "rewind": "training.rewind",
    "save_on_each_node": "training.save_on_each_node",
    "sample_every_steps": "training.sample_every_steps",
    "dataloader_num_workers": "training.dataloader_num_workers",
    "cpu_threads": "training.cpu_threads",
    "report_to": "training.report_to",
    "logging_dir": "training.logging_dir",
    "num_inference_steps": "sampling.num_inference_steps",
    "vae": "sampling.vae",
    "export_pipeline": "training.export_pipeline",
    "push_to_hub": "training.push_to_hub",
    "hub_model_id": "training.hub_model_id",
    "hub_private_repo": "training.hub_private_repo",
}
# Older spellings that stay accepted.
ALIASES = {"hub_private_repo": ("--hub_private", "--private")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML config (e.g. configs/digits/G.yaml)")
    for flag, dotted in FLAGS.items():
        section, key = dotted.split(".")
        _, kind, help_text = SCHEMA[section][key]
        names = (f"--{flag}", *ALIASES.get(flag, ()))
        if kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(*names, type=kind, default=None, help=help_text)
    parser.add_argument(
        "--ema_snapshot_steps",
        type=int,
        default=None,
        help="write post-hoc EMA snapshots every N optimizer steps (overrides ema.snapshot_every_steps)",
    )
    parser.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="Hub token for --push_to_hub (default: HF_TOKEN or the cached login; never stored with the run)",
    )
    parser.add_argument(
        "--num_metric_images",
        type=int,
        default=256,
        help="digits runs: samples of the final pipeline scored with the digits metrics at the end (0: skip)",
    )
    return parser.parse_args(argv)


@torch.no_grad()
def digits_report(result, cfg: dict, num_images: int) -> dict | None:
    """Digits metrics (Fréchet distance of classifier features, confident share) of samples of the final model.

    The samples come from the exported pipeline (its root EMA variant), else from the first EMA profile.
    """
    from edm2_diffusers import EDM2Pipeline, EDMHeunScheduler
    from edm2_diffusers.evaluation import digits_metrics
    from edm2_diffusers.evaluation.generation import generate_batch
    from edm2_diffusers.hub import load_pipeline

    if result.pipeline_dir is not None:
        pipe = load_pipeline(result.pipeline_dir)
    elif result.ema is not None:
        scheduler = EDMHeunScheduler(sigma_data=cfg["training"]["sigma_data"])
        pipe = EDM2Pipeline(unet=result.ema.averaged_models()[0][1], scheduler=scheduler)
    else:
        return None
    pipe.set_progress_bar_config(disable=True)
    classes = pipe.unet.config.num_class_embeds
    labels = torch.arange(num_images) % classes if classes else None  # every digit equally often
    # The pipeline as its users call it: its own sampler and default step count (the run's when it stores none).
    steps = getattr(pipe.config, "default_num_inference_steps", None) or cfg["sampling"]["num_inference_steps"]
    images = generate_batch(pipe, range(num_images), steps, class_labels=labels)
    sampler = "Heun" if isinstance(pipe.scheduler, EDMHeunScheduler) else type(pipe.scheduler).__name__
    return {**digits_metrics(images), "num_inference_steps": steps, "sampler": sampler}


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {dotted: getattr(args, flag) for flag, dotted in FLAGS.items() if getattr(args, flag) is not None}
    if args.ema_snapshot_steps is not None:
        overrides["ema.snapshot_every_steps"] = args.ema_snapshot_steps
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("edm2_diffusers").setLevel(logging.INFO)
    try:
        cfg = load_config(args.config, overrides)
        if args.num_metric_images < 0 or args.num_metric_images == 1:
            raise ValueError(f"--num_metric_images must be 0 (skip) or at least 2, got {args.num_metric_images}")
        result = train(cfg, hub_token=args.hub_token)
    except (ValueError, FileNotFoundError, NonFiniteLossError, RuntimeError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not result.is_main_process:
        return 0
    if result.sample_grids:
        print(f"final sample grid: {result.sample_grids[-1]}")
    if result.pipeline_dir:
        print(f"pipeline:          {result.pipeline_dir}")
    if cfg["data"]["source"] == "sklearn_digits" and args.num_metric_images:
        metrics = digits_report(result, cfg, args.num_metric_images)
        if metrics is not None:
            print(
                f"digits metrics of {metrics['num_images']} samples "
                f"({metrics['num_inference_steps']} {metrics['sampler']} steps): "
                f"FD {metrics['fd']:.3f} (lower is better), confident {metrics['confident']:.3f} "
                "(real digits: about 0.97)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
