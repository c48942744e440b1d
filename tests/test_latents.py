"""Latent datasets: EDM2-style centre crop, posterior moments in a `datasets` dataset with its standardization
constants, and a round trip through the same standardization the pipeline decodes with."""

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import free_port, tiny_vae
from diffusers.utils.torch_utils import randn_tensor
from loopback import run_on_loopback
from PIL import Image

from edm2_diffusers import EDM2Pipeline, EDM2UNet2DModel, EDMHeunScheduler
from edm2_diffusers.data import (
    build_latent_dataset,
    center_crop,
    encode_images,
    images_to_tensor,
    load_latent_dataset,
    load_train_dataset,
    read_latent_info,
    save_latent_dataset,
)
from edm2_diffusers.latents import SD_VAE_LATENT_MEAN, SD_VAE_LATENT_STD, LatentStandardizer

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(20, 30), (40, 16), (16, 16), (50, 50), (33, 17)]  # (height, width)


def tiny_unet(channels):
    return EDM2UNet2DModel(
        sample_size=8, in_channels=channels, out_channels=channels, architecture="G", model_channels=16,
        channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), channels_per_head=16, logvar_channels=16,
    )  # fmt: skip


def random_images(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def image_dataset(labels=(0, 1, 2, 1, 0)):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"image": random_images(), "label": list(labels)}, features=features)


