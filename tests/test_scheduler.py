"""EDMHeunScheduler against an independent loop of EDM's Algorithm 2 on an analytic denoiser."""

import json
import math
import sys

import pytest
import torch
from diffusers import EDMEulerScheduler, HeunDiscreteScheduler
from torch import nn

from edm2_diffusers import EDMHeunScheduler
from edm2_diffusers.edm import edm_precondition

SIGMA_DATA = 0.5
S = 0.7  # std of the Gaussian data


def gaussian_D(x, sigma, s=S):
    """Exact denoiser of data ~ N(0, s²) per pixel: E[y | x] = x·s²/(s² + σ²)."""
    return x * (s**2 / (s**2 + sigma**2))


class GaussianF(nn.Module):
    """The EDM network F that makes D exact for Gaussian data, called like a diffusers unet: (c_in·x, c_noise).

    It only sees the float32 c_noise, so its σ carries float32 rounding (~1e-7 relative), which the Heun steps
    amplify a little: comparisons allow 1e-5 relative error (a real algorithmic slip costs 1e-3 or more).
    """

    def __init__(self, s=S):
        super().__init__()
        self.s = s
        self.calls = 0

    def forward(self, model_in, c_noise):
        self.calls += 1
        sigma = torch.exp(4 * c_noise.to(torch.float64))
        c = edm_precondition(sigma, SIGMA_DATA)
        x = model_in / c.c_in
        return (gaussian_D(x, sigma, self.s) - c.c_skip * x) / c.c_out


