"""EDM2UNet2DModel: golden parity, sizes, serialization, forced weight normalization, input checks."""

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GOLDEN, golden_config, golden_state, load_golden, tiny_unet_config

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.convert import from_multigpu, from_official
from edm2_diffusers.edm import denoise

CONFIGS = Path(__file__).parents[1] / "configs"

GOLDEN_FILES = [
    "edm2_official_unet.safetensors",
    "official_cond_unet.safetensors",
    "multigpu_unetC.safetensors",
    "multigpu_unetE.safetensors",
    "multigpu_unetC_multihead.safetensors",
    "multigpu_unetE_multihead.safetensors",
    "multigpu_unetG.safetensors",
]


def convert_golden(name):
    meta, tensors = load_golden(name)
    state, config = golden_state(tensors), golden_config(meta)
    if name.startswith("multigpu"):
        return from_multigpu(state, config, meta["architecture"]), tensors
    return from_official(state, config), tensors


def assert_parity(ours, ref):
    err = (ours - ref).abs().max() / ref.abs().max()
    assert err <= 1e-4, f"max error {err:.3g} relative to the reference's largest magnitude"


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_parity(name):
    assert (GOLDEN / name).exists()
    model, t = convert_golden(name)
    with torch.no_grad():
        D, u = denoise(model, t["in.x"], t["in.sigma"], class_labels=t.get("in.class_labels"), return_logvar=True)
    assert D.shape == t["out.denoised"].shape and u.shape == t["out.logvar"].shape
    assert_parity(D, t["out.denoised"])
    assert_parity(u, t["out.logvar"])


def test_golden_parity_is_sensitive():
    """A perturbed weight or a wrong label breaks parity, so the tolerance is meaningful."""
    model, t = convert_golden("official_cond_unet.safetensors")
    labels = t["in.class_labels"].roll(1, dims=1)
    with torch.no_grad():
        D = denoise(model, t["in.x"], t["in.sigma"], class_labels=labels)
    assert (D - t["out.denoised"]).abs().max() / t["out.denoised"].abs().max() > 1e-4
    model, t = convert_golden("multigpu_unetE.safetensors")
    with torch.no_grad():
        model.enc["8x8_block0"].attn_qkv.weight.mul_(-1)
        D = denoise(model, t["in.x"], t["in.sigma"])
    assert (D - t["out.denoised"]).abs().max() / t["out.denoised"].abs().max() > 1e-4


