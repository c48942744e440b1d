"""Two CPU processes under ``accelerate launch`` (gloo): one model, one global batch, images counted globally."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import free_port, tiny_unet_config
from loopback import run_on_loopback
from safetensors.torch import load_file
from test_run_safety import hold_lock, let_go
from test_training_loop import tree

from edm2_diffusers.models import EDM2UNet2DModel
from edm2_diffusers.training import load_config, train

ROOT = Path(__file__).resolve().parents[1]

# Each rank trains through the library and then writes the weights it holds and what it counted.
RANK_SCRIPT = """
import json, os, sys
from safetensors.torch import save_file
from edm2_diffusers.run_lock import FolderLockedError
from edm2_diffusers.training import load_config, train

out = sys.argv[2]
rank = int(os.environ["RANK"])
try:
    result = train(load_config(sys.argv[1], {"training.output_dir": out, **json.loads(sys.argv[3])}))
except FolderLockedError as err:
    print(f"rank {rank}: {err}", flush=True)
    sys.exit(3)
weights = {k: v.contiguous() for k, v in result.unet.state_dict().items()}
save_file(weights, os.path.join(out, f"rank{rank}.safetensors"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world": int(os.environ["WORLD_SIZE"]), "step": result.step, "images_seen": result.images_seen,
               "has_ema": result.ema is not None, "grids": len(result.sample_grids)}, f)
"""


def launch_two(tmp_path: Path, cfg: Path, out: Path, overrides: str = "{}") -> list[str]:
    """The ``accelerate launch`` command of two CPU processes (gloo) running RANK_SCRIPT."""
    (tmp_path / "rank_train.py").write_text(RANK_SCRIPT)
    # On CPU, `--multi_gpu` is what makes `accelerate launch` start a process group (gloo); the library tells
    # Accelerate it runs on CPU.
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(tmp_path / "rank_train.py"),
        str(cfg),
        str(out),
        overrides,
    ]


def test_two_cpu_processes_train_one_model(tmp_path):
    cfg = {
        "model": tiny_unet_config(),
        "data": {"source": "sklearn_digits", "random_flip": True, "max_train_samples": 64},
        "training": {
            "train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "max_train_steps": 3,
            "checkpointing_steps": 0,
            "sample_every_steps": 0,
            "report_to": "none",
            "lr_warmup_steps": 2,
        },
        "ema": {"type": "power", "stds": [0.1]},
        "sampling": {"num_inference_steps": 2, "grid_rows": 1, "grid_cols": 2},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    cmd = launch_two(tmp_path, tmp_path / "cfg.yaml", out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = run_on_loopback(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    global_batch = 4 * 2 * 2  # per device x processes x accumulation
    for info in ranks:
        assert info["world"] == 2 and info["step"] == 3 and info["images_seen"] == 3 * global_batch
    assert [r["has_ema"] for r in ranks] == [True, False]  # EMA and samples on the main process only
    assert [r["grids"] for r in ranks] == [1, 0]

    w0, w1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    state = json.loads((out / "checkpoint-3" / "training_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch_size"] == global_batch
    assert state["images_seen"] == 3 * global_batch and state["batches_per_epoch"] == 64 // (4 * 2)
    assert (out / "checkpoint-3" / "random_states_1.pkl").exists()  # every process's RNG state is checkpointed
    ckpt = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(ckpt[f"unet.{k}"], w0[k]) for k in w0)

    # Another process holds the run folder: the main process cannot lock it, and neither rank goes on.
    before = tree(out)
    holder = hold_lock(out)
    try:
        cmd[cmd.index("--main_process_port") + 1] = str(free_port())
        cmd[-1] = json.dumps({"training.resume_from_checkpoint": "latest", "training.max_train_steps": 6})
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        let_go(holder)
    assert proc.returncode != 0
    assert f"rank 0: {out} is in use by pid {holder.pid}" in proc.stdout, proc.stdout + proc.stderr
    assert f"rank 1: the main process could not lock the run folder: {out} is in use by pid {holder.pid}" in (
        proc.stdout
    ), proc.stdout + proc.stderr
    assert tree(out) == before


def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path):
    """Two processes × 4 images × 2 micro-steps against one process × 8 images × 2 micro-steps (global batch 16).

    Each global micro-batch holds the same images (Accelerate gives process i the batches i, i+2, ... of the seeded
    order, which together are the one process's batch) and the same draws (flips, σ, ε come from one seed per
    micro-step for the whole global batch, each process keeping its rows). What differs is float arithmetic: each
    process sums the gradient over 4 images and gloo averages the two sums, where one process sums over 8; the
    per-sample loss weighting and Adam's normalisation then carry those last-bit differences along. So the weights
    agree to a float tolerance, not bit for bit: 1e-5 absolute after 4 steps (measured: 7e-7, while training moved
    the weights by up to 1.5).
    """
    base = {
        "model": tiny_unet_config(),
        "data": {"source": "sklearn_digits", "random_flip": True, "max_train_samples": 64},
        "training": {
            "gradient_accumulation_steps": 2,
            "max_train_steps": 4,
            "checkpointing_steps": 0,
            "sample_every_steps": 0,
            "report_to": "none",
            "lr_warmup_steps": 2,
            "cpu_threads": 1,
            "export_pipeline": False,
        },
        "ema": None,
    }
    two = dict(base, training=dict(base["training"], train_batch_size=4))
    one = dict(base, training=dict(base["training"], train_batch_size=8))
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(two))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = run_on_loopback(launch_two(tmp_path, tmp_path / "two.yaml", tmp_path / "two"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = train(load_config(tmp_path / "one.yaml", {"training.output_dir": str(tmp_path / "one")}))
    reference = {k: v.detach() for k, v in result.unet.state_dict().items()}
    torch.manual_seed(0)  # the seed of the runs' initialisation (training.seed)
    start = EDM2UNet2DModel(**tiny_unet_config()).state_dict()
    parallel = load_file(str(tmp_path / "two" / "rank0.safetensors"))
    moved = max((reference[k] - start[k]).abs().max().item() for k in reference)
    worst = max((reference[k] - parallel[k]).abs().max().item() for k in reference)
    print(f"largest change by training {moved:.3e}, largest difference one vs two processes {worst:.3e}")
    assert moved > 0.1  # training moved the weights ...
    assert worst < 1e-5, worst  # ... and both runs moved them alike
