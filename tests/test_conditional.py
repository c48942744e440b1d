"""Class-conditional EDM2 end to end: a conditional digits model trains through the library's entry point with the
`label` column, and the pipeline samples it with given labels, random labels, and classifier-free guidance by an
unconditional model trained on the same data."""

from pathlib import Path

import pytest
import torch

from edm2_diffusers import EDM2Pipeline, EDMHeunScheduler
from edm2_diffusers.data import load_digits_dataset
from edm2_diffusers.edm import denoise
from edm2_diffusers.training import load_config, merge_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    sample_size=8, in_channels=1, out_channels=1, architecture="G", model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[4], channels_per_head=16, logvar_channels=16,
)  # fmt: skip
STEPS = 3


def run(out: Path, dataset, num_class_embeds):
    """A few steps of the digits quickstart config, with a tiny network, through ``train``."""
    cfg = load_config(
        ROOT / "configs" / "digits" / "G.yaml",
        {
            "training.output_dir": str(out),
            "training.train_batch_size": 8,
            "training.max_train_steps": STEPS,
            "training.lr_warmup_steps": 2,
            "training.checkpointing_steps": 0,
            "training.report_to": "none",
            "training.seed": 1,
            "sampling.num_inference_steps": 2,
        },
    )
    label_column = "label" if num_class_embeds else None
    cfg = merge_config(
        cfg,
        {
            "model": {**TINY, "num_class_embeds": num_class_embeds},
            "data": {"label_column": label_column},
            "sampling": {"grid_rows": 2, "grid_cols": 2},
        },
    )
    return train(cfg, dataset=dataset)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    digits = load_digits_dataset().select(range(40))
    assert len(set(digits["label"])) == 10
    shifted = digits.map(lambda row: {"label": (row["label"] + 1) % 10})
    root = tmp_path_factory.mktemp("conditional")
    return {
        "cond": run(root / "cond", digits, 10),
        "shifted": run(root / "shifted", shifted, 10),
        "uncond": run(root / "uncond", digits, None),
    }


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_conditional_model_trains_on_the_label_column(runs):
    cond, shifted = runs["cond"], runs["shifted"]
    assert cond.step == STEPS and cond.unet.config.num_class_embeds == 10 and cond.unet.emb_label is not None
    assert cond.last_checkpoint is not None and len(cond.sample_grids) == 1
    assert runs["uncond"].unet.emb_label is None
    # Same seed, data and noise, only the labels differ: if the loop fed no labels, the two runs would be identical.
    a, b = cond.unet.state_dict(), shifted.unet.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if not k.startswith("emb_label"))
    assert not torch.equal(a["emb_label.weight"], b["emb_label.weight"])
    for result in (cond, shifted, runs["uncond"]):
        assert all(torch.isfinite(p).all() for p in result.unet.parameters())


def pipeline(runs, guided=False):
    nets = {name: runs[name].ema.averaged_models()[0][1] for name in ("cond", "uncond")}
    pipe = EDM2Pipeline(
        unet=nets["cond"], scheduler=EDMHeunScheduler(), guidance_unet=nets["uncond"] if guided else None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sampling_with_given_class_labels(runs):
    pipe = pipeline(runs)
    noise = torch.randn(4, 1, 8, 8, generator=gen(0))

    def sample(labels):
        out = pipe(batch_size=4, latents=noise, class_labels=labels, num_inference_steps=3, output_type="latent")
        return out.images

    threes = sample([3, 3, 3, 3])
    assert threes.shape == (4, 1, 8, 8) and torch.isfinite(threes).all()
    torch.testing.assert_close(sample([3]), threes)  # one label for the whole batch
    torch.testing.assert_close(sample(torch.nn.functional.one_hot(torch.full((4,), 3), 10).float()), threes)
    sevens = sample([7, 7, 7, 7])
    assert (threes - sevens).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # the label changes every sample
    mixed = sample([3, 7, 3, 7])
    torch.testing.assert_close(mixed[0::2], threes[0::2])
    torch.testing.assert_close(mixed[1::2], sevens[1::2])
    with pytest.raises(ValueError, match="out of range"):
        sample([10, 0, 0, 0])


def test_random_class_labels_when_none_are_given(runs):
    pipe = pipeline(runs)
    noise = torch.randn(6, 1, 8, 8, generator=gen(1))
    steps = dict(num_inference_steps=2, output_type="latent")
    drawn = pipe(batch_size=6, latents=noise, generator=gen(5), **steps).images
    again = pipe(batch_size=6, latents=noise, generator=gen(5), **steps).images
    assert torch.equal(drawn, again)  # reproducible from the generator
    # Each sample must be the sample of exactly one class for its noise.
    per_class = torch.stack([pipe(batch_size=6, latents=noise, class_labels=[c], **steps).images for c in range(10)])
    err = (per_class - drawn[None]).abs().amax(dim=(2, 3, 4))  # (class, sample)
    labels = err.argmin(dim=0)
    assert torch.all(err.min(dim=0).values < 1e-5)
    assert torch.all(err.kthvalue(2, dim=0).values > 1e-4)
    assert len(set(labels.tolist())) > 1  # random per sample, not one class for the batch
    other = pipe(batch_size=6, latents=noise, generator=gen(6), **steps).images
    assert not torch.equal(other, drawn)


def test_guidance_by_an_unconditional_model(runs):
    plain, guided = pipeline(runs), pipeline(runs, guided=True)
    kwargs = dict(batch_size=4, class_labels=[0, 1, 2, 3], num_inference_steps=3, output_type="latent")
    unguided = plain(generator=gen(2), **kwargs).images
    assert torch.equal(guided(generator=gen(2), guidance_scale=1.0, **kwargs).images, unguided)
    w2 = guided(generator=gen(2), guidance_scale=2.0, **kwargs).images
    assert (w2 - unguided).abs().max() > 1e-3

    # One Heun step from sigma_max is one Euler step to 0: the output is the guided denoiser itself,
    # D = D_uncond + w (D_cond - D_uncond), with the unconditional guide seeing no labels.
    noise = torch.randn(4, 1, 8, 8, generator=gen(3))
    labels = torch.tensor([0, 1, 2, 3])
    out = guided(batch_size=4, latents=noise, class_labels=labels, num_inference_steps=1, guidance_scale=2.0,
                 output_type="latent").images  # fmt: skip
    x, sigma = noise * 80.0, torch.full((4,), 80.0)
    with torch.no_grad():
        d_cond = denoise(guided.unet, x, sigma, torch.nn.functional.one_hot(labels, 10).float())
        d_uncond = denoise(guided.guidance_unet, x, sigma)
    torch.testing.assert_close(out, d_uncond + 2.0 * (d_cond - d_uncond), rtol=1e-4, atol=1e-4)
