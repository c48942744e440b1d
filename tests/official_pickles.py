"""Official-format EDM2 network pickles written by the tests themselves, for the restricted unpickler and conversion.

The pickles are written the way the official training code writes them: persistent objects reduce to
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the module source embedded in ``meta``, the top
level is a ``dnnlib.util.EasyDict``, tensors and storages pickle the way torch pickles them. The two names are served
by stand-in modules that exist only while a pickle is written (or while a test proves a payload is live).
"""

import contextlib
import pickle
import shlex
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import torch
from conftest import golden_config, golden_state, load_golden, tiny_unet_config
from torch import nn

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.convert import to_official

# ---------------------------------------------------------------------------------------------------------------------
# A small imitation of the saver's persistence mechanism.

_SOURCE = {"text": ""}  # the module source that persistent objects embed when pickled


def _imitation_reconstruct(meta):
    """What the real loader does with ``meta``: execute the embedded source and rebuild the object from it."""
    module = types.ModuleType("_embedded_network_module")
    exec(meta["module_src"], module.__dict__)
    cls = module.__dict__[meta["class_name"]]
    obj = cls.__new__(cls)
    obj.__dict__.update(meta["state"])
    return obj


_imitation_reconstruct.__module__ = "torch_utils.persistence"
_imitation_reconstruct.__qualname__ = _imitation_reconstruct.__name__ = "_reconstruct_persistent_obj"


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict`` (a dict with attribute access)."""


EasyDict.__module__ = "dnnlib.util"


@contextlib.contextmanager
def imitation_modules():
    """Serve ``torch_utils.persistence`` and ``dnnlib.util`` from this test while the block runs."""
    persistence = types.ModuleType("torch_utils.persistence")
    persistence._reconstruct_persistent_obj = _imitation_reconstruct
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = EasyDict
    torch_utils, dnnlib = types.ModuleType("torch_utils"), types.ModuleType("dnnlib")
    torch_utils.persistence, dnnlib.util = persistence, util
    fakes = {"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib, "dnnlib.util": util}
    assert not set(fakes) & set(sys.modules)
    sys.modules.update(fakes)
    try:
        yield
    finally:
        for name in fakes:
            sys.modules.pop(name, None)


def dump_official(obj, source: str = "") -> bytes:
    _SOURCE["text"] = source
    with imitation_modules():
        return pickle.dumps(obj)


class Persistent:
    """Mixin: pickle like a persistent class (embedded source, recorded constructor arguments)."""

    def record_init(self, args, kwargs):
        self._init_args, self._init_kwargs = tuple(args), dict(kwargs)

    def __reduce__(self):
        meta = dict(
            type="class",
            version=6,
            module_src=_SOURCE["text"],
            class_name=type(self).__name__,
            state=dict(self.__dict__),
        )
        return _imitation_reconstruct, (meta,)


class MPFourier(Persistent, nn.Module):
    def __init__(self, num_channels):
        super().__init__()
        self.record_init((num_channels,), {})
        self.register_buffer("freqs", torch.zeros(num_channels))
        self.register_buffer("phases", torch.zeros(num_channels))


class MPConv(Persistent, nn.Module):
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.record_init((in_channels, out_channels), {"kernel": kernel})
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, *kernel))


class Block(Persistent, nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.record_init((), kwargs)
        c = {"dropout": 0, "res_balance": 0.3, "attn_balance": 0.3, "clip_act": 256, "resample_filter": [1, 1]}
        c.update({k: v for k, v in kwargs.items() if k in c})
        self.__dict__.update(c, flavor=kwargs["flavor"], resample_mode=kwargs["resample_mode"])
        self.num_heads = 0  # set once the block's tensors are known


class UNet(Persistent, nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.record_init((), kwargs)
        self.label_balance = kwargs.get("label_balance", 0.5)
        self.concat_balance = kwargs.get("concat_balance", 0.5)


class Precond(Persistent, nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5, **unet_kwargs):
        super().__init__()
        self.record_init((), dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim))
        self._init_kwargs.update(unet_kwargs)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data


class EDM2Loss(Persistent):
    def __init__(self, P_mean=-0.8, P_std=1.6, sigma_data=0.5):
        self.record_init((), dict(P_mean=P_mean, P_std=P_std))
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


class StandardRGBEncoder(Persistent):
    def __init__(self):
        self.record_init((), {})


class StabilityVAEEncoder(Persistent):
    def __init__(self, raw_mean=(5.81, 3.25, 0.12, -2.15), raw_std=(4.17, 4.62, 3.71, 3.28), final_std=0.5):
        self.record_init((), {})
        self.vae_name = "stabilityai/sd-vae-ft-mse"
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(0) - np.float32(raw_mean) * self.scale
        self.batch_size = 8
        self._vae = None


def build_precond(state: dict, config: dict) -> Precond:
    """A Precond-shaped module tree holding ``state`` (official keys), with the attributes the official one stores."""
    config = dict(config)
    block_kwargs = {k: config[k] for k in ("dropout", "res_balance", "attn_balance", "clip_act") if k in config}
    config.setdefault("channels_per_head", 64)
    net = Precond(**config)
    for key, tensor in state.items():
        *path, leaf = key.split(".")
        node = net
        for depth, name in enumerate(path):
            if name not in node._modules:
                parent = path[depth - 1] if depth else ""
                if name == "unet":
                    child = UNet(**{k: v for k, v in config.items() if k.endswith("_balance")})
                elif name in ("enc", "dec"):
                    child = nn.ModuleDict()
                elif parent in ("enc", "dec") and not name.endswith("_conv"):
                    mode = "down" if name.endswith("_down") else "up" if name.endswith("_up") else "keep"
                    child = Block(flavor=parent, resample_mode=mode, **block_kwargs)
                elif name.endswith("_fourier"):
                    child = MPFourier(tensor.shape[0])
                else:
                    child = MPConv(tensor.shape[1], tensor.shape[0], list(tensor.shape[2:]))
                node.add_module(name, child)
            node = node._modules[name]
        target = node._buffers if leaf in ("freqs", "phases") else node._parameters
        target[leaf] = tensor.clone() if leaf in ("freqs", "phases") else nn.Parameter(tensor.clone())
    for module in net.modules():
        if isinstance(module, Block):
            module.out_channels = module.conv_res1.weight.shape[0]
            if "attn_qkv" in module._modules:
                module.num_heads = module.out_channels // config["channels_per_head"]
    return net


def embedded_source(marker: Path) -> str:
    """Module source that leaves ``marker`` (by Python) and ``marker.system`` (by a shell command) when executed."""
    return textwrap.dedent(
        f"""
        import os
        import torch
        open({str(marker)!r}, "w").close()
        os.system({"touch " + shlex.quote(str(marker) + ".system")!r})
        class Precond(torch.nn.Module): pass
        class UNet(torch.nn.Module): pass
        class Block(torch.nn.Module): pass
        class MPConv(torch.nn.Module): pass
        class MPFourier(torch.nn.Module): pass
        class EDM2Loss: pass
        class StandardRGBEncoder: pass
        class StabilityVAEEncoder: pass
        """
    )


def snapshot(net, encoder=None):
    """The top-level dict of an official snapshot pickle."""
    return EasyDict(
        encoder=encoder if encoder is not None else StandardRGBEncoder(),
        dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", path="img64.zip", use_labels=True),
        loss_fn=EDM2Loss(),
        ema=net,
    )


def golden():
    meta, tensors = load_golden("edm2_official_unet.safetensors")
    return golden_config(meta), golden_state(tensors), tensors


class Payload:
    """Pickles as ``func(*args)``: the classic way a pickle runs a command when loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def random_unet(seed, **overrides):
    torch.manual_seed(seed)
    model = EDM2UNet2DModel(**tiny_unet_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def write_pickle(path, model, encoder=None):
    """Write ``model`` as an official snapshot pickle at ``path``."""
    state, config = to_official(model)
    path.write_bytes(dump_official(snapshot(build_precond(state, config), encoder)))
    return path
