"""An export's default sampler from the EMA sweep: the cheapest setting within the margin becomes the pipeline's
scheduler and stored step count, the card says so, ``sampler="heun"`` turns it off, and a sweep that does not describe
the exported weights (another training step, another EMA std) leaves the Heun sampler with a logged reason.

The sweeps are the real ``sweep_ema`` on a real short digits run (``test_export.train_run``), with a fixed random
projection as the feature extractor; a margin of 1000 % makes the cheapest setting the one with the fewest network
evaluations whatever the tiny model's metrics are: DPM-Solver at 10 steps (10 NFE) against Heun at 18 (35).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler
from huggingface_hub import ModelCard
from test_export import STEPS, ToyFeatures, card_snippets, run_loader, train_run

import edm2_diffusers
from edm2_diffusers import EDM2Pipeline, EDMHeunScheduler
from edm2_diffusers.ema import reconstruct
from edm2_diffusers.evaluation.fid import FeatureStats
from edm2_diffusers.evaluation.sweep import sweep_ema
from edm2_diffusers.hub import check_export, export_pipelines, read_export_info
from edm2_diffusers.hub.sampler_choice import choose_sampler
from edm2_diffusers.runs import read_sweep, run_scheduler
from edm2_diffusers.schedulers.samplers import SamplerSetting

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = "heun:18,dpmsolver:10"
DPM = "EDMDPMSolverMultistepScheduler"


def sweep(run: Path, stds, step=None, samplers=SAMPLERS, margin="1000%"):
    """The real EMA sweep of ``run`` into ``run/sweep`` (its default place, where the export looks)."""
    reference = FeatureStats.from_features(torch.randn(32, 4, generator=torch.Generator().manual_seed(1)), "toy")
    return sweep_ema(
        str(run),
        stds,
        ToyFeatures(),
        reference,
        num_images=8,
        batch_size=8,
        step=step,
        output_dir=str(run / "sweep"),
        overwrite=True,
        progress=False,
        samplers=samplers,
        margin=margin,
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_run(tmp_path_factory.mktemp("digits") / "run")


@pytest.fixture(scope="module")
def swept(run_dir, tmp_path_factory):
    """A copy of the run with a sweep over two EMA stds and two samplers at its last step (6)."""
    run = tmp_path_factory.mktemp("swept") / "run"
    shutil.copytree(run_dir, run)
    result = sweep(run, [0.05, 0.10])
    assert result.cheapest["scheduler"] == DPM and result.cheapest["num_inference_steps"] == 10
    return run, result


@pytest.fixture(scope="module")
def cheap_export(swept, tmp_path_factory) -> Path:
    run, _ = swept
    out = tmp_path_factory.mktemp("exports") / "digits-cheap"
    export_pipelines(run, [0.05, 0.10], out, repo_id="someone/digits-cheap")
    return out


def count_unet_calls(pipe, **kwargs):
    """Sample one image with the pipeline's defaults; returns (images, number of U-Net forward calls)."""
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: calls.append(1))
    pipe.set_progress_bar_config(disable=True)
    try:
        images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    finally:
        hook.remove()
    return images, len(calls)


