"""Checkpoint conversion beyond the golden files: round trips and clear errors."""

import pytest
import torch
from conftest import golden_config, golden_state, load_golden, tiny_unet_config

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.convert import from_multigpu, from_official, official_to_config, to_official
from edm2_diffusers.edm import denoise


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_class_embeds=7),
        dict(sample_size=16, channel_mult=(1, 2, 3), attn_resolutions=(8, 4), channels_per_head=8, num_blocks=2),
        dict(in_channels=4, out_channels=4, model_channels=8, attn_resolutions=(), channel_mult_emb=3),
    ],
)
def test_official_roundtrip(overrides):
    model = EDM2UNet2DModel(**tiny_unet_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 0:
                p.fill_(0.4)
    state, config = to_official(model)
    assert all(k.startswith(("unet.", "logvar_")) for k in state)
    converted = from_official(state, config)
    c = model.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    labels = torch.tensor([1, 6]) if c.num_class_embeds else None
    with torch.no_grad():
        a, ua = denoise(model, x, torch.tensor([0.1, 5.0]), labels, return_logvar=True)
        b, ub = denoise(converted, x, torch.tensor([0.1, 5.0]), labels, return_logvar=True)
    assert torch.equal(a, b) and torch.equal(ua, ub)


def test_official_defaults_fill_missing_keys():
    config = official_to_config({"img_resolution": 64, "img_channels": 3})
    assert config["model_channels"] == 192 and config["channel_mult"] == [1, 2, 3, 4]
    assert config["attn_resolutions"] == [16, 8] and config["num_class_embeds"] is None


def test_official_errors():
    meta, tensors = load_golden("edm2_official_unet.safetensors")
    state, config = golden_state(tensors), golden_config(meta)
    with pytest.raises(ValueError, match="lacks required key"):
        from_official(state, {"img_channels": 3})
    with pytest.raises(ValueError, match="unsupported key"):
        from_official(state, {**config, "mystery": 1})
    with pytest.raises(ValueError, match="missing"):
        from_official({k: v for k, v in state.items() if "out_conv" not in k}, config)
    with pytest.raises(ValueError, match="shape"):
        from_official(state, {**config, "logvar_channels": 16})


def test_multigpu_errors():
    meta, tensors = load_golden("multigpu_unetC.safetensors")
    state, config = golden_state(tensors), golden_config(meta)
    with pytest.raises(ValueError, match="'C', 'E' or 'G'"):
        from_multigpu(state, config, "H")
    with pytest.raises(ValueError, match="does not match"):  # a Config C checkpoint is not its UNetG
        from_multigpu(state, config, "G")
    meta_g, tensors_g = load_golden("multigpu_unetG.safetensors")
    with pytest.raises(ValueError, match="does not match"):  # nor the other way round
        from_multigpu(golden_state(tensors_g), golden_config(meta_g), "E")
    with pytest.raises(ValueError, match="no official counterpart"):  # its UNetG is not NVIDIA's G
        to_official(from_multigpu(golden_state(tensors_g), golden_config(meta_g), "G"))
    with pytest.raises(ValueError, match="reweight_mlp"):
        from_multigpu({k: v for k, v in state.items() if k.startswith("nn_model")}, config, "C")
    with pytest.raises(ValueError, match="n_blocks must be at least 2"):
        from_multigpu(state, {**config, "n_blocks": 1}, "C")
    with pytest.raises(ValueError, match="does not match"):
        from_multigpu(state, {**config, "n_blocks": 4}, "C")
