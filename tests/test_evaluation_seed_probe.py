"""edm2-multi-gpu's linear-probe protocol against its formulas written out: the block and σ per seed dataset config,
the learning rate per epoch, and a probe on the digits (no downloads)."""

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_unet_config

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.evaluation import load_digits_split
from edm2_diffusers.evaluation.linear_probe import block_features
from edm2_diffusers.evaluation.seed_probe import (
    SeedProbeProtocol,
    protocol_with,
    seed_linear_probe,
    seed_probe_block,
    seed_probe_protocol,
    seed_probe_sigma,
)
from edm2_diffusers.runs import sampling_settings

ROOT = Path(__file__).resolve().parents[1]
SEED_CONFIGS = [f"{d}/{a}.yaml" for d in ("cifar10", "cifar100", "tinyimagenet") for a in ("C", "E", "G")]


def reference_sigma(timestep, steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """edm2-multi-gpu's EDM.perturb(x, t, steps): reversed(sample_schedule(steps))[t], the schedule ending in 0."""
    i = torch.arange(steps, dtype=torch.float64)
    times = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    times = torch.cat([times, torch.zeros(1, dtype=torch.float64)])
    return float(times.flip(0)[timestep])


def reference_block(model_cfg, number=6):
    """edm2-multi-gpu's `out_<number>`: its UNet's `up` list in order (per level from the bottom: num_blocks + 1
    blocks, then an upsampling block below the top level), named as EDM2UNet2DModel names those blocks."""
    res = [model_cfg["sample_size"] >> i for i in range(len(model_cfg["channel_mult"]))]
    names = []
    for level in reversed(range(len(res))):
        names += [f"{res[level]}x{res[level]}_block{j}" for j in range(model_cfg["num_blocks"] + 1)]
        if level > 0:
            names.append(f"{res[level - 1]}x{res[level - 1]}_up")
    return names[number - 1]


@pytest.mark.parametrize("config", SEED_CONFIGS)
def test_block_and_sigma_per_seed_config(config):
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    protocol = seed_probe_protocol(cfg["data"]["dataset_name"])
    assert protocol is not None, "every seed config's dataset has the seed's probe settings"
    with torch.device("meta"):
        unet = EDM2UNet2DModel(**cfg["model"])
    block = seed_probe_block(unet, protocol.block_number)
    assert block == reference_block(cfg["model"], 6)
    assert block == ("16x16_up" if config.startswith("tinyimagenet") else "8x8_block1")

    s = sampling_settings(cfg)
    sigma = seed_probe_sigma(protocol.timestep, protocol.num_steps, s["sigma_min"], s["sigma_max"], s["rho"])
    tiny = config.startswith("tinyimagenet")
    assert protocol.timestep == (5 if tiny else 4)
    assert sigma == pytest.approx(reference_sigma(protocol.timestep), rel=1e-12)
    assert sigma == pytest.approx(0.1395 if tiny else 0.0599, abs=1e-4)
    assert protocol.test_split == ("valid" if tiny else "test")
    assert (protocol.num_epochs, protocol.batch_size, protocol.learning_rate) == (15, 128, 1e-3)


def test_protocol_errors_and_overrides():
    with pytest.raises(ValueError, match=r"\[1, 18\]"):
        seed_probe_sigma(0)
    unet = EDM2UNet2DModel(**tiny_unet_config())
    with pytest.raises(ValueError, match="pass --block"):
        seed_probe_block(unet, 6)  # a 2-level model has 5 decoder blocks after its bottleneck
    assert seed_probe_block(unet, 3) == "8x8_up"
    assert seed_probe_protocol("uoft-cs/cifar100").label_column == "fine_label"
    assert seed_probe_protocol("digits") is None
    assert protocol_with(SeedProbeProtocol(), num_epochs=3, batch_size=None).num_epochs == 3


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    unet = EDM2UNet2DModel(**tiny_unet_config()).requires_grad_(False)
    (train_x, train_y), (test_x, test_y) = load_digits_split("train"), load_digits_split("test")
    return unet, (train_x * 2 - 1, train_y), (test_x * 2 - 1, test_y)


def test_seed_probe_lr_per_epoch(digits):
    """The learning rate follows CosineAnnealingLR(T_max=15) stepped once per epoch: lr_e = lr/2·(1 + cos(π e/15))."""
    unet, train, test = digits
    protocol = SeedProbeProtocol(batch_size=16)
    sigma = seed_probe_sigma(protocol.timestep)
    data = (train[0][:32], train[1][:32], test[0][:16], test[1][:16])
    out = seed_linear_probe(unet, *data, protocol, sigma, "8x8_up")
    expected = [1e-3 / 2 * (1 + math.cos(math.pi * e / 15)) for e in range(15)]
    assert out.learning_rates == pytest.approx(expected, rel=1e-9)
    assert out.learning_rates[0] == 1e-3 and out.learning_rates[-1] < 2e-5
    width = block_features(unet, test[0][:2], "8x8_up").shape[1]
    assert (out.block, out.num_features) == ("8x8_up", width) and out.sigma == pytest.approx(0.0599, abs=1e-4)
    again = seed_linear_probe(unet, *data, protocol, sigma, "8x8_up")
    assert again.accuracy == out.accuracy  # reproducible for a seed


def test_seed_probe_beats_chance_on_digits(digits):
    """Raw pooled features of a frozen network, a linear layer on them: better than chance (0.1) on the test split."""
    unet, train, test = digits
    protocol = SeedProbeProtocol(num_epochs=4, batch_size=32, learning_rate=0.02, random_flip=False)
    out = seed_linear_probe(unet, train[0][:320], train[1][:320], *test, protocol, seed_probe_sigma(4), "8x8_up")
    assert out.accuracy > 0.25


def _inputs(unet, protocol, images, labels, sigma, seed=0):
    """The U-Net inputs of each training batch (the first, one-image call only measures the feature width)."""
    seen = []
    handle = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        seed_linear_probe(unet, images, labels, images[:2], labels[:2], protocol, sigma, "8x8_up", seed=seed)
    finally:
        handle.remove()
    return [x for x in seen[1:] if len(x) == len(images)]


def test_fresh_noise_every_epoch_and_random_flips():
    torch.manual_seed(0)
    unet = EDM2UNet2DModel(**tiny_unet_config()).requires_grad_(False)
    images, labels = load_digits_split("train")
    images, labels = images[:256] * 2 - 1, labels[:256]
    whole = SeedProbeProtocol(num_epochs=2, batch_size=256, random_flip=False)
    sigma, sigma_data = 0.5, 0.5
    c_in = 1 / math.sqrt(sigma**2 + sigma_data**2)
    x0, x1 = _inputs(unet, whole, images, labels, sigma)
    # Undo the preconditioning and each epoch's shuffle (DistributedSampler's: randperm seeded by seed + epoch).
    orders = [torch.randperm(256, generator=torch.Generator().manual_seed(e)) for e in (0, 1)]
    noise = []
    for x, order in zip((x0, x1), orders):
        n = torch.empty_like(x)
        n[order] = x / c_in - images[order]
        noise.append(n / sigma)
    for n in noise:
        assert n.std().item() == pytest.approx(1.0, abs=0.05) and abs(n.mean().item()) < 0.05
    assert torch.corrcoef(torch.stack([noise[0].flatten(), noise[1].flatten()]))[0, 1].abs() < 0.05

    # Random flips: with almost no noise each input is its image or its mirror, about half of them mirrored.
    flips = protocol_with(whole, num_epochs=1, random_flip=True)
    (x,) = _inputs(unet, flips, images, labels, 1e-4)
    y = (x * math.sqrt(1e-8 + sigma_data**2))[:, None]
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    same = (y[:, 0] - images[order]).abs().flatten(1).amax(1) < 1e-3
    mirrored = (y[:, 0] - images[order].flip(-1)).abs().flatten(1).amax(1) < 1e-3
    assert bool((same | mirrored).all())
    assert 0.35 < mirrored[~same].numel() / 256 < 0.65
