"""The sweep's sampler settings: network evaluations counted on a real pipeline, parsing, and the cheapest choice."""

import math

import pytest
import torch
from conftest import tiny_unet_config
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from edm2_diffusers import EDM2Pipeline, EDM2UNet2DModel, EDMHeunScheduler
from edm2_diffusers.evaluation.sweep import _result, margin_threshold, parse_margin
from edm2_diffusers.schedulers.samplers import SamplerSetting, parse_samplers


@pytest.mark.parametrize("name", ["heun", "dpmsolver", "euler"])
@pytest.mark.parametrize("steps", [1, 3, 6])
def test_nfe_is_what_the_pipeline_calls(name, steps):
    """NFE counted with a forward hook on the U-Net: Heun 2N − 1 (Euler on the last step to σ = 0), the others N."""
    torch.manual_seed(0)
    unet = EDM2UNet2DModel(**tiny_unet_config())
    setting = SamplerSetting(name, steps)
    pipe = EDM2Pipeline(unet, setting.make_scheduler(EDMHeunScheduler(sigma_max=40.0, rho=5.0)))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    unet.register_forward_hook(lambda module, args, out: calls.append(1))
    pipe(batch_size=1, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    assert len(calls) == setting.nfe == (2 * steps - 1 if name == "heun" else steps)
    # The swapped scheduler keeps the run's σ range and ρ.
    assert (pipe.scheduler.config.sigma_max, pipe.scheduler.config.rho) == (40.0, 5.0)


def test_parse_samplers():
    got = parse_samplers("heun:18, DPM:18,EDMEulerScheduler:4,dpmsolver,heun:18", default_steps=10)
    assert got == [
        SamplerSetting("heun", 18),
        SamplerSetting("dpmsolver", 18),
        SamplerSetting("euler", 4),
        SamplerSetting("dpmsolver", 10),
    ]
    assert [s.nfe for s in got] == [35, 18, 4, 10]
    assert got[1].scheduler_class == EDMDPMSolverMultistepScheduler.__name__
    assert got[2].scheduler_class == EDMEulerScheduler.__name__
    assert parse_samplers([("heun", 5)]) == [SamplerSetting("heun", 5)]
    for bad, match in (("lms:10", "unknown scheduler"), ("heun:x", "integer"), ("heun:0", "at least 1"), (",", "no")):
        with pytest.raises(ValueError, match=match):
            parse_samplers(bad)


def test_margin():
    assert parse_margin("2%") == (0.02, True)
    assert parse_margin(0.5) == (0.5, False)
    assert margin_threshold(10.0, "2%") == pytest.approx(10.2)
    assert margin_threshold(10.0, "0.5") == pytest.approx(10.5)
    for bad in ("two", "-1%", "inf", "nan"):
        with pytest.raises(ValueError, match="margin"):
            parse_margin(bad)


def _rows(values):
    """Rows of a sweep: (std, scheduler, steps) → fd."""
    out = []
    for (std, name, steps), fd in values.items():
        s = SamplerSetting(name, steps)
        row = {"std": std, "scheduler": s.scheduler_class, "num_inference_steps": steps, "nfe": s.nfe}
        out.append(dict(row, fd=fd, step=9))
    return out


def test_cheapest_within_margin_at_the_best_std():
    rows = _rows(
        {
            (0.05, "heun", 18): 10.0,
            (0.05, "dpmsolver", 18): 10.1,
            (0.05, "dpmsolver", 10): 10.3,
            (0.05, "euler", 5): math.nan,
            (0.10, "heun", 18): 11.0,
            (0.10, "dpmsolver", 10): 10.15,  # cheap and close, but at another std than the best
        }
    )
    r = _result(rows, "fd", "2%")
    assert (r.best_std, r.best_metric, r.best_row["nfe"]) == (0.05, 10.0, 35)
    assert r.cheapest["nfe"] == 18 and r.cheapest["scheduler"] == "EDMDPMSolverMultistepScheduler"
    assert r.cheapest["threshold"] == pytest.approx(10.2) and r.cheapest["value"] == 10.1
    # A wider margin admits DPM-Solver at 10 steps; none keeps the best itself.
    assert _result(rows, "fd", "0.35").cheapest["nfe"] == 10
    assert _result(rows, "fd", "0%").cheapest["nfe"] == 35
    # Equal NFE: the lower metric wins.
    tie = _rows({(0.05, "heun", 18): 10.0, (0.05, "euler", 10): 10.1, (0.05, "dpmsolver", 10): 10.05})
    assert _result(tie, "fd", "5%").cheapest["scheduler"] == "EDMDPMSolverMultistepScheduler"
