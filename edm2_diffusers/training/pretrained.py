"""Fine-tuning: the U-Net a run starts from, either new from ``model`` or the weights of an exported pipeline.

``training.pretrained_model_name_or_path`` (``--pretrained_model_name_or_path``, with ``--variant``) names an export
folder or Hub repository, as in diffusers' training scripts; its ``unet/`` is loaded with
``EDM2UNet2DModel.from_pretrained``. The export's model config is the architecture: a key of the YAML's ``model``
section that disagrees with it is an error naming the key (an architecture mismatch is never silently overridden), and
the run records the export's config as its ``model`` section, and where it came from as ``training.base_model``.
"""

from __future__ import annotations

import os

import torch

from ..hub import read_export_info
from ..models import EDM2UNet2DModel
from .checkpoint import architecture


def base_model_id(path: str) -> str:
    """What a model card names as the base model: the Hub id, or the repository a local export was made for."""
    if not os.path.isdir(path):
        return path
    try:
        repo_id = read_export_info(path).get("repo_id")
    except (FileNotFoundError, ValueError):
        repo_id = None
    if repo_id and not str(repo_id).startswith("your-username/"):
        return str(repo_id)
    return os.path.abspath(path)


def build_unet(cfg: dict) -> EDM2UNet2DModel:
    """The U-Net to train: ``EDM2UNet2DModel(**cfg["model"])``, or the pretrained export's U-Net.

    With a pretrained model, ``cfg`` is updated in place: ``model`` becomes the export's config and
    ``training.base_model`` names the export.

    Raises:
        ValueError: the export cannot be loaded, or the YAML's ``model`` section contradicts its config.
    """
    train_cfg = cfg["training"]
    path, variant = train_cfg["pretrained_model_name_or_path"], train_cfg["variant"]
    if path is None:
        if variant is not None:
            raise ValueError("--variant selects weights of --pretrained_model_name_or_path, which was not given")
        return EDM2UNet2DModel(**cfg["model"])
    try:
        unet = EDM2UNet2DModel.from_pretrained(path, subfolder="unet", variant=variant, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        which = f" (variant {variant!r})" if variant else ""
        raise ValueError(
            f"--pretrained_model_name_or_path {path!r}{which}: no EDM2 U-Net could be loaded from its unet/ folder: "
            f"{err}"
        ) from None
    loaded = architecture(unet.config)
    wanted = architecture(cfg.get("model") or {})
    clashes = [f"{k}: config {v!r} vs pretrained {loaded.get(k)!r}" for k, v in wanted.items() if loaded.get(k) != v]
    if clashes:
        raise ValueError(
            f"the config's model section contradicts the pretrained model {path!r}, whose architecture is used: "
            + "; ".join(clashes)
            + ". Drop these keys from the model section (or the whole section) to fine-tune it"
        )
    cfg["model"] = loaded
    train_cfg["base_model"] = base_model_id(path)
    return unet.train()


__all__ = ["base_model_id", "build_unet"]
