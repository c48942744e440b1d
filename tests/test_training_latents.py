"""Training on a latent dataset (``examples/encode_latents.py``'s ``save_to_disk`` folder of VAE posterior moments):
auto-detection from ``--train_data_dir``, latents drawn inside the seeded micro-step (exact resume), the constants
recorded with the run and given to the exported pipeline, sample grids decoded by ``sampling.vae``, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_vae
from diffusers import AutoencoderKL, DiffusionPipeline
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from edm2_diffusers.data import build_latent_dataset, load_latent_dataset, read_latent_info, save_latent_dataset
from edm2_diffusers.hub import check_export, load_pipeline
from edm2_diffusers.latents import LatentStandardizer
from edm2_diffusers.training import load_config, merge_config, train

TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, architecture="G", model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[4], channels_per_head=16, logvar_channels=16, num_class_embeds=3,
)  # fmt: skip


def images(n=8, seed=0):
    """Small generated RGB images: smooth colour ramps with a random offset each, and a class per image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 16)
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        rgb = np.stack([np.add.outer(ramp * a, ramp * b) / 2, np.full((16, 16), c), np.outer(ramp, 1 - ramp)], -1)
        out.append(Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"image": out, "label": [i % 3 for i in range(n)]}, features=features)


@pytest.fixture(scope="module")
def latent_data(tmp_path_factory):
    """A latent dataset of 8 images encoded by a tiny AutoencoderKL (its measured constants), and the VAE's folder."""
    root = tmp_path_factory.mktemp("latents")
    vae = tiny_vae()
    vae.save_pretrained(root / "vae")
    ds = build_latent_dataset(
        vae, images(), resolution=16, label_column="label", use_measured_statistics=True, vae_name="tiny"
    )
    save_latent_dataset(ds, root / "data")
    return {"data": root / "data", "vae": root / "vae", "info": read_latent_info(ds), "root": root}


def config(out: Path, data: Path, **training):
    cfg = load_config(None, {"training.output_dir": str(out), "data.train_data_dir": str(data)})
    return merge_config(
        cfg,
        {
            "model": TINY,
            "data": {"label_column": "label"},
            "training": {
                "train_batch_size": 4,
                "max_train_steps": 3,
                "lr_warmup_steps": 2,
                "checkpointing_steps": 0,
                "sample_every_steps": 0,
                "report_to": "none",
                "seed": 4,
                "cpu_threads": 1,
                **training,
            },
            "ema": {"type": "power", "stds": [0.05, 0.10]},
            "sampling": {"num_inference_steps": 2, "grid_rows": 2, "grid_cols": 2},
        },
    )


def test_latent_run_records_its_constants_and_exports_a_pipeline_that_decodes(latent_data, tmp_path):
    out = tmp_path / "run"
    cfg = config(out, latent_data["data"])
    cfg["sampling"]["vae"] = str(latent_data["vae"])
    train(cfg)

    constants = latent_data["info"]["standardizer"].to_dict()
    recorded = json.loads((out / "latent_info.json").read_text())
    assert {k: recorded[k] for k in constants} == constants and recorded["vae"] == "tiny"

    # The final grid is decoded by the VAE: 2x2 RGB tiles of 16 px enlarged 4x, 2-pixel gaps.
    with Image.open(out / "samples" / "step-0000003.png") as grid:
        assert grid.mode == "RGB" and grid.size == (2 * 66 + 2, 2 * 66 + 2)

    # The export carries the constants and the VAE; both loaders decode to images.
    pipeline = out / "pipeline"
    assert check_export(pipeline) == [pipeline]
    assert sorted(p.name for p in (pipeline / "unet").glob("*.safetensors")) == [
        "diffusion_pytorch_model.ema0050.safetensors",
        "diffusion_pytorch_model.ema0100.safetensors",
        "diffusion_pytorch_model.safetensors",
    ]
    assert len(list(pipeline.rglob("vae/*.safetensors"))) == 1  # the VAE is stored once
    assert (pipeline / "samples.png").is_file()
    vae_weights = load_file(str(pipeline / "vae" / "diffusion_pytorch_model.safetensors"))
    for name, value in AutoencoderKL.from_pretrained(latent_data["vae"]).state_dict().items():
        assert torch.equal(vae_weights[name], value), name
    ours = load_pipeline(pipeline)
    remote = DiffusionPipeline.from_pretrained(str(pipeline), trust_remote_code=True)
    for pipe in (ours, remote):
        assert pipe.vae is not None
        assert LatentStandardizer.from_pipeline(pipe).to_dict() == constants
    runs = []
    for pipe in (ours, remote):
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(1)
        runs.append(pipe(batch_size=2, class_labels=[0, 2], num_inference_steps=2, generator=gen, output_type="np"))
    a, b = runs[0].images, runs[1].images
    assert a.shape == (2, 16, 16, 3) and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-5)
    card = ModelCard.load(pipeline / "README.md").text
    assert "8×8 latents × 4 channels" in card and "the export includes the VAE" in card


