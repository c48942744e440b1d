"""Linear probe: how linearly separable are a frozen denoiser's internal features?

Clean images y are noised to x = y + σ·n at one fixed σ, passed through the denoiser D(x; σ) (frozen, eval mode),
and the output of one named decoder block (``unet.dec[name]``) is averaged over space. A linear classifier is trained
on these features of the train split and scored on the test split. Following edm2-multi-gpu's probe, a small σ is the
default; the networks' class input is left empty (the unconditional label), so class-conditional models cannot read
the answer from their label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput

from ..data import EDM2ImageDataset, load_train_dataset
from ..edm import denoise
from .digits import load_digits_split

DEFAULT_SIGMA = 0.06  # near the low end of an 18-step EDM schedule, where features are cleanest


@dataclass
class LinearProbeOutput(BaseOutput):
    """Result of :func:`linear_probe`.

    Args:
        accuracy (`float`): test-split accuracy of the linear classifier.
        train_accuracy (`float`): its accuracy on the train split.
        block (`str`): the decoder block probed.
        sigma (`float`): the noise level.
        num_features (`int`): feature width (channels of the block).
    """

    accuracy: float
    train_accuracy: float
    block: str
    sigma: float
    num_features: int


def decoder_block_names(unet) -> list[str]:
    """Names of the decoder blocks of an ``EDM2UNet2DModel`` (e.g. ``"8x8_up"``, ``"8x8_block1"``)."""
    return list(unet.dec.keys())


def default_probe_block(unet) -> str:
    """The first upsampling block of the decoder (mid-depth, one level above the bottleneck), else the last block."""
    names = decoder_block_names(unet)
    ups = [n for n in names if n.endswith("_up")]
    return ups[0] if ups else names[-1]


class _StopForward(Exception):
    """Raised by the hook once the probed block has run: the rest of the network is not needed."""


@torch.no_grad()
def pooled_block_output(unet, x: torch.Tensor, sigma: float, block: str, sigma_data: float = 0.5) -> torch.Tensor:
    """The spatial mean of ``unet.dec[block]``'s output inside D(x; σ), as float32 (N, channels) on x's device.

    The network runs in eval mode and stops once the block has run (a forward hook).
    """
    names = decoder_block_names(unet)
    if block not in names:
        raise ValueError(f"unknown decoder block {block!r}; this model's decoder blocks are {', '.join(names)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output.float().mean(dim=(2, 3)))
        raise _StopForward

    handle = unet.dec[block].register_forward_hook(hook)
    was_training = unet.training
    unet.eval()
    try:
        denoise(unet, x.to(next(unet.parameters()).device), sigma, sigma_data=sigma_data)
    except _StopForward:
        pass
    finally:
        handle.remove()
        unet.train(was_training)
    return captured[0].to(x.device)


def block_features(
    unet,
    images: torch.Tensor,
    block: str | None = None,
    sigma: float = DEFAULT_SIGMA,
    batch_size: int = 256,
    seed: int = 0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """Globally average-pooled output of ``unet.dec[block]`` for noised images.

    Args:
        unet (`EDM2UNet2DModel`): the (frozen) network; temporarily put in eval mode.
        images (`torch.Tensor`): clean images (N, C, H, W) in the model's data space ([-1, 1] for pixel models).
        block (`str`, *optional*): decoder block name; defaults to :func:`default_probe_block`.
        sigma (`float`): noise level σ of x = y + σ·n.
        batch_size (`int`): images per forward pass.
        seed (`int`): seed of the noise n (fixed, so features are reproducible).
        sigma_data (`float`): σ_data of the preconditioning.

    Returns:
        `torch.Tensor`: float32 features (N, channels) on the CPU.
    """
    block = block or default_probe_block(unet)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(images), batch_size):
        y = images[start : start + batch_size].float()
        x = y + sigma * torch.randn(y.shape, generator=gen)
        out.append(pooled_block_output(unet, x, sigma, block, sigma_data).cpu())
    return torch.cat(out)


@torch.enable_grad()
def train_linear_classifier(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    num_epochs: int = 15,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
) -> torch.nn.Module:
    """A linear classifier on standardised features (Adam, cosine learning-rate decay over ``num_epochs``).

    Standardisation uses the train split's mean and std and is folded into the returned ``nn.Sequential``, which
    stays linear (an affine map).
    """
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be at least 1, got {num_epochs}")
    mean = train_features.mean(0)
    std = train_features.std(0).clamp(min=1e-6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(train_features.shape[1], num_classes)
    opt = torch.optim.Adam(linear.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(train_features) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    z = (train_features - mean) / std
    for _ in range(num_epochs):
        order = torch.randperm(len(z), generator=gen)
        for start in range(0, len(z), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(linear(z[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    class Standardize(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("std", std)

        def forward(self, x):
            return (x - self.mean) / self.std

    return torch.nn.Sequential(Standardize(), linear).eval().requires_grad_(False)


def linear_probe(
    unet,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    block: str | None = None,
    sigma: float = DEFAULT_SIGMA,
    num_epochs: int = 15,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    num_classes: int | None = None,
) -> LinearProbeOutput:
    """Train a linear classifier on frozen denoiser features of the train split; report test accuracy.

    Args:
        unet (`EDM2UNet2DModel`): the frozen network (typically an EMA reconstruction).
        train_images, test_images (`torch.Tensor`): clean images (N, C, H, W) in the model's data space ([-1, 1]).
        train_labels, test_labels (`torch.Tensor`): int64 class ids (N,).
        block (`str`, *optional*): decoder block to probe; see :func:`default_probe_block`.
        sigma (`float`): noise level of the probe.
        num_epochs (`int`): epochs of classifier training.
        batch_size (`int`): classifier batch size.
        lr (`float`): Adam learning rate.
        seed (`int`): seed of the noise and of the classifier.
        num_classes (`int`, *optional*): defaults to ``max(label) + 1``.
    """
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    if len(train_images) != len(train_labels) or len(test_images) != len(test_labels):
        raise ValueError("each split needs exactly one label per image")
    if len(train_images) == 0 or len(test_images) == 0:
        raise ValueError("the linear probe needs non-empty train and test splits")
    block = block or default_probe_block(unet)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train_f = block_features(unet, train_images, block, sigma, seed=seed)
    test_f = block_features(unet, test_images, block, sigma, seed=seed + 1)
    clf = train_linear_classifier(train_f, train_labels, num_classes, num_epochs, batch_size, lr, seed)
    with torch.no_grad():
        acc = (clf(test_f).argmax(1) == test_labels).float().mean().item()
        train_acc = (clf(train_f).argmax(1) == train_labels).float().mean().item()
    return LinearProbeOutput(
        accuracy=acc, train_accuracy=train_acc, block=block, sigma=float(sigma), num_features=int(train_f.shape[1])
    )


def probe_dataset(
    dataset_name: str = "digits",
    split: str = "train",
    label_column: str = "label",
    image_column: str = "image",
    dataset_config_name: str | None = None,
    resolution: int | None = None,
    channels: int = 3,
    max_images: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled images (N, C, H, W) in [-1, 1] and labels (N,) of a dataset split.

    ``dataset_name="digits"`` gives the fixed 75/25 train/test split of scikit-learn's digits (offline); any other
    name is loaded from the Hub through the training data code.
    """
    if dataset_name in ("digits", "sklearn_digits"):
        images, labels = load_digits_split(split)
        images = images * 2 - 1
    else:
        ds = load_train_dataset(
            {
                "source": "hub",
                "dataset_name": dataset_name,
                "dataset_config_name": dataset_config_name,
                "dataset_split": split,
            }
        )
        for col in (image_column, label_column):
            if col not in ds.column_names:
                raise ValueError(f"the {split!r} split has no column {col!r}; its columns are {ds.column_names}")
        data = EDM2ImageDataset(ds, image_column, label_column, resolution=resolution, channels=channels)
        items = data.__getitems__(list(range(len(data))))
        images = torch.stack([it["pixel_values"] for it in items])
        labels = torch.tensor([it["class_labels"] for it in items])
    if max_images is not None:
        images, labels = images[:max_images], labels[:max_images]
    return images, labels


__all__ = [
    "DEFAULT_SIGMA",
    "LinearProbeOutput",
    "block_features",
    "decoder_block_names",
    "default_probe_block",
    "linear_probe",
    "pooled_block_output",
    "probe_dataset",
    "train_linear_classifier",
]
