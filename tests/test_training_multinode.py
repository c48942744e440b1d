"""Several nodes over loopback and elastic resume: the global sequence of samples and noise, and the weights.

Every run trains the tiny U-Net on 48 digits with a global batch of 16 (2 micro-steps of 8 images: 2 processes x 4
or 1 x 8), 4 steps with checkpoints at steps 2 and 4; an epoch is 3 steps, so the runs cross an epoch and a resume at
step 2 starts inside one. tests/multinode_rank.py records the images (after flips), σ and ε of every micro-step on
every process; the global micro-batch is the processes' rows in rank order.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, tiny_unet_config
from loopback import beyond_loopback, kill, remote_addresses
from multinode_rank import spy
from safetensors.torch import load_file
from test_training_loop import tree

from edm2_diffusers.training import load_config, loop, train

RANK = Path(__file__).with_name("multinode_rank.py")
ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))


def config(tmp: Path) -> Path:
    cfg = {
        "model": tiny_unet_config(),
        "data": {"source": "sklearn_digits", "random_flip": True, "max_train_samples": 48},
        "training": {
            "total_batch_size": 16,
            "gradient_accumulation_steps": 2,
            "max_train_steps": 4,
            "checkpointing_steps": 2,
            "sample_every_steps": 0,
            "report_to": "none",
            "lr_warmup_steps": 2,
            "cpu_threads": 1,
            "export_pipeline": False,
        },
        "ema": {"type": "power", "stds": [0.1], "snapshot_every_steps": 2},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(cfg: Path, out: Path, records: Path, overrides: dict | None = None, nodes: int = 1, port=None, **env):
    """``accelerate launch`` of 2 CPU processes in all: one node of 2, or (``nodes=2``) one of 2 nodes of 1 each,
    ``env["NODE"]`` naming the machine rank; the processes meet on 127.0.0.1:``port``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", str(nodes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if nodes > 1:
        cmd += ["--machine_rank", env.pop("NODE"), "--main_process_ip", "127.0.0.1"]
    cmd += ["--main_process_port", str(port or free_port()), str(RANK), str(cfg), str(out), str(records)]
    cmd.append(json.dumps(overrides or {}))
    log = open(records.parent / f"{records.name}-{env.get('LOG', 'node')}.log", "w")
    env.pop("LOG", None)
    return subprocess.Popen(cmd, env={**ENV, **env}, stdout=log, stderr=subprocess.STDOUT)


def wait(procs, timeout=300, stop_markers=()) -> set[tuple[str, str, int]]:
    """Wait for every launcher to exit (or, with ``stop_markers``, for the markers and then kill them all);
    returns the remote ends of the sockets seen meanwhile."""
    seen, end = set(), time.monotonic() + timeout
    while time.monotonic() < end:
        seen |= remote_addresses(procs)
        if stop_markers and all(m.exists() for m in stop_markers):
            kill(procs)
            return seen
        if not stop_markers and all(p.poll() is not None for p in procs):
            return seen
        time.sleep(0.2)
    kill(procs)
    raise AssertionError("the launched processes did not finish in time")


def logs(records: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(records.parent.glob(f"{records.name}-*.log")))


def start_two_nodes(cfg, outs, records, overrides=None, stop_at=None) -> list:
    """Start two nodes of one process each (node R writes into ``outs[R]``)."""
    records.mkdir()
    port, extra = free_port(), {} if stop_at is None else {"STOP_AT_STEP": str(stop_at)}
    return [
        launch(cfg, outs[r], records, overrides, nodes=2, port=port, NODE=str(r), LOG=f"node{r}", **extra)
        for r in (0, 1)
    ]


def two_nodes(cfg, outs, records, overrides=None, stop_at=None) -> tuple[list, set]:
    """Two nodes of one process each (node R writes into ``outs[R]``); returns the exit codes and addresses seen."""
    procs = start_two_nodes(cfg, outs, records, overrides, stop_at)
    markers = [records / f"stopped{r}" for r in (0, 1)] if stop_at is not None else ()
    seen = wait(procs, stop_markers=markers)
    return [p.returncode for p in procs], seen