def test_latents_are_drawn_in_the_seeded_step_so_resume_is_exact(latent_data, tmp_path, caplog):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with caplog.at_level(logging.INFO, logger="edm2_diffusers"):
        train(config(straight, latent_data["data"]))
    assert "latent run without sampling.vae: no sample grids" in caplog.text
    assert not (straight / "samples").exists()

    train(config(resumed, latent_data["data"], max_train_steps=2, export_pipeline=False))
    again = config(resumed, latent_data["data"], resume_from_checkpoint="latest", export_pipeline=False)
    train(again)
    wa = load_file(str(straight / "checkpoint-3" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoint-3" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # Each read draws z = mean + std·ε: the same run on the posterior means alone (std 0) ends elsewhere.
    ds, _ = load_latent_dataset(latent_data["data"])
    means_only = ds.map(lambda row: {"latents": np.concatenate([np.asarray(row["latents"])[:4], np.zeros((4, 8, 8))])})
    assert means_only.info.description == ds.info.description
    save_latent_dataset(means_only, tmp_path / "means-only")
    train(config(tmp_path / "other", tmp_path / "means-only", export_pipeline=False))
    wc = load_file(str(tmp_path / "other" / "checkpoint-3" / "model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)

    # Without a VAE the export holds the constants, no VAE and no grid, and its card says how to add the VAE.
    pipe = load_pipeline(straight / "pipeline")
    assert pipe.vae is None and pipe.config.latent_mean == latent_data["info"]["standardizer"].to_dict()["latent_mean"]
    assert not (straight / "pipeline" / "samples.png").exists() and not (straight / "pipeline" / "vae").exists()
    card = ModelCard.load(straight / "pipeline" / "README.md").text
    assert "This export holds no VAE" in card and "(`tiny`)" in card


def test_latent_bad_input_fails_before_anything_is_written(latent_data, tmp_path):
    out = tmp_path / "run"
    data = latent_data["data"]
    bad_model = merge_config(config(out, data), {"model": {"in_channels": 3, "out_channels": 3}})
    with pytest.raises(ValueError, match="the latents have 4 channels but model.in_channels is 3"):
        train(bad_model)
    with pytest.raises(ValueError, match="cannot resize them"):
        train(merge_config(config(out, data), {"data": {"resolution": 16}}))
    with pytest.raises(ValueError, match="sample_size is 16"):
        train(merge_config(config(out, data), {"model": {"sample_size": 16}}))
    image_folder = tmp_path / "images"
    image_folder.mkdir()
    Image.new("RGB", (8, 8)).save(image_folder / "a.png")
    with pytest.raises(FileNotFoundError, match="not a latent dataset"):
        train(merge_config(config(out, image_folder), {"data": {"source": "latents"}}))
    assert not out.exists()

    # Resuming on a latent dataset with other standardization constants is refused before anything is written.
    train(config(out, data, max_train_steps=1, export_pipeline=False))
    other = tmp_path / "sd-constants"
    ds = build_latent_dataset(tiny_vae(), images(), resolution=16, label_column="label")  # EDM2's SD-VAE values
    save_latent_dataset(ds, other)
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(ValueError, match="standardization constants differ"):
        train(config(out, other, resume_from_checkpoint="latest", max_train_steps=2))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
