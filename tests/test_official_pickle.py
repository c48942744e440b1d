"""Reading official EDM2 network pickles without running their code.

The pickles here are written by this test itself, the way the official training code writes them: persistent objects
reduce to ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with the module source embedded in ``meta``,
the top level is a ``dnnlib.util.EasyDict``, tensors and storages pickle the way torch pickles them. The two names are
served by stand-in modules that exist only while a pickle is written (or while a test proves a payload is live).
"""

import contextlib
import io
import json
import os
import pickle
import shlex
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import golden_config, golden_state, load_golden, tiny_unet_config, tiny_vae
from torch import nn

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.convert import from_official, to_official
from edm2_diffusers.convert.official_pickle import (
    ObjectRecord,
    UnsafePickleError,
    extract_official_network,
    load_official_network,
    load_official_pickle,
    official_latent_encoder,
    official_pickle_to_unet,
)
from edm2_diffusers.edm import denoise

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


# ---------------------------------------------------------------------------------------------------------------------
# Official-format pickles load into records and convert.


def test_golden_network_pickle_converts_and_matches_reference(tmp_path):
    config, state, tensors = golden()
    marker = tmp_path / "embedded-source-ran"
    path = tmp_path / "edm2-img16-golden.pkl"
    path.write_bytes(dump_official(snapshot(build_precond(state, config)), embedded_source(marker)))

    data = load_official_pickle(path)
    assert set(data) == {"encoder", "dataset_kwargs", "loss_fn", "ema"} and type(data) is dict
    assert data["dataset_kwargs"]["path"] == "img64.zip"
    assert data["loss_fn"].class_name == "EDM2Loss" and data["loss_fn"].attributes["P_mean"] == -0.8
    ema = data["ema"]
    assert isinstance(ema, ObjectRecord) and ema.class_name == "Precond"
    assert ema.module_src == embedded_source(marker) and ema.modules["unet"].modules["enc"].class_name == "ModuleDict"
    assert ema.modules["unet"].modules["enc"].modules["16x16_conv"].init_kwargs == {"kernel": [3, 3]}

    network = extract_official_network(data)
    assert network.class_name == "Precond"
    assert network.config == {
        **config,
        "use_fp16": True,
        "sigma_data": 0.5,
        "label_balance": 0.5,
        "concat_balance": 0.5,
        "dropout": 0,
        "res_balance": 0.3,
        "attn_balance": 0.3,
        "clip_act": 256,
        "resample_filter": [1, 1],
    }
    assert sorted(network.state_dict) == sorted(state)
    assert all(torch.equal(network.state_dict[k], v) for k, v in state.items())

    unet = from_official(network.state_dict, network.config)
    with torch.no_grad():
        D, logvar = denoise(unet, tensors["in.x"], tensors["in.sigma"], return_logvar=True)
    for ours, ref in ((D, tensors["out.denoised"]), (logvar, tensors["out.logvar"])):
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not marker.exists() and not Path(f"{marker}.system").exists()
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


def test_half_precision_snapshot_keeps_its_weights(tmp_path):
    config, state, _ = golden()
    path = tmp_path / "half.pkl"
    path.write_bytes(dump_official(snapshot(build_precond(state, config).half())))
    network = load_official_network(path)
    assert all(v.dtype == torch.float16 for v in network.state_dict.values())
    assert all(torch.equal(network.state_dict[k], v.half()) for k, v in state.items())
    unet = official_pickle_to_unet(path)
    assert unet.dtype == torch.float32
    assert torch.equal(unet.state_dict()["out_conv.weight"], state["unet.out_conv.weight"].half().float())


