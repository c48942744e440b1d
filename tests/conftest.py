import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

# ------------------------------------------------------------------------------------------------ hermetic caches
# The suite writes no cache under the user's home: HOME and every cache variable point into one temporary folder for
# the session. Set at import, before the test modules import diffusers and datasets (which read HF_HOME and
# HF_MODULES_CACHE once, at import) and inherited by every subprocess; restored in pytest_unconfigure. The digits
# classifier cache (EDM2_DIFFUSERS_CACHE) is shared by the session's tests, so it trains once.
_SANDBOX = Path(tempfile.mkdtemp(prefix="edm2-tests-"))
FAKE_HOME = _SANDBOX / "home"
_ENV = pytest.MonkeyPatch()
for _name, _value in {
    "HOME": FAKE_HOME,
    "HF_HOME": _SANDBOX / "hf_home",
    "HF_MODULES_CACHE": _SANDBOX / "hf_modules",
    "HF_DATASETS_CACHE": _SANDBOX / "hf_home" / "datasets",
    "EDM2_DIFFUSERS_CACHE": _SANDBOX / "edm2_cache",
    "TORCH_HOME": _SANDBOX / "torch",
    "MPLCONFIGDIR": _SANDBOX / "matplotlib",
}.items():
    _ENV.setenv(_name, str(_value))
for _name in ("XDG_CACHE_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE"):
    _ENV.delenv(_name, raising=False)
FAKE_HOME.mkdir(parents=True)


def pytest_unconfigure(config):
    _ENV.undo()
    shutil.rmtree(_SANDBOX, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _nothing_cached_under_home():
    """Fails the session if anything the tests ran wrote a cache under (the session's) $HOME."""
    yield
    written = [str(p.relative_to(FAKE_HOME)) for p in FAKE_HOME.rglob("*") if p.is_file()]
    assert not written, f"tests wrote under $HOME: {written[:10]}"


def free_port() -> int:
    """A free TCP port for ``accelerate launch --main_process_port`` (never Accelerate's default 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_root() -> str:
    """The session's digits-classifier cache (``EDM2_DIFFUSERS_CACHE``, not under $HOME)."""
    return os.environ["EDM2_DIFFUSERS_CACHE"]


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