def global_draws(records: Path, ranks=(0, 1)) -> dict:
    """``{(step, micro): (images, σ, ε)}`` of the global micro-batches: the ranks' rows in rank order."""
    files = [
        load_file(str(records / f"draws{r}.safetensors"))
        for r in ranks
        if (records / f"draws{r}.safetensors").exists()
    ]
    return from_record(files)


def from_record(files: list[dict]) -> dict:
    keys = sorted({tuple(int(x) for x in k.split(".")[:2]) for k in files[0]})
    return {
        key: tuple(torch.cat([f[f"{key[0]}.{key[1]}.{name}"] for f in files]) for name in ("images", "sigma", "noise"))
        for key in keys
    }


def assert_same_sequence(got: dict, expected: dict, steps) -> None:
    """The same global micro-batches, bit for bit, at the optimizer steps ``steps`` (counted from 1)."""
    keys = [(s - 1, m) for s in steps for m in (0, 1)]
    assert sorted(k for k in got if k[0] + 1 in steps) == keys
    for key in keys:
        for name, a, b in zip(("images", "sigma", "noise"), got[key], expected[key]):
            assert a.shape[0] == 8, (key, name, a.shape)  # one global micro-batch: 8 images
            assert torch.equal(a, b), (key, name)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One node of two processes, uninterrupted: 4 steps, checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg, out, records = config(tmp), tmp / "run", tmp / "records"
    records.mkdir()
    proc = launch(cfg, out, records)
    seen = wait([proc])
    assert proc.returncode == 0, logs(records)
    assert not beyond_loopback(seen), seen
    return {"cfg": cfg, "out": out, "records": records, "draws": global_draws(records)}


