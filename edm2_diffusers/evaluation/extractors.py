"""The feature extractors of the evaluation, by name: Inception (FID) and the offline digits classifier.

Every extractor follows the convention of :mod:`edm2_diffusers.evaluation.fid`: an ``nn.Module`` mapping (N, C, H, W)
float images in [0, 1] to (N, D) features, with an integer ``num_features = D`` and, ideally, a ``name``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import NoTrainInceptionV3
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from .digits import digits_feature_extractor
from .fid import check_unit_images

EXTRACTOR_NAMES = ("inception", "digits")


class InceptionFeatureExtractor(nn.Module):
    """The 2048-d pool features of the FID Inception-v3 (torch-fidelity's port, as wrapped by torchmetrics).

    Takes (N, C, H, W) floats in [0, 1], quantises them to uint8 as a saved PNG would be, repeats grey images to three
    channels, and lets the network resize to 299×299. Needs ``pip install edm2-diffusers[metrics]``; the weights are
    downloaded by torch-fidelity on first use (or read from ``weights_path``).

    Args:
        weights_path (`str`, *optional*): local copy of torch-fidelity's ``pt_inception-2015-12-05`` weights.
    """

    name = "inception"
    num_features = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError(
                "the Inception feature extractor needs torch-fidelity: pip install 'edm2-diffusers[metrics]' "
                "(its weights are downloaded on first use); offline, use --feature_extractor digits or a custom module"
            )
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=weights_path,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = check_unit_images(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {images.shape[1]}")
        return self.net((images * 255).round().to(torch.uint8)).reshape(len(images), -1)


def get_feature_extractor(name: str | nn.Module, **kwargs) -> nn.Module:
    """The feature extractor called ``name`` (``"inception"`` or ``"digits"``), or ``name`` itself if a module.

    Args:
        name (`str` or `nn.Module`): extractor name, or a ready module following the convention above.
        **kwargs: passed to the extractor's constructor (e.g. ``weights_path`` for Inception, ``cache_dir`` for
            digits).
    """
    if isinstance(name, nn.Module):
        return name
    if name == "inception":
        return InceptionFeatureExtractor(**kwargs)
    if name == "digits":
        return digits_feature_extractor(**kwargs)
    raise ValueError(f"unknown feature extractor {name!r}; expected 'inception', 'digits' or an nn.Module")


def extractor_name(feature_extractor: nn.Module) -> str:
    """The name an extractor's statistics are stored under: its ``name`` attribute, else its class name."""
    return str(getattr(feature_extractor, "name", type(feature_extractor).__name__))


__all__ = ["EXTRACTOR_NAMES", "InceptionFeatureExtractor", "extractor_name", "get_feature_extractor"]