def rho_schedule(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    return [
        (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        for i in range(n)
    ] + [0.0]


def algorithm2(noise, n, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, generator=None):
    """EDM Algorithm 2, written out. The first step's churn (if any) is folded into the initial draw."""
    t = rho_schedule(n)
    gammas = [min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= ti <= s_tmax else 0.0 for ti in t[:n]]
    t0_hat = t[0] * (1 + gammas[0])
    x = noise * math.sqrt(t[0] ** 2 + s_noise**2 * (t0_hat**2 - t[0] ** 2))
    for i in range(n):
        t_hat = t[i] * (1 + gammas[i])
        if i > 0 and gammas[i] > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + s_noise * math.sqrt(t_hat**2 - t[i] ** 2) * eps
        d = (x - gaussian_D(x, t_hat)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d2 = (x_next - gaussian_D(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def run_scheduler(scheduler, model, noise, n, generator=None):
    """The generic diffusers loop."""
    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        F = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(F, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_deterministic_heun_matches_algorithm2(n):
    noise = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    ours = run_scheduler(EDMHeunScheduler(), GaussianF(), noise, n)
    ref = algorithm2(noise, n)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("s_tmax", [10.0, math.inf])
def test_stochastic_heun_matches_algorithm2(s_tmax):
    # s_tmax=10 leaves the first step (σ=80) deterministic, so the generator streams line up draw for draw;
    # s_tmax=inf also churns the first step, whose noise the scheduler folds into init_noise_sigma.
    n, kwargs = 6, dict(s_churn=40.0, s_tmin=0.05, s_tmax=s_tmax, s_noise=1.007)
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ours = run_scheduler(EDMHeunScheduler(**kwargs), GaussianF(), noise, n, torch.Generator().manual_seed(7))
    ref = algorithm2(noise, n, generator=torch.Generator().manual_seed(7), **kwargs)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    deterministic = algorithm2(noise, n)
    assert (ours - deterministic).abs().max() > 1e-3  # the churn really happened


def test_churn_is_reproducible_and_seed_dependent():
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sched = EDMHeunScheduler(s_churn=20.0)
    a = run_scheduler(sched, GaussianF(), noise, 4, torch.Generator().manual_seed(1))
    b = run_scheduler(sched, GaussianF(), noise, 4, torch.Generator().manual_seed(1))
    c = run_scheduler(sched, GaussianF(), noise, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_heun_is_a_second_order_solver_of_the_gaussian_ode():
    # For Gaussian data the probability-flow ODE has the solution x(σ) = x(σ_max)·√(s² + σ²)/√(s² + σ_max²); the
    # last (Euler) step to σ = 0 returns D(x(σ_min); σ_min) = x(σ_min)·s²/(s² + σ_min²).
    noise = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    exact = noise * 80.0 * math.sqrt(S**2 + 0.002**2) / math.sqrt(S**2 + 80.0**2) * S**2 / (S**2 + 0.002**2)
    errors = []
    for n in (32, 64):
        x = run_scheduler(EDMHeunScheduler(), GaussianF(), noise, n)
        errors.append(((x - exact) / exact).abs().max().item())
    assert errors[0] < 0.03
    assert 3.0 < errors[0] / errors[1] < 5.5  # halving the step size quarters the error


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_exactly_2n_minus_1_model_evaluations(n, churn):
    sched = EDMHeunScheduler(s_churn=churn)
    model = GaussianF()
    run_scheduler(sched, model, torch.randn(1, 1, 2, 2, dtype=torch.float64), n, torch.Generator().manual_seed(0))
    assert model.calls == 2 * n - 1
    assert len(sched.timesteps) == 2 * n - 1
    assert len(sched.sigmas) == 2 * n


def test_schedule_timesteps_and_preconditioning():
    sched = EDMHeunScheduler(sigma_min=0.01, sigma_max=40.0, rho=5.0)
    sched.set_timesteps(5)
    steps = torch.tensor(rho_schedule(5, 0.01, 40.0, 5.0), dtype=torch.float64)
    torch.testing.assert_close(sched.step_sigmas, steps)
    # evaluations: σ0, then (σ1, σ1), (σ2, σ2), (σ3, σ3), σ4 — predictor and corrector share σ without churn
    expected = torch.tensor([steps[0]] + [s for s in steps[1:5] for _ in (0, 1)], dtype=torch.float32)
    torch.testing.assert_close(sched.sigmas[:-1], expected)
    assert sched.sigmas[-1] == 0
    torch.testing.assert_close(sched.timesteps, (expected.double().log() / 4).float())
    assert sched.init_noise_sigma == pytest.approx(40.0)

    x, F = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma = 1.3
    c_in = 1 / math.sqrt(sigma**2 + 0.25)
    torch.testing.assert_close(sched.precondition_inputs(x, sigma), x * c_in)
    D = sched.precondition_outputs(x, F, sigma)
    torch.testing.assert_close(D, 0.25 / (sigma**2 + 0.25) * x + sigma * 0.5 * c_in * F)
    # same convention as diffusers' EDM schedulers (model_output = raw F)
    torch.testing.assert_close(D, EDMEulerScheduler().precondition_outputs(x, F, sigma))


def test_step_outputs_denoised_and_tuple():
    sched = EDMHeunScheduler()
    sched.set_timesteps(3)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64) * sched.init_noise_sigma
    model = GaussianF()
    t = sched.timesteps[0]
    out = sched.step(model(sched.scale_model_input(x, t), t), t, x)
    torch.testing.assert_close(out.pred_original_sample, gaussian_D(x, 80.0))
    sched.set_timesteps(3)
    prev, denoised = sched.step(model(sched.scale_model_input(x, t), t), t, x, return_dict=False)
    torch.testing.assert_close(prev, out.prev_sample)
    torch.testing.assert_close(denoised, out.pred_original_sample)


def test_add_noise_uses_the_timestep_sigma():
    sched = EDMHeunScheduler()
    sched.set_timesteps(4)
    y, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = sched.timesteps[[0, 2, 5]]
    sig = sched.sigmas[[0, 2, 5]].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(y, noise, t), y + noise * sig)
    # off-schedule timesteps are read as c_noise = ¼·ln σ
    torch.testing.assert_close(sched.add_noise(y, noise, torch.tensor([0.0])), y + noise)


def test_config_round_trip_and_bad_arguments(tmp_path):
    sched = EDMHeunScheduler(s_churn=5.0, s_tmin=0.1, sigma_max=20.0)
    sched.save_pretrained(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    assert loaded.config.s_tmax == math.inf
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="decreasing"):
        sched.set_timesteps(sigmas=[1.0, 2.0])
    with pytest.raises(ValueError, match="prediction_type"):
        EDMHeunScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="sigma_min"):
        EDMHeunScheduler(sigma_min=100.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        EDMHeunScheduler().scale_model_input(torch.zeros(1), torch.tensor(0.0))


def test_custom_sigmas():
    sched = EDMHeunScheduler()
    sched.set_timesteps(sigmas=[10.0, 1.0, 0.1])
    model = GaussianF()
    x = run_scheduler_with_set(sched, model, torch.randn(2, 1, 2, 2, dtype=torch.float64))
    assert model.calls == 5
    assert torch.isfinite(x).all()


def run_scheduler_with_set(scheduler, model, noise):
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


# -- clip_sample: edm2-multi-gpu's sampler clips D(x; σ) to [−r, r] at every evaluation --

MU, S_NARROW = 1.5, 0.3  # data N(1.5, 0.3²): its exact D leaves [−1, 1] once σ is small


def gaussian_D_mean(x, sigma, mu=MU, s=S_NARROW):
    """Exact denoiser of data ~ N(μ, s²) per pixel: E[y | x] = μ + (x − μ)·s²/(s² + σ²)."""
    return mu + (x - mu) * (s**2 / (s**2 + sigma**2))


class GaussianMeanF(nn.Module):
    """The EDM network F whose D is the exact denoiser of N(μ, s²) data (as GaussianF, with a mean)."""

    def forward(self, model_in, c_noise):
        sigma = torch.exp(4 * c_noise.to(torch.float64))
        c = edm_precondition(sigma, SIGMA_DATA)
        x = model_in / c.c_in
        return (gaussian_D_mean(x, sigma) - c.c_skip * x) / c.c_out


def clipped_heun(noise, n, r=1.0, clip_corrector=True):
    """edm2-multi-gpu's deterministic sampler written out: Heun steps whose every D is clipped to [−r, r]."""
    t = rho_schedule(n)

    def slope(x, sigma, clip=True):
        D = gaussian_D_mean(x, sigma)
        return (x - (D.clamp(-r, r) if clip else D)) / sigma

    x = noise * t[0]
    for i in range(n):
        d = slope(x, t[i])
        x_next = x + (t[i + 1] - t[i]) * d
        if i < n - 1:
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * slope(x_next, t[i + 1], clip_corrector))
        x = x_next
    return x


@pytest.mark.parametrize("n", [1, 4, 18])
def test_clip_sample_matches_the_clipped_heun_loop(n):
    noise = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ours = run_scheduler(EDMHeunScheduler(clip_sample=True), GaussianMeanF(), noise, n)
    torch.testing.assert_close(ours, clipped_heun(noise, n), rtol=1e-5, atol=1e-6)
    assert ours.abs().max() <= 1.0 + 1e-12  # the last (Euler) step to σ = 0 lands on the clipped D


def test_clip_sample_changes_the_result_and_off_is_nvidia():
    n = 18
    noise = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    off = run_scheduler(EDMHeunScheduler(), GaussianMeanF(), noise, n)
    clipped = run_scheduler(EDMHeunScheduler(clip_sample=True), GaussianMeanF(), noise, n)
    # off is EDM's Algorithm 2 (exactly the loop above without clipping), bit for bit the same as before the option
    same_off = run_scheduler(EDMHeunScheduler(clip_sample=False, clip_sample_range=1.0), GaussianMeanF(), noise, n)
    assert torch.equal(off, same_off)
    assert off.mean() > 1.2  # the data's mean 1.5 is reached without clipping ...
    assert (off - clipped).abs().max() > 0.2  # ... and clipping pulls it into [−1, 1]
    # both evaluations of a step are clipped: clipping only the predictor is a different sampler
    assert (clipped - clipped_heun(noise, n, clip_corrector=False)).abs().max() > 1e-3
    wide = run_scheduler(EDMHeunScheduler(clip_sample=True, clip_sample_range=2.0), GaussianMeanF(), noise, n)
    torch.testing.assert_close(wide, clipped_heun(noise, n, r=2.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="clip_sample_range"):
        EDMHeunScheduler(clip_sample=True, clip_sample_range=0.0)


def test_clip_sample_is_stored_in_scheduler_config(tmp_path):
    EDMHeunScheduler(clip_sample=True, clip_sample_range=1.5).save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert stored["clip_sample"] is True and stored["clip_sample_range"] == 1.5
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert loaded.config.clip_sample is True and loaded.config.clip_sample_range == 1.5


# -- diffusers scheduler conventions --


def test_index_for_timestep_resolves_repeats_as_diffusers_heun():
    sched = EDMHeunScheduler()
    sched.set_timesteps(6)
    ts = sched.timesteps
    assert ts[1] == ts[2]  # σ_1: corrector of step 0, predictor of step 1
    reference = HeunDiscreteScheduler()
    for k, t in enumerate(ts):
        expected = reference.index_for_timestep(t, schedule_timesteps=ts)
        assert sched.index_for_timestep(t) == expected
        assert expected % 2 == 0 or k % 2 == 1  # never a corrector where a predictor shares the timestep
    assert sched.index_for_timestep(ts[3]) == 4


@pytest.mark.parametrize("with_begin_index", [False, True])
def test_starting_mid_schedule_begins_a_step(with_begin_index):
    # Start at σ_2 (e.g. image-to-image): the loop over timesteps[4:] must run steps 2 .. N−1 of Algorithm 2.
    n, start = 6, 2
    sched = EDMHeunScheduler()
    sched.set_timesteps(n)
    if with_begin_index:
        sched.set_begin_index(2 * start)
    t = rho_schedule(n)
    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x = noise * t[start]
    model = GaussianF()
    for ts in sched.timesteps[2 * start :]:
        x = sched.step(model(sched.scale_model_input(x, ts), ts), ts, x).prev_sample
    assert model.calls == 2 * (n - start) - 1
    ref = noise * t[start]
    for i in range(start, n):
        d = (ref - gaussian_D(ref, t[i])) / t[i]
        nxt = ref + (t[i + 1] - t[i]) * d
        if t[i + 1] > 0:
            nxt = ref + (t[i + 1] - t[i]) * 0.5 * (d + (nxt - gaussian_D(nxt, t[i + 1])) / t[i + 1])
        ref = nxt
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)


def test_timesteps_and_sigmas_exist_from_construction():
    sched = EDMHeunScheduler(num_train_timesteps=50)
    assert sched.num_inference_steps is None and sched.begin_index is None and sched.step_index is None
    assert len(sched.timesteps) == 2 * 50 - 1 and len(sched.sigmas) == 2 * 50
    assert sched.sigmas[0] == pytest.approx(80.0) and sched.sigmas[-2] == pytest.approx(0.002)
    assert sched.sigmas[-1] == 0
    torch.testing.assert_close(sched.timesteps, (sched.sigmas[:-1].double().log() / 4).float())
    assert sched.init_noise_sigma == pytest.approx(80.0)
    # the default schedule samples too, as the set one does
    noise = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    fresh = run_scheduler_with_set(EDMHeunScheduler(num_train_timesteps=7), GaussianF(), noise)
    torch.testing.assert_close(fresh, algorithm2(noise, 7), rtol=1e-5, atol=1e-6)


def _strict(name):
    raise ValueError(f"non-finite JSON constant {name}")


@pytest.mark.parametrize("s_tmax", [math.inf, 12.5])
def test_scheduler_config_is_strict_json(tmp_path, s_tmax):
    EDMHeunScheduler(s_churn=3.0, s_tmax=s_tmax).save_pretrained(tmp_path)
    text = (tmp_path / "scheduler_config.json").read_text()
    stored = json.loads(text, parse_constant=_strict)
    assert stored["s_tmax"] == (sys.float_info.max if s_tmax == math.inf else s_tmax)  # finite, so old readers work
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert loaded.config.s_tmax == s_tmax
    torch.testing.assert_close(loaded.gammas, EDMHeunScheduler(s_churn=3.0, s_tmax=s_tmax).gammas)
    with pytest.raises(ValueError, match="non-finite"):
        json.loads('{"s_tmax": Infinity}', parse_constant=_strict)  # the check can fail


def test_old_configs_with_infinity_still_load(tmp_path):
    config = json.loads(EDMHeunScheduler(s_churn=2.0).to_json_string())
    config["s_tmax"] = math.inf
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))  # Python writes Infinity
    assert "Infinity" in (tmp_path / "scheduler_config.json").read_text()
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert loaded.config.s_tmax == math.inf and loaded.config.s_churn == 2.0
    assert EDMHeunScheduler(s_tmax=None).config.s_tmax == math.inf
    assert EDMHeunScheduler(s_tmax=sys.float_info.max).config.s_tmax == math.inf
    loaded.save_pretrained(tmp_path / "again")
    json.loads((tmp_path / "again" / "scheduler_config.json").read_text(), parse_constant=_strict)


def test_training_config_sets_clip_sample(tmp_path):
    from edm2_diffusers.training import load_config, validate_config

    base = {"training.output_dir": str(tmp_path / "o"), "training.train_batch_size": 4, "training.max_train_steps": 1}
    path = tmp_path / "c.yaml"
    path.write_text("model: {sample_size: 8}\nsampling: {clip_sample: true, clip_sample_range: 1.5}\n")
    sampling = load_config(path)["sampling"]
    assert sampling["clip_sample"] is True and sampling["clip_sample_range"] == 1.5
    assert load_config(tmp_path / "c.yaml", {"sampling.clip_sample": False})["sampling"]["clip_sample"] is False
    validate_config(load_config(path, base))
    with pytest.raises(ValueError, match="clip_sample_range"):
        validate_config(load_config(path, {**base, "sampling.clip_sample_range": 0.0}))
