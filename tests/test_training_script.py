"""The training script as diffusers users expect it: Accelerate's mixed precision (``accelerate launch
--mixed_precision bf16`` takes effect and is recorded), sample grids in TensorBoard, ``--center_crop``, and fine-tuning
an exported pipeline with ``--pretrained_model_name_or_path`` / ``--variant``."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import free_port, tiny_unet_config
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_training_loop import tiny_config

from edm2_diffusers import EDM2UNet2DModel
from edm2_diffusers.training import load_config, train
from edm2_diffusers.training.checkpoint import architecture
from edm2_diffusers.training.pretrained import build_unet

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_edm2.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_edm2_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ mixed precision


def test_accelerate_launch_mixed_precision_bf16_takes_effect_and_is_recorded(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(tmp_path, max_train_steps=3, checkpointing_steps=0)
    assert "mixed_precision" not in yaml.safe_load(config.read_text())["training"]  # Accelerate's setting applies
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    cmd += [str(SCRIPT), "--config", str(config), "--output_dir", str(out), "--num_metric_images", "0"]
    hf = tmp_path / "hf"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(hf), HF_DATASETS_CACHE=str(hf / "datasets"))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["mixed_precision"] == "bf16"
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["mixed_precision"] == "bf16"
    info = json.loads((out / "pipeline" / "export_info.json").read_text())
    assert info["training"]["mixed_precision"] == "bf16"


def test_a_configured_precision_wins_over_accelerates_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "run"
    cfg = load_config(
        tiny_config(tmp_path, max_train_steps=1, mixed_precision="no", export_pipeline=False),
        {"training.output_dir": str(out)},
    )
    with caplog.at_level(logging.WARNING, logger="edm2_diffusers"):
        train(cfg)
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["mixed_precision"] == "no"
    assert "training.mixed_precision 'no' (config or --mixed_precision) overrides Accelerate's 'bf16'" in caplog.text
    assert cfg["training"]["mixed_precision"] == "no"  # the caller's config is not changed by the run


# ------------------------------------------------------------------------------------------------ trackers


def test_sample_grids_are_logged_to_tensorboard_as_images(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        tiny_config(tmp_path, max_train_steps=2, sample_every_steps=1, report_to="tensorboard", export_pipeline=False),
        {"training.output_dir": str(out)},
    )
    result = train(cfg)
    assert len(result.sample_grids) == 2
    logged = []  # the run's writer (hparams go to writers of their own)
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if "samples" in acc.Tags()["images"]:
            logged += acc.Images("samples")
    assert [e.step for e in logged] == [1, 2]
    for event, png in zip(logged, result.sample_grids):
        with Image.open(io.BytesIO(event.encoded_image_string)) as img, Image.open(png) as saved:
            assert img.size == saved.size == (event.width, event.height)
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(saved.convert("RGB")))


# ------------------------------------------------------------------------------------------------ flags


def test_diffusers_flags_reach_the_config(tmp_path):
    script = load_script()
    args = script.parse_args(
        ["--output_dir", "x", "--no-center_crop", "--mixed_precision", "bf16", "--torch_compile"]
        + ["--pretrained_model_name_or_path", "some/export", "--variant", "ema0100"]
    )
    overrides = {
        dotted: getattr(args, flag) for flag, dotted in script.FLAGS.items() if getattr(args, flag) is not None
    }
    cfg = load_config(tiny_config(tmp_path), overrides)
    assert cfg["data"]["center_crop"] is False and cfg["training"]["mixed_precision"] == "bf16"
    assert cfg["training"]["torch_compile"] is True
    assert cfg["training"]["pretrained_model_name_or_path"] == "some/export"
    assert cfg["training"]["variant"] == "ema0100"
    defaults = load_config(tiny_config(tmp_path))
    assert defaults["data"]["center_crop"] is True and defaults["training"]["mixed_precision"] is None


# ------------------------------------------------------------------------------------------------ fine-tuning


@pytest.fixture
def tiny_export(tmp_path):
    """An export's U-Net folder: root weights and a different ``ema0100`` weight variant, as diffusers stores them."""
    config = tiny_unet_config(num_class_embeds=10)
    torch.manual_seed(1)
    root = EDM2UNet2DModel(**config)
    torch.manual_seed(2)
    variant = EDM2UNet2DModel(**config)
    path = tmp_path / "export"
    root.save_pretrained(path / "unet")
    variant.save_pretrained(path / "unet", variant="ema0100")
    return path, root, variant


def test_pretrained_unet_and_variant_are_loaded_with_their_config(tmp_path, tiny_export):
    path, root, variant = tiny_export
    for name, expected in ((None, root), ("ema0100", variant)):
        cfg = load_config(tiny_config(tmp_path))
        cfg["model"] = {}
        cfg["training"].update(pretrained_model_name_or_path=str(path), variant=name)
        unet = build_unet(cfg)
        assert unet.training
        for key, value in expected.state_dict().items():
            assert torch.equal(unet.state_dict()[key], value), key
        assert cfg["model"] == architecture(expected.config)
        assert cfg["training"]["base_model"] == str(path.resolve())


def test_fine_tuning_from_an_export_records_its_model_and_base(tmp_path, tiny_export):
    path, _, variant = tiny_export
    spec = yaml.safe_load(tiny_config(tmp_path, max_train_steps=1, export_pipeline=False).read_text())
    del spec["model"]  # the export's config is the architecture
    (tmp_path / "no_model.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    argv = ["--config", str(tmp_path / "no_model.yaml"), "--output_dir", str(out), "--num_metric_images", "0"]
    argv += ["--pretrained_model_name_or_path", str(path), "--variant", "ema0100"]
    assert load_script().main(argv) == 0
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["model"] == architecture(variant.config)
    assert recorded["training"]["base_model"] == str(path.resolve())
    assert recorded["training"]["pretrained_model_name_or_path"] == str(path)
    assert architecture(json.loads((out / "checkpoint-1" / "unet_config.json").read_text())) == recorded["model"]


@pytest.mark.parametrize(
    "model, variant, match",
    [
        ({"model_channels": 32}, None, "model_channels: config 32 vs pretrained 16"),
        (None, "ema0999", "no EDM2 U-Net could be loaded"),
    ],
)
def test_a_pretrained_model_that_does_not_fit_stops_before_writing(
    tmp_path, tiny_export, capsys, model, variant, match
):
    path, _, _ = tiny_export
    spec = yaml.safe_load(tiny_config(tmp_path).read_text())
    spec["model"] = model or {}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    argv = ["--config", str(tmp_path / "cfg.yaml"), "--output_dir", str(out), "--pretrained_model_name_or_path"]
    argv += [str(path)] + (["--variant", variant] if variant else [])
    assert load_script().main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err
    assert not out.exists()
