import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

GOLDEN = Path(__file__).parent / "data" / "golden"


def load_golden(name: str):
    """(metadata, tensors) of a golden reference file."""
    with safe_open(str(GOLDEN / name), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def golden_state(tensors: dict) -> dict:
    return {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}


def golden_config(meta: dict) -> dict:
    return json.loads(meta["config"])


def tiny_unet_config(**overrides):
    """A Config G U-Net of about 50k parameters on 8×8 single-channel images, for fast tests."""
    cfg = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        architecture="G",
        model_channels=16,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[4],
        channels_per_head=16,
        logvar_channels=16,
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny_vae():
    """A randomly initialised two-level AutoencoderKL (4 latent channels, 2× downsampling) for latent tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