def test_export_stores_the_sweeps_cheapest_sampler(swept, cheap_export):
    run, _ = swept
    index = json.loads((cheap_export / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", DPM]  # a diffusers class: loaded by name, no custom code
    assert index["default_num_inference_steps"] == 10
    assert not (cheap_export / "scheduler" / "scheduling_edm_heun.py").exists()
    assert check_export(cheap_export) == [cheap_export]
    # Built as the sweep built it: the run's Heun settings through SamplerSetting.make_scheduler.
    expected = SamplerSetting("dpmsolver", 10).make_scheduler(run_scheduler(run)).config
    stored = json.loads((cheap_export / "scheduler" / "scheduler_config.json").read_text())
    assert stored["_class_name"] == DPM
    assert {k: v for k, v in stored.items() if not k.startswith("_")} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in expected.items() if not k.startswith("_")
    }
    info = read_export_info(cheap_export)
    assert info["sampling"]["scheduler"] == DPM and info["sampling"]["nfe"] == 10
    choice = info["sampler_choice"]
    best = json.loads((run / "sweep" / "best.json").read_text())
    assert (choice["sampler"], choice["std"], choice["margin"]) == ("cheapest", best["std"], "1000%")
    assert choice["value"] == best["cheapest"]["value"] and choice["best"]["value"] == best["value"]
    assert choice["heun"] == {"num_inference_steps": STEPS, "nfe": 2 * STEPS - 1}  # the run's own sampler


def test_loaded_pipeline_samples_with_ten_network_evaluations(swept, cheap_export):
    run, _ = swept
    pipe = EDM2Pipeline.from_pretrained(cheap_export)
    assert type(pipe.scheduler) is EDMDPMSolverMultistepScheduler
    images, calls = count_unet_calls(pipe)
    assert calls == 10
    # The same images as the sweep's pipeline for this setting: reconstruction, scheduler and step count.
    rec = reconstruct(str(run), [0.05])
    sweep_pipe = EDM2Pipeline(rec.model(0), SamplerSetting("dpmsolver", 10).make_scheduler(run_scheduler(run)))
    reference, ref_calls = count_unet_calls(sweep_pipe, num_inference_steps=10)
    assert ref_calls == 10
    np.testing.assert_allclose(images, reference, rtol=0, atol=1e-6)
    # A call's num_inference_steps still wins over the stored default.
    assert count_unet_calls(pipe, num_inference_steps=4)[1] == 4


REMOTE = r"""
import json, sys
sys.modules["edm2_diffusers"] = None  # the package cannot be imported: diffusers alone loads the export
import numpy as np
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
calls = []
pipe.unet.register_forward_hook(lambda module, args, out: calls.append(1))
images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), output_type="np").images
np.save(sys.argv[2], images)
print(json.dumps([type(pipe).__module__, type(pipe.scheduler).__module__, type(pipe.scheduler).__name__, len(calls)]))
"""


def test_diffusers_alone_loads_and_samples_with_the_stored_sampler(cheap_export, tmp_path):
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_MODULES_CACHE=str(tmp_path / "mod"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-I", str(tmp_path / "remote.py"), str(cheap_export), str(tmp_path / "images.npy")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pipe_module, sched_module, sched_name, calls = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pipe_module.startswith("diffusers_modules.") and sched_module.startswith("diffusers.schedulers")
    assert (sched_name, calls) == (DPM, 10)
    reference, _ = count_unet_calls(EDM2Pipeline.from_pretrained(cheap_export))
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), reference, rtol=0, atol=1e-6)


def test_card_snippet_loads_from_the_hub_without_the_package(cheap_export, tmp_path):
    """The card's snippet against the (faked) Hub repository: diffusers builds its own scheduler by class name from
    the scheduler config; the code fetched is the pipeline's and the U-Net's only."""
    snippets = card_snippets((cheap_export / "README.md").read_text())
    report, arrays = run_loader(cheap_export, tmp_path / "blocked", block=True, snippets={"root": snippets["root"]})
    assert report["snippets"]["root"] == ["EDM2Pipeline", 4, "Image"]
    assert report["snippets"]["root:downloaded"] == sorted(
        {"model_index.json", "pipeline_edm2.py", "scheduler/scheduler_config.json", "unet/config.json"}
        | {"unet/diffusion_pytorch_model.safetensors", "unet/unet_edm2.py"}
    )
    reference, _ = count_unet_calls(EDM2Pipeline.from_pretrained(cheap_export), num_inference_steps=STEPS)
    np.testing.assert_allclose(arrays["hub:default"][:1], reference, rtol=0, atol=1e-6)


