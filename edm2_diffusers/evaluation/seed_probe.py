"""edm2-multi-gpu's linear-probe protocol, for the runs of its seed configs (``configs/cifar10``, ``cifar100``,
``tinyimagenet``).

The procedure of its ``linear.py`` with the ``linear`` section of its configs, restated:

* the network is the run's EMA model, in eval mode, frozen;
* the noise level is σ = t̃[k] of its 18-step EDM schedule read from the end, t̃ = reversed(σ_0 … σ_17, 0) with
  σ_i = (σ_max^(1/ρ) + i/17 · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ (Karras et al. 2022, Eq. 5), i.e. σ = σ_(18 − k):
  k = 4 on CIFAR (σ ≈ 0.0599), k = 5 on Tiny-ImageNet (σ ≈ 0.1395);
* the features are the raw global average of the 6th decoder block's output (``out_6``: decoder blocks counted from
  the bottom, resampling blocks included, the bottleneck's not): ``8x8_block1`` of the 32×32 CIFAR networks and
  ``16x16_up`` of the 64×64 Tiny-ImageNet ones in :class:`~edm2_diffusers.EDM2UNet2DModel`'s names;
* a linear layer (PyTorch's default initialisation) is trained on the training split with fresh noise x = y + σ·n for
  every batch and random horizontal flips, by Adam at lr 1e-3 × processes, batch 128 per process, 15 epochs, the
  learning rate following a cosine over the epochs (``CosineAnnealingLR(T_max=15)`` stepped once per epoch);
* accuracy is measured on CIFAR's test split and Tiny-ImageNet's validation split (one noise draw, no flip).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from ..edm import karras_sigmas
from .linear_probe import decoder_block_names, pooled_block_output


@dataclass(frozen=True)
class SeedProbeProtocol:
    """The settings of edm2-multi-gpu's linear probe (its configs' ``linear`` section and ``linear.py``).

    Args:
        timestep (`int`): index k into the reversed schedule (``linear.timestep``).
        block_number (`int`): which decoder block, counted from 1 (``linear.blockname: out_6``).
        num_steps (`int`): steps of the schedule σ is read from (``get_feature(steps=18)``).
        num_epochs (`int`), batch_size (`int`), learning_rate (`float`): ``linear.n_epoch``, ``batch_size`` (per
            process) and ``lrate`` (multiplied by the number of processes).
        test_split (`str`): the split accuracy is measured on.
        label_column (`str`): the column holding the classes, when the run's config names none.
        random_flip (`bool`): horizontal flips on the training split (``get_dataset(train=True, flip=True)``).
    """

    timestep: int = 4
    block_number: int = 6
    num_steps: int = 18
    num_epochs: int = 15
    batch_size: int = 128
    learning_rate: float = 1e-3
    test_split: str = "test"
    label_column: str = "label"
    random_flip: bool = True


# The seed's three datasets under their Hub names (the seed configs' data.dataset_name).
SEED_PROBES = {
    "uoft-cs/cifar10": SeedProbeProtocol(timestep=4),
    "uoft-cs/cifar100": SeedProbeProtocol(timestep=4, label_column="fine_label"),
    "zh-plus/tiny-imagenet": SeedProbeProtocol(timestep=5, test_split="valid"),
}
SEED_PROBES.update({name.split("/")[1]: proto for name, proto in list(SEED_PROBES.items())})


def seed_probe_protocol(dataset_name: str | None) -> SeedProbeProtocol | None:
    """The protocol of a seed dataset (Hub name, or its name without the owner); ``None`` for other datasets."""
    return SEED_PROBES.get(str(dataset_name)) if dataset_name else None


def seed_probe_sigma(
    timestep: int, num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> float:
    """σ at index ``timestep`` of the reversed ``num_steps``-step EDM schedule with σ = 0 appended (σ_(N − k))."""
    if not 1 <= timestep <= num_steps:
        raise ValueError(f"the probe's timestep must lie in [1, {num_steps}], got {timestep}")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).double()
    return float(sigmas[num_steps - timestep])


def seed_probe_block(unet, block_number: int = 6) -> str:
    """The name of the ``block_number``-th decoder block (from 1), not counting the bottleneck's ``_in`` blocks."""
    names = [n for n in decoder_block_names(unet) if "_in" not in n]
    if not 1 <= block_number <= len(names):
        raise ValueError(
            f"decoder block {block_number} does not exist: this model has {len(names)} decoder blocks after its "
            f"bottleneck ({', '.join(names)}); pass --block"
        )
    return names[block_number - 1]


@dataclass
class SeedProbeOutput(BaseOutput):
    """Result of :func:`seed_linear_probe`: test accuracy, the per-epoch learning rates and what was probed."""

    accuracy: float
    block: str
    sigma: float
    num_features: int
    learning_rates: list


