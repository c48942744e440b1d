"""One writer per run folder, `latest` picks only complete checkpoints, and resuming never runs code from a checkpoint.

The locks are exercised across real processes; the checkpoints are real ones written by short training runs.
"""

import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_training_loop import ROOT, run_script, tiny_config, tree

from edm2_diffusers.hub import export_pipelines
from edm2_diffusers.run_lock import LOCK_NAME, FolderLockedError, lock_folder, read_holder
from edm2_diffusers.training import load_config, train
from edm2_diffusers.training.checkpoint import UnsafeCheckpointError

HOLDER = """
import sys, time
from edm2_diffusers.run_lock import lock_folder
lock = lock_folder(sys.argv[1], inside=sys.argv[2] == "inside", purpose="a test holder")
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes our stdin
lock.release()
"""


def hold_lock(folder: Path, inside: bool = True) -> subprocess.Popen:
    """A second process that takes the lock of ``folder`` and holds it until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "inside" if inside else "next"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])),
    )
    assert proc.stdout.readline().strip() == "locked", proc.communicate()[0]
    return proc


def let_go(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=60)
    assert proc.returncode == 0


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ one writer


def test_a_second_training_run_on_a_running_folder_stops_naming_the_holder_and_touches_nothing(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(tmp_path, max_train_steps=40, checkpointing_steps=2, checkpoints_total_limit=2)
    first = run_script("--config", cfg, "--output_dir", out, wait=False)
    deadline = time.time() + 240
    while not (out / "checkpoint-2").exists():
        assert first.poll() is None, first.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.01)
    holder = read_holder(str(out / LOCK_NAME))
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    os.kill(first.pid, signal.SIGSTOP)  # the first run still holds its lock but writes nothing meanwhile
    try:
        before = tree(out)
        # A fresh start (it would refuse the folder's checkpoints anyway) and a resume of `latest`, which without
        # the lock would write checkpoints and prune the first run's.
        for extra in ([], ["--resume_from_checkpoint", "latest"]):
            rc, log = run_script("--config", cfg, "--output_dir", out, "--max_train_steps", "1000", *extra)
            assert rc != 0
            assert f"in use by pid {first.pid} on {socket.gethostname()} since {holder['since']}" in log, log
            assert "Traceback" not in log
        assert tree(out) == before  # nothing of the first run's was touched
    finally:
        os.kill(first.pid, signal.SIGCONT)
    log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log  # the first run finishes undisturbed
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-38", "checkpoint-40"]
    assert not (out / LOCK_NAME).exists()


def test_export_and_reconstruction_into_a_locked_folder_are_refused(tmp_path):
    out = tmp_path / "run"
    train(load_config(tiny_config(tmp_path, max_train_steps=2), {"training.output_dir": str(out)}))
    before = tree(out)
    holder = hold_lock(out)  # another process writes into the run folder
    try:
        # The default export goes inside the run folder, so it needs the run's lock.
        with pytest.raises(FolderLockedError, match=f"in use by pid {holder.pid} on "):
            export_pipelines(out, [0.05], out / "pipeline", overwrite=True)
        spec_path = ROOT / "examples" / "reconstruct_ema.py"
        proc = subprocess.run(
            [sys.executable, str(spec_path), "--run_dir", str(out), "--stds", "0.1", "--output_dir", str(out / "ph")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0 and f"in use by pid {holder.pid}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        let_go(holder)
    assert tree(out) == before
    # An export into another folder held by another process is refused too.
    target = tmp_path / "export"
    holder = hold_lock(target, inside=False)
    try:
        with pytest.raises(FolderLockedError, match=f"pid {holder.pid}.*a test holder"):
            export_pipelines(out, [0.05], target)
        assert not target.exists()
    finally:
        let_go(holder)
    export_pipelines(out, [0.05], target, sample_grid=False)  # released: now it works
    assert (target / "model_index.json").is_file() and not any(p.name.endswith(LOCK_NAME) for p in tmp_path.iterdir())


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    stale = {"pid": pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00", "command": "killed run"}
    (out / LOCK_NAME).write_text(__import__("json").dumps(stale))
    with caplog.at_level(logging.WARNING, logger="edm2_diffusers.run_lock"):
        result = train(load_config(tiny_config(tmp_path, max_train_steps=2), {"training.output_dir": str(out)}))
    assert result.step == 2
    assert f"taking over the stale lock of pid {pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_of_another_host_or_a_live_process_is_not_taken_over(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    import json

    (folder / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "x"}))
    with pytest.raises(FolderLockedError, match="on another host.*delete"):
        lock_folder(folder)
    # A live process of this host named in a file nobody flocks (e.g. on a file system without flock): refused.
    (folder / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "x"}))
    with pytest.raises(FolderLockedError, match=f"pid {os.getppid()}"):
        lock_folder(folder)
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getppid()  # untouched


def test_the_lock_is_reentrant_in_one_process_and_released_last(tmp_path):
    outer = lock_folder(tmp_path)
    inner = lock_folder(tmp_path)
    inner.release()
    assert (tmp_path / LOCK_NAME).exists()
    proc = subprocess.run(
        [sys.executable, "-c", HOLDER, str(tmp_path), "inside"], capture_output=True, text=True, input=""
    )
    assert proc.returncode != 0 and f"in use by pid {os.getpid()}" in proc.stderr
    outer.release()
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------------ latest


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real run of 4 steps with checkpoints at 2 and 4 (power-function EMA), copied by each test."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    train(load_config(tiny_config(tmp, max_train_steps=4, checkpointing_steps=2), {"training.output_dir": str(out)}))
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def resume_cfg(tmp_path: Path, out: Path, resume: str, steps: int = 4):
    return load_config(
        tiny_config(tmp_path, max_train_steps=steps, checkpointing_steps=2),
        {"training.output_dir": str(out), "training.resume_from_checkpoint": resume},
    )


def test_latest_skips_incomplete_checkpoints_and_says_so(trained, tmp_path, caplog):
    out = copy_run(trained, tmp_path)
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-6")
    (out / "checkpoint-6" / "optimizer.bin").unlink()
    (out / "checkpoint-8").mkdir()
    shutil.copy(out / "checkpoint-4" / "training_state.json", out / "checkpoint-8")
    with caplog.at_level(logging.INFO):
        result = train(resume_cfg(tmp_path, out, "latest"))
    assert result.step == 4
    assert "resumed from " + str(out / "checkpoint-4") in caplog.text
    assert "skipping the incomplete checkpoint " + str(out / "checkpoint-8") in caplog.text
    skipped6 = "skipping the incomplete checkpoint " + str(out / "checkpoint-6") + " (no optimizer.bin in it)"
    assert skipped6 in caplog.text
    with pytest.raises(FileNotFoundError, match=r"'checkpoint-6' is not a complete training checkpoint \(no optim"):
        train(resume_cfg(tmp_path, out, "checkpoint-6"))


# ------------------------------------------------------------------------------------------------ no code on resume


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holds_no_pickled_objects_only_data(trained):
    names = sorted(os.listdir(trained / "checkpoint-4"))
    assert not [n for n in names if n.startswith("custom_checkpoint")], names
    assert {"ema.safetensors", "ema_state.json", "model.safetensors", "training_state.json"} <= set(names)


def test_a_malicious_file_in_any_checkpoint_slot_is_refused_before_anything_runs(trained, tmp_path):
    slots = sorted(os.listdir(trained / "checkpoint-4")) + ["custom_checkpoint_0.pkl", "extra.bin"]
    assert len(slots) >= 8
    marker = tmp_path / "pwned"
    messages = set()
    for slot in slots:
        out = copy_run(trained, tmp_path / slot)
        before = tree(out)
        path = out / "checkpoint-4" / slot
        if slot.endswith((".bin", ".pkl", ".pt")):
            torch.save({"state": Payload(marker)}, path)  # a torch zip file whose pickle calls os.system
        else:
            path.write_bytes(pickle.dumps(Payload(marker)))
        for resume in ("latest", str(out / "checkpoint-4")):
            with pytest.raises(UnsafeCheckpointError, match=f"{slot}.*refusing to resume") as err:
                train(resume_cfg(tmp_path / slot, out, resume, steps=6))
            assert not marker.exists(), f"{slot}: the payload ran"
            assert str(err.value).count("\n") == 0
            messages.add(str(err.value).replace(str(out), "RUN"))
        before.pop(f"checkpoint-4/{slot}", None)
        after = tree(out)
        after.pop(f"checkpoint-4/{slot}", None)
        assert after == before  # nothing written
    assert len(messages) == len(slots)  # one message per slot, each naming its file


def test_the_payload_does_run_when_unpickled_so_the_test_can_fail(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, tmp_path / "custom_checkpoint_0.pkl")
    torch.load(tmp_path / "custom_checkpoint_0.pkl", weights_only=False)  # what Accelerate's load_custom_state does
    assert marker.exists()
