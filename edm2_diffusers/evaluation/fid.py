"""Fréchet distances between feature statistics, with torchmetrics' ``FrechetInceptionDistance`` as the accumulator.

Feature-extractor convention used throughout :mod:`edm2_diffusers.evaluation`: an extractor is any ``nn.Module`` that
maps **float images of shape (N, C, H, W) with values in [0, 1]** to features of shape (N, D), and that exposes the
integer attribute ``num_features = D``. Images that are only quantised at the very end (uint8 PNGs in the usual FID
protocol) are quantised inside the extractor, so generators and datasets hand over [0, 1] floats everywhere.

The Fréchet distance between two Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂) is
‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)  (Heusel et al. 2017; the metric of the EDM2 paper's Table 2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from ..files import atomic_path

REF_STATS_FORMAT = "edm2_diffusers.feature_stats.v1"


@dataclass
class FeatureStats:
    """Mean and covariance of a feature set.

    Args:
        mu (`np.ndarray` of shape `(D,)`): feature mean.
        sigma (`np.ndarray` of shape `(D, D)`): unbiased feature covariance.
        num_samples (`int`): number of feature vectors the statistics summarise.
        feature_extractor (`str`, *optional*): name of the extractor that produced the features; checked on load.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    feature_extractor: str | None = None

    @property
    def num_features(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features, feature_extractor: str | None = None) -> FeatureStats:
        """Statistics of a `(N, D)` feature array (N ≥ 2)."""
        f = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"features must have shape (N, D) with N >= 2, got {tuple(f.shape)}")
        mu = f.mean(0)
        centred = f - mu
        sigma = centred.T @ centred / (f.shape[0] - 1)
        return cls(mu.numpy(), sigma.numpy(), int(f.shape[0]), feature_extractor)

    def save(self, path: str | os.PathLike) -> None:
        """Write the statistics to an ``.npz`` file (atomically: a partial file never replaces a good one)."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            raise ValueError(f"reference statistics are stored as .npz; got the file name {path!r}")
        meta = {"format": REF_STATS_FORMAT, "feature_extractor": self.feature_extractor}
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                mu=self.mu,
                sigma=self.sigma,
                num_samples=np.int64(self.num_samples),
                meta=np.array(json.dumps(meta)),
            )

    @classmethod
    def load(cls, path: str | os.PathLike, feature_extractor: str | None = None) -> FeatureStats:
        """Read statistics written by :meth:`save` (or any ``.npz`` with ``mu`` and ``sigma`` arrays).

        Args:
            path: the ``.npz`` file.
            feature_extractor (`str`, *optional*): if given, the file must have been made by this extractor.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"reference statistics file {path!r} does not exist")
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma"} - set(data.files)
            if missing:
                raise ValueError(f"{path!r} is not a statistics file: it lacks {sorted(missing)}")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            n = int(data["num_samples"]) if "num_samples" in data.files else 0
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{path!r}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
        stored = meta.get("feature_extractor")
        if feature_extractor is not None and stored is not None and stored != feature_extractor:
            raise ValueError(
                f"{path!r} holds statistics of the {stored!r} feature extractor, not {feature_extractor!r}; "
                "pass another --ref_stats file"
            )
        return cls(mu, sigma, n, stored)


def _sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative round-off clipped)."""
    vals, vecs = torch.linalg.eigh(mat)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((Σ₁Σ₂)^½) is evaluated as tr((Σ₁^½ Σ₂ Σ₁^½)^½), a symmetric PSD matrix, so only ``torch.linalg.eigh`` is needed
    (no scipy) and round-off cannot produce complex values.

    Args:
        mu1, mu2 (array-like of shape `(D,)`): means.
        sigma1, sigma2 (array-like of shape `(D, D)`): covariances.

    Returns:
        `float`: the squared Fréchet distance (the number reported as FID when the features are Inception's).
    """
    mu1, mu2, sigma1, sigma2 = (
        torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (mu1, mu2, sigma1, sigma2)
    )
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of equal length, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"covariances must have shape ({d}, {d}), got {tuple(sigma1.shape)} and {tuple(sigma2.shape)}"
        )
    s1 = _sqrtm_psd((sigma1 + sigma1.T) / 2)
    middle = s1 @ ((sigma2 + sigma2.T) / 2) @ s1
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    dist = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return float(dist.clamp(min=0))


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """:func:`frechet_distance` of two :class:`FeatureStats`."""
    if a.num_features != b.num_features:
        raise ValueError(f"feature sizes differ: {a.num_features} vs {b.num_features}")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