def test_two_nodes_train_are_killed_and_resume_like_one_node_on_shared_and_on_node_local_disks(tmp_path, reference):
    """Two nodes of one process each over 127.0.0.1 against one node of two processes: the same processes, ranks,
    batches and all-reduce, so the weights are bit-identical (tolerance 0). Each two-node run is killed (SIGKILL to
    both nodes) during step 3, after checkpoint-2 was written, and resumed with ``latest``."""
    ref_weights = load_file(str(reference["records"] / "weights0.safetensors"))
    ref_ckpt = reference["out"] / "checkpoint-4"
    cfg, addresses = reference["cfg"], set()

    # (a) A shared filesystem: both nodes use one output_dir; the main process writes everything there.
    shared, records = tmp_path / "shared", tmp_path / "a"
    codes, seen = two_nodes(cfg, [shared, shared], records, stop_at=2)
    addresses |= seen
    assert codes == [-signal.SIGKILL] * 2, logs(records)
    assert sorted(p.name for p in shared.glob("checkpoint-*")) == ["checkpoint-2"], logs(records)
    assert not (records / "draws0.safetensors").exists()  # killed: nothing after step 2 was recorded
    records = tmp_path / "a2"
    codes, seen = two_nodes(cfg, [shared, shared], records, {"training.resume_from_checkpoint": "latest"})
    addresses |= seen
    assert codes == [0, 0], logs(records)
    assert_same_sequence(global_draws(records), reference["draws"], steps=(3, 4))
    weights = load_file(str(records / "weights0.safetensors"))
    assert max_difference(weights, ref_weights) == 0.0
    assert max_difference(weights, load_file(str(records / "weights1.safetensors"))) == 0.0
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_difference(load_file(str(shared / "checkpoint-4" / name)), load_file(str(ref_ckpt / name))) == 0.0
    files = {p.name for p in (shared / "checkpoint-4").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "optimizer.bin", "training_state.json"} <= files
    info = [json.loads((records / f"info{r}.json").read_text()) for r in (0, 1)]
    assert [i["has_ema"] for i in info] == [True, False]  # the EMA lives on the main process alone

    # (b) Node-local disks: each node its own output_dir. Misconfigured runs stop before training, all three at once:
    # node-local folders without save_on_each_node; one shared folder with it; a node without the checkpoint.
    local = [tmp_path / "node0", tmp_path / "node1"]
    on_each = {"training.save_on_each_node": True}
    copy = [tmp_path / "copy0", tmp_path / "copy1"]
    shutil.copytree(shared / "checkpoint-4", copy[0] / "checkpoint-4")
    refusals = [
        start_two_nodes(cfg, local, tmp_path / "r0"),
        start_two_nodes(cfg, [tmp_path / "both"] * 2, tmp_path / "r1", on_each),
        start_two_nodes(cfg, copy, tmp_path / "r2", {**on_each, "training.resume_from_checkpoint": "latest"}),
    ]
    wait([p for pair in refusals for p in pair])
    assert all(p.returncode not in (0, None) for pair in refusals for p in pair)
    host = socket.gethostname()
    text = logs(tmp_path / "r0")
    assert f"process 1 on {host} does not see the run lock of the main process" in text, text
    assert f"in {local[1]}, it sees no lock: output_dir is not shared by all nodes" in text, text
    text = logs(tmp_path / "r1")
    assert "could not lock its node's run folder" in text and f"{tmp_path / 'both'} is in use by pid" in text, text
    text = logs(tmp_path / "r2")
    assert "the processes found different checkpoints to resume from" in text, text
    assert f"{copy[0] / 'checkpoint-4'}; process 1 on {host}: none" in text, text
    assert not list(local[0].glob("checkpoint-*")) and not list(local[1].glob("checkpoint-*"))
    assert sorted(p.name for p in copy[0].iterdir()) == ["checkpoint-4"] and not copy[1].exists()
    for folder in local:
        shutil.rmtree(folder, ignore_errors=True)

    # With save_on_each_node each node's first process writes a complete checkpoint into its own folder.
    records = tmp_path / "b1"
    codes, seen = two_nodes(cfg, local, records, on_each, stop_at=2)
    addresses |= seen
    assert codes == [-signal.SIGKILL] * 2, logs(records)
    for folder in local:
        assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2"], logs(records)
    records = tmp_path / "b2"
    codes, seen = two_nodes(cfg, local, records, {**on_each, "training.resume_from_checkpoint": "latest"})
    addresses |= seen
    assert codes == [0, 0], logs(records)
    assert_same_sequence(global_draws(records), reference["draws"], steps=(3, 4))
    assert max_difference(load_file(str(records / "weights0.safetensors")), ref_weights) == 0.0
    for rank, folder in enumerate(local):
        ckpt = folder / "checkpoint-4"
        for name in ("model.safetensors", "ema.safetensors"):  # each node's copy is the whole checkpoint
            assert max_difference(load_file(str(ckpt / name)), load_file(str(ref_ckpt / name))) == 0.0
        states = sorted(p.name for p in ckpt.glob("random_states_*.pkl"))
        assert states == [f"random_states_{rank}.pkl"]
        assert {"optimizer.bin", "training_state.json", "ema_state.json", "unet_config.json"} <= {
            p.name for p in ckpt.iterdir()
        }
    # The main process's node holds the run's own files; the other node checkpoints only.
    assert (local[0] / "run.json").exists() and (local[0] / "config.yaml").exists()
    assert len(list((local[0] / "phema").glob("*.safetensors"))) == 2  # snapshots of steps 2 and 4 (after resume)
    assert not (local[1] / "run.json").exists() and not (local[1] / "phema").exists()
    info = [json.loads((records / f"info{r}.json").read_text()) for r in (0, 1)]
    assert [i["has_ema"] for i in info] == [True, True]  # each node's first process keeps the EMA it checkpoints

    # Nothing the nodes opened reached another address than the loopback.
    assert any(c[0] == "tcp" for c in addresses) and not beyond_loopback(addresses), addresses


