#!/usr/bin/env python
"""Convert NVIDIA's published EDM2 network pickles into an `EDM2Pipeline` export, without running code from them.

Examples:
    # ImageNet-64, one network
    python examples/convert_official.py edm2-img64-s-1073741-0.045.pkl out/edm2-img64-s

    # Two EMA lengths of one network: one pipeline, the second as weight variant ema0100
    python examples/convert_official.py edm2-img64-s-1073741-0.045.pkl edm2-img64-s-1073741-0.100.pkl out/edm2-img64-s

    # ImageNet-512 with guidance by a smaller unconditional network, and a local copy of the SD VAE
    python examples/convert_official.py edm2-img512-xxl-0939524-0.015.pkl out/edm2-img512-xxl-guid \\
        --guidance edm2-img512-xs-uncond-2147483-0.015.pkl --guidance_scale 1.2 --vae ./sd-vae-ft-mse

The pickles are read by a restricted unpickler that rebuilds only tensors and plain data: the Python source they
embed is never executed, and any other reference in the file is refused. The output goes through the same exporter as
a training run (`edm2_diffusers.hub.export_converted`): one pipeline with safetensors weights and bundled code, so
`DiffusionPipeline.from_pretrained(out, trust_remote_code=True)` loads it; several pickles of one network become
weight variants named by their EMA std; the model card names the source pickles, the guidance pair and NVIDIA's
license for the weights (CC BY-NC-SA 4.0); `export_info.json` keeps the official constructor arguments.

A refused input (a pickle that would run code or exhaust memory, a missing or unreadable file, a file in another
format, a non-empty output folder) ends the script with one line naming the problem and the file, and exit status 1;
nothing is written then.
"""

from __future__ import annotations

import argparse
import sys

import torch

from edm2_diffusers.hub.converted import OFFICIAL_LICENSE, export_converted
from edm2_diffusers.run_lock import FolderLockedError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "pickles",
        nargs="+",
        help="official EDM2 network pickle(s) of one network (their 'ema' entries); several become EMA variants",
    )
    parser.add_argument("out_dir", help="folder to write the pipeline export to")
    parser.add_argument("--guidance", default=None, help="network pickle of the guiding network (guidance_unet)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="guidance weight w for that pair")
    parser.add_argument(
        "--vae", default=None, help="local folder or Hub repo of the SD VAE for latent (img512) networks"
    )
    parser.add_argument("--vae_subfolder", default=None, help="subfolder of --vae holding the autoencoder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved networks")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export at out_dir")
    parser.add_argument(
        "--stds", default=None, help="comma-separated EMA std of each pickle (default: from the names)"
    )
    parser.add_argument(
        "--license", default=OFFICIAL_LICENSE, help="license in the card (NVIDIA's weights: CC BY-NC-SA)"
    )
    parser.add_argument("--base_model", default=None, help="Hub model id the card names as base_model")
    parser.add_argument("--dataset", default=None, help="Hub dataset id for the card's datasets metadata")
    parser.add_argument("--sample_grid", action="store_true", help="render a sample grid into the card")
    args = parser.parse_args(argv)
    if (args.guidance is None) != (args.guidance_scale is None):
        parser.error("--guidance and --guidance_scale go together")
    return args


def main(argv=None):
    args = parse_args(argv)
    result = export_converted(
        args.pickles,
        args.out_dir,
        guidance_pickle=args.guidance,
        guidance_scale=args.guidance_scale,
        vae=args.vae,
        vae_subfolder=args.vae_subfolder,
        torch_dtype=DTYPES[args.dtype],
        stds=[float(s) for s in args.stds.split(",")] if args.stds else None,
        base_model=args.base_model,
        overwrite=args.overwrite,
        license=args.license,
        dataset=args.dataset,
        sample_grid=args.sample_grid,
    )
    info = result.info
    config = info["model"]["config"]
    variants = ", ".join(v["variant"] for v in info["variants"] if v["variant"])
    print(
        f"wrote {result.output_dir}: {config['sample_size']}x{config['sample_size']}x{config['in_channels']} "
        f"{'class-conditional' if config.get('num_class_embeds') else 'unconditional'} EDM2 network, "
        f"{info['model']['num_parameters_without_logvar'] / 1e6:.1f}M parameters"
        + (f", variants {variants}" if variants else "")
        + (f", guided by {info['guidance']['source']}" if args.guidance else "")
    )
    latent = info.get("latent")
    if latent is not None and not latent["vae_included"]:
        print(f"latent network: attach the VAE {latent['vae']!r} when loading (see {result.output_dir}/README.md)")
    return result.output_dir


def cli(argv=None) -> int:
    """:func:`main` for the command line: a refusal is one line on stderr and exit status 1, not a traceback."""
    try:
        main(argv)
    except (ValueError, OSError, MemoryError, FolderLockedError) as err:  # UnsafePickleError is a ValueError
        message = " ".join(str(err).splitlines()) or type(err).__name__
        print(f"convert_official.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