def _shard(order: torch.Tensor, rank: int, world: int, pad: bool) -> torch.Tensor:
    """This process's indices, like ``DistributedSampler``: padded by wrapping (training), or an exact cover."""
    if pad and len(order) % world:
        order = torch.cat([order, order[: world - len(order) % world]])
    return order[rank::world]


def _features(unet, images, block, sigma, generator, sigma_data, device, flip: bool) -> torch.Tensor:
    y = images.float()
    if flip:  # torchvision's RandomHorizontalFlip: each image mirrored with probability 1/2
        mirror = torch.rand(len(y), generator=generator) < 0.5
        y = torch.where(mirror.view(-1, 1, 1, 1), y.flip(-1), y)
    x = y + sigma * torch.randn(y.shape, generator=generator)
    return pooled_block_output(unet, x.to(device), sigma, block, sigma_data).to(device)


def seed_linear_probe(
    unet,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    protocol: SeedProbeProtocol,
    sigma: float,
    block: str | None = None,
    num_classes: int | None = None,
    seed: int = 0,
    sigma_data: float = 0.5,
    accelerator=None,
) -> SeedProbeOutput:
    """Train and score a linear probe by edm2-multi-gpu's protocol (see the module docstring).

    Args:
        unet (`EDM2UNet2DModel`): the frozen EMA network.
        train_images, test_images (`torch.Tensor`): clean images (N, C, H, W) in [-1, 1].
        train_labels, test_labels (`torch.Tensor`): int64 classes (N,).
        protocol (`SeedProbeProtocol`): epochs, batch, learning rate, flips, block number.
        sigma (`float`): the noise level (:func:`seed_probe_sigma` of the run's schedule).
        block (`str`, *optional*): decoder block; default :func:`seed_probe_block` of ``protocol.block_number``.
        num_classes (`int`, *optional*): defaults to ``max(label) + 1``.
        seed (`int`): seed of the order, flips, noise and the classifier's initialisation (offset per process).
        sigma_data (`float`): σ_data of the preconditioning.
        accelerator (`accelerate.Accelerator`, *optional*): each process takes its share of every epoch; gradients
            are averaged and the learning rate is multiplied by the number of processes.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    device = next(unet.parameters()).device
    block = block or seed_probe_block(unet, protocol.block_number)
    train_labels, test_labels = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    if len(train_images) != len(train_labels) or len(test_images) != len(test_labels) or not len(train_images):
        raise ValueError("the probe needs a non-empty training split and one label per image in each split")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    gen = torch.Generator().manual_seed(seed + rank)
    width = pooled_block_output(unet, train_images[:1].float().to(device), sigma, block, sigma_data).shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same initial layer on every process, as DDP broadcasts it
        linear = torch.nn.Linear(width, num_classes).to(device)
    opt = torch.optim.Adam(linear.parameters(), lr=protocol.learning_rate * world)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, protocol.num_epochs)
    rates = []
    for epoch in range(protocol.num_epochs):
        rates.append(opt.param_groups[0]["lr"])
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed + epoch))
        mine = _shard(order, rank, world, pad=True)
        for start in range(0, len(mine), protocol.batch_size):
            idx = mine[start : start + protocol.batch_size]
            feats = _features(unet, train_images[idx], block, sigma, gen, sigma_data, device, protocol.random_flip)
            loss = F.cross_entropy(linear(feats), train_labels[idx].to(device))
            opt.zero_grad()
            loss.backward()
            if world > 1:
                for p in linear.parameters():
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            opt.step()
        sched.step()  # once per epoch
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        mine = _shard(torch.arange(len(test_images)), rank, world, pad=False)
        for start in range(0, len(mine), protocol.batch_size):
            idx = mine[start : start + protocol.batch_size]
            feats = _features(unet, test_images[idx], block, sigma, gen, sigma_data, device, flip=False)
            hits = (linear(feats).argmax(1).cpu() == test_labels[idx]).sum()
            correct += torch.tensor([float(hits), float(len(idx))], dtype=torch.float64, device=device)
    if world > 1:
        correct = accelerator.reduce(correct, reduction="sum")
    return SeedProbeOutput(
        accuracy=float(correct[0] / correct[1]), block=block, sigma=float(sigma), num_features=int(width),
        learning_rates=rates,
    )  # fmt: skip


def protocol_with(protocol: SeedProbeProtocol, **overrides) -> SeedProbeProtocol:
    """``protocol`` with the given fields replaced (``None`` values are ignored)."""
    return replace(protocol, **{k: v for k, v in overrides.items() if v is not None})


__all__ = [
    "SEED_PROBES",
    "SeedProbeOutput",
    "SeedProbeProtocol",
    "protocol_with",
    "seed_linear_probe",
    "seed_probe_block",
    "seed_probe_protocol",
    "seed_probe_sigma",
]
