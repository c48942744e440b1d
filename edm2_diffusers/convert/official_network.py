"""The official EDM2 network inside a loaded pickle: its constructor kwargs, state dict and latent encoder.

:func:`extract_official_network` reads the ``ema`` record that :func:`~.safe_unpickler.load_official_pickle`
returns (a ``Precond`` holding a ``UNet``): its constructor kwargs, completed and cross-checked with what the network
stored, and a flat state dict keyed exactly like ``Precond.state_dict()``, ready for
:func:`edm2_diffusers.convert.from_official`.
:func:`official_latent_encoder` reads the latent standardization of ImageNet-512 snapshots.

Of the package this module imports only :mod:`.safe_unpickler`, :mod:`.pickle_records` and :mod:`.official`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .official import from_official
from .pickle_records import ObjectRecord
from .safe_unpickler import load_official_pickle

__all__ = [
    "OfficialNetwork",
    "extract_official_network",
    "load_official_network",
    "official_pickle_to_unet",
    "official_latent_encoder",
]


# Constructor parameters of the official Precond in positional order (for pickles that recorded init_args).
_PRECOND_POSITIONAL = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data", "logvar_channels")
_PRECOND_ATTRIBUTES = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_data")
_UNET_ATTRIBUTES = ("label_balance", "concat_balance")
_BLOCK_ATTRIBUTES = ("dropout", "res_balance", "attn_balance", "clip_act", "resample_filter")


@dataclass
class OfficialNetwork:
    """An official EDM2 network read from a pickle.

    Args:
        config (`dict`): the official constructor kwargs (``img_resolution``, ``img_channels``, ``label_dim``,
            ``model_channels``, …), as :func:`edm2_diffusers.convert.from_official` takes them.
        state_dict (`dict`): tensors keyed like the official ``Precond.state_dict()`` (``unet.enc.64x64_conv.weight``,
            ``logvar_linear.weight``, …), in the pickle's dtype.
        class_name (`str`): the pickled class name (``"Precond"``).
    """

    config: dict
    state_dict: dict
    class_name: str


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def extract_official_network(data, key: str = "ema") -> OfficialNetwork:
    """Constructor kwargs and state dict of the official ``Precond`` network in loaded pickle data.

    The kwargs are those the saver recorded for ``Precond`` (which pass on to ``UNet`` and its blocks), completed with
    the values the network stored as attributes (resolution, channels, label dimension, balances, dropout, …) and the
    ``logvar_channels`` its tensors show; a recorded kwarg that contradicts the stored network is an error.

    Args:
        data: what :func:`load_official_pickle` returned (a dict holding ``key``) or the network record itself.
        key (`str`): the entry holding the network; the official files keep the EMA network under ``"ema"``.
    """
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"the pickle has no {key!r} entry (it has: {', '.join(map(str, data)) or 'nothing'})")
        net = data[key]
    else:
        net = data
    if not isinstance(net, ObjectRecord):
        raise ValueError(f"the {key!r} entry is a {type(net).__name__}, not a pickled network")
    if net.class_name != "Precond":
        raise ValueError(f"unsupported network class {net.class_name!r}: only EDM2's Precond (holding a UNet) is")
    unet = net.modules.get("unet")
    if not isinstance(unet, ObjectRecord) or unet.class_name != "UNet":
        raise ValueError("the Precond record has no 'unet' sub-module of class UNet")
    if net.init_kwargs is None:
        raise ValueError("the network pickle recorded no constructor arguments for Precond; cannot rebuild its config")
    if len(net.init_args) > len(_PRECOND_POSITIONAL):
        raise ValueError(f"Precond was built with {len(net.init_args)} positional arguments; expected at most 6")

    recorded = dict(zip(_PRECOND_POSITIONAL, net.init_args))
    recorded.update(net.init_kwargs)

    observed = {k: net.attributes[k] for k in _PRECOND_ATTRIBUTES if k in net.attributes}
    observed.update({k: unet.attributes[k] for k in _UNET_ATTRIBUTES if k in unet.attributes})
    blocks = [r for _, r in unet.records() if r.class_name == "Block"]
    if blocks:
        observed.update({k: blocks[0].attributes[k] for k in _BLOCK_ATTRIBUTES if k in blocks[0].attributes})
    fourier = net.modules.get("logvar_fourier")
    if isinstance(fourier, ObjectRecord) and isinstance(fourier.buffers.get("freqs"), torch.Tensor):
        observed["logvar_channels"] = int(fourier.buffers["freqs"].numel())

    clashes = [k for k in recorded.keys() & observed.keys() if not _same(recorded[k], observed[k])]
    if clashes:
        detail = ", ".join(f"{k}: recorded {recorded[k]!r} vs stored {observed[k]!r}" for k in sorted(clashes))
        raise ValueError(f"the pickled network contradicts its recorded constructor arguments ({detail})")
    config = {**observed, **recorded}
    return OfficialNetwork(config=config, state_dict=net.state_dict(), class_name=net.class_name)


def load_official_network(path_or_file, key: str = "ema") -> OfficialNetwork:
    """:func:`load_official_pickle` followed by :func:`extract_official_network`."""
    return extract_official_network(load_official_pickle(path_or_file), key=key)


def official_pickle_to_unet(path_or_file, key: str = "ema"):
    """Convert an official EDM2 network pickle into an :class:`~edm2_diffusers.EDM2UNet2DModel` (Config G)."""
    network = load_official_network(path_or_file, key=key)
    return from_official(network.state_dict, network.config)


def official_latent_encoder(data) -> dict | None:
    """The latent standardization stored with a latent (ImageNet-512) official network, or ``None`` for pixels.

    The official ``StabilityVAEEncoder`` keeps ``final = raw · scale + bias`` per channel, with
    ``scale = final_std / raw_std`` and ``bias = final_mean − raw_mean · scale``. Any such affine map is the same map
    as raw mean ``−bias/scale``, raw std ``final_std/scale`` with ``final_mean = 0``; this returns it for
    ``final_std`` 0.5, EDM2's choice.

    Args:
        data: what :func:`load_official_pickle` returned.

    Returns:
        ``None`` when the pickle holds no encoder or a pixel-space one, else a dict with ``vae_name``,
        ``latents_mean``, ``latents_std`` (per channel, of the raw VAE latents) and ``final_std``.
    """
    enc = data.get("encoder") if isinstance(data, dict) else None
    if enc is None or (isinstance(enc, ObjectRecord) and enc.class_name == "StandardRGBEncoder"):
        return None
    if not isinstance(enc, ObjectRecord) or enc.class_name != "StabilityVAEEncoder":
        name = enc.class_name if isinstance(enc, ObjectRecord) else type(enc).__name__
        raise ValueError(f"unsupported encoder {name!r} in the network pickle")
    try:
        scale = [float(s) for s in enc.attributes["scale"].reshape(-1)]
        bias = [float(b) for b in enc.attributes["bias"].reshape(-1)]
    except (KeyError, AttributeError) as err:
        raise ValueError("the StabilityVAEEncoder record lacks its scale/bias constants") from err
    if len(scale) != len(bias) or any(s == 0 for s in scale):
        raise ValueError("the StabilityVAEEncoder record has inconsistent scale/bias constants")
    final_std = 0.5

    def tidy(v):  # the constants were stored in float32: keep float32's 7 significant digits
        return float(f"{v:.7g}")

    return {
        "vae_name": enc.attributes.get("vae_name"),
        "latents_mean": [tidy(-b / s) for s, b in zip(scale, bias)],
        "latents_std": [tidy(final_std / s) for s in scale],
        "final_std": final_std,
    }
