"""An offline feature extractor for the 8×8 digits quickstart: a small classifier trained on scikit-learn's digits.

Nothing can be downloaded in the quickstart, so Inception is out of reach. Instead a small MLP is trained on the
digits that ship with scikit-learn the first time it is needed (a few seconds on a CPU, fixed seed) and cached. Its
penultimate activations play the role of Inception features for a Fréchet distance ("FD"), and its softmax tells
how many generated samples look like a clear digit ("confident": max class probability above a threshold).
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from ..files import atomic_path
from .fid import FeatureStats, check_unit_images, frechet_distance_from_stats

logger = logging.getLogger(__name__)

CLASSIFIER_FILE = "digits_classifier_v1.safetensors"
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


def default_cache_dir() -> str:
    """``$EDM2_DIFFUSERS_CACHE``, else ``$XDG_CACHE_HOME/edm2_diffusers``, else ``~/.cache/edm2_diffusers``."""
    env = os.environ.get("EDM2_DIFFUSERS_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "edm2_diffusers")


def load_digits_split(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as (N, 1, 8, 8) float images in [0, 1] and (N,) int64 labels.

    Args:
        split (`str`): ``"all"``, or ``"train"`` / ``"test"`` of a fixed stratified 75/25 split (seed 0), shared by the
            digits classifier and the linear probe.
    """
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    if split == "all":
        return images, labels
    if split not in ("train", "test"):
        raise ValueError(f"unknown digits split {split!r}; expected 'all', 'train' or 'test'")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=digits.target,
    )
    idx = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
    return images[idx], labels[idx]


class DigitsClassifier(nn.Module):
    """A small MLP for 8×8 grey digits; its penultimate layer gives ``num_features``-d features.

    Args:
        hidden (`int`): width of the first hidden layer.
        num_features (`int`): width of the penultimate (feature) layer.
        num_classes (`int`): number of output classes.
    """

    name = "digits"

    def __init__(self, hidden: int = 256, num_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.num_features = num_features
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, num_features)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of (N, 1, 8, 8) images in [0, 1]."""
        x = images.flatten(1) * 2 - 1
        return F.silu(self.fc2(F.silu(self.fc1(x))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(images))


@torch.enable_grad()
def train_digits_classifier(num_steps: int = 600, batch_size: int = 128, lr: float = 3e-3, seed: int = 0):
    """Train :class:`DigitsClassifier` on the train split (fixed seed, mild noise augmentation).

    Returns:
        `(DigitsClassifier, float)`: the model in eval mode and its accuracy on the test split.
    """
    images, labels = load_digits_split("train")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_steps)
    model.train()
    for _ in range(num_steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx]
        # Mild noise augmentation, so that slightly imperfect samples are still judged fairly.
        x = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test_images, test_labels = load_digits_split("test")
    with torch.no_grad():
        acc = (model(test_images).argmax(1) == test_labels).float().mean().item()
    return model, acc


@functools.lru_cache(maxsize=4)
def _cached_classifier(cache_dir: str) -> DigitsClassifier:
    path = os.path.join(cache_dir, CLASSIFIER_FILE)
    model = DigitsClassifier()
    if os.path.isfile(path):
        try:
            model.load_state_dict(load_file(path))
            model.eval()
            return model
        except Exception as err:  # a damaged cache file is rebuilt, never trusted
            logger.warning("digits classifier cache %s is unreadable (%s); retraining", path, err)
    model, acc = train_digits_classifier()
    logger.info("trained the digits classifier: test accuracy %.3f; cached at %s", acc, path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"test_accuracy": f"{acc}"})
    return model


def get_digits_classifier(cache_dir: str | None = None) -> DigitsClassifier:
    """The cached digits classifier, trained (seconds) and written to ``cache_dir`` on first use.

    Args:
        cache_dir (`str`, *optional*): where the weights live; defaults to :func:`default_cache_dir`.
    """
    return _cached_classifier(os.path.abspath(cache_dir or default_cache_dir()))


class DigitsFeatureExtractor(nn.Module):
    """Feature extractor (the convention of :mod:`.fid`) over the digits classifier's penultimate layer.

    Args:
        classifier (`DigitsClassifier`): a trained classifier (frozen here).
    """

    name = "digits"

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        images = check_unit_images(images)
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"the digits extractor takes (N, 1, 8, 8) images, got {tuple(images.shape)}")
        return images.to(next(self.classifier.parameters()).device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self._check(images))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 10)."""
        return self.classifier(self._check(images)).softmax(-1)


def digits_feature_extractor(cache_dir: str | None = None) -> DigitsFeatureExtractor:
    """The ``--feature_extractor digits`` module (trains and caches the classifier on first use)."""
    return DigitsFeatureExtractor(get_digits_classifier(cache_dir))


@functools.lru_cache(maxsize=4)
def _reference_stats(cache_dir: str) -> FeatureStats:
    extractor = digits_feature_extractor(cache_dir)
    images, _ = load_digits_split("all")
    with torch.no_grad():
        return FeatureStats.from_features(extractor(images), feature_extractor="digits")


def digits_reference_stats(cache_dir: str | None = None) -> FeatureStats:
    """Feature statistics of all 1797 real digits (the quickstart's training set) under the digits extractor."""
    return _reference_stats(os.path.abspath(cache_dir or default_cache_dir()))


def confident_share(probabilities: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of samples whose largest class probability exceeds ``threshold``."""
    return float((probabilities.max(-1).values > threshold).float().mean())


@torch.no_grad()
def digits_metrics(images, threshold: float = 0.9, cache_dir: str | None = None) -> dict:
    """Quality of generated 8×8 digits in one call: Fréchet distance and confidently-classified share.

    Args:
        images (`torch.Tensor` or `np.ndarray`): generated digits of shape (N, 1, 8, 8) in [0, 1] (N ≥ 2); a
            pipeline's ``output_type="np"`` array of shape (N, 8, 8, 1) is accepted too.
        threshold (`float`): a sample counts as confident when its top class probability exceeds this.
        cache_dir (`str`, *optional*): classifier cache (see :func:`default_cache_dir`).

    Returns:
        `dict`: ``fd`` (Fréchet distance of classifier features to all real digits; lower is better, biased upward
        for small N), ``confident`` (share in [0, 1]; real digits score about 0.97+), ``num_images``.
    """
    images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    if images.ndim == 4 and images.shape[-1] == 1 and images.shape[1] != 1:
        images = images.permute(0, 3, 1, 2)
    extractor = digits_feature_extractor(cache_dir)
    images = extractor._check(images)
    if len(images) < 2:
        raise ValueError(f"digits_metrics needs at least 2 images, got {len(images)}")
    stats = FeatureStats.from_features(extractor(images), feature_extractor="digits")
    return {
        "fd": frechet_distance_from_stats(stats, digits_reference_stats(cache_dir)),
        "confident": confident_share(extractor.probabilities(images), threshold),
        "num_images": int(len(images)),
    }


__all__ = [
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "confident_share",
    "default_cache_dir",
    "digits_feature_extractor",
    "digits_metrics",
    "digits_reference_stats",
    "get_digits_classifier",
    "load_digits_split",
    "train_digits_classifier",
]
