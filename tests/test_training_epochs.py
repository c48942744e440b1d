"""edm2-multi-gpu's epochs: the last partial batch kept (steps per epoch, images seen, exact resume) and the learning
rate set once per epoch, against its train.py's rules written out here."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.data_loader import prepare_data_loader
from conftest import tiny_unet_config
from safetensors.torch import load_file

from edm2_diffusers.training import load_config, train, validate_config
from edm2_diffusers.training.loop import train_dataloader
from edm2_diffusers.training.schedule import epoch_learning_rate, step_epoch, step_learning_rate

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ the reference


def reference_batches_per_epoch(num_images: int, batch: int, processes: int) -> int:
    """edm2-multi-gpu: DistributedSampler (no drop_last: ceil(N / P) indices per rank) and a DataLoader of batch / P
    per rank that keeps its last partial batch."""
    per_rank = math.ceil(num_images / processes)
    return math.ceil(per_rank / (batch // processes))


def reference_epoch_lr(ep: int, lrate: float, warm_epoch: int, tref_epoch: int | None, n_epoch: int) -> float:
    """edm2-multi-gpu train.py: the rate of epoch ``ep``, set before its first batch."""
    if ep < warm_epoch:
        return lrate * min((ep + 1.0) / warm_epoch, 1.0)
    tref = tref_epoch if tref_epoch is not None else n_epoch
    return lrate / math.sqrt(max(ep / tref, 1.0))


# ------------------------------------------------------------------------------------------------ steps per epoch


@pytest.mark.parametrize("num_images, batch, steps", [(50_000, 512, 98), (100_000, 192, 521)])
@pytest.mark.parametrize("processes", [1, 2, 4])
def test_steps_per_epoch_keep_the_last_batch_like_edm2_multigpu(num_images, batch, steps, processes):
    assert reference_batches_per_epoch(num_images, batch, processes) == steps
    cfg = {"drop_last": False, "dataloader_num_workers": 0}
    lengths, sizes = set(), []
    for rank in range(processes):
        loader = prepare_data_loader(
            train_dataloader(range(num_images), batch // processes, cfg),
            num_processes=processes,
            process_index=rank,
            put_on_device=False,
        )
        lengths.add(len(loader))
        sizes.append([len(b) for b in loader])
    assert lengths == {steps}
    step_sizes = [sum(s) for s in zip(*sizes)]
    assert len(step_sizes) == steps and all(s == batch for s in step_sizes[:-1])
    if processes == 1:  # the reference's own last step: the images left over
        assert step_sizes[-1] == num_images - (steps - 1) * batch
    else:  # Accelerate's even_batches: every process gets a full last batch (DDP needs equal batches)
        assert step_sizes[-1] == batch
    # drop_last (this package's default) drops the remainder instead
    dropped = prepare_data_loader(train_dataloader(range(num_images), batch, {**cfg, "drop_last": True}))
    assert len(dropped) == num_images // batch == steps - 1


# ------------------------------------------------------------------------------------------------ rates


@pytest.mark.parametrize(
    "name, images, batch",
    [("cifar10/E", 50_000, 512), ("cifar10/C", 50_000, 512), ("tinyimagenet/E", 100_000, 192)],
)
def test_seed_configs_set_the_rate_per_epoch_like_edm2_multigpu(name, images, batch):
    cfg = validate_config(load_config(ROOT / "configs" / f"{name}.yaml", {"training.output_dir": "unused"}))
    t = cfg["training"]
    ref = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())["training"]
    per_epoch = math.ceil(images / batch)
    warm, tref, n_epoch = 200, (400 if name.endswith("E") else None), ref["num_epochs"]
    lrate = ref["learning_rate"]
    steps = [0, 1, per_epoch - 1, per_epoch, 5 * per_epoch + 3, 199 * per_epoch, 200 * per_epoch - 1]
    steps += [200 * per_epoch, 400 * per_epoch + 1, 1000 * per_epoch - 1, 1600 * per_epoch, n_epoch * per_epoch - 1]
    for step in (s for s in steps if s < n_epoch * per_epoch):  # within the run (C: tref = n_epoch is never reached)
        got = step_learning_rate(t, step, 0, per_epoch, 0, None)  # one process: batches per epoch = steps per epoch
        want = reference_epoch_lr(step // per_epoch, lrate, warm, tref, n_epoch)
        assert got == pytest.approx(want, rel=1e-12), step
    # a few values by hand: the first epoch runs at lrate / 200, epoch 1 at 2 lrate / 200, 1600 (E) at lrate / 2
    assert step_learning_rate(t, per_epoch - 1, 0, per_epoch, 0, None) == pytest.approx(lrate / 200)
    assert step_learning_rate(t, per_epoch, 0, per_epoch, 0, None) == pytest.approx(2 * lrate / 200)
    late = step_learning_rate(t, (n_epoch - 1) * per_epoch, 0, per_epoch, 0, None)
    assert late == pytest.approx(lrate / math.sqrt((n_epoch - 1) / 400) if tref else lrate)


def test_epoch_schedule_counts_micro_batches_with_accumulation():
    # 2 micro-batches per step, 5 per epoch: step 2 starts in epoch 0 (batch 4), step 3 in epoch 1 (batch 6)
    assert [step_epoch(s, 2, 5) for s in range(6)] == [0, 0, 0, 1, 1, 2]
    assert epoch_learning_rate(0, 1.0, 4, 8) == 0.25 and epoch_learning_rate(3, 1.0, 4, 8) == 1.0
    assert epoch_learning_rate(32, 1.0, 4, 8) == 0.5 and epoch_learning_rate(32, 1.0, 4, None) == 1.0
    with pytest.raises(ValueError, match="epoch"):
        epoch_learning_rate(-1, 1.0)


# ------------------------------------------------------------------------------------------------ a tiny run


def tiny_config(tmp_path: Path, name: str, **training) -> dict:
    """Tiny G on the first 40 digits in batches of 16: 3 steps per epoch (16, 16, 8) when the last batch is kept."""
    cfg = {
        "model": tiny_unet_config(),
        "data": {"source": "sklearn_digits", "random_flip": True, "max_train_samples": 40},
        "training": {
            "train_batch_size": 16,
            "num_epochs": 2,
            "learning_rate": 1e-2,
            "lr_schedule": "epochs",
            "lr_warmup_epochs": 2,
            "drop_last": False,
            "checkpointing_steps": 1,
            "sample_every_steps": 0,
            "export_pipeline": False,
            "report_to": "none",
            "seed": 5,
            "cpu_threads": 1,
            **training,
        },
        "ema": {"type": "power", "stds": [0.05]},
        "sampling": {"num_inference_steps": 2, "grid_rows": 1, "grid_cols": 1},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, {"training.output_dir": str(tmp_path / name)})


def optimizer_lr(checkpoint: Path) -> float:
    state = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)
    return state["param_groups"][0]["lr"]


def test_tiny_run_keeps_the_last_batch_and_counts_its_images(tmp_path):
    result = train(tiny_config(tmp_path, "kept"))
    assert result.step == 6 and result.images_seen == 80  # 2 epochs x 3 steps, 2 x 40 images
    run = tmp_path / "kept"
    states = [json.loads((run / f"checkpoint-{s}" / "training_state.json").read_text()) for s in (1, 2, 3)]
    seen = [state["images_seen"] for state in states]
    assert seen == [16, 32, 40]  # the third step trains on the 8 images left
    # per-epoch rate: epoch 0 at lr (0 + 1) / 2, epoch 1 at lr (1 + 1) / 2 (edm2-multi-gpu's warm-up)
    lrs = [optimizer_lr(run / f"checkpoint-{s}") for s in range(1, 7)]
    assert lrs == pytest.approx([reference_epoch_lr(ep, 1e-2, 2, None, 2) for ep in (0, 0, 0, 1, 1, 1)], rel=1e-12)

    dropped = train(tiny_config(tmp_path, "dropped", drop_last=True))
    assert dropped.step == 4 and dropped.images_seen == 64  # 2 full batches per epoch


def test_resume_with_the_last_batch_kept_is_bit_exact(tmp_path):
    straight = train(tiny_config(tmp_path, "straight", num_epochs=None, max_train_steps=6, checkpointing_steps=2))
    assert straight.step == 6
    # stop after step 4 (epoch 1, after its first batch: the resume skips 3 + 1 batches, one of them partial)
    cut = tiny_config(tmp_path, "cut", num_epochs=None, max_train_steps=4, checkpointing_steps=2)
    train(cut)
    cut["training"].update(max_train_steps=6, resume_from_checkpoint="latest")
    resumed = train(cut)
    assert resumed.step == 6 and resumed.images_seen == straight.images_seen == 80

    a, b = tmp_path / "straight" / "checkpoint-6", tmp_path / "cut" / "checkpoint-6"
    for name in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and wa
        for key in wa:
            assert torch.equal(wa[key], wb[key]), (name, key)
    assert json.loads((a / "training_state.json").read_text()) == json.loads((b / "training_state.json").read_text())
