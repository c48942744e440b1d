"""Evaluation: Fréchet distance, FID state, seed ranges, resumable generation, digits metric, linear probe."""

import os

import numpy as np
import pytest
import torch
from conftest import cache_root, tiny_unet_config
from torchmetrics.image.fid import _compute_fid

from edm2_diffusers import EDM2Pipeline, EDM2UNet2DModel, EDMHeunScheduler
from edm2_diffusers.evaluation import (
    FeatureCache,
    FeatureFrechetDistance,
    FeatureStats,
    digits_feature_extractor,
    digits_metrics,
    evaluate_pipeline,
    frechet_distance,
    load_digits_split,
    seed_ranges,
)
from edm2_diffusers.evaluation.evaluate import reference_stats
from edm2_diffusers.evaluation.linear_probe import block_features, linear_probe, probe_dataset

TINY = tiny_unet_config()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One classifier cache for the session (the digits classifier trains once, in seconds)."""
    return cache_root()  # conftest: one session cache, outside $HOME


@pytest.fixture()
def tiny_pipe():
    torch.manual_seed(0)
    return EDM2Pipeline(EDM2UNet2DModel(**TINY), EDMHeunScheduler())


class MeanPool(torch.nn.Module):
    """A deterministic, download-free extractor for 1×8×8 images: means of 2×2 cells."""

    name = "meanpool"
    num_features = 16

    def forward(self, images):
        return torch.nn.functional.avg_pool2d(images.float(), 2).flatten(1)


# -- Fréchet distance ------------------------------------------------------------------------------------------------


def test_frechet_distance_self_zero_and_grows_with_shift():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 16, generator=gen) @ torch.randn(16, 16, generator=gen)
    s = FeatureStats.from_features(feats)
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-6)
    dists = []
    for shift in (0.5, 1.0, 2.0):
        t = FeatureStats.from_features(feats + shift)
        dists.append(frechet_distance(s.mu, s.sigma, t.mu, t.sigma))
    # A pure mean shift of every coordinate by c adds exactly 16·c² (covariances are unchanged).
    np.testing.assert_allclose(dists, [16 * 0.25, 16 * 1.0, 16 * 4.0], rtol=1e-6)
    scaled = FeatureStats.from_features(feats * 1.5)
    assert frechet_distance(s.mu, s.sigma, scaled.mu, scaled.sigma) > 1.0


def test_frechet_distance_matches_torchmetrics_and_closed_form():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 6, generator=gen)
    b = torch.randn(300, 6, generator=gen) * 1.3 + 0.2
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    ours = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    ref = float(_compute_fid(*(torch.as_tensor(x) for x in (sa.mu, sa.sigma, sb.mu, sb.sigma))))
    assert ours == pytest.approx(ref, rel=1e-6)
    # Diagonal covariances: Σ (√v1 − √v2)² + ‖Δμ‖².
    v1, v2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])
    d = frechet_distance([0, 0], np.diag(v1), [1, 2], np.diag(v2))
    assert d == pytest.approx(5 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance([0, 0], np.eye(3), [0, 0], np.eye(2))


def test_metric_state_roundtrips_reference_stats(tmp_path):
    gen = torch.Generator().manual_seed(2)
    real = torch.rand(64, 1, 8, 8, generator=gen)
    fake = torch.rand(48, 1, 8, 8, generator=gen) ** 2
    m1 = FeatureFrechetDistance(MeanPool())
    m1.update(real, real=True)
    m1.update(fake, real=False)
    direct = m1.frechet_distance()

    path = tmp_path / "ref.npz"
    m1.real_stats().save(path)
    with pytest.raises(ValueError, match="meanpool"):
        FeatureStats.load(path, feature_extractor="digits")
    m2 = FeatureFrechetDistance(MeanPool())
    m2.set_reference_stats(FeatureStats.load(path, feature_extractor="meanpool"))
    m2.update(features=MeanPool()(fake))
    assert m2.frechet_distance() == pytest.approx(direct, rel=1e-9)
    stats = m2.fake_stats()
    np.testing.assert_allclose(stats.mu, MeanPool()(fake).double().mean(0).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"\.npz"):
        stats.save(tmp_path / "ref.txt")
    with pytest.raises(FileNotFoundError):
        FeatureStats.load(tmp_path / "missing.npz")


# -- seeds and generation --------------------------------------------------------------------------


@pytest.mark.parametrize("num_images,procs,batch,seed", [(0, 1, 4, 0), (10, 3, 4, 5), (37, 4, 8, 0), (5, 8, 2, 100)])
def test_seed_ranges_disjoint_exact_cover(num_images, procs, batch, seed):
    ranges = seed_ranges(num_images, procs, batch, seed)
    assert len(ranges) == procs
    seeds = [s for proc in ranges for r in proc for s in r]
    assert len(seeds) == len(set(seeds)) == num_images
    assert sorted(seeds) == list(range(seed, seed + num_images))
    assert all(0 < len(r) <= batch for proc in ranges for r in proc)
    # Balanced: process batch counts differ by at most one.
    counts = [len(p) for p in ranges]
    assert max(counts) - min(counts) <= 1


def test_seed_ranges_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        seed_ranges(10, 2, 0)
    with pytest.raises(ValueError, match="num_processes"):
        seed_ranges(10, 0, 4)


class CountingPipeline:
    """Delegates to a real pipeline and records the batch sizes it was asked for."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs["batch_size"])
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_generation_resumes_from_cache(tmp_path, tiny_pipe):
    ref = FeatureStats.from_features(MeanPool()(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3))))
    cache = str(tmp_path / "cache")
    kw = dict(batch_size=8, num_inference_steps=2, progress=False, cache_settings={"model": "tiny"})
    first = CountingPipeline(tiny_pipe)
    full = evaluate_pipeline(first, MeanPool(), ref, 20, cache_dir=cache, **kw)
    assert first.calls == [8, 8, 4]
    files = sorted(f for f in os.listdir(cache) if f.startswith("batch-"))
    assert files == ["batch-000000000-000000007.npz", "batch-000000008-000000015.npz", "batch-000000016-000000019.npz"]

    # A run that stopped after two batches: the rerun generates only the missing one.
    os.remove(os.path.join(cache, files[1]))
    kept = os.path.getmtime(os.path.join(cache, files[0]))
    second = CountingPipeline(tiny_pipe)
    resumed = evaluate_pipeline(second, MeanPool(), ref, 20, cache_dir=cache, **kw)
    assert second.calls == [8]
    assert os.path.getmtime(os.path.join(cache, files[0])) == kept
    assert resumed.fd == pytest.approx(full.fd, rel=1e-9)
    uncached = evaluate_pipeline(
        tiny_pipe, MeanPool(), ref, 20, **{k: v for k, v in kw.items() if k != "cache_settings"}
    )
    assert uncached.fd == pytest.approx(full.fd, rel=1e-6)

    # Other settings, or other weights at the same path, must not reuse these images.
    with pytest.raises(ValueError, match="num_inference_steps"):
        evaluate_pipeline(tiny_pipe, MeanPool(), ref, 20, cache_dir=cache, **{**kw, "num_inference_steps": 3})
    with torch.no_grad():
        next(tiny_pipe.unet.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="weights"):
        evaluate_pipeline(tiny_pipe, MeanPool(), ref, 20, cache_dir=cache, **kw)


