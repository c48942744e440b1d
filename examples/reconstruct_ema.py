#!/usr/bin/env python
"""Post-hoc EMA: rebuild U-Nets with any EMA length from the snapshots of a training run.

Example:
    python examples/reconstruct_ema.py --run_dir runs/digits --stds 0.05,0.10,0.15 --output_dir runs/digits/posthoc

Each std becomes a folder `OUT/ema-<std>/` (config.json + diffusion_pytorch_model.safetensors) that
`EDM2UNet2DModel.from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from edm2_diffusers.ema import profile_folders, reconstruct
from edm2_diffusers.run_lock import FolderLockedError, lock_for_writing


def parse_stds(text: str) -> list[float]:
    try:
        stds = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--stds must be comma-separated floats, got {text!r}") from e
    if not stds:
        raise argparse.ArgumentTypeError("--stds needs at least one value")
    return stds


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, help="training output folder holding phema/ snapshots")
    parser.add_argument("--stds", required=True, type=parse_stds, help="relative EMA stds, e.g. 0.05,0.10,0.15")
    parser.add_argument("--step", type=int, default=None, help="snapshot step to reconstruct at (default: last)")
    parser.add_argument("--output_dir", required=True, help="where to write one model folder per std")
    parser.add_argument("--overwrite", action="store_true", help="replace existing non-empty output folders")
    return parser.parse_args(argv)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    # Names that collide (0.0801 and 0.0804 both make ema-0.080) are refused before anything is read or written.
    targets = {std: os.path.join(args.output_dir, name) for std, name in profile_folders(args.stds).items()}
    if not os.path.isdir(args.run_dir):
        raise FileNotFoundError(f"run directory {args.run_dir} does not exist")
    with lock_for_writing(args.output_dir, args.run_dir, output_inside=True, purpose="EMA reconstruction"):
        return _write(args, targets)


def _write(args, targets: dict) -> list[str]:
    if not args.overwrite:
        for path in targets.values():
            if os.path.isdir(path) and os.listdir(path) or os.path.isfile(path):
                raise FileExistsError(f"{path} exists and is not empty; pass --overwrite to replace it")
    result = reconstruct(args.run_dir, list(targets), step=args.step)
    print(f"reconstructed {len(result)} EMA profile(s) at step {result.step} from {len(result.snapshots)} snapshots")
    written = []
    for i, (std, _) in enumerate(result):
        path = targets[std]
        tmp = os.path.join(args.output_dir, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        result.model(i).save_pretrained(tmp)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        os.replace(tmp, path)
        written.append(path)
        print(f"  std {std:.3f} -> {path}")
    return written


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, FolderLockedError) as e:
        sys.exit(f"error: {e}")
