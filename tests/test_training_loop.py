"""The training loop: checkpoints, pruning, samples, logs, EMA snapshots, exact resume after SIGKILL, non-finite loss,
and bad input failing before anything is written."""

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_unet_config
from PIL import Image
from safetensors.torch import load_file

from edm2_diffusers.training import NonFiniteLossError, list_checkpoints, load_config, train

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_edm2.py"
TINY = tiny_unet_config(num_class_embeds=10)


def tiny_config(tmp_path: Path, **training) -> Path:
    """A YAML config: tiny class-conditional G on the first 40 digits, 5 batches of 8 per epoch."""
    cfg = {
        "model": TINY,
        "data": {"source": "sklearn_digits", "label_column": "label", "random_flip": True, "max_train_samples": 40},
        "training": {
            "train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_train_steps": 6,
            "learning_rate": 1e-2,
            "lr_warmup_steps": 3,
            "lr_decay_ref_steps": 4,
            "checkpointing_steps": 2,
            "sample_every_steps": 0,
            "report_to": "none",
            "seed": 3,
            "cpu_threads": 1,  # subprocess and in-process runs compute alike
            **training,
        },
        "ema": {"type": "power", "stds": [0.05, 0.1]},
        "sampling": {"num_inference_steps": 2, "grid_rows": 2, "grid_cols": 3},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tree(path: Path) -> dict:
    """Every file under ``path`` with its content hash (to prove nothing was written or changed)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def run_script(*args, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        return proc.returncode, out
    return proc


# ------------------------------------------------------------------------------------------------ in process


def test_train_writes_checkpoints_samples_logs_and_snapshots(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        tiny_config(tmp_path, checkpoints_total_limit=2, sample_every_steps=3, report_to="tensorboard"),
        {"training.output_dir": str(out), "ema.snapshot_every_steps": 3},
    )
    result = train(cfg)

    assert result.step == 6 and result.images_seen == 6 * 8
    assert [s for s, _ in list_checkpoints(out)] == [4, 6]  # checkpoints_total_limit 2 pruned checkpoint-2
    ck = out / "checkpoint-6"
    state = json.loads((ck / "training_state.json").read_text())
    assert state["step"] == 6 and state["images_seen"] == 48 and state["batches_per_epoch"] == 5
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 1)  # 6 batches of a 5-batch epoch
    assert json.loads((ck / "unet_config.json").read_text())["num_class_embeds"] == 10
    weights = load_file(str(ck / "model.safetensors"))
    for name, param in result.unet.state_dict().items():
        assert torch.equal(weights[f"unet.{name}"], param)
    assert not list(out.glob(".tmp-*"))

    grids = sorted((out / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-0000003.png", "step-0000006.png"]
    with Image.open(grids[-1]) as im:  # 2x3 tiles of 8x8 pixels enlarged 8x, 2-pixel gaps
        assert im.size == (3 * 66 + 2, 2 * 66 + 2) and im.mode == "L"
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "phema").glob("*.safetensors")) == [
        "phema-000000003-0.050.safetensors",
        "phema-000000003-0.100.safetensors",
        "phema-000000006-0.050.safetensors",
        "phema-000000006-0.100.safetensors",
    ]
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["max_train_steps"] == 6

    # Nothing left to do: resuming a finished run writes nothing.
    before = tree(out)
    again = train(
        load_config(
            tmp_path / "tiny.yaml", {"training.output_dir": str(out), "training.resume_from_checkpoint": "latest"}
        )
    )
    assert again.step == 6 and tree(out) == before


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(load_config(tiny_config(tmp_path, max_train_steps=2), {"training.output_dir": str(out)}))
    before = tree(out)
    # ln σ ~ N(90, ·) overflows σ² in float32: the loss of the next step is not finite.
    bad = load_config(
        tmp_path / "tiny.yaml",
        {
            "training.output_dir": str(out),
            "training.resume_from_checkpoint": "latest",
            "training.max_train_steps": 4,
            "training.P_mean": 90.0,
        },
    )
    with pytest.raises(NonFiniteLossError, match="at step 3.*checkpoint-2"):
        train(bad)
    assert tree(out) == before


def test_bad_resume_and_reused_output_dir_fail_before_writing(tmp_path):
    out = tmp_path / "run"
    base = {"training.output_dir": str(out)}
    path = tiny_config(tmp_path, max_train_steps=2)

    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        train(load_config(path, {**base, "training.resume_from_checkpoint": str(tmp_path / "missing")}))
    assert not out.exists()

    train(load_config(path, base))
    before = tree(out)
    with pytest.raises(ValueError, match="model_channels: checkpoint 16 vs config 32"):
        train(
            load_config(path, {**base, "training.resume_from_checkpoint": "latest"})
            | {"model": dict(TINY, model_channels=32)}
        )
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(load_config(path, base))
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        train(load_config(path, {**base, "training.resume_from_checkpoint": str(out / "samples")}))
    assert tree(out) == before


def test_a_fresh_run_into_an_unused_dir_with_latest_starts_from_scratch(tmp_path):
    out = tmp_path / "run"
    result = train(
        load_config(
            tiny_config(tmp_path, max_train_steps=1),
            {"training.output_dir": str(out), "training.resume_from_checkpoint": "latest"},
        )
    )
    assert result.step == 1 and [s for s, _ in list_checkpoints(out)] == [1]


# ------------------------------------------------------------------------------------------------ kill and resume


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    # 2 micro-batches per step, 5 batches per epoch: checkpoints fall inside epochs and steps straddle them.
    cfg = tiny_config(tmp_path, max_train_steps=12, checkpointing_steps=3, gradient_accumulation_steps=2)
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    proc = run_script("--config", cfg, "--output_dir", killed, wait=False)
    deadline = time.time() + 240
    while not (killed / "checkpoint-3").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoint-12").exists()
    # What a kill in the middle of a save leaves behind: `latest` must not pick it.
    (killed / ".tmp-checkpoint-99").mkdir()
    (killed / ".tmp-checkpoint-99" / "model.safetensors").write_bytes(b"partial")

    rc, log = run_script("--config", cfg, "--output_dir", killed, "--resume_from_checkpoint", "latest")
    assert rc == 0, log
    assert "resumed from" in log
    # The uninterrupted reference runs in this process (cpu_threads 1, like the subprocesses).
    threads = torch.get_num_threads()
    train(load_config(cfg, {"training.output_dir": str(straight)}))
    assert torch.get_num_threads() == threads  # train() restores the caller's thread count

    a, b = straight / "checkpoint-12", killed / "checkpoint-12"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    ema_a, ema_b = load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))
    assert ema_a.keys() == ema_b.keys() and len(ema_a) > 0
    for key in ema_a:
        assert torch.equal(ema_a[key], ema_b[key]), key
    assert json.loads((a / "ema_state.json").read_text()) == json.loads((b / "ema_state.json").read_text())
    assert json.loads((a / "training_state.json").read_text()) == json.loads((b / "training_state.json").read_text())


def load_script():
    spec = importlib.util.spec_from_file_location("train_edm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_reports_bad_input_as_one_line(tmp_path, capsys):
    script = load_script()
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rat: 0.1}\n")
    assert script.main(["--config", str(bad), "--output_dir", str(tmp_path / "o")]) == 1
    assert "error:" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert (
        script.main(
            [
                "--config",
                str(tiny_config(tmp_path)),
                "--output_dir",
                str(tmp_path / "o"),
                "--dataset_name",
                "x/y",
                "--train_data_dir",
                str(tmp_path),
            ]
        )
        == 1
    )
    assert "not both" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_script_flags_override_the_yaml(tmp_path):
    script = load_script()
    out = tmp_path / "o"
    argv = [
        "--config",
        str(tiny_config(tmp_path)),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--train_batch_size",
        "4",
        "--checkpointing_steps",
        "0",
        "--no-random_flip",
        "--ema_snapshot_steps",
        "2",
    ]
    assert script.main(argv) == 0
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["training"]["max_train_steps"] == 2 and stored["training"]["train_batch_size"] == 4
    assert stored["data"]["random_flip"] is False and stored["ema"]["snapshot_every_steps"] == 2
    assert [s for s, _ in list_checkpoints(out)] == [2]  # 0: only the final checkpoint
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["images_seen"] == 8
    assert len(list((out / "phema").glob("*.safetensors"))) == 2


def test_traditional_ema_with_posthoc_profiles_writes_snapshots_and_exports_the_traditional_average(tmp_path):
    cfg = load_config(
        tiny_config(tmp_path, max_train_steps=4, checkpointing_steps=0, output_dir=str(tmp_path / "run"))
    )
    cfg["ema"] = {
        "type": "traditional",
        "beta": 0.9,
        "warmup": "ema_pytorch",
        "posthoc": {"stds": [0.05, 0.1], "snapshot_every_steps": 3},
    }
    result = train(cfg)
    out = tmp_path / "run"
    # The tracker decides its snapshots: every 3 steps and at the last step, for both profiles.
    steps = sorted({int(p.name.split("-")[1]) for p in (out / "phema").glob("phema-*.safetensors")})
    assert steps == [3, 4] and len(list((out / "phema").glob("*.safetensors"))) == 4
    # The export holds the traditional average the run evaluated, as it is.
    exported = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    ((_, net),) = result.ema.averaged_models()
    for name, value in net.state_dict().items():
        torch.testing.assert_close(exported[name], value.to(exported[name].dtype), rtol=0, atol=0)