def test_feature_cache_ignores_foreign_files(tmp_path):
    cache = FeatureCache(str(tmp_path), {"a": 1})
    cache.save(range(0, 4), {"features": np.zeros((4, 2), np.float32)})
    assert cache.load(range(0, 4))["features"].shape == (4, 2)
    os.replace(cache.path(range(0, 4)), cache.path(range(4, 8)))  # a file whose seeds do not match its name
    assert cache.load(range(4, 8)) is None
    with open(cache.path(range(8, 12)), "wb") as f:
        f.write(b"truncated")
    assert cache.load(range(8, 12)) is None


# -- digits ----------------------------------------------------------------------------------------


def test_digits_classifier_accuracy_and_features(cache_dir):
    extractor = digits_feature_extractor()
    assert os.path.isfile(os.path.join(cache_dir, "digits_classifier_v1.safetensors"))
    images, labels = load_digits_split("test")
    assert images.shape[1:] == (1, 8, 8) and 0 <= images.min() and images.max() <= 1
    feats = extractor(images)
    assert feats.shape == (len(images), extractor.num_features)
    acc = (extractor.probabilities(images).argmax(1) == labels).float().mean().item()
    assert acc > 0.93
    train, _ = load_digits_split("train")
    assert len(train) + len(images) == 1797