def test_multigpu_g_parity_needs_its_own_g():
    """edm2-multi-gpu's UNetG: a perturbed weight or NVIDIA's middle blocks break parity; its options are recorded."""
    model, t = convert_golden("multigpu_unetG.safetensors")
    assert (model.config.pixel_norm, model.config.mid_flavor, model.config.emb_gain_init) == ("rms", "enc", 1.0)

    def error(net):
        with torch.no_grad():
            D = denoise(net, t["in.x"], t["in.sigma"])
        return ((D - t["out.denoised"]).abs().max() / t["out.denoised"].abs().max()).item()

    assert error(model) <= 1e-5
    for name in ("dec.8x8_in0.emb_gain", "dec.16x16_block0.conv_res0.weight", "enc.8x8_block0.attn_qkv.weight"):
        perturbed = copy.deepcopy(model)
        param = perturbed.get_parameter(name)
        with torch.no_grad():  # weights are normalized when used: change their direction, not only their scale
            param.add_(0.1 * param.abs().mean() * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
        assert error(perturbed) > 1e-4, name
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    nvidia_middle = EDM2UNet2DModel(**{**config, "mid_flavor": "dec"}).eval()
    nvidia_middle.load_state_dict(model.state_dict())
    assert error(nvidia_middle) > 1e-2
    nvidia_norm = EDM2UNet2DModel(**{**config, "pixel_norm": "edm2"}).eval()
    nvidia_norm.load_state_dict(model.state_dict())
    assert error(nvidia_norm) > 10 * error(model)  # ε inside vs outside the root: small but measurable here


def test_g_options_default_to_nvidia_and_belong_to_g():
    g = EDM2UNet2DModel(**tiny_unet_config(architecture="G"))
    assert (g.config.pixel_norm, g.config.mid_flavor, g.config.emb_gain_init) == ("edm2", "dec", 0.0)
    assert all(b.emb_gain.item() == 0 for b in g.enc.values() if hasattr(b, "emb_gain"))
    ours = EDM2UNet2DModel(**tiny_unet_config(architecture="G", emb_gain_init=1.0, mid_flavor="enc"))
    assert all(b.emb_gain.item() == 1 for b in ours.dec.values())
    assert all(b.flavor == "enc" for n, b in ours.dec.items() if n.endswith(("_in0", "_in1")))
    for bad, match in (({"pixel_norm": "l2"}, "pixel_norm"), ({"mid_flavor": "up"}, "mid_flavor")):
        with pytest.raises(ValueError, match=match):
            EDM2UNet2DModel(**tiny_unet_config(architecture="G", **bad))
    with pytest.raises(ValueError, match="Config G only"):
        EDM2UNet2DModel(**tiny_unet_config(architecture="E", pixel_norm="rms"))


def test_integer_labels_match_one_hot():
    model, t = convert_golden("official_cond_unet.safetensors")
    indices = t["in.class_labels"].argmax(dim=1)
    with torch.no_grad():
        D = denoise(model, t["in.x"], t["in.sigma"], class_labels=indices)
    assert_parity(D, t["out.denoised"])


# Trainable parameters of edm2-multi-gpu's networks (sum of requires_grad parameters, without the u(σ) head).
# CIFAR: the counts its model/unetC.py, unetE.py and unetG.py print for their CIFAR-10 size (39.509888 M,
# 39.509888 M, 39.542685 M). Tiny-ImageNet: counted with its UNetC/UNetE/UNetG constructors at config/tinyimagenet's
# network (image_shape [3, 64, 64], n_channels 128, ch_mults [1, 2, 2, 2], is_attn at 16x16, n_blocks 5).
EXPECTED_SIZES = {
    "cifar10": {"C": 39_509_888, "E": 39_509_888, "G": 39_542_685},
    "cifar100": {"C": 39_509_888, "E": 39_509_888, "G": 39_542_685},
    "tinyimagenet": {"C": 62_414_720, "E": 62_414_720, "G": 62_447_533},
}


@pytest.mark.parametrize("dataset", sorted(EXPECTED_SIZES))
@pytest.mark.parametrize("arch", ["C", "E", "G"])
def test_config_parameter_counts(dataset, arch):
    cfg = yaml.safe_load((CONFIGS / dataset / f"{arch}.yaml").read_text())
    with torch.device("meta"):
        model = EDM2UNet2DModel(**cfg["model"])
    assert model.config.architecture == arch
    assert model.num_parameters_without_logvar() == EXPECTED_SIZES[dataset][arch]


@pytest.mark.parametrize("name", [n for n in GOLDEN_FILES if n.startswith("multigpu")])
def test_parameter_count_equals_the_reference_state_dict(name):
    # The reference's own trainable tensors: its network's state dict without the fixed Fourier features.
    meta, tensors = load_golden(name)
    reference = sum(
        v.numel() for k, v in golden_state(tensors).items() if k.startswith("nn_model.") and ".fourier." not in k
    )
    model, _ = convert_golden(name)
    assert model.num_parameters_without_logvar() == reference


@pytest.mark.parametrize("arch", ["C", "E", "G"])
def test_save_and_load_roundtrip(tmp_path, arch):
    model = EDM2UNet2DModel(**tiny_unet_config(architecture=arch, num_class_embeds=3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([-1.0, 0.5]), torch.tensor([0, 2])
    with torch.no_grad():
        before = model(x, t, class_labels=y).sample
    model.save_pretrained(tmp_path / "unet", safe_serialization=True)
    files = sorted(p.name for p in (tmp_path / "unet").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = EDM2UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.architecture == arch
    with torch.no_grad():
        after = loaded(x, t, class_labels=y).sample
    assert torch.equal(before, after)


def test_return_dict_and_logvar_shapes():
    model = EDM2UNet2DModel(**tiny_unet_config()).eval()
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.zeros(3), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == x.shape
    assert model(x, 0.25).sample.shape == x.shape  # scalar timestep broadcasts
    assert model.logvar(torch.zeros(3)).shape == (3,)
    names = [n for n, _ in model.named_parameters() if "logvar" in n]
    assert names and all(n.startswith("logvar") for n in names)


@pytest.mark.parametrize("arch", ["E", "G"])
def test_forced_weight_normalization(arch):
    model = EDM2UNet2DModel(**tiny_unet_config(architecture=arch))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(3.0)
    weights = {n: p for n, p in model.named_parameters() if p.ndim > 1}
    before = {n: p.detach().clone() for n, p in weights.items()}
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8), torch.zeros(2))
    for n, p in weights.items():
        assert torch.equal(p, before[n]), f"{n} changed in an eval forward"
    model.train()
    model(torch.randn(2, 1, 8, 8), torch.zeros(2)).sample.sum().backward()
    model.logvar(torch.zeros(2)).sum().backward()
    for n, p in weights.items():
        norms = p.detach().flatten(1).norm(dim=1) / math.sqrt(p[0].numel())
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3), f"{n} is not unit-norm per output channel"


def test_config_c_keeps_weights():
    model = EDM2UNet2DModel(**tiny_unet_config(architecture="C", clip_act=None)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 1, 8, 8), torch.zeros(2))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown architecture 'F'"):
        EDM2UNet2DModel(**tiny_unet_config(architecture="F"))
    with pytest.raises(ValueError, match="sample_size 10 is not divisible"):
        EDM2UNet2DModel(**tiny_unet_config(sample_size=10, channel_mult=(1, 2, 2)))
    model = EDM2UNet2DModel(**tiny_unet_config())
    with pytest.raises(ValueError, match="unconditional model"):
        model(torch.randn(1, 1, 8, 8), torch.zeros(1), class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="has 3 channels but the model expects in_channels=1"):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1))
    cond = EDM2UNet2DModel(**tiny_unet_config(num_class_embeds=4))
    with pytest.raises(ValueError, match="class label out of range"):
        cond(torch.randn(2, 1, 8, 8), torch.zeros(2), class_labels=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"one-hot of shape \(N, 4\)"):
        cond(torch.randn(2, 1, 8, 8), torch.zeros(2), class_labels=torch.zeros(2, 5))


