#!/usr/bin/env python
"""Convert NVIDIA's published EDM2 network pickles into an `EDM2Pipeline` folder, without running code from them.

Examples:
    # ImageNet-64, one network
    python examples/convert_official.py edm2-img64-s-1073741-0.045.pkl out/edm2-img64-s

    # ImageNet-512 with guidance by a smaller unconditional network, and a local copy of the SD VAE
    python examples/convert_official.py edm2-img512-xxl-0939524-0.015.pkl out/edm2-img512-xxl-guid \\
        --guidance edm2-img512-xs-uncond-2147483-0.015.pkl --guidance_scale 1.2 --vae ./sd-vae-ft-mse

The pickles are read by a restricted unpickler that rebuilds only tensors and plain data: the Python source they
embed is never executed, and any other reference in the file is refused. The output folder holds the pipeline
(`save_pretrained` with safetensors), `conversion.json` (sources, official constructor arguments, guidance scale,
latent settings) and a README with the loading code.

A refused input (a pickle that would run code or exhaust memory, a missing or unreadable file, a file in another
format, a non-empty output folder) ends the script with one line naming the problem and the file, and exit status 1;
nothing is written then.
"""

from __future__ import annotations

import argparse
import sys

import torch

from edm2_diffusers.convert import convert_official_pipeline, save_converted_pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pickle", help="official EDM2 network pickle (its 'ema' entry is converted)")
    parser.add_argument("out_dir", help="folder to write the pipeline to")
    parser.add_argument("--guidance", default=None, help="network pickle of the guiding network (guidance_unet)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="guidance weight w for that pair")
    parser.add_argument(
        "--vae", default=None, help="local folder or Hub repo of the SD VAE for latent (img512) networks"
    )
    parser.add_argument("--vae_subfolder", default=None, help="subfolder of --vae holding the autoencoder")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved networks")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pipeline folder at out_dir")
    args = parser.parse_args(argv)
    if (args.guidance is None) != (args.guidance_scale is None):
        parser.error("--guidance and --guidance_scale go together")
    return args


def main(argv=None):
    args = parse_args(argv)
    converted = convert_official_pipeline(
        args.pickle,
        guidance_pickle=args.guidance,
        guidance_scale=args.guidance_scale,
        vae=args.vae,
        vae_subfolder=args.vae_subfolder,
        torch_dtype=DTYPES[args.dtype],
    )
    out = save_converted_pipeline(converted, args.out_dir, overwrite=args.overwrite)
    unet = converted.pipeline.unet
    print(
        f"wrote {out}: {unet.config.sample_size}x{unet.config.sample_size}x{unet.config.in_channels} "
        f"{'class-conditional' if unet.config.num_class_embeds else 'unconditional'} EDM2 network, "
        f"{unet.num_parameters_without_logvar() / 1e6:.1f}M parameters"
        + (f", guided by {converted.info['guidance_source']}" if args.guidance else "")
    )
    latent = converted.info["latent"]
    if latent is not None and converted.info["vae"] is None:
        print(f"latent network: attach the VAE {latent['vae_name']!r} when loading (see {out}/README.md)")
    return out


def cli(argv=None) -> int:
    """:func:`main` for the command line: a refusal is one line on stderr and exit status 1, not a traceback."""
    try:
        main(argv)
    except (ValueError, OSError, MemoryError) as err:  # UnsafePickleError is a ValueError
        message = " ".join(str(err).splitlines()) or type(err).__name__
        print(f"convert_official.py: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
