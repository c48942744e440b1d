"""Streaming training (``data.streaming``) on local parquet files of the digits: the order is the seeded shuffle
buffer's, a stopped run resumes to the same batches and bit-identical weights, two processes read disjoint shards
that cover the data, and what a stream cannot do is refused naming the problem."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_unet_config
from datasets.distributed import split_dataset_by_node
from loopback import run_on_loopback
from safetensors.torch import load_file
from test_training_latents import config as latent_config
from test_training_latents import latent_data  # noqa: F401  (a fixture)
from test_training_multiprocess import launch_two

from edm2_diffusers.data import image_to_array, load_digits_dataset, load_train_dataset, resolve_source
from edm2_diffusers.training import load_config, train
from edm2_diffusers.training import loop as training_loop

ROOT = Path(__file__).resolve().parents[1]
BATCH = 8


def digit_hash(array) -> str:
    """A name for one image as the loop receives it (float32 array in [-1, 1])."""
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()[:12]


def write_parquet(folder: Path, count: int, files: int = 4) -> Path:
    """The first ``count`` digits as ``files`` parquet files (the ``datasets`` Image feature kept in their schema)."""
    folder.mkdir(parents=True)
    ds = load_digits_dataset().select(range(count))
    for i in range(files):
        ds.shard(files, i, contiguous=True).to_parquet(str(folder / f"part-{i}.parquet"))
    return folder


def expected_order(folder: Path, seed: int, buffer: int, epochs: int, rank: int = 0, world: int = 1) -> list[str]:
    """What ``datasets`` yields for the seeded buffer shuffle, epoch after epoch, computed here independently."""
    stream = datasets.load_dataset("parquet", data_dir=str(folder), split="train", streaming=True)
    stream = split_dataset_by_node(stream.shuffle(seed=seed, buffer_size=max(1, buffer)), rank=rank, world_size=world)
    order = []
    for epoch in range(epochs):
        stream.set_epoch(epoch)
        order += [digit_hash(image_to_array(row["image"], 8, 1)) for row in stream]
    return order


def config(out: Path, data: Path, **training):
    cfg = load_config(None, {"training.output_dir": str(out), "data.train_data_dir": str(data)})
    cfg["model"] = tiny_unet_config()
    cfg["data"].update(streaming=True, shuffle_buffer_size=16, random_flip=True)
    cfg["training"].update(
        train_batch_size=BATCH,
        max_train_steps=5,
        checkpointing_steps=0,
        sample_every_steps=0,
        report_to="none",
        export_pipeline=False,
        lr_warmup_steps=2,
        cpu_threads=1,
        seed=3,
    )
    cfg["training"].update(training)
    cfg["ema"] = None
    return cfg


@pytest.fixture(autouse=True)
def _no_shutdown_pause(monkeypatch):
    """``datasets`` pauses 5 s whenever a shuffled parquet stream's reader threads stop (the end of every epoch, and
    every iterator left unfinished: a workaround for apache/arrow#45214 at interpreter exit); these tests stop many
    streams, and the pause changes nothing they read."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture
def seen(monkeypatch):
    """The images of every micro-batch the training loop draws from, by name, in order (the real loop runs)."""
    batches = []
    real = training_loop.micro_batch

    def record(cfg, batch, *args):
        if "pixel_values" not in batch:  # latents
            return real(cfg, batch, *args)
        batches.append([digit_hash(image) for image in batch["pixel_values"].numpy()])
        if "class_labels" in batch:
            batches[-1] = list(zip(batches[-1], batch["class_labels"].tolist()))
        return real(cfg, batch, *args)

    monkeypatch.setattr(training_loop, "micro_batch", record)
    return batches


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


def test_stream_batches_follow_the_seeded_shuffle_buffer(tmp_path, seen):
    data = write_parquet(tmp_path / "digits", 20)
    result = train(config(tmp_path / "run", data))
    assert result.step == 5
    order = expected_order(data, seed=3, buffer=16, epochs=2)
    assert len(set(order[:20])) == 20  # 20 different digits, each once per epoch
    # 5 steps x 8 images: the first epoch's 20 images, then 20 of the second pass in its own order.
    assert [h for batch in seen for h in batch] == order[:40]
    assert [len(b) for b in seen] == [BATCH] * 5  # the third batch spans the two epochs: none is partial
    file_order = expected_order(data, seed=3, buffer=0, epochs=1)
    assert order[:20] != file_order and order[:20] != order[20:40]  # shuffled, and reshuffled each epoch
    assert sorted(order[20:40]) == sorted(order[:20])
    state = json.loads((tmp_path / "run" / "checkpoint-5" / "stream_state_0.json").read_text())
    assert (state["epoch"], state["examples_in_epoch"], state["num_processes"]) == (1, 20, 1)
    # Without --streaming the same folder of parquet files is a map-style dataset (found by its files).
    data_cfg = {"train_data_dir": str(data)}
    assert resolve_source(data_cfg) == "parquet"
    table = load_train_dataset(data_cfg)
    assert sorted(digit_hash(image_to_array(image, 8, 1)) for image in table["image"]) == sorted(order[:20])