def test_card_names_the_sampler_the_margin_and_the_way_back_to_heun(swept, cheap_export):
    run, _ = swept
    best = json.loads((run / "sweep" / "best.json").read_text())
    card = ModelCard.load(cheap_export / "README.md")
    text = " ".join(card.text.split())  # the template wraps lines
    assert "| scheduler | `EDMDPMSolverMultistepScheduler` |" in card.text
    assert "| steps N (`num_inference_steps`) | 10 (10 network evaluations) |" in card.text
    assert "`EDMDPMSolverMultistepScheduler` at 10 steps (10 network evaluations per image)" in text
    std = best["std"]
    assert f"EMA std {std:.3f} (`ema{round(std * 1000):04d}`)" in text and "training step 6" in text
    best_sampler = best["sampler"]
    assert (
        f"FD {best['cheapest']['value']:.4g} against {best['value']:.4g} for the sweep's best setting, "
        f"`{best_sampler['scheduler']}` at {best_sampler['num_inference_steps']} steps "
        f"({best_sampler['nfe']} network evaluations)"
    ) in text
    assert f"margin of 1000% of the best (at most {best['cheapest']['threshold']:.4g}" in text
    assert "steps of `EDMDPMSolverMultistepScheduler`" in text  # the sample grid's caption
    assert "The pipeline holds `pipeline_edm2.py` and `unet/unet_edm2.py`:" in text  # no Heun code bundled
    assert "(pipeline and U-Net; the scheduler is diffusers' own)" in text
    # The way back to Heun: a snippet that runs as written and samples with 2N - 1 evaluations.
    snippet = card_snippets(card.text)["heun"]
    assert f"num_inference_steps={STEPS}" in snippet
    scope = {}
    exec(compile(snippet.replace("someone/digits-cheap", str(cheap_export)), "<card heun>", "exec"), scope)
    pipe = scope["pipe"]
    assert type(pipe.scheduler) is EDMHeunScheduler and len(scope["images"]) == 4
    assert count_unet_calls(pipe, num_inference_steps=STEPS)[1] == 2 * STEPS - 1
    assert pipe.scheduler.config.sigma_max == run_scheduler(run).config.sigma_max
    # The usage snippets sample with the stored step count.
    assert "num_inference_steps=10" in card_snippets(card.text)["root"]


def test_saved_copy_keeps_the_sampler_and_its_story(cheap_export, tmp_path):
    pipe = EDM2Pipeline.from_pretrained(cheap_export)
    pipe.save_pretrained(tmp_path / "copy")
    info = read_export_info(tmp_path / "copy")
    assert info["sampling"]["scheduler"] == DPM and info["sampler_choice"]["sampler"] == "cheapest"
    assert "### The default sampler comes from the EMA sweep" in (tmp_path / "copy" / "README.md").read_text()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "copy", trust_remote_code=True)
    assert type(loaded.scheduler) is EDMDPMSolverMultistepScheduler
    assert count_unet_calls(loaded)[1] == 10
    # Another scheduler set on the pipeline: the sweep's statement no longer holds.
    pipe.scheduler = EDMHeunScheduler()
    pipe.save_pretrained(tmp_path / "heun")
    assert "sampler_choice" not in read_export_info(tmp_path / "heun")


def test_off_switch_and_explicit_steps_keep_heun(swept, tmp_path, caplog):
    run, _ = swept
    for name, kwargs, reason in (
        ("off", {"sampler": "heun"}, "the Heun sampler was asked for"),
        ("steps", {"num_inference_steps": 3}, "num_inference_steps=3 was given"),
    ):
        out = tmp_path / name
        export_pipelines(run, [0.05, 0.10], out, sample_grid=False, **kwargs)
        index = json.loads((out / "model_index.json").read_text())
        assert index["scheduler"] == ["scheduling_edm_heun", "EDMHeunScheduler"]
        steps = kwargs.get("num_inference_steps", STEPS)
        assert index["default_num_inference_steps"] == steps
        assert count_unet_calls(EDM2Pipeline.from_pretrained(out))[1] == 2 * steps - 1
        assert read_export_info(out)["sampler_choice"]["reason"] == reason
        assert "comes from the EMA sweep" not in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="sampler 'fastest' is not one of cheapest, best, heun"):
        export_pipelines(run, [0.05], tmp_path / "bad", sampler="fastest")
    assert not (tmp_path / "bad").exists()