def test_class_conditional_round_trip(tmp_path):
    model = EDM2UNet2DModel(**tiny_unet_config(in_channels=2, out_channels=2, num_class_embeds=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    state, config = to_official(model)
    with open(tmp_path / "cond.pkl", "wb") as f:
        f.write(dump_official(snapshot(build_precond(state, config))))

    network = load_official_network(tmp_path / "cond.pkl")
    assert network.config["label_dim"] == 5 and "unet.emb_label.weight" in network.state_dict
    assert {k: network.config[k] for k in config} == config
    converted = official_pickle_to_unet(tmp_path / "cond.pkl")
    assert converted.config.num_class_embeds == 5
    x, sigma = torch.randn(4, 2, 8, 8), torch.tensor([0.002, 0.5, 3.0, 80.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 4, 2, 4]), 5).float()
    with torch.no_grad():
        ref, ref_u = denoise(model, x, sigma, labels, return_logvar=True)
        out, out_u = denoise(converted, x, sigma, labels, return_logvar=True)
        other = denoise(converted, x, sigma, torch.tensor([1, 1, 1, 1]))
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max() and torch.allclose(out_u, ref_u, rtol=0, atol=1e-6)
    assert not torch.allclose(other, out)  # the labels matter


def test_tensor_geometry_and_dtypes_survive():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),
        "offset_slice": base[1:, 2:5],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "bf16": base.to(torch.bfloat16),
        "int64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "param": nn.Parameter(torch.randn(2, 3)),
    }
    loaded = load_official_pickle(io.BytesIO(dump_official(tensors)))
    for name, ref in tensors.items():
        assert type(loaded[name]) is torch.Tensor and loaded[name].dtype == ref.dtype, name
        assert torch.equal(loaded[name], ref.detach()), name


def test_latent_encoder_constants(tmp_path):
    config, state, _ = golden()
    blob = dump_official(snapshot(build_precond(state, config), StabilityVAEEncoder()))
    data = load_official_pickle(io.BytesIO(blob))
    assert isinstance(data["encoder"].attributes["scale"], np.ndarray)
    latent = official_latent_encoder(data)
    assert latent["vae_name"] == "stabilityai/sd-vae-ft-mse" and latent["final_std"] == 0.5
    assert latent["latents_mean"] == pytest.approx([5.81, 3.25, 0.12, -2.15], abs=1e-6)
    assert latent["latents_std"] == pytest.approx([4.17, 4.62, 3.71, 3.28], abs=1e-6)
    pixel = load_official_pickle(io.BytesIO(dump_official(snapshot(build_precond(state, config)))))
    assert official_latent_encoder(pixel) is None


def test_clear_errors_for_unusable_pickles(tmp_path):
    config, state, _ = golden()
    with pytest.raises(FileNotFoundError, match="network pickle not found"):
        load_official_pickle(tmp_path / "missing.pkl")
    with pytest.raises(ValueError, match="no 'ema' entry"):
        extract_official_network(load_official_pickle(io.BytesIO(dump_official(EasyDict(net=1)))))
    with pytest.raises(ValueError, match="unsupported network class 'EDM2Loss'"):
        extract_official_network({"ema": load_official_pickle(io.BytesIO(dump_official(EDM2Loss())))})
    net = build_precond(state, config)
    net._init_kwargs["label_dim"] = 10
    with pytest.raises(ValueError, match="label_dim: recorded 10 vs stored 0"):
        load_official_network(io.BytesIO(dump_official(snapshot(net))))
    net._init_kwargs = None
    with pytest.raises(ValueError, match="recorded no constructor arguments"):
        load_official_network(io.BytesIO(dump_official(snapshot(net))))
    with pytest.raises(ValueError, match="could not read the network pickle"):
        load_official_pickle(io.BytesIO(dump_official(snapshot(build_precond(state, config)))[:-100]))


# ---------------------------------------------------------------------------------------------------------------------
# Nothing in the pickle runs.