@pytest.mark.parametrize("buffer", [0, 16], ids=["dataset-state", "replayed-buffer"])
def test_stopped_stream_resumes_to_the_same_batches_and_weights(tmp_path, seen, buffer):
    """Without a buffer the dataset's own state_dict() restores the position; with one the epoch is read again up to
    it. Both continue exactly, also in the middle of the second epoch."""
    data = write_parquet(tmp_path / "digits", 20)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = config(straight, data, max_train_steps=5)
    cfg["data"]["shuffle_buffer_size"] = buffer
    train(cfg)
    uninterrupted = list(seen)
    seen.clear()
    cfg = config(resumed, data, max_train_steps=3)
    cfg["data"]["shuffle_buffer_size"] = buffer
    train(cfg)  # stopped after 3 steps (24 images: the second epoch's 4th image), checkpoint-3 written
    state = json.loads((resumed / "checkpoint-3" / "stream_state_0.json").read_text())
    assert (state["epoch"], state["examples_in_epoch"]) == (1, 4)
    cfg["training"].update(max_train_steps=5, resume_from_checkpoint="latest")
    train(cfg)
    assert len(seen) == 5 and seen == uninterrupted  # the same 5 batches, the last 2 read after the resume
    wa, wb = weights(straight / "checkpoint-5"), weights(resumed / "checkpoint-5")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], weights(resumed / "checkpoint-3")[k]) for k in wa)  # it trained on


def test_resuming_a_stream_refuses_changed_data_and_settings(tmp_path):
    data = write_parquet(tmp_path / "digits", 20)
    out = tmp_path / "run"
    train(config(out, data, max_train_steps=3))
    for change, message in (
        ({"data.shuffle_buffer_size": 8}, "shuffle_buffer_size 16, this run has 8"),
        (
            {"training.train_batch_size": 4, "training.max_train_steps": 6},
            "global batch of 8 images .* this run.s is 4",
        ),  # training.elastic
    ):
        cfg = config(out, data, max_train_steps=5, resume_from_checkpoint="latest")
        for dotted, value in change.items():
            section, key = dotted.split(".")
            cfg[section][key] = value
        with pytest.raises(ValueError, match=message):
            train(cfg)
    plain = config(tmp_path / "plain", data, max_train_steps=1)
    plain["data"].update(streaming=False, source="sklearn_digits", train_data_dir=None)
    train(plain)  # a run of map-style data cannot continue as a stream
    again = config(tmp_path / "plain", data, max_train_steps=2, resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match="it was not written by a streaming run"):
        train(again)
    as_table = config(out, data, max_train_steps=5, resume_from_checkpoint="latest")
    as_table["data"]["streaming"] = False
    with pytest.raises(ValueError, match="was written by a streaming run; resume it with --streaming"):
        train(as_table)
    os.remove(data / "part-3.parquet")  # the stream is not the one the checkpoint read
    with pytest.raises(ValueError, match="the data changed since; resume on the same data"):
        train(config(out, data, max_train_steps=5, resume_from_checkpoint="latest"))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]


