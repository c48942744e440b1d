"""Conversion between the official EDM2 ``Precond`` network's state dict and :class:`EDM2UNet2DModel` (Config G).

The official layout already matches ours key for key (``unet.`` prefix aside), so conversion is a config translation
and a strict state-dict load.
"""

from __future__ import annotations

import torch

from ..models.unet_edm2 import EDM2UNet2DModel

# Constructor defaults of the official ``Precond``/``UNet``/``Block`` classes; missing keys take these values.
OFFICIAL_DEFAULTS = {
    "label_dim": 0,
    "model_channels": 192,
    "channel_mult": [1, 2, 3, 4],
    "channel_mult_noise": None,
    "channel_mult_emb": None,
    "num_blocks": 3,
    "attn_resolutions": [16, 8],
    "label_balance": 0.5,
    "concat_balance": 0.5,
    "channels_per_head": 64,
    "dropout": 0.0,
    "res_balance": 0.3,
    "attn_balance": 0.3,
    "clip_act": 256,
    "logvar_channels": 128,
    "sigma_data": 0.5,
    "resample_filter": [1, 1],
    "use_fp16": True,
}
_REQUIRED = ("img_resolution", "img_channels")
_IGNORED = {"use_fp16"}  # a run-time precision choice, not part of the network


def official_to_config(config: dict) -> dict:
    """Translate the official constructor kwargs into ``EDM2UNet2DModel`` config values."""
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"official network config lacks required key(s): {', '.join(missing)}")
    unknown = sorted(set(config) - set(OFFICIAL_DEFAULTS) - set(_REQUIRED))
    if unknown:
        raise ValueError(f"official network config has unsupported key(s): {', '.join(unknown)}")
    c = {**OFFICIAL_DEFAULTS, **config}
    if list(c["resample_filter"]) != [1, 1]:
        raise ValueError(f"only resample_filter [1, 1] is supported, got {c['resample_filter']}")
    if float(c["sigma_data"]) != 0.5:
        raise ValueError(f"only sigma_data 0.5 is supported, got {c['sigma_data']}")
    label_dim = int(c["label_dim"])
    return dict(
        architecture="G",
        sample_size=int(c["img_resolution"]),
        in_channels=int(c["img_channels"]),
        out_channels=int(c["img_channels"]),
        model_channels=int(c["model_channels"]),
        channel_mult=[int(m) for m in c["channel_mult"]],
        channel_mult_noise=c["channel_mult_noise"],
        channel_mult_emb=c["channel_mult_emb"],
        num_blocks=int(c["num_blocks"]),
        attn_resolutions=[int(r) for r in c["attn_resolutions"]],
        channels_per_head=c["channels_per_head"],
        num_class_embeds=label_dim if label_dim > 0 else None,
        label_balance=float(c["label_balance"]),
        concat_balance=float(c["concat_balance"]),
        res_balance=float(c["res_balance"]),
        attn_balance=float(c["attn_balance"]),
        clip_act=c["clip_act"],
        dropout=float(c["dropout"]),
        logvar_channels=int(c["logvar_channels"]),
    )


def config_to_official(model: EDM2UNet2DModel) -> dict:
    """The official constructor kwargs that describe ``model`` (Config G only)."""
    cfg = model.config
    if cfg.architecture != "G":
        raise ValueError(f"only Config G models have an official counterpart, not {cfg.architecture!r}")
    if cfg.in_channels != cfg.out_channels:
        raise ValueError("the official network has as many output channels as input channels")
    if cfg.get("pixel_norm", "edm2") != "edm2" or cfg.get("mid_flavor", "dec") != "dec":
        raise ValueError(
            "this is edm2-multi-gpu's UNetG (pixel_norm 'rms' or mid_flavor 'enc'), which computes differently from "
            "the official network: it has no official counterpart"
        )
    return dict(
        img_resolution=cfg.sample_size,
        img_channels=cfg.in_channels,
        label_dim=cfg.num_class_embeds or 0,
        model_channels=cfg.model_channels,
        channel_mult=list(cfg.channel_mult),
        channel_mult_noise=cfg.channel_mult_noise,
        channel_mult_emb=cfg.channel_mult_emb,
        num_blocks=cfg.num_blocks,
        attn_resolutions=list(cfg.attn_resolutions),
        label_balance=cfg.label_balance,
        concat_balance=cfg.concat_balance,
        channels_per_head=cfg.channels_per_head,
        dropout=cfg.dropout,
        res_balance=cfg.res_balance,
        attn_balance=cfg.attn_balance,
        clip_act=cfg.clip_act,
        logvar_channels=cfg.logvar_channels,
    )


def _official_key(key: str) -> str:
    return key if key.startswith("logvar_") else f"unet.{key}"


def from_official(state_dict: dict, config: dict) -> EDM2UNet2DModel:
    """Build an :class:`EDM2UNet2DModel` from the official ``Precond`` state dict and its constructor kwargs.

    Args:
        state_dict (`dict`): keys like ``unet.enc.64x64_block0.conv_res0.weight``, ``logvar_linear.weight``.
        config (`dict`): the official constructor kwargs (``img_resolution``, ``img_channels``, ``label_dim``, …);
            missing ones take the official defaults.
    """
    model = EDM2UNet2DModel(**official_to_config(config))
    expected = {_official_key(k): k for k in model.state_dict()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "state dict does not match the official network described by the config: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    ours = {}
    for official, key in expected.items():
        tensor = torch.as_tensor(state_dict[official])
        want = model.state_dict()[key].shape
        if tensor.shape != want:
            raise ValueError(f"{official}: shape {tuple(tensor.shape)} does not match the expected {tuple(want)}")
        ours[key] = tensor.to(torch.float32)
    model.load_state_dict(ours, strict=True)
    return model.eval()


def to_official(model: EDM2UNet2DModel) -> tuple[dict, dict]:
    """The official ``Precond`` state dict and constructor kwargs of a Config G model."""
    config = config_to_official(model)
    return {_official_key(k): v.detach().clone() for k, v in model.state_dict().items()}, config
