"""Conversion of edm2-multi-gpu checkpoints (Config C, E and its own G) into :class:`EDM2UNet2DModel`.

edm2-multi-gpu's ``UNetG`` is not NVIDIA's Config G; its differences are model options (see ``models/layers.py``):
its pixel norm (encoder inputs and attention q, k, v) adds ε = 1e-8 to the mean square (``pixel_norm="rms"``), its
two middle blocks are encoder blocks that pixel-normalize their input (``mid_flavor="enc"``), and its embedding gains
start at 1 (``emb_gain_init=1.0``). Its per-block ``res.gain.g`` is our ``emb_gain`` and ``final.1.g`` our
``out_gain``; the output gain multiplies the convolution's output where ours scales its weight (the same product).

Differences handled here:

* block lists: ``down.<i>`` / ``middle1`` / ``middle2`` / ``up.<i>`` map in order onto our ``enc`` / ``dec`` blocks
  (their ``n_blocks`` counts the resampling block, so ``num_blocks = n_blocks − 1``);
* Fourier features store f and φ in cycles (cos 2π(a·f + φ)); ours store radians, so both are scaled by 2π;
* attention q, k, v are grouped per head as [q | k | v]; ours interleave them per channel, so the rows of the
  qkv projection are permuted (exact: each row is normalized on its own).
"""

from __future__ import annotations

import math

import torch

from ..models.unet_edm2 import EDM2UNet2DModel

_BLOCK_PARTS = {
    "res.conv1": "conv_res0",
    "res.conv2.1": "conv_res1",
    "res.linear": "emb_linear",
    "res.shortcut": "conv_skip",
    "attn.projection": "attn_qkv",
    "attn.output": "attn_proj",
    "res.gain": "emb_gain",
}
# edm2-multi-gpu's UNetG, expressed as EDM2UNet2DModel options (defaults are NVIDIA's G).
MULTIGPU_G_OPTIONS = {"pixel_norm": "rms", "mid_flavor": "enc", "emb_gain_init": 1.0}
_NETWORK_KEYS = {"image_shape", "n_channels", "ch_mults", "is_attn", "dropout", "n_blocks", "attn_channels_per_head"}


def multigpu_to_config(network: dict, architecture: str, logvar_channels: int = 256) -> dict:
    """Translate an edm2-multi-gpu ``network:`` mapping into ``EDM2UNet2DModel`` config values."""
    if architecture not in ("C", "E", "G"):
        raise ValueError(f"edm2-multi-gpu conversion supports architecture 'C', 'E' or 'G', got {architecture!r}")
    unknown = sorted(set(network) - _NETWORK_KEYS)
    if unknown:
        raise ValueError(f"edm2-multi-gpu network config has unsupported key(s): {', '.join(unknown)}")
    channels, height, width = network.get("image_shape", [3, 32, 32])
    if height != width:
        raise ValueError(f"only square images are supported, got image_shape {network['image_shape']}")
    ch_mults = list(network.get("ch_mults", [1, 2, 2, 2]))
    is_attn = list(network.get("is_attn", [False, True, False, False]))
    if len(is_attn) != len(ch_mults):
        raise ValueError(f"is_attn has {len(is_attn)} entries for {len(ch_mults)} levels (ch_mults)")
    n_blocks = int(network.get("n_blocks", 3))
    if n_blocks < 2:
        raise ValueError(f"n_blocks must be at least 2 (it counts the resampling block), got {n_blocks}")
    extra = MULTIGPU_G_OPTIONS if architecture == "G" else {}
    return dict(
        architecture=architecture,
        sample_size=int(height),
        in_channels=int(channels),
        out_channels=int(channels),
        model_channels=int(network.get("n_channels", 128)),
        channel_mult=[int(m) for m in ch_mults],
        channel_mult_noise=1,
        channel_mult_emb=4,
        num_blocks=n_blocks - 1,
        attn_resolutions=[int(height) >> level for level, attn in enumerate(is_attn) if attn],
        channels_per_head=network.get("attn_channels_per_head"),
        dropout=float(network.get("dropout", 0.1)),
        clip_act=None if architecture == "C" else 256,
        logvar_channels=logvar_channels,
        **extra,
    )