def test_stream_bad_input_is_refused_before_anything_is_written(tmp_path):
    data = write_parquet(tmp_path / "digits", 20)
    out = tmp_path / "run"
    cases = [
        ({"training.max_train_steps": None, "training.num_epochs": 2}, "--num_epochs needs the number of examples"),
        ({"data.source": "sklearn_digits", "data.train_data_dir": None}, "'sklearn_digits' cannot be streamed"),
        ({"training.lr_schedule": "epochs", "training.lr_warmup_steps": 0}, "lr_schedule epochs counts epochs of a"),
        ({"training.dataloader_num_workers": 2}, "set training.dataloader_num_workers to 0"),
        ({"data.shuffle_buffer_size": -1}, "shuffle_buffer_size must not be negative"),
        ({"data.max_train_samples": 4}, "the dataset has 4 images, fewer than one global batch of 8"),
        ({"data.image_column": "pixels"}, "no image column 'pixels'"),
        ({"data.label_column": "label"}, "the model is unconditional"),
    ]
    for change, message in cases:
        cfg = config(out, data)
        for dotted, value in change.items():
            section, key = dotted.split(".")
            cfg[section][key] = value
        with pytest.raises(ValueError, match=message):
            train(cfg)
        assert not out.exists(), change
    memory = load_digits_dataset().select(range(16))
    with pytest.raises(ValueError, match=r"pass dataset.to_iterable_dataset\(num_shards=N\)"):
        train(config(out, data), dataset=memory)
    # The script's flags: --streaming with --num_epochs on a stream of unknown length is one line, exit 1.
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": tiny_unet_config()}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_edm2.py"), "--config", str(tmp_path / "model.yaml")]
        + ["--output_dir", str(out), "--train_data_dir", str(data), "--streaming", "--num_epochs", "1"]
        + ["--train_batch_size", "8", "--shuffle_buffer_size", "4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 1 and "error: --num_epochs needs the number of examples" in proc.stderr, proc.stderr
    assert not out.exists()


def test_epochs_of_a_bounded_stream_image_folders_and_latents(tmp_path, seen, latent_data):  # noqa: F811
    """num_epochs counts passes when the length is known (here bounded by max_train_samples): ⌊2·16/8⌋ = 4 steps.
    A labelled image folder streams with its labels, and a latent dataset streams and resumes exactly."""
    data = write_parquet(tmp_path / "digits", 20)
    cfg = config(tmp_path / "epochs", data, max_train_steps=None, num_epochs=2)
    cfg["data"]["max_train_samples"] = 16
    assert train(cfg).step == 4

    digits = load_digits_dataset().select(range(16))
    truth = {}
    for i, row in enumerate(digits):
        (tmp_path / "folder" / str(row["label"])).mkdir(parents=True, exist_ok=True)
        row["image"].save(tmp_path / "folder" / str(row["label"]) / f"{i}.png")
        truth[digit_hash(image_to_array(row["image"], 8, 1))] = row["label"]
    seen.clear()
    cfg = config(tmp_path / "folder-run", tmp_path / "folder", max_train_steps=2)
    cfg["model"]["num_class_embeds"] = 10
    cfg["data"]["label_column"] = "label"
    train(cfg)
    pairs = [pair for batch in seen for pair in batch]
    assert len(pairs) == 16 and dict(pairs) == truth  # every image once, with its folder's label
    (tmp_path / "folder" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cfg["training"].update(output_dir=str(tmp_path / "broken-run"), max_train_steps=3)  # reads all 17 files
    with pytest.raises(ValueError, match=r"cannot read the image of .*broken\.png"):  # met while streaming
        train(cfg)

    straight, resumed = tmp_path / "latent-straight", tmp_path / "latent-resumed"
    streaming = {"streaming": True, "shuffle_buffer_size": 4}
    a = latent_config(straight, latent_data["data"], max_train_steps=3, export_pipeline=False)
    a["data"].update(streaming)
    train(a)
    b = latent_config(resumed, latent_data["data"], max_train_steps=2, export_pipeline=False)
    b["data"].update(streaming)
    train(b)
    b["training"].update(max_train_steps=3, resume_from_checkpoint="latest")
    train(b)
    wa, wb = weights(straight / "checkpoint-3"), weights(resumed / "checkpoint-3")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = json.loads((resumed / "checkpoint-3" / "stream_state_0.json").read_text())
    assert (state["epoch"], state["examples_in_epoch"]) == (1, 4)  # 8 latents, 3 batches of 4


RANK_SCRIPT = """
import hashlib, json, os, sys
import datasets
import numpy as np
from edm2_diffusers.training import load_config, train
from edm2_diffusers.training import loop

seen = []
real = loop.micro_batch
def record(cfg, batch, *args):
    seen.extend(hashlib.sha1(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:12]
                for x in batch["pixel_values"].numpy())
    return real(cfg, batch, *args)
loop.micro_batch = record
datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # see _no_shutdown_pause
out = sys.argv[2]
result = train(load_config(sys.argv[1], {"training.output_dir": out, **json.loads(sys.argv[3])}))
with open(os.path.join(out, f"seen{os.environ['RANK']}.json"), "w") as f:
    json.dump({"seen": seen, "step": result.step}, f)
"""


def test_two_processes_read_disjoint_shards_that_cover_the_stream(tmp_path):
    """Two CPU processes (gloo): each reads its own two of the four files (split_dataset_by_node), in the order of
    its seeded buffer; together one epoch is every digit once. A one-process run cannot resume their checkpoint."""
    data = write_parquet(tmp_path / "digits", 24)
    cfg = config(tmp_path / "unused", data, max_train_steps=3, train_batch_size=4)
    cfg["training"]["output_dir"] = None
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    cmd = launch_two(tmp_path, tmp_path / "cfg.yaml", out)
    (tmp_path / "rank_stream.py").write_text(RANK_SCRIPT)
    cmd[cmd.index(str(tmp_path / "rank_train.py"))] = str(tmp_path / "rank_stream.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = run_on_loopback(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    ranks = [json.loads((out / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [3, 3]
    for rank, info in enumerate(ranks):  # 3 steps x 4 images: each process's whole shard, one epoch
        assert info["seen"] == expected_order(data, seed=3, buffer=16, epochs=1, rank=rank, world=2)
    first, second = ranks[0]["seen"], ranks[1]["seen"]
    assert len(first) == len(second) == 12 and not set(first) & set(second)
    assert sorted(first + second) == sorted(expected_order(data, seed=3, buffer=0, epochs=1))  # all 24 digits
    for rank in (0, 1):
        state = json.loads((out / "checkpoint-3" / f"stream_state_{rank}.json").read_text())
        assert (state["rank"], state["num_processes"], state["examples_in_epoch"]) == (rank, 2, 12)

    # the same global batch of 8 on one process (training.elastic allows that); the stream refuses it
    one = config(
        out, data, max_train_steps=5, train_batch_size=None, total_batch_size=8, resume_from_checkpoint="latest"
    )
    with pytest.raises(ValueError, match="written with num_processes 2, this run has 1"):
        train(one)