@pytest.mark.parametrize("arch", ["C", "G"])
def test_fused_attention_matches_explicit_formula(arch):
    from edm2_diffusers.models.layers import normalize, rms_normalize

    block = EDM2UNet2DModel(**tiny_unet_config(architecture=arch, channels_per_head=8)).enc["4x4_block0"].eval()
    x = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        fused = block._attention(x)
        qkv = block.attn_qkv(x).reshape(2, block.num_heads, 32 // block.num_heads, 3, 16)
        qkv = normalize(qkv, dim=2) if arch == "G" else rms_normalize(qkv, dim=2)
        q, k, v = qkv.unbind(3)
        w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        explicit = block.attn_proj(torch.einsum("nhqk,nhck->nhcq", w, v).reshape(2, 32, 4, 4))
    assert (fused - explicit).abs().max() <= 1e-5


def test_inference_weight_cache_is_refreshed():
    model = EDM2UNet2DModel(**tiny_unet_config(architecture="E")).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with torch.no_grad():
        first = model(x, t).sample
        assert torch.equal(first, model(x, t).sample)
        layer = model.out_conv
        assert layer.effective_weight() is layer.effective_weight()  # cached, not recomputed
        layer.weight.mul_(-1)  # in-place change
        flipped = model(x, t).sample
    assert not torch.equal(first, flipped)
    other = EDM2UNet2DModel(**tiny_unet_config(architecture="E"))
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, other.eval()(x, t).sample)
    # Gradients still reach the weights outside no_grad, even in eval mode.
    model(x, t).sample.sum().backward()
    assert model.out_conv.weight.grad is not None


@pytest.mark.parametrize("arch", ["C", "E", "G"])
def test_autocast_bfloat16_training_step(arch):
    """Mixed precision as Accelerate applies it: forward and backward run under autocast and stay finite."""
    model = EDM2UNet2DModel(**tiny_unet_config(architecture=arch, num_class_embeds=3)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D, u = denoise(
            model, torch.randn(2, 1, 8, 8), torch.tensor([0.3, 2.0]), torch.tensor([0, 2]), return_logvar=True
        )
        loss = (D.float() ** 2).mean() + u.float().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mp_sum_promotes_mixed_precision_inputs():
    from edm2_diffusers.models.layers import mp_sum

    a, b = torch.randn(4), torch.randn(4).bfloat16()
    out = mp_sum(a, b, t=0.3)
    assert out.dtype == torch.float32
    assert torch.allclose(out, (0.7 * a + 0.3 * b.float()) / math.sqrt(0.7**2 + 0.3**2))
