"""The bad inputs of issue 13 through `train()` and the training script: each stops with one line naming the problem
and the file, before the output folder is created."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_unet_config
from PIL import Image
from test_training_data import corrupt_png
from test_training_loop import run_script, tiny_config

from edm2_diffusers.training import load_config, train
from edm2_diffusers.training.checkpoint import UnsafeCheckpointError


def image_folder(root: Path, count: int = 16) -> Path:
    """An image folder of ``count`` grey 8×8 PNGs."""
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8), 8 * i, dtype=np.uint8), "L").save(root / f"img{i:02d}.png")
    return root


def folder_config(tmp_path: Path, data_dir: Path) -> Path:
    cfg = {
        "model": tiny_unet_config(),
        "data": {"train_data_dir": str(data_dir), "cache_dir": str(tmp_path / "hf-cache")},
        "training": {
            "train_batch_size": 4,
            "max_train_steps": 2,
            "checkpointing_steps": 0,
            "sample_every_steps": 0,
            "report_to": "none",
            "cpu_threads": 1,
        },
        "ema": {"type": "power", "stds": [0.05]},
        "sampling": {"num_inference_steps": 2, "grid_rows": 1, "grid_cols": 2},
    }
    path = tmp_path / "folder.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_undecodable_png_stops_train_and_the_script_before_the_run_folder_exists(tmp_path):
    data = image_folder(tmp_path / "images")
    corrupt_png(data / "img07.png")
    cfg = folder_config(tmp_path, data)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"img07\.png.*dataset row 7"):
        train(load_config(cfg, {"training.output_dir": str(out)}))
    assert not out.exists()
    rc, log = run_script("--config", cfg, "--output_dir", out)
    assert rc == 1, log
    assert "img07.png" in log and "dataset row 7" in log and "Traceback" not in log
    assert not out.exists()


def test_a_tampered_checkpoint_to_resume_from_stops_before_the_run_folder_exists(tmp_path):
    cfg = tiny_config(tmp_path, max_train_steps=2)
    source = tmp_path / "source"
    train(load_config(cfg, {"training.output_dir": str(source)}))
    checkpoint = source / "checkpoint-2"
    (checkpoint / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04K\x01.")
    out = tmp_path / "run"
    with pytest.raises(UnsafeCheckpointError, match="custom_checkpoint_0.pkl"):
        train(load_config(cfg, {"training.output_dir": str(out), "training.resume_from_checkpoint": str(checkpoint)}))
    assert not out.exists()
    rc, log = run_script("--config", cfg, "--output_dir", out, "--resume_from_checkpoint", checkpoint)
    assert rc == 1 and "custom_checkpoint_0.pkl" in log and "Traceback" not in log, log
    assert not out.exists()
    # An incomplete one likewise.
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    shutil.copytree(checkpoint, tmp_path / "partial")
    (tmp_path / "partial" / "optimizer.bin").unlink()
    with pytest.raises(FileNotFoundError, match="optimizer.bin"):
        train(
            load_config(
                cfg, {"training.output_dir": str(out), "training.resume_from_checkpoint": str(tmp_path / "partial")}
            )
        )
    assert not out.exists()
