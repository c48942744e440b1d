"""Mixed precision and NVIDIA's loss details: u(σ) in float32 under autocast, bf16 autocast as the CPU stand-in for
the fp16 path, a GradScaler-skipped step that still counts (edm2-multi-gpu), zeroed non-finite gradients, the
per-image loss sum, sampling autocast and ADM's centre crop for image training."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_unet_config
from PIL import Image
from safetensors.torch import load_file
from test_training_epochs import tiny_config as epochs_tiny_config

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.data import image_to_array
from edm2_diffusers.data.latents import center_crop
from edm2_diffusers.edm import denoise, loss_weight
from edm2_diffusers.runs import sampling_autocast
from edm2_diffusers.training import edm2_loss, train
from edm2_diffusers.training import loop as loop_module
from edm2_diffusers.training.loss import zero_nonfinite_grads_
from edm2_diffusers.training.setup import make_accelerator

TINY = tiny_unet_config()


def tiny_config(tmp_path: Path, name: str, **training) -> dict:
    """Tiny G on 40 digits, 2 steps of 8 images with the rate of the images seen, checkpoints every step."""
    plain = {"num_epochs": None, "max_train_steps": 2, "train_batch_size": 8, "lr_schedule": "images"}
    plain.update(lr_warmup_epochs=0, drop_last=True)
    return epochs_tiny_config(tmp_path, name, **{**plain, **training})


# ------------------------------------------------------------------------------------------------ the loss


def test_u_sigma_stays_float32_under_autocast():
    unet = EDM2UNet2DModel(**TINY)
    dtypes = {}
    unet.logvar_linear.register_forward_hook(lambda m, i, o: dtypes.__setitem__("u", o.dtype))
    unet.out_conv.register_forward_hook(lambda m, i, o: dtypes.__setitem__("F", o.dtype))
    y = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = edm2_loss(unet, y, torch.tensor([0.3, 4.0]), torch.randn_like(y))
    assert dtypes == {"F": torch.bfloat16, "u": torch.float32}  # the U-Net autocasts, u(σ) does not
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_sum_per_image_sums_each_image_and_averages_the_batch():
    torch.manual_seed(0)
    unet = EDM2UNet2DModel(**{**TINY, "architecture": "C", "clip_act": None})  # C: non-zero output at init
    y = torch.rand(3, 1, 8, 8) * 2 - 1
    sigma, eps = torch.tensor([0.05, 0.8, 9.0]), torch.randn_like(y)
    mean = edm2_loss(unet, y, sigma, eps)
    summed = edm2_loss(unet, y, sigma, eps, reduction="sum_per_image")
    # NVIDIA: loss.sum() / batch over the per-element loss λ/e^u·(D − y)² + u
    with torch.no_grad():
        D = denoise(unet, y + sigma.view(-1, 1, 1, 1) * eps, sigma)
        u = unet.logvar(sigma.log() / 4).view(-1, 1, 1, 1)
        per_element = (loss_weight(sigma).view(-1, 1, 1, 1) / u.exp()) * (D - y) ** 2 + u
    assert summed.item() == pytest.approx(per_element.sum().item() / 3, rel=1e-5)
    assert summed.item() == pytest.approx(mean.item() * 64, rel=1e-5)  # C·H·W = 64 elements per image
    (g_mean,) = torch.autograd.grad(mean, unet.out_conv.weight)
    (g_sum,) = torch.autograd.grad(summed, unet.out_conv.weight)
    torch.testing.assert_close(g_sum, 64 * g_mean, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="reduction"):
        edm2_loss(unet, y, sigma, eps, reduction="sum")


def test_zero_nonfinite_grads_zeroes_only_nan_and_inf():
    layer = torch.nn.Linear(3, 2)
    layer.weight.grad = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 0.5, float("-inf")]])
    layer.bias.grad = None
    zero_nonfinite_grads_(layer)
    assert torch.equal(layer.weight.grad, torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.5, 0.0]]))
    assert layer.bias.grad is None


def test_zero_nonfinite_grads_turns_the_grad_scaler_off(tmp_path):
    base = {"output_dir": str(tmp_path), "report_to": "none", "mixed_precision": "no", "seed": 0}
    base["logging_dir"] = "logs"
    nvidia = make_accelerator({**base, "zero_nonfinite_grads": True})
    assert nvidia.scaler_handler is not None and nvidia.scaler_handler.to_kwargs() == {"enabled": False}
    dynamic = make_accelerator({**base, "zero_nonfinite_grads": False})
    assert dynamic.scaler_handler is None or dynamic.scaler_handler.to_kwargs() == {}


# ------------------------------------------------------------------------------------------------ the loop


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose precision cannot change; other precisions need a fresh one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_trains_on_cpu_and_changes_the_numerics(tmp_path, fresh_accelerate_state):
    # Accelerate autocasts bf16 on a CPU (no fp16 there): the stand-in for the fp16 GPU path of the seed configs.
    fp32 = train(tiny_config(tmp_path, "fp32"))
    AcceleratorState._reset_state(reset_partial_state=True)
    bf16 = train(tiny_config(tmp_path, "bf16", mixed_precision="bf16"))
    assert fp32.step == bf16.step == 2
    a = load_file(str(tmp_path / "fp32" / "checkpoint-2" / "model.safetensors"))
    b = load_file(str(tmp_path / "bf16" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in b.values())
    assert all(t.dtype == torch.float32 for t in b.values())  # weights stay float32
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the forward really ran in bf16


def test_a_step_the_grad_scaler_skips_still_counts(tmp_path, monkeypatch, caplog):
    # On a GPU, fp16 training overflows now and then: the GradScaler skips that update and lowers the scale. A CPU
    # has no fp16 autocast, so a real (CPU) GradScaler is put into the Accelerator with a scale that overflows the
    # first step's gradients (the loss itself stays finite) and backs off to a sane one after it.
    real = loop_module.make_accelerator

    def with_scaler(train_cfg):
        accelerator = real(train_cfg)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=3e38, backoff_factor=2.0**-120)
        return accelerator

    monkeypatch.setattr(loop_module, "make_accelerator", with_scaler)
    with caplog.at_level(logging.INFO, logger="edm2_diffusers.training.loop"):
        cfg = tiny_config(tmp_path, "scaled", max_train_steps=3)
        cfg["ema"] = {"type": "traditional", "beta": 0.9993, "warmup": "ema_pytorch"}  # it counts its updates
        result = train(cfg)
    assert "step 1: the fp16 gradients overflowed" in caplog.text
    # edm2-multi-gpu's rule: the loop step, its images and the EMA update go on; Adam took 2 steps, not 3
    assert result.step == 3 and result.images_seen == 24
    run = tmp_path / "scaled"
    adam = [torch.load(run / f"checkpoint-{s}" / "optimizer.bin", weights_only=True)["state"] for s in (1, 3)]
    assert adam[0] == {}  # nothing was applied at step 1
    assert {int(state["step"]) for state in adam[1].values()} == {2}
    ema_state = json.loads((run / "checkpoint-3" / "ema_state.json").read_text())
    assert ema_state["num_updates"] == 3  # the EMA was updated at the skipped step too
    scale = torch.load(run / "checkpoint-1" / "scaler.pt", weights_only=True)["scale"]
    assert scale == pytest.approx(3e38 * 2.0**-120)


# ------------------------------------------------------------------------------------------------ sampling, data


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_sampling_autocast_is_fp16_on_a_gpu_and_nothing_on_a_cpu():
    fp16 = {"sampling": {"mixed_precision": "fp16"}}
    with sampling_autocast(fp16, "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with sampling_autocast({"sampling": {"mixed_precision": "no"}}, "cuda"):
        assert not torch.is_autocast_enabled("cuda")
    ctx = sampling_autocast(fp16, "cuda")
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.float16
    assert sampling_autocast({"sampling": {"mixed_precision": "bf16"}}, "cuda").fast_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sampling.mixed_precision"):
        sampling_autocast({"sampling": {"mixed_precision": "fp8"}}, "cuda")


def test_dhariwal_crop_is_the_adm_centre_crop():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    adm = image_to_array(image, 64, 3, crop="dhariwal")
    want = center_crop(image, 64).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    np.testing.assert_array_equal(adm, want)
    plain = image_to_array(image, 64, 3)  # one bicubic resize: a different image
    assert adm.shape == plain.shape == (3, 64, 64) and not np.array_equal(adm, plain)
