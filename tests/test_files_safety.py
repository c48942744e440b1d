"""Leftovers of killed writers are cleaned, files follow the umask, a full disk and a damaged `model_index.json` stop
with one line naming the file, and nothing already written is lost.

The full disk is a real one: a 64 KiB tmpfs mounted for the test (it needs root; without it the tests skip).
"""

import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from test_run_safety import dead_pid
from test_training_loop import tiny_config, tree

from edm2_diffusers.ema.snapshots import write_snapshot
from edm2_diffusers.files import DiskFullError, process_umask, staged_folder
from edm2_diffusers.hub import export_pipelines, load_pipeline
from edm2_diffusers.training import load_config, train

ROOT = Path(__file__).resolve().parents[1]
UMASK = 0o027  # not the usual 0o022, so that a mode copied from the default cannot pass by chance


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real 4-step run (checkpoints at 2 and 4, snapshots, the export) written under umask 027."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    previous = os.umask(UMASK)
    try:
        train(
            load_config(tiny_config(tmp, max_train_steps=4, checkpointing_steps=2), {"training.output_dir": str(out)})
        )
    finally:
        os.umask(previous)
    return out


def modes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------ permissions


def test_every_file_of_a_run_follows_the_umask_weights_included(trained):
    found = modes(trained)
    weights = [name for name in found if name.endswith(".safetensors")]
    # checkpoint weights (Accelerate's and the EMA's), the snapshots and the exported pipelines
    assert any(n.startswith("checkpoint-4/") for n in weights) and any(n.startswith("phema/") for n in weights)
    assert any(n.startswith("pipeline/") for n in weights)
    wrong = {name: oct(mode) for name, mode in found.items() if mode != 0o666 & ~UMASK and ".lock" not in name}
    assert not wrong


def test_the_safetensors_writer_alone_would_write_0600_so_the_test_can_fail(tmp_path):
    from safetensors.torch import save_file

    previous = os.umask(UMASK)
    try:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "raw.safetensors"))
        write_snapshot(str(tmp_path / "ours.safetensors"), {"a": torch.zeros(2)}, {})
        assert process_umask() == UMASK
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "raw.safetensors").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ours.safetensors").stat().st_mode) == 0o666 & ~UMASK


# ------------------------------------------------------------------------------------------------ leftovers


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc.pid
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_restarting_run_removes_the_leftovers_of_dead_writers_and_keeps_live_ones(trained, tmp_path, live_pid):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    dead = dead_pid()
    planted_dead = [
        out / "phema" / f".phema-000000004-0.050.safetensors.tmp-{dead}-{uuid.uuid4().hex[:8]}",
        out / "phema" / f".phema-000000003-0.050.safetensors.tmp-{dead}",  # the name of earlier versions
        out / f".config.yaml.tmp-{dead}-{uuid.uuid4().hex[:8]}",
        out / "samples" / f".step-0000004.png.tmp-{dead}-{uuid.uuid4().hex[:8]}.png",
    ]
    dead_folders = [
        out / f".pipeline.partial-{dead}-{uuid.uuid4().hex[:8]}",
        out / f".pipeline.partial-{uuid.uuid4().hex[:8]}",  # no pid: the run's lock says nobody writes it
        out / ".tmp-checkpoint-6",
    ]
    planted_live = [out / "phema" / f".phema-000000006-0.050.safetensors.tmp-{live_pid}-{uuid.uuid4().hex[:8]}"]
    live_folders = [out / f".pipeline.partial-{live_pid}-{uuid.uuid4().hex[:8]}"]
    (out / "samples").mkdir(exist_ok=True)
    for path in planted_dead + planted_live:
        path.write_bytes(b"partial")
    for folder in dead_folders + live_folders:
        folder.mkdir()
        (folder / "model_index.json").write_text("{")
    cfg = load_config(
        tiny_config(tmp_path, max_train_steps=4, checkpointing_steps=2),
        {"training.output_dir": str(out), "training.resume_from_checkpoint": "latest"},
    )
    train(cfg)
    assert not [p for p in planted_dead + dead_folders if p.exists()]
    assert all(p.exists() for p in planted_live + live_folders)


def test_an_export_removes_dead_staging_folders_of_its_target_only(trained, tmp_path, live_pid):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    target = tmp_path / "export"
    dead_stage = tmp_path / f".export.partial-{dead_pid()}-{uuid.uuid4().hex[:8]}"
    live_stage = tmp_path / f".export.partial-{live_pid}-{uuid.uuid4().hex[:8]}"
    other = tmp_path / f".other.partial-{dead_pid()}-{uuid.uuid4().hex[:8]}"
    for folder in (dead_stage, live_stage, other):
        folder.mkdir()
    export_pipelines(str(out), [0.05], str(target), sample_grid=False)
    assert (target / "model_index.json").is_file()
    assert not dead_stage.exists() and live_stage.exists() and other.exists()


# ------------------------------------------------------------------------------------------------ full disk


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_a_snapshot_write_with_one_line_naming_the_file_and_keeps_the_earlier_one(tiny_disk):
    path = tiny_disk / "phema" / "phema-000000002-0.050.safetensors"
    write_snapshot(str(path), {"w": torch.ones(1000)}, {"step": "2"})  # 4 KB fit
    before = tree(tiny_disk)
    with pytest.raises(DiskFullError, match=r"no space left on the device writing .*phema-000000002-0\.050") as err:
        write_snapshot(str(path), {"w": torch.ones(100_000)}, {"step": "2"})  # 400 KB do not
    assert "\n" not in str(err.value) and "os error 28" not in str(err.value)
    assert tree(tiny_disk) == before  # the earlier file as it was, no temporary file left


def test_a_full_disk_stops_reconstruct_ema_with_one_line_and_keeps_the_earlier_folder(trained, tiny_disk):
    target = tiny_disk / "ema-0.050"
    with staged_folder(target) as staging:
        (staging / "config.json").write_text("{}")
    before = tree(tiny_disk)
    rc, log = run_script_module(
        "reconstruct_ema.py", "--run_dir", trained, "--stds", "0.05", "--output_dir", tiny_disk, "--overwrite"
    )
    assert rc != 0 and "no space left on the device writing" in log and "ema-0.050" in log, log
    assert "Traceback" not in log and "SafetensorError" not in log
    assert tree(tiny_disk) == before


def run_script_module(name: str, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True, text=True, env=env
    )
    return done.returncode, done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ damaged export


def test_a_damaged_model_index_is_named_in_one_line(trained, tmp_path):
    export = tmp_path / "pipeline"
    shutil.copytree(trained / "pipeline", export)
    (export / "model_index.json").write_text('{"_class_name": "EDM2Pipeline", ')
    with pytest.raises(ValueError, match=r"pipeline/model_index\.json is not valid JSON"):
        load_pipeline(str(export))
