#!/usr/bin/env python
"""Export post-hoc EMA variants of a training run as one diffusers pipeline (and push it to the Hub).

    python examples/export_pipeline.py --run_dir runs/digits --stds 0.05,0.10 --output_dir exports/digits
    python examples/export_pipeline.py --run_dir runs/digits --stds best --output_dir exports/digits \\
        --push_to_hub --hub_model_id USER/edm2-digits

Each std's U-Net is a diffusers weight variant (``ema0050`` for 0.050), the first std also the default weights; a
variant loads with ``DiffusionPipeline.from_pretrained(folder, variant="ema0100", trust_remote_code=True)``, also where
edm2-diffusers is not installed, or ``EDM2Pipeline.from_pretrained(folder, variant="ema0100")`` with it.

The pipeline's default sampler (``--sampler``, default ``cheapest``) is the EMA sweep's cheapest setting within its
``--margin`` of the best (e.g. DPM-Solver at 10 steps, 10 network evaluations, instead of Heun at 18, 35), when the
sweep ran at the exported step with samplers and its best std is exported; otherwise, or with ``--sampler heun``, the
run's Heun sampler. The model card says which and why; ``export_info.json`` records the reason when Heun is kept.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edm2_diffusers.files import DiskFullError
from edm2_diffusers.hub import export_run
from edm2_diffusers.hub.sampler_choice import DEFAULT_SAMPLER, SAMPLER_CHOICES
from edm2_diffusers.run_lock import FolderLockedError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="the training run's output folder (with phema/ snapshots)")
    parser.add_argument(
        "--stds",
        required=True,
        help="comma-separated EMA stds, e.g. 0.05,0.10 (the first is the root variant); 'best' reads the EMA sweep",
    )
    parser.add_argument("--output_dir", required=True, help="the export folder (must be new or empty)")
    parser.add_argument("--step", type=int, default=None, help="reconstruct at this snapshot step (default: last)")
    parser.add_argument("--sweep_dir", default=None, help="folder of the EMA sweep's best.json (default: RUN/sweep)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --output_dir")
    parser.add_argument("--license", default="apache-2.0", help="license in the model card's metadata")
    parser.add_argument("--dataset", default=None, help="Hub dataset id for the card (default: from the run config)")
    parser.add_argument("--model_name", default=None, help="title of the model card")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="sampler steps (default: run config)")
    parser.add_argument(
        "--sampler",
        choices=SAMPLER_CHOICES,
        default=DEFAULT_SAMPLER,
        help="the pipeline's default sampler: the EMA sweep's cheapest setting within its margin of the best, its "
        "best setting, or the run's Heun sampler (the sweep's only where it ran at this step on an exported std)",
    )
    parser.add_argument("--no_sample_grid", action="store_true", help="skip rendering the sample grid")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the export to the Hugging Face Hub")
    parser.add_argument("--hub_model_id", default=None, help="repository to push to, USER/NAME")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    parser.add_argument(
        "--hub_private_repo", "--private", action="store_true", help="create the repository private (alias --private)"
    )
    parser.add_argument("--commit_message", default=None, help="message of the Hub commit")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = export_run(
        args.run_dir,
        args.output_dir,
        args.stds,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        private=args.hub_private_repo,
        token=args.hub_token,
        commit_message=args.commit_message,
        step=args.step,
        sweep_dir=args.sweep_dir,
        overwrite=args.overwrite,
        license=args.license,
        sample_grid=not args.no_sample_grid,
        num_inference_steps=args.num_inference_steps,
        sampler=args.sampler,
        model_name=args.model_name,
        dataset=args.dataset,
    )
    for std, variant in result.variants:
        print(f"EMA std {std:.3f}: variant {variant}")
    sampling, choice = result.info["sampling"], result.info["sampler_choice"]
    why = f"the EMA sweep's {choice['sampler']} setting" if choice["sampler"] != "heun" else choice["reason"]
    print(f"default sampler: {sampling['scheduler']}, {sampling['num_inference_steps']} steps ({why})")
    if result.commit is not None:
        print(f"pushed to {getattr(result.commit, 'commit_url', args.hub_model_id)}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, FolderLockedError, DiskFullError) as err:
        sys.exit(f"error: {err}")