class FeatureFrechetDistance(FrechetInceptionDistance):
    """torchmetrics' ``FrechetInceptionDistance`` with a pluggable extractor, precomputed features and cached stats.

    The metric keeps torchmetrics' state (feature sums, sums of outer products, counts) and its ``compute``. Three
    additions serve resumable, multi-process evaluation: :meth:`update` also accepts features computed earlier (e.g.
    read back from a cache), :meth:`set_reference_stats` loads cached (μ, Σ) of the real data in place of real
    images, and :meth:`reduce_state` sums the state over Accelerate processes. Create it with
    ``sync_on_compute=False`` (the default here) so that real statistics loaded on every process are not summed.

    Args:
        feature_extractor (`nn.Module`): maps (N, C, H, W) float images in [0, 1] to (N, D) features and has an
            integer ``num_features`` attribute (see :mod:`edm2_diffusers.evaluation.extractors`).
        **kwargs: passed to torchmetrics' ``Metric``.
    """

    def __init__(self, feature_extractor: nn.Module, **kwargs):
        if not isinstance(feature_extractor, nn.Module):
            raise TypeError(f"feature_extractor must be a torch.nn.Module, got {type(feature_extractor).__name__}")
        if not isinstance(getattr(feature_extractor, "num_features", None), int):
            raise ValueError("the feature extractor must have an integer `num_features` attribute")
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(feature=feature_extractor, reset_real_features=False, normalize=True, **kwargs)

    @property
    def feature_extractor(self) -> nn.Module:
        return self.inception

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Features of (N, C, H, W) images in [0, 1], as float32 on the CPU."""
        return self.inception(images).float().cpu()

    def update(self, imgs: torch.Tensor | None = None, real: bool = False, features: torch.Tensor | None = None):
        """Add images (through the extractor) or ready-made `(N, D)` features to the real or generated state."""
        if (imgs is None) == (features is None):
            raise ValueError("pass exactly one of `imgs` and `features`")
        if features is None:
            with torch.no_grad():
                features = self.inception(imgs)
        self.orig_dtype = torch.float64
        features = torch.as_tensor(features).to(self.real_features_sum.device, torch.float64)
        if features.ndim != 2 or features.shape[1] != self.real_features_sum.shape[0]:
            raise ValueError(
                f"features must have shape (N, {self.real_features_sum.shape[0]}), got {tuple(features.shape)}"
            )
        prefix = "real" if real else "fake"
        setattr(self, f"{prefix}_features_sum", getattr(self, f"{prefix}_features_sum") + features.sum(0))
        setattr(
            self, f"{prefix}_features_cov_sum", getattr(self, f"{prefix}_features_cov_sum") + features.T @ features
        )
        setattr(
            self, f"{prefix}_features_num_samples", getattr(self, f"{prefix}_features_num_samples") + len(features)
        )

    def _stats(self, prefix: str) -> FeatureStats:
        n = int(getattr(self, f"{prefix}_features_num_samples"))
        if n < 2:
            raise RuntimeError(f"at least two {prefix} samples are needed for feature statistics, got {n}")
        total = getattr(self, f"{prefix}_features_sum").cpu()
        mu = total / n
        sigma = (getattr(self, f"{prefix}_features_cov_sum").cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return FeatureStats(mu.numpy(), sigma.numpy(), n, getattr(self.inception, "name", None))

    def real_stats(self) -> FeatureStats:
        """(μ, Σ) of the real images added so far."""
        return self._stats("real")

    def fake_stats(self) -> FeatureStats:
        """(μ, Σ) of the generated images added so far."""
        return self._stats("fake")

    def set_reference_stats(self, stats: FeatureStats) -> None:
        """Replace the real-image state by cached statistics (inverse of :meth:`real_stats`)."""
        d = self.real_features_sum.shape[0]
        if stats.num_features != d:
            raise ValueError(f"reference statistics have {stats.num_features} features, the extractor gives {d}")
        n = max(int(stats.num_samples), 2)
        device = self.real_features_sum.device
        mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=device)
        sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=device)
        self.real_features_sum = mu * n
        self.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
        self.real_features_num_samples = torch.tensor(n, device=device)
        self._computed = None

    def reduce_state(self, accelerator, real: bool = False) -> None:
        """Sum the generated (or, with ``real``, the real) state over the processes of an ``accelerate.Accelerator``.

        The sums of features and of their outer products are float64, so merging them once is exact up to the order
        of float64 additions (no-op for one process).
        """
        if accelerator is None or accelerator.num_processes == 1:
            return
        prefix = "real" if real else "fake"
        for name in (f"{prefix}_features_sum", f"{prefix}_features_cov_sum", f"{prefix}_features_num_samples"):
            value = getattr(self, name)
            reduced = accelerator.reduce(value.to(accelerator.device), reduction="sum")
            setattr(self, name, reduced.to(value.device))
        self._computed = None

    def frechet_distance(self) -> float:
        """The distance between the real and generated state (torchmetrics' ``compute``), as a float."""
        if int(self.real_features_num_samples) < 2:
            raise RuntimeError("no reference statistics: add real images or call set_reference_stats first")
        return float(self.compute())


def check_unit_images(images: torch.Tensor) -> torch.Tensor:
    """Images in the extractor convention above: (N, C, H, W) floats in [0, 1] (uint8 is scaled), else an error."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    images = images.float()
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"images must lie in [0, 1] (got values in [{float(images.min()):.3f}, {float(images.max()):.3f}]); "
            "map [-1, 1] model outputs with (x + 1) / 2"
        )
    return images.clamp(0, 1)


__all__ = [
    "FeatureStats",
    "FeatureFrechetDistance",
    "frechet_distance",
    "check_unit_images",
    "frechet_distance_from_stats",
]