class Payload:
    """Pickles as ``func(*args)``: the classic way a pickle runs a command when loaded."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path):
    touch = "touch " + shlex.quote(str(marker))
    return {
        "os.system": (Payload(os.system, touch), f"{os.system.__module__}.system"),
        "builtins.eval": (Payload(eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"),
        "subprocess.call": (Payload(subprocess.call, ["touch", str(marker)]), "subprocess.call"),
        "builtins.exec": (Payload(exec, f"open({str(marker)!r}, 'w').close()"), "builtins.exec"),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.call", "builtins.exec"])
def test_command_payloads_are_refused_and_never_run(tmp_path, kind):
    marker = tmp_path / "payload-ran"
    payload, global_name = _payloads(marker)[kind]
    blob = pickle.dumps({"ema": payload})
    pickle.loads(blob)  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafePickleError, match=f"'{global_name}'") as err:
        load_official_pickle(io.BytesIO(blob))
    assert isinstance(err.value, pickle.UnpicklingError) and isinstance(err.value, ValueError)
    assert not marker.exists()

    # The same payload hidden deep inside an otherwise valid network.
    config, state, _ = golden()
    net = build_precond(state, config)
    net.unet.enc["8x8_block1"].clip_act = payload
    with pytest.raises(UnsafePickleError, match=f"'{global_name}'"):
        load_official_pickle(io.BytesIO(dump_official(snapshot(net))))
    assert not marker.exists()


def test_embedded_module_source_is_never_executed(tmp_path):
    config, state, _ = golden()
    marker = tmp_path / "embedded-source-ran"
    blob = dump_official(snapshot(build_precond(state, config)), embedded_source(marker))
    with imitation_modules():  # the real mechanism executes the source: the file is dangerous
        assert type(pickle.loads(blob)["ema"]).__name__ == "Precond"
    assert marker.exists() and Path(f"{marker}.system").exists()
    marker.unlink()
    Path(f"{marker}.system").unlink()

    network = load_official_network(io.BytesIO(blob))
    assert network.state_dict.keys() == state.keys()
    assert not marker.exists() and not Path(f"{marker}.system").exists()


def test_malicious_source_of_a_persistent_object_stays_text(tmp_path):
    marker = tmp_path / "malicious-source-ran"
    source = f"import os\nos.system({'touch ' + shlex.quote(str(marker))!r})\nclass EDM2Loss: pass\n"
    data = load_official_pickle(io.BytesIO(dump_official({"loss_fn": EDM2Loss()}, source)))
    assert data["loss_fn"].module_src == source and data["loss_fn"].attributes["P_std"] == 1.6
    assert not marker.exists()


def _legacy_storage_bytes(main: bytes) -> bytes:
    """Bytes in the layout of torch's legacy storage format, with ``main`` as its main record."""
    head = pickle.dumps(0x1950A86A20F9469CFC6C) + pickle.dumps(1001)
    head += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}})
    return head + main + pickle.dumps([])


class LoadFromBytes:
    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


@pytest.mark.parametrize(
    "blob, refused",
    [
        # Payloads through other opcodes and look-alike names next to the allowed ones.
        (b"(S'echo pwned'\nios\nsystem\n.", "os.system"),  # INST, protocol 0
        (b"cposix\nsystem\n(S'echo pwned'\ntR.", "posix.system"),  # GLOBAL + REDUCE, protocol 0
        (pickle.dumps(Payload(torch.load, "x.pt")), "torch.serialization.load"),
        (pickle.dumps(Payload(torch._utils._rebuild_tensor, None, 0, (1,), (1,))), "torch._utils._rebuild_tensor'"),
        (pickle.dumps(Payload(nn.Sequential)), "torch.nn.modules.container.Sequential"),
        # A command hidden inside a tensor storage's bytes.
        (pickle.dumps(LoadFromBytes(_legacy_storage_bytes(pickle.dumps(Payload(os.system, "echo pwned"))))), "system"),
        # A numpy object array (its elements are pickled objects).
        (pickle.dumps(np.array([1, "a"], dtype=object)), "numpy dtype 'O8'"),
    ],
    ids=["inst", "global-reduce", "torch.load", "rebuild_tensor_v1", "sequential", "inside-storage", "object-array"],
)
def test_other_refusals(blob, refused):
    with pytest.raises(UnsafePickleError, match=refused.replace(".", r"\.")):
        load_official_pickle(io.BytesIO(blob))


def test_lookalike_persistence_function_is_refused():
    with imitation_modules():
        persistence = sys.modules["torch_utils.persistence"]
        persistence._src_to_module = lambda src: None
        persistence._src_to_module.__module__ = "torch_utils.persistence"
        persistence._src_to_module.__qualname__ = "_src_to_module"
        blob = pickle.dumps(Payload(persistence._src_to_module, "import os"))
    with pytest.raises(UnsafePickleError, match=r"'torch_utils\.persistence\._src_to_module'"):
        load_official_pickle(io.BytesIO(blob))


# ---------------------------------------------------------------------------------------------------------------------
# Pipelines from official pickles, through the example script.


