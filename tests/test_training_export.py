"""The end of a training run: the EMA exported into ``output_dir/pipeline`` (power-function and traditional EMA), the
last step's snapshot, the push to the Hub (only the network boundary faked, as in test_export.py), a bad repository
id failing before anything is written, and the quickstart script's closing report."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hub_http import hub_transport, whoami
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file
from test_export import FakeHub

from edm2_diffusers import EDM2Pipeline
from edm2_diffusers.hub import check_export, load_pipeline, read_export_info
from edm2_diffusers.training import load_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    sample_size=8, in_channels=1, out_channels=1, architecture="G", model_channels=16, channel_mult=[1, 2],
    num_blocks=1, attn_resolutions=[4], channels_per_head=16, logvar_channels=16, num_class_embeds=10,
)  # fmt: skip


def tiny_config(tmp_path: Path, ema=None, **training) -> Path:
    """3 steps of a tiny class-conditional G on 32 digits; power EMA without periodic snapshots by default."""
    cfg = {
        "model": TINY,
        "data": {"source": "sklearn_digits", "label_column": "label", "max_train_samples": 32},
        "training": {
            "train_batch_size": 8,
            "max_train_steps": 3,
            "lr_warmup_steps": 2,
            "checkpointing_steps": 0,
            "sample_every_steps": 0,
            "report_to": "none",
            "seed": 2,
            "cpu_threads": 1,
            **training,
        },
        "ema": ema if ema is not None else {"type": "power", "stds": [0.05, 0.10]},
        "sampling": {"num_inference_steps": 2, "grid_rows": 2, "grid_cols": 2},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tree(path: Path) -> dict:
    if not path.exists():
        return {}
    files = (p for p in path.rglob("*") if p.is_file())
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def sample(pipe, n=2, seed=0):
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    return pipe(batch_size=n, class_labels=[3, 7][:n], num_inference_steps=2, generator=gen, output_type="np").images


def load_script():
    spec = importlib.util.spec_from_file_location("train_edm2_script", ROOT / "examples" / "train_edm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ power EMA


def test_power_ema_run_ends_with_a_loadable_export_of_its_ema(tmp_path):
    out = tmp_path / "run"
    result = train(load_config(tiny_config(tmp_path), {"training.output_dir": str(out)}))

    # snapshot_every_steps is 0, yet the last step has a snapshot of each profile: the export is made from them.
    assert sorted(p.name for p in (out / "phema").iterdir()) == [
        "phema-000000003-0.050.safetensors",
        "phema-000000003-0.100.safetensors",
    ]
    assert result.pipeline_dir == str(out / "pipeline") and result.is_main_process
    assert check_export(out / "pipeline") == [out / "pipeline"]
    info = read_export_info(out / "pipeline")
    assert info["run"]["step"] == 3 and info["run"]["nimg"] == 24
    assert info["model_name"] == "run" and info["repo_id"] == "your-username/run"  # named after the run
    assert [(v["std"], v["variant"]) for v in info["variants"]] == [(0.05, "ema0050"), (0.10, "ema0100")]

    # The exported weights are the EMA profiles the run tracked, each a weight variant, the first also the default.
    unet = out / "pipeline" / "unet"
    for (label, net), name in zip(result.ema.averaged_models(), (".", ".ema0100.")):
        saved = load_file(str(unet / f"diffusion_pytorch_model{name}safetensors"))
        for name, value in net.state_dict().items():
            torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-6, msg=f"{label} {name}")

    # Both loaders give pipelines that sample alike, with the run's sampling settings.
    from diffusers import DiffusionPipeline

    ours = load_pipeline(out / "pipeline")
    remote = DiffusionPipeline.from_pretrained(str(out / "pipeline"), trust_remote_code=True)
    assert isinstance(ours, EDM2Pipeline) and type(remote).__name__ == "EDM2Pipeline"
    a, b = sample(ours), sample(remote)
    assert a.shape == (2, 8, 8, 1) and np.isfinite(a).all() and not np.allclose(a[0], a[1])
    np.testing.assert_allclose(a, b, atol=1e-5)
    reference = EDM2Pipeline(unet=result.ema.averaged_models()[0][1], scheduler=ours.scheduler)
    np.testing.assert_allclose(sample(reference), a, atol=1e-5)

    # Resuming the finished run writes nothing; with the export gone (a run stopped while exporting) it exports again.
    before = tree(out)
    resume = {"training.output_dir": str(out), "training.resume_from_checkpoint": "latest"}
    assert train(load_config(tmp_path / "tiny.yaml", resume)).pipeline_dir == str(out / "pipeline")
    assert tree(out) == before
    root_weights = before["pipeline/unet/diffusion_pytorch_model.safetensors"]
    shutil.rmtree(out / "pipeline")
    train(load_config(tmp_path / "tiny.yaml", resume))
    assert tree(out)["pipeline/unet/diffusion_pytorch_model.safetensors"] == root_weights


def test_a_last_step_between_snapshots_gets_its_own_snapshot(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(tiny_config(tmp_path), {"training.output_dir": str(out), "ema.snapshot_every_steps": 2})
    cfg["training"]["export_pipeline"] = False
    result = train(cfg)
    steps = sorted({int(p.name.split("-")[1]) for p in (out / "phema").iterdir()})
    assert steps == [2, 3] and result.pipeline_dir is None and not (out / "pipeline").exists()


# ------------------------------------------------------------------------------------------------ traditional EMA


def test_traditional_ema_run_exports_its_single_average(tmp_path):
    out = tmp_path / "run"
    ema = {"type": "traditional", "beta": 0.9, "warmup_steps": 1}
    result = train(load_config(tiny_config(tmp_path, ema=ema), {"training.output_dir": str(out)}))

    assert not (out / "phema").exists()  # a traditional EMA writes no snapshots
    assert check_export(out / "pipeline") == [out / "pipeline"]
    info = read_export_info(out / "pipeline")
    assert info["ema"] == {"type": "traditional", "beta": 0.9, "warmup_steps": 1}
    assert info["variants"] == [{"std": None, "variant": None, "metrics": {}}]
    saved = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    (_, net), = result.ema.averaged_models()  # fmt: skip
    raw = dict(result.unet.named_parameters())
    for name, value in net.state_dict().items():
        assert torch.equal(saved[name], value), name
    assert any(not torch.equal(saved[n], raw[n].detach()) for n in raw), "the export is the average, not the raw model"
    card = ModelCard.load(out / "pipeline" / "README.md")
    assert "traditional EMA (β = 0.9 per step, warmed up over 1 steps)" in card.text
    assert "post-hoc EMA reconstructions" not in card.text
    assert sample(load_pipeline(out / "pipeline")).shape == (2, 8, 8, 1)


def test_traditional_ema_with_posthoc_profiles_exports_the_average_and_keeps_snapshots(tmp_path):
    from edm2_diffusers.hub import export_run

    out = tmp_path / "run"
    ema = {"type": "traditional", "beta": 0.9, "warmup": "ema_pytorch", "posthoc": {"stds": [0.05, 0.10]}}
    cfg = load_config(tiny_config(tmp_path, ema=ema), {"training.output_dir": str(out), "ema.snapshot_every_steps": 2})
    result = train(cfg)

    # Snapshots of the power-function profiles every 2 steps and at the last one.
    names = sorted(p.name for p in (out / "phema").iterdir())
    assert names == [f"phema-{s:09d}-{d}.safetensors" for s in (2, 3) for d in ("0.050", "0.100")]
    # The export is the traditional EMA, as it is.
    info = read_export_info(out / "pipeline")
    assert info["ema"]["type"] == "traditional" and info["ema"]["warmup"] == "ema_pytorch"
    saved = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    ((_, net),) = result.ema.averaged_models()
    for name, value in net.state_dict().items():
        assert torch.equal(saved[name], value), name
    # Post-hoc EMA of the same run: any std reconstructs from the snapshots.
    export_run(out, tmp_path / "posthoc", stds=[0.07], overwrite=True)
    posthoc = load_file(str(tmp_path / "posthoc" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(posthoc[n], v) for n, v in net.state_dict().items() if v.is_floating_point())
    assert sample(load_pipeline(tmp_path / "posthoc")).shape == (2, 8, 8, 1)


# ------------------------------------------------------------------------------------------------ Hub


@pytest.fixture
def hub_http():
    with hub_transport() as server:
        yield server


def test_push_to_hub_sends_the_final_export(tmp_path, monkeypatch, hub_http):
    hub_http.tokens["hf_secret"] = whoami("alice")  # the access check before training
    hub = FakeHub(monkeypatch)
    tokens = []
    create_commit = HfApi.create_commit

    def recording(api, *args, **kwargs):
        tokens.append(api.token)
        return create_commit(api, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", recording)
    script = load_script()
    out = tmp_path / "run"
    argv = ["--config", str(tiny_config(tmp_path)), "--output_dir", str(out), "--num_metric_images", "0"]
    argv += ["--push_to_hub", "--hub_model_id", "alice/tiny-edm2", "--hub_private", "--hub_token", "hf_secret"]
    assert script.main(argv) == 0

    assert hub.repos == [dict(repo_id="alice/tiny-edm2", private=True, exist_ok=True, repo_type="model")]
    assert len(hub.commits) == 1 and tokens == ["hf_secret"]
    sent = hub.commits[0]
    assert sent["repo_id"] == "alice/tiny-edm2"
    assert sent["message"] == "Upload EDM2 Config G pipeline: EMA std 0.050 (default), 0.100 at step 3"
    pipeline = out / "pipeline"
    assert sent["files"] == {rel: (pipeline / rel).read_bytes() for rel in tree(pipeline)}
    assert '"alice/tiny-edm2"' in sent["files"]["README.md"].decode()
    # The token is used, never stored with the run.
    assert all(b"hf_secret" not in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["hub_model_id"] == "alice/tiny-edm2"


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--push_to_hub"], "--hub_model_id"),
        (["--push_to_hub", "--hub_model_id", "a/b/c"], "not a valid Hub repository id"),
        (["--push_to_hub", "--hub_model_id", "bad id!"], "not a valid Hub repository id"),
        (["--push_to_hub", "--hub_model_id", "a/b", "--no-export_pipeline"], "needs training.export_pipeline"),
    ],
)
def test_a_bad_hub_id_fails_before_anything_is_written(tmp_path, monkeypatch, capsys, flags, match):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    script = load_script()
    assert script.main(["--config", str(tiny_config(tmp_path)), "--output_dir", str(out), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err
    assert not out.exists() and not hub.repos and not hub.commits


def test_foreign_files_in_the_export_folder_stop_the_run_before_training(tmp_path):
    out = tmp_path / "run"
    (out / "pipeline").mkdir(parents=True)
    (out / "pipeline" / "notes.txt").write_text("mine")
    before = tree(out)
    with pytest.raises(ValueError, match="not a pipeline export"):
        train(load_config(tiny_config(tmp_path), {"training.output_dir": str(out)}))
    assert tree(out) == before


# ------------------------------------------------------------------------------------------------ script report


def test_digits_script_reports_grid_pipeline_and_metrics(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDM2_DIFFUSERS_CACHE", str(tmp_path / "cache"))  # the digits classifier trains here
    out = tmp_path / "run"
    script = load_script()
    argv = ["--config", str(tiny_config(tmp_path)), "--output_dir", str(out), "--num_metric_images", "20"]
    assert script.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"final sample grid: {out / 'samples' / 'step-0000003.png'}" in lines
    assert f"pipeline:          {out / 'pipeline'}" in lines
    report = [line for line in lines if line.startswith("digits metrics of 20 samples (2 Heun steps): FD ")]
    assert len(report) == 1
    fd = float(report[0].split("FD ")[1].split()[0])
    confident = float(report[0].split("confident ")[1].split()[0])
    assert fd > 0 and 0 <= confident <= 1
    assert script.main(argv[:4] + ["--num_metric_images", "1"]) == 1  # one image has no Fréchet distance


def test_pixel_runs_refuse_a_vae(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(tiny_config(tmp_path), {"training.output_dir": str(out)})
    cfg["sampling"]["vae"] = str(tmp_path)
    with pytest.raises(ValueError, match="sampling.vae decodes latent models"):
        train(cfg)
    assert not out.exists()
