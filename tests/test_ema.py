"""Post-hoc EMA: power-function math against the official coefficients, trackers, snapshots, reconstruction."""

import importlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_unet_config
from safetensors import safe_open

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.edm import denoise, loss_weight
from edm2_diffusers.ema import (
    MAX_STD,
    PowerFunctionEMA,
    TraditionalEMA,
    TraditionalEMAWithPostHoc,
    build_ema,
    ema_pytorch_decay,
    exp_to_std,
    list_snapshots,
    power_function_beta,
    profile_inner_product,
    reconstruct,
    solve_posthoc_coefficients,
    std_to_exp,
)
from edm2_diffusers.hub import export_pipelines

# The package exports the function `reconstruct`, which shadows the submodule of the same name as an attribute.
reconstruct_module = importlib.import_module("edm2_diffusers.ema.reconstruct")
ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden" / "phema_official.json"
TINY = tiny_unet_config()
BATCH = 4
STEPS = 24
EVERY = 3
MID_STEP = 12


def flat(state) -> torch.Tensor:
    return torch.cat([v.float().reshape(-1) for k, v in sorted(state.items())])


def params_of(net) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in net.parameters()])


# ---------------------------------------------------------------------------------------------------------------------
# Math against the official implementation


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


def test_golden_coefficients(golden):
    snaps, targets = golden["snapshots"], golden["targets"]
    coefs = solve_posthoc_coefficients(
        [s["step"] for s in snaps],
        [s["std"] for s in snaps],
        [t["step"] for t in targets],
        [t["std"] for t in targets],
    )
    expected = np.array(golden["coefficients"])
    assert coefs.shape == expected.shape == (len(snaps), len(targets))
    np.testing.assert_allclose(coefs, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(coefs.sum(axis=0), 1.0, atol=1e-12)


def test_golden_std_to_exp_and_beta(golden):
    for std, gamma in golden["std_to_exp"].items():
        assert abs(std_to_exp(float(std)) - gamma) < 1e-6 * max(1.0, gamma)
    for key, beta in golden["beta_per_step"].items():
        std, step = key.split("@")
        assert abs(power_function_beta(float(std), int(step), 1) - beta) < 1e-6


def test_exp_to_std_inverts_std_to_exp():
    stds = np.array([0.005, 0.03, 0.1, 0.2, 0.28])
    np.testing.assert_allclose(exp_to_std(std_to_exp(stds)), stds, rtol=1e-12)
    assert np.all(std_to_exp(stds) > 0)


def test_tracked_profile_equals_closed_form_weights():
    # One parameter following a known sequence θ_k: after t updates with β_k of Eq. 127 the EMA must equal
    # Σ_k ∫_{k-1}^{k} p_{t,γ}(τ) dτ θ_k = Σ_k (k^(γ+1) − (k−1)^(γ+1)) / t^(γ+1) θ_k.
    net = torch.nn.Linear(1, 1, bias=False).double()
    ema = PowerFunctionEMA(net, stds=(0.05, 0.2), count_by="steps")
    theta = torch.randn(30, dtype=torch.float64)
    for k in range(30):
        with torch.no_grad():
            net.weight.fill_(theta[k])
        ema.update()
    k = np.arange(1, 31, dtype=np.float64)
    for std, (_, avg) in zip((0.05, 0.2), ema.averaged_models()):
        g = std_to_exp(std)
        w = (k ** (g + 1) - (k - 1) ** (g + 1)) / 30 ** (g + 1)
        assert abs(avg.weight.item() - float(np.dot(w, theta.numpy()))) < 1e-5


def test_counting_by_images_matches_counting_by_steps():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    by_img = PowerFunctionEMA(net, stds=(0.1,), count_by="images")
    by_step = PowerFunctionEMA(net, stds=(0.1,), count_by="steps")
    for step in range(1, 11):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        by_img.update(cur_nimg=step * 64, batch_size=64)
        by_step.update(step=step)
    torch.testing.assert_close(params_of(by_img.emas[0]), params_of(by_step.emas[0]))


@pytest.mark.parametrize("std", [0.0, -0.1, 0.29, 0.5])
def test_inexpressible_std_is_rejected(std):
    with pytest.raises(ValueError, match=f"{std!r}"):
        std_to_exp(std)
    with pytest.raises(ValueError, match="std"):
        solve_posthoc_coefficients([100, 200], 0.05, 200, std)
    with pytest.raises(ValueError, match=f"{std!r}"):
        PowerFunctionEMA(torch.nn.Linear(1, 1), stds=(0.05, std))
    assert MAX_STD == pytest.approx(0.2887, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Config and traditional EMA


def test_build_ema_from_config():
    net = torch.nn.Linear(2, 2)
    ema = build_ema(
        net,
        {
            "type": "power",
            "stds": [0.05, 0.10],
            "snapshot_every_steps": 7,
            "snapshot_dtype": "float16",
            "count_by": "steps",
        },
    )
    assert isinstance(ema, PowerFunctionEMA)
    assert ema.stds == [0.05, 0.10] and ema.snapshot_every_steps == 7 and ema.snapshot_dtype == torch.float16
    assert isinstance(build_ema(net, {"type": "traditional", "beta": 0.9993, "warmup_steps": 0}), TraditionalEMA)
    assert build_ema(net, {}).stds == [0.05, 0.10]
    with pytest.raises(ValueError, match="halflife"):
        build_ema(net, {"type": "power", "halflife": 3})
    with pytest.raises(ValueError, match="stds"):
        build_ema(net, {"type": "traditional", "stds": [0.1]})
    with pytest.raises(ValueError, match="'karras'"):
        build_ema(net, {"type": "karras"})
    with pytest.raises(ValueError, match="count_by"):
        build_ema(net, {"count_by": "epochs"})
    with pytest.raises(ValueError, match="snapshot_dtype"):
        build_ema(net, {"snapshot_dtype": "int8"})
    with pytest.raises(ValueError, match="snapshot_every_steps"):
        build_ema(net, {"type": "traditional", "snapshot_every_steps": 10})


def test_traditional_ema_warmup_and_round_trip(tmp_path):
    net = torch.nn.Linear(1, 1, bias=False)
    ema = TraditionalEMA(net, beta=0.9, warmup_steps=4)
    expected = net.weight.item()
    for n, value in enumerate([3.0, -1.0, 2.0, 5.0, 7.0, 1.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update()
        beta = 0.9 * min(1.0, (n - 1) / 4)
        expected = beta * expected + (1 - beta) * value
        assert ema.ema.weight.item() == pytest.approx(expected, rel=1e-6)
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    other = TraditionalEMA(net, beta=0.9, warmup_steps=4)
    other.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert other.num_updates == 6 and other.ema.weight.item() == ema.ema.weight.item()
    with pytest.raises(ValueError, match="power"):
        ema.save_snapshots(str(tmp_path), step=1, nimg=1)


def _wander(net: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every parameter as a training step would: a drift plus noise."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 + 0.3 * torch.randn(p.shape, generator=generator))


class _SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.SiLU(), torch.nn.Conv1d(16, 4, 1))
        self.register_buffer("freqs", torch.randn(6))


@pytest.mark.parametrize("beta", [0.9, 0.9993])  # 0.9: the warm-up reaches β at update 32; 0.9993: never in 150
def test_ema_pytorch_warmup_matches_the_ema_pytorch_package(beta):
    from ema_pytorch import EMA

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    net = _SmallNet()
    reference = EMA(net, beta=beta, update_after_step=0, update_every=1)
    ours = build_ema(net, {"type": "traditional", "beta": beta, "warmup": "ema_pytorch"})
    assert isinstance(ours, TraditionalEMA) and not isinstance(ours, TraditionalEMAWithPostHoc)
    worst = 0.0
    for n in range(1, 151):
        _wander(net, gen)
        reference.update()
        ours.update(cur_nimg=n, batch_size=1)
        # The package's own decay for this update: its step counter already counts it.
        expected_decay = 0.0 if n == 1 else reference.get_current_decay()
        assert ours.current_beta(n) == expected_decay
        theirs = dict(reference.ema_model.named_parameters())
        for name, p in ours.ema.named_parameters():
            worst = max(worst, (p - theirs[name]).abs().max().item())
    assert worst <= 1e-6
    assert abs(params_of(ours.ema) - params_of(net)).max() > 1  # an average, not a copy of the model
    # Written out: a copy at the first update, then min(β, 1 − n^(−2/3)).
    assert ema_pytorch_decay(1, beta) == 0.0
    for n in (2, 10, 31, 32, 100, 5000, 10**6):
        assert ema_pytorch_decay(n, beta) == pytest.approx(min(beta, 1 - n ** (-2 / 3)), abs=1e-7)


def test_ema_pytorch_warmup_config_errors():
    net = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="ema.warmup must be one of"):
        build_ema(net, {"type": "traditional", "warmup": "cosine"})
    with pytest.raises(ValueError, match="warmup_steps"):
        build_ema(net, {"type": "traditional", "warmup": "ema_pytorch", "warmup_steps": 10})
    with pytest.raises(ValueError, match="update_index"):
        ema_pytorch_decay(0, 0.9)
    with pytest.raises(ValueError, match="beta"):
        build_ema(net, {"type": "traditional", "beta": "0.9993"})
    linear = TraditionalEMA(net, beta=0.9)
    with pytest.raises(ValueError, match="ema_pytorch"):
        linear.load_state_dict(TraditionalEMA(net, beta=0.9, warmup="ema_pytorch").state_dict())


POSTHOC_CONFIG = {
    "type": "traditional",
    "beta": 0.8,
    "warmup": "ema_pytorch",
    "posthoc": {"stds": [0.05, 0.10], "snapshot_every_steps": 3, "snapshot_dtype": "float32", "count_by": "images"},
}


def test_traditional_ema_with_posthoc_profiles_tracks_both(tmp_path):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    net = EDM2UNet2DModel(**TINY)
    ema = build_ema(net, POSTHOC_CONFIG)
    alone = TraditionalEMA(net, beta=0.8, warmup="ema_pytorch")
    power = PowerFunctionEMA(net, stds=[0.05, 0.10])
    # The interface the trainer uses of one tracker (training/loop.py, training/finish.py).
    assert isinstance(ema, TraditionalEMA) and not isinstance(ema, PowerFunctionEMA)
    assert ema.stds == [0.05, 0.10] and ema.snapshot_every_steps == 3
    for step in range(1, 7):
        _wander(net, gen)
        for tracker in (ema, alone, power):
            tracker.update(cur_nimg=step * BATCH, batch_size=BATCH)
        if step % ema.snapshot_every_steps == 0:
            ema.save_snapshots(str(tmp_path), step=step, nimg=step * BATCH)
    ((label, averaged),) = ema.averaged_models()  # the evaluated / exported model: the traditional EMA only
    assert label == "ema" and torch.equal(params_of(averaged), params_of(alone.ema))
    for (lab, a), (lab2, b) in zip(ema.posthoc_models(), power.averaged_models()):
        assert lab == lab2 and torch.equal(params_of(a), params_of(b))
    assert not torch.equal(params_of(averaged), params_of(ema.posthoc.emas[0]))
    snaps = list_snapshots(str(tmp_path))
    assert sorted((s.step, round(s.std, 3)) for s in snaps) == [(3, 0.05), (3, 0.1), (6, 0.05), (6, 0.1)]
    assert ema.description() == {
        "type": "traditional", "beta": 0.8, "warmup_steps": 0, "warmup": "ema_pytorch", "posthoc_stds": [0.05, 0.10]
    }  # fmt: skip

    # Resume: the state (torch.save with weights_only) restores both averages and both clocks.
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    resumed = build_ema(net, POSTHOC_CONFIG)
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    _wander(net, gen)
    for tracker in (ema, resumed):
        tracker.update(cur_nimg=7 * BATCH, batch_size=BATCH)
    for a, b in zip([ema.ema, *ema.posthoc.emas], [resumed.ema, *resumed.posthoc.emas]):
        assert torch.equal(params_of(a), params_of(b))
    assert (resumed.num_updates, resumed.posthoc.time) == (7, 7.0 * BATCH)


def test_traditional_ema_with_posthoc_profiles_rejects_mismatches():
    net = torch.nn.Linear(2, 2)
    ema = build_ema(net, POSTHOC_CONFIG)
    with pytest.raises(ValueError, match="without post-hoc profiles"):
        ema.load_state_dict(TraditionalEMA(net, beta=0.8, warmup="ema_pytorch").state_dict())
    other = build_ema(net, {**POSTHOC_CONFIG, "posthoc": {"stds": [0.02]}})
    before = params_of(ema.ema).clone()
    with pytest.raises(ValueError, match="stds"):
        ema.load_state_dict(other.state_dict())
    assert torch.equal(params_of(ema.ema), before)
    bad = [
        ({"posthoc": [0.05]}, "ema.posthoc must be a mapping"),
        ({"posthoc": {"snapshot_every_steps": 5}}, "ema.posthoc needs stds"),
        ({"posthoc": {"stds": [0.05], "halflife": 3}}, "ema.posthoc.halflife"),
        ({"posthoc": {"stds": "0.05"}}, "ema.posthoc.stds must be a list"),
        ({"posthoc": {"stds": [0.5]}}, "cannot be expressed"),
        ({"posthoc": {"stds": [0.05]}, "snapshot_every_steps": 5}, "ema.posthoc.snapshot_every_steps"),
    ]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            build_ema(net, {"type": "traditional", **extra})
    with pytest.raises(ValueError, match="posthoc"):
        build_ema(net, {"type": "power", "posthoc": {"stds": [0.05]}})


def _traditional_ema_std(total_steps: int, beta: float, warmup: bool = True) -> float:
    """σ_rel (EDM2 Eq. 123) of the averaging profile of a traditional EMA after `total_steps` updates.

    Update n weighs the model after step n by (1 − β_n)·Π_{m>n} β_m; that model stands for the interval (n − 1, n],
    so the profile is piecewise constant and its variance adds 1/12 step² to the midpoints' variance.
    """
    n = np.arange(1, total_steps + 1, dtype=np.float64)
    decay = np.minimum(beta, 1 - n ** (-2 / 3)) if warmup else np.full_like(n, beta)
    decay[0] = 0.0  # the first update copies the model
    later = np.concatenate([np.cumsum(np.log(decay[:0:-1]))[::-1], [0.0]])  # log Π_{m>n} β_m
    weight = (1 - decay) * np.exp(later)
    assert weight.sum() == pytest.approx(1.0, abs=1e-9)
    mid = (n - 0.5) / total_steps
    mean = (weight * mid).sum()
    var = (weight * (mid**2 + 1 / (12 * total_steps**2))).sum() - mean**2
    return float(np.sqrt(var))


def _reconstruction_error(snapshot_steps, stds, target_step, target_std) -> float:
    """Relative L2 distance between a target power-function profile and its post-hoc reconstruction (Algorithm 3)."""
    in_t = np.repeat(np.asarray(snapshot_steps, dtype=np.float64), len(stds))
    in_s = np.tile(np.asarray(stds, dtype=np.float64), len(snapshot_steps))
    x = solve_posthoc_coefficients(in_t, in_s, [target_step], [target_std])[:, 0]
    g, g_out = std_to_exp(in_s), std_to_exp(target_std)
    gram = profile_inner_product(in_t[:, None], g[:, None], in_t[None], g[None])
    cross = profile_inner_product(in_t, g, target_step, g_out)
    norm2 = profile_inner_product(target_step, g_out, target_step, g_out)
    return float(np.sqrt(max(x @ gram @ x - 2 * x @ cross + norm2, 0.0) / norm2))


SEED_CONFIGS = [(d, a) for d in ("cifar10", "cifar100", "tinyimagenet") for a in "CEG"]
SEED_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "tinyimagenet": 100_000}


@pytest.mark.parametrize("dataset, arch", SEED_CONFIGS, ids=[f"{d}/{a}" for d, a in SEED_CONFIGS])
def test_seed_config_snapshots_reconstruct_the_traditional_ema_length(dataset, arch):
    from edm2_diffusers.training import load_config

    cfg = load_config(ROOT / "configs" / dataset / f"{arch}.yaml")
    ema_cfg, train_cfg = cfg["ema"], cfg["training"]
    # edm2-multi-gpu: ema_pytorch.EMA(beta=0.9993, update_after_step=0, update_every=1) is the evaluated model.
    assert (ema_cfg["type"], ema_cfg["beta"], ema_cfg["warmup"]) == ("traditional", 0.9993, "ema_pytorch")
    ema = build_ema(torch.nn.Linear(1, 1), ema_cfg)
    assert isinstance(ema, TraditionalEMAWithPostHoc)
    images, batch = SEED_IMAGES[dataset], train_cfg["total_batch_size"]
    # Steps per epoch: the last partial batch dropped (images // batch) or kept, as edm2-multi-gpu does.
    for steps_per_epoch in (images // batch, -(-images // batch)):
        total = train_cfg["num_epochs"] * steps_per_epoch
        target = _traditional_ema_std(total, ema.beta)
        assert abs(target - _traditional_ema_std(total, ema.beta, warmup=False)) < 1e-6  # the config comments say so
        expected = (
            {"C": 0.0146, "E": 0.0073, "G": 0.0073} if dataset != "tinyimagenet" else {a: 0.00137 for a in "CEG"}
        )
        assert target == pytest.approx(expected[arch], rel=0.02)
        every = ema.snapshot_every_steps
        steps = list(range(every, total, every)) + [total]  # the trainer also snapshots the last step
        assert len(steps) <= 25  # disk: at most 25 snapshot steps x 2 profiles
        assert _reconstruction_error(steps, ema.stds, total, target) <= 0.03


def test_reconstruction_error_measures_the_profile_distance():
    # A tracked profile reconstructs itself exactly; one far from every snapshot's profile does not.
    assert _reconstruction_error([100, 200], [0.05], 200, 0.05) < 1e-6
    assert _reconstruction_error([100, 200], [0.05], 200, 0.01) > 0.3
    # The closed form agrees with a numerical integral of the profiles (Eq. 121).
    tau = np.linspace(0, 200, 400_001)
    dt = tau[1] - tau[0]
    coefs = solve_posthoc_coefficients([100, 200], [0.10], [200], [0.05])[:, 0]

    def profile(t, std):
        g = std_to_exp(std)
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    target = profile(200, 0.05)
    recon = coefs[0] * profile(100, 0.10) + coefs[1] * profile(200, 0.10)
    numeric = np.sqrt(((recon - target) ** 2).sum() * dt / ((target**2).sum() * dt))
    assert _reconstruction_error([100, 200], [0.10], 200, 0.05) == pytest.approx(numeric, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# A tiny EDM2 U-Net trained briefly while tracking profiles and writing snapshots


def train_step(unet, opt, generator):
    y = torch.randn(BATCH, 1, 8, 8, generator=generator)
    sigma = (torch.randn(BATCH, generator=generator) * 1.2 - 1.2).exp()
    noise = torch.randn(y.shape, generator=generator) * sigma.view(-1, 1, 1, 1)
    D, u = denoise(unet, y + noise, sigma, return_logvar=True)
    loss = (loss_weight(sigma).view(-1, 1, 1, 1) / u.exp().view(-1, 1, 1, 1) * (D - y) ** 2).mean() + u.mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    unet = EDM2UNet2DModel(**TINY).train()
    opt = torch.optim.Adam(unet.parameters(), lr=3e-2)
    run_dir = tmp_path_factory.mktemp("run")
    ema = build_ema(unet, {"stds": [0.05, 0.10], "snapshot_every_steps": EVERY})
    truth = PowerFunctionEMA(unet, stds=(0.075,))  # the profile reconstruction should recover, tracked directly
    mid = None
    for step in range(1, STEPS + 1):
        train_step(unet, opt, gen)
        ema.update(cur_nimg=step * BATCH, batch_size=BATCH)
        truth.update(cur_nimg=step * BATCH, batch_size=BATCH)
        if step % ema.snapshot_every_steps == 0:
            ema.save_snapshots(str(run_dir), step=step, nimg=step * BATCH)
        if step == MID_STEP:
            mid = [params_of(net).clone() for _, net in ema.averaged_models()]
    return dict(unet=unet, ema=ema, truth=truth, run_dir=str(run_dir), mid=mid, opt=opt, gen=gen)


def test_snapshot_files_and_metadata(run):
    files = sorted(os.listdir(os.path.join(run["run_dir"], "phema")))
    expected = [f"phema-{s:09d}-{std:.3f}.safetensors" for s in range(EVERY, STEPS + 1, EVERY) for std in (0.05, 0.1)]
    assert files == sorted(expected)
    snaps = list_snapshots(run["run_dir"])
    last = snaps[-1]
    assert (last.step, last.nimg, last.time, last.std) == (STEPS, STEPS * BATCH, STEPS * BATCH, 0.1)
    assert last.model_config["model_channels"] == 16 and last.model_class.endswith("EDM2UNet2DModel")
    assert len({s.fingerprint for s in snaps}) == 1 and len(last.fingerprint) == 64
    with safe_open(last.path, "pt") as f:
        for name, value in run["ema"].emas[1].state_dict().items():
            torch.testing.assert_close(f.get_tensor(name), value, rtol=0, atol=0)


def test_ema_copies_are_separate_fp32_and_buffers_copied(run):
    unet, ema = run["unet"], run["ema"]
    models = ema.averaged_models()
    assert [label for label, _ in models] == ["ema-0.050", "ema-0.100"]
    n_params = sum(p.numel() for p in unet.parameters())
    for _, net in models:
        assert not any(m is net for m in unet.modules())
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
        assert sum(p.numel() for p in net.parameters()) == n_params
    assert not torch.equal(params_of(models[0][1]), params_of(unet))
    name, buf = next(iter(unet.named_buffers()))
    saved = buf.clone()
    with torch.no_grad():
        buf.mul_(2.0)
    try:
        for _, net in ema.averaged_models():
            torch.testing.assert_close(dict(net.named_buffers())[name], buf)
    finally:
        with torch.no_grad():
            buf.copy_(saved)


def test_reconstructing_a_tracked_std_gives_the_tracked_ema(run):
    result = reconstruct(run["run_dir"], [0.10, 0.05])
    assert result.step == STEPS and result.stds == [0.10, 0.05]
    for (std, state), (_, net) in zip(result, reversed(run["ema"].averaged_models())):
        tracked = flat(net.state_dict())
        assert (flat(state) - tracked).abs().max() < 1e-4 * tracked.abs().max(), std


def test_intermediate_std_lands_between_and_near_truth(run):
    ((_, state),) = reconstruct(run["run_dir"], 0.075)
    rec = flat(state)
    ema05, ema10 = (flat(net.state_dict()) for _, net in run["ema"].averaged_models())
    truth = flat(run["truth"].emas[0].state_dict())
    span = (ema05 - ema10).norm()
    assert (rec - ema05).norm() < span and (rec - ema10).norm() < span
    # Much closer to the directly tracked 0.075 profile than either stored profile is.
    assert (rec - truth).norm() < 0.05 * min((truth - ema05).norm(), (truth - ema10).norm())


def test_reconstruct_at_earlier_step_uses_only_earlier_snapshots(run):
    result = reconstruct(run["run_dir"], [0.05, 0.10], step=MID_STEP)
    assert result.step == MID_STEP and max(s.step for s in result.snapshots) == MID_STEP
    for (_, state), tracked in zip(result, run["mid"]):
        model = EDM2UNet2DModel(**TINY)
        model.load_state_dict(state)
        assert (params_of(model) - tracked).abs().max() < 1e-4 * tracked.abs().max()


def test_reconstruction_streams_each_snapshot_once(run, monkeypatch):
    reads = []
    original = reconstruct_module.load_snapshot

    def counting_loader(path):
        reads.append(path)
        return original(path)

    monkeypatch.setattr(reconstruct_module, "load_snapshot", counting_loader)
    result = reconstruct(run["run_dir"], [0.03, 0.075, 0.15])
    assert len(result) == 3
    assert sorted(reads) == sorted(s.path for s in list_snapshots(run["run_dir"]))


def test_state_dict_round_trip_resumes_exactly(run, tmp_path):
    unet, ema = run["unet"], run["ema"]
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    resumed = build_ema(unet, {"stds": [0.05, 0.10]})
    resumed.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True))
    assert resumed.time == ema.time and resumed.num_updates == ema.num_updates
    before = [params_of(net).clone() for _, net in ema.averaged_models()]
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    nimg = int(ema.time) + BATCH
    for tracker in (ema, resumed):
        tracker.update(cur_nimg=nimg, batch_size=BATCH)
    for (_, a), (_, b) in zip(ema.averaged_models(), resumed.averaged_models()):
        assert torch.equal(params_of(a), params_of(b))
    # Restore the shared fixture.
    with torch.no_grad():
        for p in unet.parameters():
            p.sub_(0.01)
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    ema.load_state_dict(state)
    assert all(torch.equal(params_of(net), b) for (_, net), b in zip(ema.averaged_models(), before))
    with pytest.raises(ValueError, match="stds"):
        build_ema(unet, {"stds": [0.05, 0.2]}).load_state_dict(state)
    with pytest.raises(ValueError, match="increase"):
        resumed.update(cur_nimg=BATCH, batch_size=BATCH)


def test_accelerate_checkpoint_restores_ema(tmp_path):
    from accelerate import Accelerator

    net = torch.nn.Linear(3, 3)
    accelerator = Accelerator(cpu=True)
    ema = build_ema(net, {"stds": [0.05, 0.10]})
    accelerator.register_for_checkpointing(ema)
    for step in range(1, 4):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update(cur_nimg=8 * step, batch_size=8)
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = [params_of(m).clone() for _, m in ema.averaged_models()]
    with torch.no_grad():
        net.weight.add_(5.0)
    ema.update(cur_nimg=32, batch_size=8)
    assert not torch.equal(params_of(ema.emas[0]), saved[0])
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert (ema.time, ema.num_updates) == (24.0, 3)
    assert all(torch.equal(params_of(m), s) for (_, m), s in zip(ema.averaged_models(), saved))


def test_accelerate_checkpoint_restores_traditional_ema_with_posthoc_profiles(tmp_path):
    from accelerate import Accelerator

    net = torch.nn.Linear(3, 3)
    accelerator = Accelerator(cpu=True)
    ema = build_ema(net, POSTHOC_CONFIG)
    accelerator.register_for_checkpointing(ema)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        _wander(net, gen)
        ema.update(cur_nimg=8 * step, batch_size=8)
    accelerator.save_state(str(tmp_path / "ckpt"))
    saved = [params_of(m).clone() for m in (ema.ema, *ema.posthoc.emas)]
    _wander(net, gen)
    ema.update(cur_nimg=32, batch_size=8)
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert (ema.num_updates, ema.posthoc.num_updates, ema.posthoc.time) == (3, 3, 24.0)
    assert all(torch.equal(params_of(m), s) for m, s in zip((ema.ema, *ema.posthoc.emas), saved))


def test_float16_snapshots(run, tmp_path):
    paths = run["ema"].save_snapshots(str(tmp_path), step=STEPS, nimg=STEPS * BATCH, dtype="float16")
    assert [os.path.basename(p) for p in paths] == [
        "phema-000000024-0.050.safetensors",
        "phema-000000024-0.100.safetensors",
    ]
    with safe_open(paths[0], "pt") as f:
        assert f.get_tensor("emb_noise.weight").dtype == torch.float16
        buffers = [n for n, _ in run["unet"].named_buffers()]
        assert f.get_tensor(buffers[0]).dtype == torch.float32
    assert not [n for n in os.listdir(tmp_path / "phema") if n.startswith(".")]  # no temporary files left


def test_cli_writes_loadable_models(run, tmp_path):
    spec = importlib.util.spec_from_file_location("reconstruct_ema", ROOT / "examples" / "reconstruct_ema.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    main = cli.main
    out = tmp_path / "out"
    written = main(["--run_dir", run["run_dir"], "--stds", "0.05,0.10,0.15", "--output_dir", str(out)])
    assert sorted(os.listdir(out)) == ["ema-0.050", "ema-0.100", "ema-0.150"] and len(written) == 3
    loaded = EDM2UNet2DModel.from_pretrained(str(out / "ema-0.100"))
    tracked = params_of(run["ema"].emas[1])
    assert (params_of(loaded) - tracked).abs().max() < 1e-4 * tracked.abs().max()
    marker = out / "ema-0.150" / "config.json"
    before = marker.read_text()
    with pytest.raises(FileExistsError, match="ema-0.150"):
        main(["--run_dir", run["run_dir"], "--stds", "0.15", "--output_dir", str(out), "--step", "9"])
    assert marker.read_text() == before
    main(["--run_dir", run["run_dir"], "--stds", "0.15", "--output_dir", str(out), "--step", "9", "--overwrite"])
    assert EDM2UNet2DModel.from_pretrained(str(out / "ema-0.150")) is not None


def test_cli_refuses_stds_whose_folders_collide_before_writing(run, tmp_path):
    spec = importlib.util.spec_from_file_location("reconstruct_ema", ROOT / "examples" / "reconstruct_ema.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"0\.0801 and 0\.0804 share the folder ema-0\.080"):
        cli.main(["--run_dir", run["run_dir"], "--stds", "0.0801,0.0804", "--output_dir", str(out)])
    assert not out.exists()
    # The pipeline export refuses them too: they would share one weight variant name.
    with pytest.raises(ValueError, match="0.0801 and 0.0804 share the variant name ema0080"):
        export_pipelines(run["run_dir"], "0.0801,0.0804", tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("kind", ["power", "traditional"])
def test_checkpoint_ema_state_is_safetensors_and_json_and_round_trips_exactly(kind, tmp_path):
    from edm2_diffusers.training.checkpoint import load_ema_state, save_ema_state

    net = EDM2UNet2DModel(**tiny_unet_config())
    ema = build_ema(net, {"type": kind})
    for step in range(1, 4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update(cur_nimg=8 * step, batch_size=8)
    save_ema_state(ema, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["ema.safetensors", "ema_state.json"]
    other = build_ema(EDM2UNet2DModel(**tiny_unet_config()), {"type": kind})
    assert not torch.equal(params_of(other._copies()[0]), params_of(ema._copies()[0]))
    load_ema_state(other, str(tmp_path))
    for a, b in zip(ema._copies(), other._copies()):
        assert torch.equal(params_of(a), params_of(b))
    assert other.num_updates == ema.num_updates == 3
    assert getattr(other, "time", None) == getattr(ema, "time", None)


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs fail clearly


@pytest.fixture
def run_copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run["run_dir"], dst)
    return dst


def test_bad_steps_and_stds(run_copy):
    with pytest.raises(ValueError, match="at or before step 2"):
        reconstruct(str(run_copy), 0.1, step=2)
    with pytest.raises(ValueError, match="no EMA snapshot at step 13"):
        reconstruct(str(run_copy), 0.1, step=13)
    with pytest.raises(ValueError, match="0.3"):
        reconstruct(str(run_copy), [0.1, 0.3])


def test_missing_snapshots(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reconstruct(str(tmp_path / "nope"), 0.1)
    (tmp_path / "empty" / "phema").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no post-hoc EMA snapshots"):
        reconstruct(str(tmp_path / "empty"), 0.1)
    with pytest.raises(FileNotFoundError, match="phema"):
        reconstruct(str(tmp_path), 0.1)


def test_truncated_snapshot_is_named(run_copy):
    victim = run_copy / "phema" / "phema-000000012-0.050.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="phema-000000012-0.050.safetensors.*truncated or corrupt"):
        reconstruct(str(run_copy), 0.1)


def test_mixed_model_configs_are_rejected(run_copy):
    other = EDM2UNet2DModel(**{**TINY, "model_channels": 32, "channels_per_head": 32})
    ema = PowerFunctionEMA(other, stds=(0.05,))
    ema.update(cur_nimg=BATCH, batch_size=BATCH)
    with pytest.raises(ValueError, match="different model config"):
        ema.save_snapshots(str(run_copy), step=44, nimg=44 * BATCH)
    ema.save_snapshots(str(run_copy / "elsewhere"), step=44, nimg=44 * BATCH)
    shutil.copy(run_copy / "elsewhere" / "phema" / "phema-000000044-0.050.safetensors", run_copy / "phema")
    with pytest.raises(ValueError, match="different model configs"):
        reconstruct(str(run_copy), 0.1)
