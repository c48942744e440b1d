"""EDM2Pipeline: schedulers, output types, class labels, guidance, save/load and latent decoding."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_unet_config, tiny_vae
from diffusers import AutoencoderKL, EDMDPMSolverMultistepScheduler, EDMEulerScheduler
from PIL import Image

from edm2_diffusers import EDM2Pipeline, EDM2UNet2DModel, EDMHeunScheduler
from edm2_diffusers.edm import denoise, karras_sigmas
from edm2_diffusers.latents import SD_VAE_LATENT_MEAN, SD_VAE_LATENT_STD, standardize_latents, unstandardize_latents

SCHEDULERS = [EDMHeunScheduler, EDMEulerScheduler, EDMDPMSolverMultistepScheduler]


@torch.no_grad()
def heun_reference(unet, x, t):
    """EDM's Algorithm 2 written out (deterministic): Heun steps through the noise levels ``t`` (ending at 0)."""
    for i in range(len(t) - 1):
        d = (x - denoise(unet, x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] > 0:
            x_next = x + (t[i + 1] - t[i]) * 0.5 * (d + (x_next - denoise(unet, x_next, t[i + 1])) / t[i + 1])
        x = x_next
    return x


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    unet = EDM2UNet2DModel(**tiny_unet_config(**overrides)).eval()
    with torch.no_grad():  # Config G zero-initializes its output and embedding gains; an F that ignored σ and the
        for name, p in unet.named_parameters():  # labels would make these tests vacuous
            if name.endswith("gain"):
                p.fill_(0.8)
    return unet


def make_pipe(unet=None, scheduler=None, **kwargs):
    pipe = EDM2Pipeline(unet=unet or tiny_unet(), scheduler=scheduler or EDMHeunScheduler(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_close_to_scale(a, b, tol=1e-4):
    """Max difference relative to the largest magnitude: float32 rounding, amplified by an untrained network."""
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err < tol, f"max difference {err:.3g} relative to the largest magnitude"


class CountCalls:
    """Counts forward calls of a real module through a forward hook."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


@pytest.mark.parametrize("scheduler_cls", SCHEDULERS)
def test_every_scheduler_gives_finite_reproducible_images(scheduler_cls):
    pipe = make_pipe(scheduler=scheduler_cls())
    a = pipe(batch_size=2, num_inference_steps=3, generator=gen(0), output_type="np").images
    b = pipe(batch_size=2, num_inference_steps=3, generator=gen(0), output_type="np").images
    c = pipe(batch_size=2, num_inference_steps=3, generator=gen(1), output_type="np").images
    assert a.shape == (2, 8, 8, 1) and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 0


@pytest.mark.parametrize("steps", [1, 3])
def test_heun_pipeline_evaluates_unet_2n_minus_1_times(steps):
    pipe = make_pipe()
    counter = CountCalls(pipe.unet)
    pipe(batch_size=1, num_inference_steps=steps, generator=gen(0), output_type="np")
    assert counter.n == 2 * steps - 1


def test_pipeline_loop_matches_denoiser_heun_loop():
    # The generic pipeline loop with the scheduler == Algorithm 2 written over edm.denoise (D-space).
    pipe = make_pipe()
    n = 4
    out = pipe(batch_size=2, num_inference_steps=n, generator=gen(3), output_type="latent").images
    x = torch.randn(2, 1, 8, 8, generator=gen(3)) * 80.0
    t = karras_sigmas(n).tolist() + [0.0]
    x = heun_reference(pipe.unet, x, t)
    assert_close_to_scale(out, x)


def test_output_types():
    pipe = make_pipe(unet=tiny_unet(in_channels=3, out_channels=3))
    kw = dict(batch_size=2, num_inference_steps=2)
    pil = pipe(generator=gen(0), **kw).images
    np_images = pipe(generator=gen(0), output_type="np", **kw).images
    pt = pipe(generator=gen(0), output_type="pt", **kw).images
    latent = pipe(generator=gen(0), output_type="latent", **kw).images
    (tup,) = pipe(generator=gen(0), output_type="np", return_dict=False, **kw)
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (8, 8) and im.mode == "RGB" for im in pil)
    assert np_images.shape == (2, 8, 8, 3) and np_images.min() >= 0 and np_images.max() <= 1
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 8, 8)
    assert np.array_equal(pt.permute(0, 2, 3, 1).numpy(), np_images)
    assert np.array_equal(tup, np_images)
    # model space [-1, 1] -> [0, 1]
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))
    assert np.array_equal(np.asarray(pil[0]), (np_images[0] * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="output_type"):
        pipe(generator=gen(0), output_type="tensor", **kw)


def test_given_latents_and_generator_lists():
    pipe = make_pipe()
    noise = torch.randn(2, 1, 8, 8, generator=gen(5))
    a = pipe(batch_size=2, num_inference_steps=2, latents=noise, output_type="np").images
    b = pipe(batch_size=2, num_inference_steps=2, generator=gen(5), output_type="np").images
    assert np.array_equal(a, b)
    per_sample = pipe(batch_size=2, num_inference_steps=2, generator=[gen(1), gen(2)], output_type="np").images
    single = pipe(batch_size=1, num_inference_steps=2, generator=gen(2), output_type="np").images
    np.testing.assert_allclose(per_sample[1], single[0], atol=1e-6)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(batch_size=3, latents=noise)
    with pytest.raises(ValueError, match="generators"):
        pipe(batch_size=3, generator=[gen(0)])


def test_pipeline_leaves_train_mode_alone():
    unet = tiny_unet().train()
    make_pipe(unet=unet)(batch_size=1, num_inference_steps=2, generator=gen(0), output_type="np")
    assert unet.training


def test_random_class_labels_when_none_given():
    pipe = make_pipe(unet=tiny_unet(num_class_embeds=4))
    # compare raw samples: an untrained network's images saturate at 0 and 1
    kw = dict(batch_size=8, num_inference_steps=2, output_type="latent")
    random = pipe(generator=gen(0), **kw).images.numpy()
    assert np.array_equal(random, pipe(generator=gen(0), **kw).images.numpy())
    # each image must be exactly the image of one explicit class for the same noise
    per_class = [pipe(generator=gen(0), class_labels=[c] * 8, **kw).images.numpy() for c in range(4)]
    drawn = []
    for i in range(8):
        matches = [c for c in range(4) if np.array_equal(random[i], per_class[c][i])]
        assert len(matches) == 1
        drawn.append(matches[0])
    assert len(set(drawn)) > 1  # labels vary across the batch
    # labels differ between seeds too, and they are not the all-zero (unconditional) input
    assert not np.array_equal(random, pipe(generator=gen(1), **kw).images.numpy())


def test_class_labels_indices_one_hot_and_errors():
    pipe = make_pipe(unet=tiny_unet(num_class_embeds=4))
    kw = dict(batch_size=3, num_inference_steps=2, output_type="latent")
    by_index = pipe(generator=gen(0), class_labels=[0, 3, 1], **kw).images
    by_tensor = pipe(generator=gen(0), class_labels=torch.tensor([0, 3, 1]), **kw).images
    one_hot = pipe(generator=gen(0), class_labels=torch.eye(4)[[0, 3, 1]], **kw).images
    assert torch.equal(by_index, by_tensor) and torch.equal(by_index, one_hot)
    other = pipe(generator=gen(0), class_labels=[2, 2, 2], **kw).images
    assert not torch.equal(by_index, other)
    broadcast = pipe(generator=gen(0), class_labels=2, **kw).images
    assert torch.equal(broadcast, other)
    with pytest.raises(ValueError, match="out of range"):
        pipe(generator=gen(0), class_labels=[0, 4, 1], **kw)
    with pytest.raises(ValueError, match="out of range"):
        pipe(generator=gen(0), class_labels=[-1, 0, 1], **kw)
    with pytest.raises(ValueError, match="batch_size"):
        pipe(generator=gen(0), class_labels=[0, 1], **kw)
    with pytest.raises(ValueError, match="4 columns"):
        pipe(generator=gen(0), class_labels=torch.eye(5)[:3], **kw)
    with pytest.raises(ValueError, match="integer class indices"):
        pipe(generator=gen(0), class_labels=[0.5, 1.0, 2.0], **kw)
    with pytest.raises(ValueError, match="unconditional"):
        make_pipe()(batch_size=1, num_inference_steps=2, class_labels=[0])


def test_guidance_scale_one_is_exactly_unguided_and_skips_the_guide():
    unet, guide = tiny_unet(0), tiny_unet(1)
    kw = dict(batch_size=2, num_inference_steps=3, output_type="pt")
    plain = make_pipe(unet=unet)(generator=gen(0), **kw).images
    guided_pipe = make_pipe(unet=unet, guidance_unet=guide)
    counter = CountCalls(guide)
    same = guided_pipe(generator=gen(0), guidance_scale=1.0, **kw).images
    assert torch.equal(same, plain)
    assert counter.n == 0
    w2 = guided_pipe(generator=gen(0), guidance_scale=2.0, **kw).images
    assert counter.n == 5
    assert not torch.equal(w2, plain)
    with pytest.raises(ValueError, match="guidance_unet"):
        make_pipe(unet=unet)(generator=gen(0), guidance_scale=2.0, **kw)


def test_guidance_in_F_equals_guidance_in_D():
    # D = c_skip·x + c_out·F is affine in F with the same coefficients for both networks, so
    # F_g + w·(F_m − F_g) yields D_g + w·(D_m − D_g).
    unet, guide = tiny_unet(0, num_class_embeds=3), tiny_unet(1)
    sched = EDMHeunScheduler()
    x = torch.randn(4, 1, 8, 8) * 3
    labels = torch.eye(3)[[0, 1, 2, 1]]
    with torch.no_grad():
        for sigma in (0.01, 0.7, 25.0):
            for w in (0.5, 1.7, 3.0):
                D_m = denoise(unet, x, sigma, class_labels=labels)
                D_g = denoise(guide, x, sigma)
                c_in_x = sched.precondition_inputs(x, sigma)
                c_noise = sched.precondition_noise(torch.tensor(sigma))
                F_m = unet(c_in_x, c_noise, class_labels=labels).sample
                F_g = guide(c_in_x, c_noise).sample
                from_F = sched.precondition_outputs(x, F_g + w * (F_m - F_g), sigma)
                torch.testing.assert_close(from_F, D_g + w * (D_m - D_g), rtol=1e-5, atol=1e-5)


def test_guided_pipeline_matches_D_space_guidance_loop():
    unet, guide = tiny_unet(0, num_class_embeds=3), tiny_unet(1, num_class_embeds=3)
    pipe = make_pipe(unet=unet, guidance_unet=guide)
    n, w, labels = 3, 2.5, [2, 0]
    out = pipe(2, n, gen(4), class_labels=labels, guidance_scale=w, output_type="latent").images
    x = torch.randn(2, 1, 8, 8, generator=gen(4)) * 80.0
    onehot = torch.eye(3)[labels]

    def D(x, s):
        D_g = denoise(guide, x, s, class_labels=onehot)  # a conditional guide gets the same labels
        return D_g + w * (denoise(unet, x, s, class_labels=onehot) - D_g)

    t = karras_sigmas(n).tolist() + [0.0]
    with torch.no_grad():
        for i in range(n):
            d = (x - D(x, t[i])) / t[i]
            x_next = x + (t[i + 1] - t[i]) * d
            if t[i + 1] > 0:
                x_next = x + (t[i + 1] - t[i]) * 0.5 * (d + (x_next - D(x_next, t[i + 1])) / t[i + 1])
            x = x_next
    assert_close_to_scale(out, x)


def test_guide_labels_follow_the_guide():
    unet = tiny_unet(0, num_class_embeds=3)
    kw = dict(batch_size=2, num_inference_steps=2, class_labels=[0, 2], guidance_scale=2.0, output_type="np")
    uncond_guide = tiny_unet(1)
    images = make_pipe(unet=unet, guidance_unet=uncond_guide)(generator=gen(0), **kw).images
    assert np.isfinite(images).all()
    wrong_classes = make_pipe(unet=unet, guidance_unet=tiny_unet(1, num_class_embeds=5))
    with pytest.raises(ValueError, match="num_class_embeds"):
        wrong_classes(generator=gen(0), **kw)
    with pytest.raises(ValueError, match="sample_size"):
        EDM2Pipeline(unet=unet, scheduler=EDMHeunScheduler(), guidance_unet=tiny_unet(1, sample_size=16))


@pytest.mark.parametrize("with_guide", [False, True])
def test_save_and_load_reproduce_images(tmp_path, with_guide):
    unet = tiny_unet(0, num_class_embeds=3)
    guide = tiny_unet(1) if with_guide else None
    pipe = make_pipe(unet=unet, guidance_unet=guide, scheduler=EDMHeunScheduler(s_churn=5.0, s_tmax=10.0))
    kw = dict(batch_size=2, num_inference_steps=3, output_type="np", guidance_scale=1.8 if with_guide else 1.0)
    before = pipe(generator=gen(0), **kw).images
    pipe.save_pretrained(tmp_path)
    loaded = EDM2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, EDMHeunScheduler) and loaded.scheduler.config.s_churn == 5.0
    assert (loaded.guidance_unet is None) == (not with_guide)
    assert loaded.vae is None
    assert np.array_equal(loaded(generator=gen(0), **kw).images, before)


def test_scheduler_swap_by_config():
    pipe = make_pipe()
    pipe.scheduler = EDMEulerScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.sigma_max == 80.0 and pipe.scheduler.config.prediction_type == "epsilon"
    images = pipe(batch_size=1, num_inference_steps=3, generator=gen(0), output_type="np").images
    assert np.isfinite(images).all()


def test_latent_pipeline_decodes_to_image_size(tmp_path):
    vae = tiny_vae()
    pipe = make_pipe(unet=tiny_unet(in_channels=4, out_channels=4), vae=vae)
    assert pipe.config.latent_mean == list(SD_VAE_LATENT_MEAN)
    assert pipe.config.latent_std == list(SD_VAE_LATENT_STD)
    images = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    pil = pipe(batch_size=1, num_inference_steps=2, generator=gen(0)).images
    assert pil[0].size == (16, 16)

    pipe.save_pretrained(tmp_path)
    loaded = EDM2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL) and loaded.config.latent_std == list(SD_VAE_LATENT_STD)
    again = loaded(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="np").images
    np.testing.assert_allclose(again, images, atol=1e-6)


def test_latent_decoding_undoes_the_standardization_without_the_vae_scaling_factor():
    vae = tiny_vae()
    mean, std = [0.5, -1.0, 2.0, 0.0], [2.0, 4.0, 1.0, 3.0]
    pipe = make_pipe(unet=tiny_unet(in_channels=4, out_channels=4), vae=vae, latent_mean=mean, latent_std=std)
    x = torch.randn(2, 4, 8, 8)
    raw = torch.stack([x[:, c] * (std[c] / 0.5) + mean[c] for c in range(4)], dim=1)
    with torch.no_grad():
        expected = vae.decode(raw).sample.clamp(0, 1)
        torch.testing.assert_close(pipe.decode(x), expected)
    torch.testing.assert_close(unstandardize_latents(x, mean, std), raw)
    torch.testing.assert_close(standardize_latents(raw, mean, std), x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latent_mean"):
        make_pipe(unet=tiny_unet(in_channels=4, out_channels=4), vae=vae, latent_mean=[0.0])


def test_pipeline_default_latent_final_std():
    assert math.isclose(pipe_default_final_std(), 0.5)


def pipe_default_final_std():
    return make_pipe().config.latent_final_std


# -- diffusers call conventions: callbacks, interrupt, sigmas, batch size from labels, stored defaults --


def manual_loop(pipe, noise, n, edit_at=None, edit=None):
    """The pipeline's loop written out with its scheduler and unet; `edit` replaces the sample after step `edit_at`."""
    sched = pipe.scheduler
    sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            F = pipe.unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(F, t, x).prev_sample
            if i == edit_at:
                x = edit(x)
    return x


def test_callback_on_step_end_sees_every_step_and_can_replace_the_latents():
    pipe = make_pipe()
    kw = dict(batch_size=2, num_inference_steps=3, output_type="latent")
    seen = []

    def record(p, step, timestep, callback_kwargs):
        assert p is pipe and set(callback_kwargs) == {"latents"}
        seen.append((step, float(timestep), callback_kwargs["latents"].clone()))
        return {}

    plain = pipe(generator=gen(0), callback_on_step_end=record, **kw).images
    assert pipe.num_timesteps == 5
    assert [s for s, _, _ in seen] == [0, 1, 2, 3, 4]  # once per network evaluation, in order
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2], plain)  # the callback sees the sample the next evaluation gets

    def double_at_end(p, step, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] * 2 + 1} if step == 4 else {}

    assert torch.equal(pipe(generator=gen(0), callback_on_step_end=double_at_end, **kw).images, plain * 2 + 1)

    def halve_at_2(p, step, timestep, callback_kwargs):
        return {"latents": callback_kwargs["latents"] * 0.5} if step == 2 else {}

    edited = pipe(generator=gen(0), callback_on_step_end=halve_at_2, **kw).images
    noise = torch.randn(2, 1, 8, 8, generator=gen(0))
    assert torch.equal(edited, manual_loop(pipe, noise, 3, edit_at=2, edit=lambda x: x * 0.5))
    assert torch.equal(plain, manual_loop(pipe, noise, 3))
    assert (edited - plain).abs().max() > 1e-3

    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(generator=gen(0), callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise_pred"], **kw)


def test_diffusers_pipeline_callback_objects_are_accepted():
    from diffusers.callbacks import PipelineCallback

    class ZeroAtCutoff(PipelineCallback):  # diffusers' callback class: tensor_inputs name what it reads
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            cutoff = self.config.cutoff_step_index
            return {"latents": callback_kwargs["latents"] * 0} if step_index == cutoff else callback_kwargs

    pipe = make_pipe()
    callback = ZeroAtCutoff(cutoff_step_ratio=None, cutoff_step_index=2)
    out = pipe(1, 2, gen(0), output_type="latent", callback_on_step_end=callback).images
    assert torch.equal(out, torch.zeros_like(out)) and pipe.num_timesteps == 3


def test_interrupt_stops_early():
    pipe = make_pipe()
    counter = CountCalls(pipe.unet)
    seen = {}

    def stop_after_1(p, step, timestep, callback_kwargs):
        seen[step] = callback_kwargs["latents"].clone()
        if step == 1:
            p._interrupt = True
        return {}

    out = pipe(1, 3, gen(0), output_type="latent", callback_on_step_end=stop_after_1).images
    assert counter.n == 2 and sorted(seen) == [0, 1] and pipe.interrupt
    assert torch.equal(out, seen[1])  # the output is the sample where sampling stopped
    pipe(1, 3, gen(0), output_type="latent")  # the next call starts afresh
    assert counter.n == 2 + 5 and not pipe.interrupt


def test_custom_sigmas_are_honoured():
    pipe = make_pipe()
    sigmas = [10.0, 1.0, 0.1]
    out = pipe(1, generator=gen(2), sigmas=sigmas, output_type="latent").images
    assert pipe.num_timesteps == 5
    torch.testing.assert_close(pipe.scheduler.step_sigmas, torch.tensor(sigmas + [0.0], dtype=torch.float64))
    x = torch.randn(1, 1, 8, 8, generator=gen(2)) * sigmas[0]
    t = sigmas + [0.0]
    x = heun_reference(pipe.unet, x, t)
    assert_close_to_scale(out, x)
    with pytest.raises(ValueError, match="custom sigmas"):
        pipe(1, num_inference_steps=2, sigmas=sigmas)
    with pytest.raises(ValueError, match="EDMEulerScheduler"):
        make_pipe(scheduler=EDMEulerScheduler())(1, sigmas=sigmas)


def test_batch_size_is_taken_from_class_labels():
    pipe = make_pipe(unet=tiny_unet(num_class_embeds=4))
    kw = dict(num_inference_steps=2, output_type="latent")
    explicit = pipe(batch_size=3, generator=gen(0), class_labels=[0, 3, 1], **kw).images
    for labels in ([0, 3, 1], torch.tensor([0, 3, 1]), torch.tensor([[0], [3], [1]]), torch.eye(4)[[0, 3, 1]]):
        assert torch.equal(pipe(generator=gen(0), class_labels=labels, **kw).images, explicit)
    assert pipe(generator=gen(0), class_labels=2, **kw).images.shape[0] == 1
    assert pipe(generator=gen(0), **kw).images.shape[0] == 1
    with pytest.raises(ValueError, match="batch_size=2 conflicts with the 3 class_labels"):
        pipe(batch_size=2, generator=gen(0), class_labels=torch.tensor([[0], [3], [1]]), **kw)


def test_non_edm_scheduler_is_refused_before_drawing_noise():
    from diffusers import DDPMScheduler, HeunDiscreteScheduler

    with pytest.raises(ValueError, match="HeunDiscreteScheduler"):
        EDM2Pipeline(unet=tiny_unet(), scheduler=HeunDiscreteScheduler())
    pipe = make_pipe()
    pipe.scheduler = DDPMScheduler()
    g = gen(0)
    state = g.get_state()
    with pytest.raises(ValueError, match="needs an EDM scheduler.*got DDPMScheduler"):
        pipe(batch_size=1, num_inference_steps=2, generator=g)
    assert torch.equal(g.get_state(), state)  # no noise was drawn


def test_stored_defaults_round_trip_and_drive_the_call(tmp_path):
    unet, guide = tiny_unet(0), tiny_unet(1)
    pipe = make_pipe(unet=unet, guidance_unet=guide, default_num_inference_steps=2, default_guidance_scale=1.5)
    by_default = pipe(generator=gen(0), output_type="latent").images
    assert pipe.num_timesteps == 3 and pipe.guidance_scale == 1.5
    explicit = pipe(generator=gen(0), num_inference_steps=2, guidance_scale=1.5, output_type="latent").images
    assert torch.equal(by_default, explicit)
    assert not torch.equal(by_default, pipe(generator=gen(0), guidance_scale=1.0, output_type="latent").images)

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["default_num_inference_steps"] == 2 and index["default_guidance_scale"] == 1.5
    loaded = EDM2Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, EDM2Pipeline) and isinstance(loaded.scheduler, EDMHeunScheduler)
    assert loaded.config.default_num_inference_steps == 2 and loaded.config.default_guidance_scale == 1.5
    assert torch.equal(loaded(generator=gen(0), output_type="latent").images, by_default)

    # nothing stored: 32 steps (stop at once, the step count is what matters) and no guidance
    bare = make_pipe(unet=unet)
    assert bare.config.default_num_inference_steps is None and bare.config.default_guidance_scale is None

    def stop(p, step, timestep, callback_kwargs):
        p._interrupt = True
        return {}

    bare(generator=gen(0), output_type="latent", callback_on_step_end=stop)
    assert bare.num_timesteps == 2 * EDM2Pipeline.DEFAULT_NUM_INFERENCE_STEPS - 1 == 63 and bare.guidance_scale == 1
    no_guide = make_pipe(unet=unet, default_guidance_scale=2.0)
    with pytest.raises(ValueError, match="default_guidance_scale"):
        no_guide(generator=gen(0))
    with pytest.raises(ValueError, match="default_num_inference_steps"):
        make_pipe(unet=unet, default_num_inference_steps=0)


def test_scheduler_config_in_a_saved_pipeline_is_strict_json(tmp_path):
    make_pipe(scheduler=EDMHeunScheduler(s_churn=1.0, clip_sample=True)).save_pretrained(tmp_path)

    def strict(name):
        raise ValueError(f"non-finite JSON constant {name}")

    stored = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text(), parse_constant=strict)
    assert stored["s_tmax"] == sys.float_info.max and stored["clip_sample"] is True
    loaded = EDM2Pipeline.from_pretrained(tmp_path)
    assert loaded.scheduler.config.s_tmax == math.inf and loaded.scheduler.config.clip_sample is True