def _qkv_rows_to_ours(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[head][q|k|v][channel] row order → [head][channel][q, k, v]."""
    rest = weight.shape[1:]
    head = weight.shape[0] // (3 * num_heads)
    return weight.reshape(num_heads, 3, head, *rest).transpose(1, 2).reshape(weight.shape)


def from_multigpu(state_dict: dict, config: dict, architecture: str) -> EDM2UNet2DModel:
    """Build an :class:`EDM2UNet2DModel` from an edm2-multi-gpu ``EDM`` state dict.

    Args:
        state_dict (`dict`): the ``EDM`` module's state dict (``nn_model.*`` and ``reweight_mlp.*`` keys).
        config (`dict`): its ``network:`` kwargs (``image_shape``, ``n_channels``, ``ch_mults``, ``is_attn``,
            ``dropout``, ``n_blocks``).
        architecture (`str`): ``"C"``, ``"E"`` or ``"G"`` (its own ``UNetG``, built with `MULTIGPU_G_OPTIONS`).
    """
    if "reweight_mlp.fourier.frequencies" not in state_dict:
        raise ValueError("state dict has no reweight_mlp.* entries: expected an edm2-multi-gpu EDM state dict")
    logvar_channels = state_dict["reweight_mlp.fourier.frequencies"].numel()
    model = EDM2UNet2DModel(**multigpu_to_config(config, architecture, logvar_channels))
    ours = model.state_dict()

    enc = [name for name in model.enc if not name.endswith("_conv")]
    dec = [name for name in model.dec if not name.endswith(("_in0", "_in1"))]
    middle = [name for name in model.dec if name.endswith(("_in0", "_in1"))]
    blocks = {f"nn_model.down.{i}": f"enc.{n}" for i, n in enumerate(enc)}
    blocks.update({f"nn_model.up.{i}": f"dec.{n}" for i, n in enumerate(dec)})
    blocks.update({"nn_model.middle1": f"dec.{middle[0]}", "nn_model.middle2": f"dec.{middle[1]}"})
    top = {
        "nn_model.image_proj.weight": f"enc.{next(iter(model.enc))}.weight",
        "nn_model.embedding.linear1.weight": "emb_noise.weight",
        "nn_model.embedding.linear2.weight": "emb_out.weight",
        "nn_model.final.2.weight": "out_conv.weight",  # C, E: final = (norm, SiLU, conv)
        "nn_model.final.0.weight": "out_conv.weight",  # G: final = (conv, gain)
        "nn_model.final.1.g": "out_gain",
        "nn_model.embedding.fourier.frequencies": "emb_fourier.freqs",
        "nn_model.embedding.fourier.phases": "emb_fourier.phases",
        "reweight_mlp.fourier.frequencies": "logvar_fourier.freqs",
        "reweight_mlp.fourier.phases": "logvar_fourier.phases",
        "reweight_mlp.linear.weight": "logvar_linear.weight",
    }

    converted, unused = {}, []
    for key, value in state_dict.items():
        value = torch.as_tensor(value).to(torch.float32)
        if key in top:
            target = top[key]
            if "fourier" in key:
                value = value * (2 * math.pi)  # cycles → radians
        elif key.endswith(".res.gain.g"):
            prefix, part = key[: -len(".res.gain.g")], "res.gain"
            if prefix not in blocks:
                unused.append(key)
                continue
            target = f"{blocks[prefix]}.{_BLOCK_PARTS[part]}"
        else:
            prefix, _, part = key.rpartition(".weight")[0].partition(".res.")
            if not _:
                prefix, _, part = key.rpartition(".weight")[0].partition(".attn.")
                part = "attn." + part
            else:
                part = "res." + part
            if prefix not in blocks or part not in _BLOCK_PARTS:
                unused.append(key)
                continue
            target = f"{blocks[prefix]}.{_BLOCK_PARTS[part]}.weight"
            if part == "attn.projection" and target in ours:
                block = model.get_submodule(blocks[prefix])
                value = _qkv_rows_to_ours(value, block.num_heads)
        if target not in ours:
            unused.append(key)
            continue
        if value.shape != ours[target].shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not match {target} {tuple(ours[target].shape)}")
        converted[target] = value
    missing = sorted(set(ours) - set(converted))
    if unused or missing:
        raise ValueError(
            "state dict does not match the network described by the config: "
            f"unexpected {unused[:5]}, missing {missing[:5]}"
        )
    model.load_state_dict(converted, strict=True)
    return model.eval()
