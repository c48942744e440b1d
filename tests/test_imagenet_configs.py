"""The ImageNet-64 and ImageNet-512 configs: they load with the training config schema, build the paper's networks
(on the meta device, so no memory is spent) and carry the paper's hyper-parameters (EDM2 paper, Table 6)."""

from pathlib import Path

import pytest
import torch

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.ema import build_ema
from edm2_diffusers.training import load_config, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The paper's numbers, written out independently of the YAML files: (channels, parameters in millions,
# alpha_ref, dropout, training duration in Mi images). XXS (ImageNet-512) and XS (ImageNet-64) are the official
# release's train_edm2.py presets edm2-img512-xxs and edm2-img64-xs; their sizes are those of Table 6's widths
# (XXS, half of XS's width, is not in Table 6: 31M is the count of the network its 64 channels build).
PAPER = {
    "imagenet512/xxs": (64, 31, 0.0170, 0.00, 2048),
    "imagenet64/xs": (128, 125, 0.0120, 0.00, 1024),
    "imagenet512/xs": (128, 125, 0.0120, 0.00, 2048),
    "imagenet512/s": (192, 280, 0.0100, 0.00, 2048),
    "imagenet512/m": (256, 498, 0.0090, 0.10, 2048),
    "imagenet512/l": (320, 777, 0.0080, 0.10, 1792),
    "imagenet512/xl": (384, 1119, 0.0070, 0.10, 1280),
    "imagenet512/xxl": (448, 1523, 0.0065, 0.10, 896),
    "imagenet64/s": (192, 280, 0.0100, 0.00, 1024),
    "imagenet64/m": (256, 498, 0.0090, 0.10, 2048),
    "imagenet64/l": (320, 777, 0.0080, 0.10, 1024),
    "imagenet64/xl": (384, 1119, 0.0070, 0.10, 640),
}


def test_every_imagenet_config_is_listed():
    found = {f"{p.parent.name}/{p.stem}" for d in ("imagenet64", "imagenet512") for p in (CONFIGS / d).glob("*.yaml")}
    assert found == set(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_loads_and_builds_the_papers_network(name, tmp_path):
    channels, mparams, lr, dropout, duration_mi = PAPER[name]
    latent = name.startswith("imagenet512")
    cfg = validate_config(load_config(CONFIGS / f"{name}.yaml", {"training.output_dir": str(tmp_path)}))

    model = cfg["model"]
    assert model["model_channels"] == channels and model["dropout"] == dropout
    assert model["num_class_embeds"] == 1000 and model["label_balance"] == 0.5 and model["architecture"] == "G"
    assert model["sample_size"] == 64 and model["in_channels"] == model["out_channels"] == (4 if latent else 3)
    with torch.device("meta"):
        unet = EDM2UNet2DModel(**model)
    # The paper reports sizes in millions of parameters (without the u(sigma) head).
    assert round(unet.num_parameters_without_logvar() / 1e6) == mparams

    train = cfg["training"]
    assert train["total_batch_size"] == 2048 and train["learning_rate"] == lr
    assert train["max_train_steps"] * 2048 == duration_mi << 20
    assert (train["P_mean"], train["P_std"]) == ((-0.4, 1.0) if latent else (-0.8, 1.6))
    assert train["lr_decay_ref_steps"] == (70000 if latent else 35000)
    assert train["lr_warmup_images"] == 10_000_000 and train["adam_beta2"] == 0.99
    assert cfg["data"]["label_column"] == "label" and cfg["data"]["random_flip"] is False
    assert cfg["ema"]["stds"] == [0.05, 0.10] and cfg["ema"]["type"] == "power"
    # NVIDIA's training loop: per-image loss sums averaged over the batch, fp16 at loss scale 1 with non-finite
    # gradients zeroed; ImageNet-64 is prepared with dataset_tool.py --transform=center-crop-dhariwal.
    assert train["loss_reduction"] == "sum_per_image"
    assert train["mixed_precision"] == "fp16" and train["zero_nonfinite_grads"] is True
    assert cfg["sampling"]["mixed_precision"] == "fp16"
    assert cfg["data"]["crop"] == (None if latent else "dhariwal")
    tiny = EDM2UNet2DModel(sample_size=8, model_channels=16, channel_mult=(1,), num_blocks=1, channels_per_head=16)
    ema = build_ema(tiny, cfg["ema"])  # the EMA section is valid for the EMA builder
    assert ema.snapshot_every_steps * 2048 == 8 << 20  # snapshots every 8Mi images