def tree(path: Path) -> dict:
    files = (p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_center_crop_takes_the_middle_square_after_box_halving():
    # Left third black, middle third grey, right third white, 96 wide and 32 high: the 16x16 crop is all grey.
    a = np.zeros((32, 96, 3), np.uint8)
    a[:, 32:64] = 128
    a[:, 64:] = 255
    out = center_crop(Image.fromarray(a), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.all(out == 128)
    # Tall 16x64 image (shorter side 16: no halving, no resize): the crop is rows 24..39.
    b = np.zeros((64, 16), np.uint8)
    b[24:40] = 200
    out = center_crop(Image.fromarray(b, mode="L"), 16)
    assert out.shape == (16, 16, 3) and np.all(out == 200)
    # A 300x200 image is box-halved until its shorter side is below 32, then resized (bicubic) and cropped.
    c = center_crop(Image.new("RGB", (300, 200), (10, 20, 30)), 16)
    assert c.shape == (16, 16, 3) and np.all(c == np.array([10, 20, 30], np.uint8))
    with pytest.raises(ValueError, match="resolution"):
        center_crop(Image.new("RGB", (8, 8)), 0)


def test_encode_images_returns_posterior_mean_and_std():
    vae = tiny_vae()
    images = images_to_tensor(random_images(), 16)
    assert images.shape == (5, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    moments = encode_images(vae, images)
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    assert moments.shape == (5, 8, 8, 8)
    torch.testing.assert_close(moments[:, :4], dist.mean)
    torch.testing.assert_close(moments[:, 4:], dist.std)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_images(vae, images * 2 - 1)
    with pytest.raises(ValueError, match="shape"):
        encode_images(vae, images[:, :1])


def test_latent_dataset_rows_labels_and_recorded_constants():
    vae = tiny_vae()
    ds = build_latent_dataset(vae, image_dataset(), resolution=16, label_column="label", batch_size=2)
    assert len(ds) == 5 and ds.column_names == ["latents", "label"]
    assert ds.features["latents"] == datasets.Array3D(shape=(8, 8, 8), dtype="float32")
    assert ds.features["label"].names == ["a", "b", "c"] and ds["label"] == [0, 1, 2, 1, 0]
    stored = torch.as_tensor(np.asarray(ds.with_format("numpy")["latents"]))
    torch.testing.assert_close(stored, encode_images(vae, images_to_tensor(random_images(), 16)))

    info = read_latent_info(ds)
    assert info["latent_shape"] == [4, 8, 8] and info["resolution"] == 16 and info["num_images"] == 5
    assert info["standardizer"] == LatentStandardizer(SD_VAE_LATENT_MEAN, SD_VAE_LATENT_STD, 0.5)

    # The measured statistics are those of latents drawn from the posteriors: check them by drawing.
    mean, std = stored.chunk(2, dim=1)
    draws = mean + std * torch.randn((400, *mean.shape), generator=gen(1))
    torch.testing.assert_close(torch.tensor(info["measured_mean"]), draws.mean(dim=(0, 1, 3, 4)), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.tensor(info["measured_std"]), draws.std(dim=(0, 1, 3, 4)), atol=0, rtol=0.02)

    half = build_latent_dataset(vae, image_dataset(), resolution=16, storage_dtype="float16")
    assert half.column_names == ["latents"]
    assert half.features["latents"].dtype == "float16"
    np.testing.assert_allclose(np.asarray(half["latents"]), stored.numpy(), rtol=2e-3, atol=2e-3)


def test_measured_statistics_standardize_to_the_final_std():
    vae = tiny_vae()
    ds = build_latent_dataset(vae, image_dataset(), resolution=16, use_measured_statistics=True)
    info = read_latent_info(ds)
    assert list(info["standardizer"].latent_mean) == info["measured_mean"]
    moments = torch.as_tensor(np.asarray(ds["latents"], dtype=np.float32)).repeat(50, 1, 1, 1)
    x = info["standardizer"].sample(moments, generator=gen(0))
    assert x.shape == (250, 4, 8, 8)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=0.02, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.full((4,), 0.5), atol=0.01, rtol=0)


def test_sampled_training_latents_standardize_the_posterior():
    vae = tiny_vae()
    images = torch.rand(2, 3, 16, 16)
    standardizer = LatentStandardizer()
    with torch.no_grad():
        raw_mean = vae.encode(images).latent_dist.mean
        moments = encode_images(vae, images)
    z = standardizer.sample(moments, sample=False)
    z1 = standardizer.sample(moments, generator=gen(0))
    z2 = standardizer.sample(moments, generator=gen(0))
    expected = (raw_mean - torch.tensor(SD_VAE_LATENT_MEAN).view(1, 4, 1, 1)) * (
        0.5 / torch.tensor(SD_VAE_LATENT_STD).view(1, 4, 1, 1)
    )
    torch.testing.assert_close(z, expected)
    assert z.shape == (2, 4, 8, 8)
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    with pytest.raises(ValueError, match="images"):
        encode_images(vae, torch.rand(3, 16, 16))


def test_training_latents_and_pipeline_decoding_share_one_standardization():
    vae = tiny_vae()
    images = images_to_tensor(random_images(), 16)
    moments = encode_images(vae, images)
    std = LatentStandardizer(latent_mean=(0.5, -1.0, 2.0, 0.0), latent_std=(2.0, 4.0, 1.0, 3.0))

    # Drawing a training latent from stored moments = z = mean + std·ε of the VAE posterior, standardized.
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
        raw = dist.mean + dist.std * randn_tensor(dist.mean.shape, generator=gen(3))
    mean, scale = torch.tensor(std.latent_mean).view(1, 4, 1, 1), torch.tensor(std.latent_std).view(1, 4, 1, 1)
    expected = (raw - mean) * (0.5 / scale)
    torch.testing.assert_close(std.sample(moments, generator=gen(3)), expected)
    x = std.sample(moments, sample=False)
    torch.testing.assert_close(std.unstandardize(x), moments[:, :4], rtol=1e-5, atol=1e-5)

    # The pipeline built from these constants decodes x to what the VAE makes of the posterior mean.
    pipe = EDM2Pipeline(unet=tiny_unet(4), scheduler=EDMHeunScheduler(), vae=vae, **std.pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    assert LatentStandardizer.from_pipeline(pipe) == std
    with torch.no_grad():
        decoded = pipe.decode(x)
        direct = vae.decode(moments[:, :4]).sample.clamp(0, 1)
    torch.testing.assert_close(decoded, direct, rtol=1e-4, atol=1e-4)
    assert decoded.shape == (5, 3, 16, 16)
    out = pipe(batch_size=2, num_inference_steps=2, generator=gen(0), output_type="np").images
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="pixel-space"):
        LatentStandardizer.from_pipeline(EDM2Pipeline(unet=tiny_unet(3), scheduler=EDMHeunScheduler()))


def test_bad_input_is_refused_and_nothing_is_overwritten(tmp_path):
    vae = tiny_vae()
    with pytest.raises(ValueError, match="no label column 'cls'"):
        build_latent_dataset(vae, image_dataset(), resolution=16, label_column="cls")
    with pytest.raises(ValueError, match="no image column"):
        build_latent_dataset(vae, image_dataset(), resolution=16, image_column="img")
    with pytest.raises(ValueError, match="3 latent statistics"):
        build_latent_dataset(vae, image_dataset(), 16, standardizer=LatentStandardizer((0, 0, 0), (1, 1, 1)))
    with pytest.raises(ValueError, match="storage_dtype"):
        build_latent_dataset(vae, image_dataset(), 16, storage_dtype="int8")
    with pytest.raises(ValueError, match="positive std"):
        LatentStandardizer((0.0, 0.0), (1.0, 0.0))
    with pytest.raises(ValueError, match=r"\(N, 8, h, w\)"):
        LatentStandardizer().sample(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="no EDM2 latent information"):
        read_latent_info(image_dataset())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_latent_dataset(tmp_path / "missing")

    ds = build_latent_dataset(vae, image_dataset(), resolution=16, label_column="label")
    out = tmp_path / "latents"
    save_latent_dataset(ds, out)
    loaded, info = load_latent_dataset(out)
    assert loaded["label"] == ds["label"] and info["standardizer"] == LatentStandardizer()
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        save_latent_dataset(ds, out)
    assert tree(tmp_path) == before


def _encode_script():
    spec = importlib.util.spec_from_file_location("encode_latents", ROOT / "examples" / "encode_latents.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_encode_latents_script_on_an_image_folder(tmp_path):
    folder = tmp_path / "images"
    for cls, seed in (("cat", 0), ("dog", 1)):
        (folder / cls).mkdir(parents=True)
        for i, img in enumerate(random_images(seed)[:3]):
            img.save(folder / cls / f"{i}.png")
    tiny_vae().save_pretrained(tmp_path / "vae")
    script = _encode_script()
    out = tmp_path / "latents"
    args = ["--train_data_dir", str(folder), "--vae", str(tmp_path / "vae"), "--resolution", "16",
            "--output_dir", str(out), "--batch_size", "4", "--storage_dtype", "float16", "--device", "cpu",
            "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert script.main(args) == 0

    ds, info = load_latent_dataset(out)
    assert len(ds) == 6 and ds.features["label"].names == ["cat", "dog"] and sorted(ds["label"]) == [0, 0, 0, 1, 1, 1]
    assert ds.features["latents"] == datasets.Array3D(shape=(8, 8, 8), dtype="float16")
    assert info["vae"] == str(tmp_path / "vae") and info["standardizer"] == LatentStandardizer()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".encode-latents-")]  # work files removed

    before = tree(out)
    with pytest.raises(FileExistsError, match="already exists"):
        script.main(args)
    assert tree(out) == before
    with pytest.raises(ValueError, match="exactly one"):
        script.main(["--vae", "x", "--resolution", "16", "--output_dir", str(tmp_path / "o2")])

    measured = tmp_path / "measured"
    args2 = ["--train_data_dir", str(folder), "--vae", str(tmp_path / "vae"), "--resolution", "16",
             "--output_dir", str(measured), "--label_column", "none", "--latent_stats", "measured",
             "--device", "cpu", "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    assert script.main(args2) == 0
    ds2, info2 = load_latent_dataset(measured)
    assert ds2.column_names == ["latents"]
    assert list(info2["standardizer"].latent_std) == info2["measured_std"]


def test_two_processes_encode_the_dataset_one_process_encodes(tmp_path):
    """``accelerate launch`` with two CPU processes (gloo) against one process, bit for bit.

    9 images in batches of 2: process 0 encodes the batches from rows 0, 4, 8 and process 1 those from rows 2, 6, so
    the last round has a short batch on the main process and none on the other. Both runs use one thread: the VAE's
    CPU arithmetic depends on the thread count, as it does on the batch a row shares (a row alone differs from the
    same row in a batch of 8 by ~1e-6), which is why whole batches are dealt out.
    """
    folder = tmp_path / "images"
    rng = np.random.default_rng(3)
    for i in range(9):
        (folder / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(16, 40, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "ab"[i % 2] / f"{i}.png")
    tiny_vae().save_pretrained(tmp_path / "vae")
    args = ["--train_data_dir", str(folder), "--vae", str(tmp_path / "vae"), "--resolution", "16", "--batch_size",
            "2", "--storage_dtype", "float16", "--latent_stats", "measured",
            "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(free_port()), str(ROOT / "examples" / "encode_latents.py")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = tmp_path / "two" / "latents"
    proc = run_on_loopback([*launch, *args, "--output_dir", str(two)], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "process 0 of 2 encodes 3 batches, from rows 0, 4, 8" in proc.stderr, proc.stderr
    assert "process 1 of 2 encodes 2 batches, from rows 2, 6" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path / "two")) == ["latents"]  # one dataset, no work files left

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _encode_script().main([*args, "--device", "cpu", "--output_dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one_ds, one_info = load_latent_dataset(tmp_path / "one")
    two_ds, two_info = load_latent_dataset(two)
    assert two_ds.features == one_ds.features and two_ds["label"] == one_ds["label"] == [0] * 5 + [1] * 4
    one_latents = torch.as_tensor(np.asarray(one_ds.with_format("numpy")["latents"]))
    two_latents = torch.as_tensor(np.asarray(two_ds.with_format("numpy")["latents"]))
    assert one_latents.shape == (9, 8, 8, 8) and torch.equal(two_latents, one_latents)
    assert two_info == one_info and two_info["num_images"] == 9  # measured statistics too, in the same order

    # The rows are the images in the dataset's order: row 6 is what the VAE makes of image 6 in its batch (6, 7).
    images = load_train_dataset({"train_data_dir": str(folder)})
    pair = images_to_tensor(images[6:8]["image"], 16)
    torch.set_num_threads(1)
    try:
        expected = encode_images(tiny_vae(), pair)[0].half()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two_latents[6], expected)