def test_elastic_resume_two_processes_to_one_and_one_to_two(tmp_path, reference, monkeypatch):
    """A checkpoint of 2 processes resumed on 1, and one of 1 resumed on 2, continue the same global micro-batches
    (images, flips, σ, ε: bit for bit) and end where the uninterrupted run ends, to float tolerance: after the
    resume each global micro-batch's gradient is summed in another order (one sum of 8 images, or two sums of 4
    all-reduced). Measured: 4.8e-7 both ways, where steps 3-4 moved the weights by up to 2.4e-2."""
    cfg = reference["cfg"]
    ref_weights = load_file(str(reference["records"] / "weights0.safetensors"))

    # A resume that would change the global batch is refused before anything is written, naming both.
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match=r"global batch of 16 images \(2 processes\), this run's is 8"):
        train(
            load_config(
                cfg,
                {
                    "training.output_dir": str(refused),
                    "training.train_batch_size": 4,
                    "training.resume_from_checkpoint": str(reference["out"] / "checkpoint-2"),
                },
            )
        )
    with pytest.raises(ValueError, match="trained with gradient_accumulation_steps 2, this run has 1"):
        train(
            load_config(
                cfg,
                {
                    "training.output_dir": str(refused),
                    "training.gradient_accumulation_steps": 1,
                    "training.resume_from_checkpoint": str(reference["out"] / "checkpoint-2"),
                },
            )
        )
    assert tree(refused) == {}

    # 2 -> 1: the two-process checkpoint-2 resumed on this one process.
    record: dict = {}
    monkeypatch.setattr(loop, "micro_batch", spy(loop.micro_batch, record))
    two_to_one = tmp_path / "two_to_one"
    overrides = {"training.output_dir": str(two_to_one)}
    result = train(
        load_config(cfg, {**overrides, "training.resume_from_checkpoint": str(reference["out"] / "checkpoint-2")})
    )
    assert result.step == 4 and result.images_seen == 64
    assert_same_sequence(from_record([record]), reference["draws"], steps=(3, 4))
    weights = {k: v.detach() for k, v in result.unet.state_dict().items()}
    at_two = load_file(str(reference["out"] / "checkpoint-2" / "model.safetensors"))
    moved = max_difference(ref_weights, {k: at_two[f"unet.{k}"] for k in ref_weights})
    difference = max_difference(weights, ref_weights)
    print(f"2 -> 1: largest difference {difference:.3e} (steps 3-4 moved the weights by up to {moved:.3e})")
    assert moved > 1e-3 and difference < 1e-5, difference  # the resumed steps moved the weights, alike
    state = json.loads((two_to_one / "checkpoint-4" / "training_state.json").read_text())
    assert state["num_processes"] == 1 and state["global_batch_size"] == 16 and state["per_device_batch_size"] == 8

    # 1 -> 2: a one-process run to step 4 (the same global sequence as two processes, all 4 steps), and its
    # checkpoint-2 resumed on two processes.
    record.clear()
    one = tmp_path / "one"
    result = train(load_config(cfg, {"training.output_dir": str(one)}))
    one_draws = from_record([record])
    assert_same_sequence(one_draws, reference["draws"], steps=(1, 2, 3, 4))
    one_weights = {k: v.detach() for k, v in result.unet.state_dict().items()}
    records = tmp_path / "records"
    records.mkdir()
    proc = launch(
        cfg, tmp_path / "one_to_two", records, {"training.resume_from_checkpoint": str(one / "checkpoint-2")}
    )
    assert not beyond_loopback(wait([proc]))
    assert proc.returncode == 0, logs(records)
    assert_same_sequence(global_draws(records), one_draws, steps=(3, 4))
    difference = max_difference(load_file(str(records / "weights0.safetensors")), one_weights)
    print(f"1 -> 2: largest difference {difference:.3e}")
    assert difference < 1e-5, difference