def test_digits_metrics_rank_real_above_noise(cache_dir):
    real, _ = load_digits_split("all")
    gen = torch.Generator().manual_seed(0)
    good = digits_metrics(real[:400])
    noisy = digits_metrics((real[:400] + 0.35 * torch.randn(real[:400].shape, generator=gen)).clamp(0, 1))
    junk = digits_metrics(torch.rand(400, 1, 8, 8, generator=gen))
    assert set(good) >= {"fd", "confident"}
    assert good["confident"] > 0.9 and junk["confident"] < 0.3
    assert good["fd"] < noisy["fd"] < junk["fd"]
    # The pipeline's numpy layout (N, 8, 8, 1) is accepted.
    assert digits_metrics(real[:50].permute(0, 2, 3, 1).numpy())["fd"] == pytest.approx(
        digits_metrics(real[:50])["fd"]
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digits_metrics(real[:10] * 2 - 1)
    with pytest.raises(ValueError, match="8, 8"):
        digits_metrics(torch.rand(4, 1, 16, 16))


def test_digits_evaluation_with_cached_reference(tmp_path, cache_dir, tiny_pipe):
    extractor = digits_feature_extractor()
    path = str(tmp_path / "digits_ref.npz")
    ref = reference_stats(path, extractor)  # computed from scikit-learn's digits and written
    assert os.path.isfile(path) and ref.num_samples == 1797
    again = reference_stats(path, extractor)
    np.testing.assert_array_equal(again.mu, ref.mu)
    out = evaluate_pipeline(tiny_pipe, "digits", ref, 12, batch_size=6, num_inference_steps=2, progress=False)
    assert out.num_images == 12 and np.isfinite(out.fd) and 0 <= out.confident <= 1


# -- linear probe ----------------------------------------------------------------------------------


def test_linear_probe_beats_chance_on_digits():
    torch.manual_seed(0)
    unet = EDM2UNet2DModel(**TINY)
    train, test = probe_dataset("digits", "train"), probe_dataset("digits", "test")
    assert train[0].min() < 0 and train[0].max() <= 1  # model space [-1, 1]
    out = linear_probe(unet, *train, *test, num_epochs=4)
    assert out.block == "8x8_up" and out.num_features == 32
    assert out.accuracy > 0.3  # chance is 0.1
    # Labels shuffled against the images: nothing to learn, accuracy falls to about chance.
    perm = torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(0))
    shuffled = linear_probe(
        unet,
        train[0],
        train[1][torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(1))],
        test[0],
        test[1][perm],
        num_epochs=4,
    )
    assert shuffled.accuracy < 0.2


def test_block_features_hook_and_errors():
    torch.manual_seed(0)
    unet = EDM2UNet2DModel(**TINY).train()
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    a = block_features(unet, images, "4x4_block0", sigma=0.1, batch_size=2)
    b = block_features(unet, images, "4x4_block0", sigma=0.1, batch_size=5)
    assert a.shape == (5, 32) and unet.training  # mode restored
    torch.testing.assert_close(a, b)  # batching does not change features (noise is per image, fixed seed)
    assert not torch.allclose(a, block_features(unet, images, "4x4_block0", sigma=0.5))
    assert not unet.dec["4x4_block0"]._forward_hooks  # hook removed
    with pytest.raises(ValueError, match="8x8_up"):
        block_features(unet, images, "nope")


# -- extractors and reference statistics: clear errors --------------------------------------------------------------


def test_extractor_errors(tmp_path):
    from edm2_diffusers.evaluation import get_feature_extractor

    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_feature_extractor("clip")
    with pytest.raises(ValueError, match="num_features"):
        FeatureFrechetDistance(torch.nn.Identity())
    with pytest.raises(ValueError, match="no reference statistics"):
        reference_stats(None, MeanPool())
    with pytest.raises(ValueError, match="exactly one"):
        FeatureFrechetDistance(MeanPool()).update()
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        # Offline machines lack torch-fidelity: the Inception path says how to get it instead of failing obscurely.
        with pytest.raises(ModuleNotFoundError, match=r"edm2-diffusers\[metrics\]"):
            get_feature_extractor("inception")