def test_best_takes_the_sweeps_best_setting(swept, tmp_path):
    run, result = swept
    out = tmp_path / "best"
    export_pipelines(run, "best", out, sampler="best", sample_grid=False)
    best = result.best_row
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"][1] == best["scheduler"]
    assert index["default_num_inference_steps"] == best["num_inference_steps"]
    assert count_unet_calls(EDM2Pipeline.from_pretrained(out))[1] == best["nfe"]
    assert read_export_info(out)["sampler_choice"]["sampler"] == "best"


@pytest.mark.parametrize(
    "stds, step, reason",
    [
        ([0.05, 0.10], 3, "the EMA sweep ran at training step 3, this export is of step 6"),
        ([0.12], None, "the EMA sweep measured its samplers at EMA std 0.12, which is not exported (0.05, 0.1)"),
    ],
)
def test_a_sweep_of_other_weights_keeps_heun_with_a_reason(run_dir, tmp_path, caplog, stds, step, reason):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    result = sweep(run, stds, step=step)
    assert result.cheapest["scheduler"] == DPM  # what the export would take if it applied
    with caplog.at_level(logging.INFO, logger="edm2_diffusers.hub.sampler_choice"):
        export_pipelines(run, [0.05, 0.10], tmp_path / "out", sample_grid=False)
    assert f"the export keeps the Heun sampler ({STEPS} steps) as its default: {reason}" in caplog.text
    assert any(r.levelno == logging.WARNING for r in caplog.records if r.name.endswith("sampler_choice"))
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["scheduler"][1] == "EDMHeunScheduler" and index["default_num_inference_steps"] == STEPS
    assert read_export_info(tmp_path / "out")["sampler_choice"] == {
        "sampler": "heun",
        "requested": "cheapest",
        "reason": reason,
    }


def test_rules_without_a_sweep_or_its_samplers():
    sampling = {"num_inference_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "sigma_data": 0.5}
    heun, choice = choose_sampler("cheapest", {}, 6, [0.05], sampling)
    assert heun["scheduler"] == "EDMHeunScheduler" and heun["nfe"] == 35
    assert choice["reason"] == "no EMA sweep ran (no best.json)"
    old = {"std": 0.05, "step": 6, "sampler": None, "cheapest": None, "path": "RUN/sweep/best.json"}
    assert "compared no samplers" in choose_sampler("cheapest", old, 6, [0.05], sampling)[1]["reason"]
    single = choose_sampler("cheapest", {}, 6, [None], sampling)[1]["reason"]
    assert single.startswith("the export is one given model")


def test_cli_sampler_flag(swept, tmp_path, capsys):
    import importlib.util

    run, _ = swept
    spec = importlib.util.spec_from_file_location("export_script", REPO_ROOT / "examples" / "export_pipeline.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    common = ["--run_dir", str(run), "--stds", "0.05,0.10", "--no_sample_grid"]
    script.main([*common, "--output_dir", str(tmp_path / "a")])
    assert f"default sampler: {DPM}, 10 steps (the EMA sweep's cheapest setting)" in capsys.readouterr().out
    script.main([*common, "--output_dir", str(tmp_path / "b"), "--sampler", "heun"])
    heun = f"default sampler: EDMHeunScheduler, {STEPS} steps (the Heun sampler was asked for)"
    assert heun in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.parse_args([*common, "--output_dir", str(tmp_path / "c"), "--sampler", "fast"])
    assert read_sweep(run)["cheapest"]["nfe"] == 10
    assert edm2_diffusers.__file__.startswith(str(REPO_ROOT))