def _load_script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "convert_official.py"
    spec = importlib.util.spec_from_file_location("convert_official_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_unet(seed, **overrides):
    torch.manual_seed(seed)
    model = EDM2UNet2DModel(**tiny_unet_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _write_pickle(path, model, encoder=None):
    state, config = to_official(model)
    path.write_bytes(dump_official(snapshot(build_precond(state, config), encoder)))
    return path


def test_script_converts_a_guided_class_conditional_pair(tmp_path):
    from edm2_diffusers import EDM2Pipeline, EDMHeunScheduler

    main, guide = _random_unet(0, num_class_embeds=5), _random_unet(1, model_channels=8)
    main_pkl, guide_pkl = _write_pickle(tmp_path / "main.pkl", main), _write_pickle(tmp_path / "guide.pkl", guide)
    out = tmp_path / "pipe"
    script = _load_script()
    args = [str(main_pkl), str(out), "--guidance", str(guide_pkl), "--guidance_scale", "1.7"]
    assert script.main(args) == out
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "guidance_unet" / "diffusion_pytorch_model.safetensors").is_file()
    info = json.loads((out / "conversion.json").read_text())
    assert info["guidance_scale"] == 1.7 and info["source"] == "main.pkl" and info["guidance_source"] == "guide.pkl"
    assert info["official_config"]["label_dim"] == 5 and "guidance_scale=1.7" in (out / "README.md").read_text()

    loaded = EDM2Pipeline.from_pretrained(out)
    reference = EDM2Pipeline(unet=main, scheduler=EDMHeunScheduler(), guidance_unet=guide)
    for pipe in (loaded, reference):
        pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, num_inference_steps=3, class_labels=[1, 4], guidance_scale=1.7, output_type="np")
    a = loaded(generator=torch.Generator().manual_seed(0), **kw).images
    b = reference(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(a - b).max() <= 1e-5

    before = (out / "model_index.json").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        script.main([str(main_pkl), str(out)])
    assert (out / "model_index.json").read_text() == before and (out / "guidance_unet").is_dir()
    script.main([str(main_pkl), str(out), "--overwrite"])
    index = json.loads((out / "model_index.json").read_text())
    assert not (out / "guidance_unet").exists() and index["guidance_unet"] == [None, None]
    with pytest.raises(SystemExit):
        script.parse_args([str(main_pkl), str(out), "--guidance", str(guide_pkl)])


def test_latent_network_with_and_without_vae(tmp_path):
    from edm2_diffusers import EDM2Pipeline
    from edm2_diffusers.convert.official_pickle import convert_official_pipeline, save_converted_pipeline

    model = _random_unet(0, in_channels=4, out_channels=4)
    pkl = _write_pickle(tmp_path / "latent.pkl", model, StabilityVAEEncoder())
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)

    with_vae = save_converted_pipeline(convert_official_pipeline(pkl, vae=vae_dir), tmp_path / "with")
    pipe = EDM2Pipeline.from_pretrained(with_vae)
    assert pipe.vae is not None and pipe.config.latent_std == pytest.approx([4.17, 4.62, 3.71, 3.28], abs=1e-6)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    without = save_converted_pipeline(convert_official_pipeline(pkl), tmp_path / "without")
    readme = (without / "README.md").read_text()
    assert 'AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-mse")' in readme
    pipe = EDM2Pipeline.from_pretrained(without, vae=tiny_vae())
    assert pipe.config.latent_mean == pytest.approx([5.81, 3.25, 0.12, -2.15], abs=1e-6)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_pipeline_conversion_errors(tmp_path):
    from edm2_diffusers.convert.official_pickle import convert_official_pipeline, save_converted_pipeline

    pkl = _write_pickle(tmp_path / "pixel.pkl", _random_unet(0))
    with pytest.raises(ValueError, match="together"):
        convert_official_pipeline(pkl, guidance_pickle=pkl)
    with pytest.raises(ValueError, match="works on pixels"):
        convert_official_pipeline(pkl, vae=tiny_vae())
    latent_guide = _write_pickle(tmp_path / "latent.pkl", _random_unet(1), StabilityVAEEncoder())
    with pytest.raises(ValueError, match="latent space"):
        convert_official_pipeline(pkl, guidance_pickle=latent_guide, guidance_scale=2.0)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a pipeline folder"):
        save_converted_pipeline(convert_official_pipeline(pkl), unrelated, overwrite=True)
    assert (unrelated / "keep.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 3
