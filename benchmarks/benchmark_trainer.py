"""The trainer end to end: ``train()`` (what ``examples/train_edm2.py`` runs) against the bare training step.

Examples::

    python benchmarks/benchmark_trainer.py --config configs/digits/G.yaml --steps 80
    python benchmarks/benchmark_trainer.py --config configs/cifar10/E.yaml --batch_size 8 --steps 12 --generated 256

The library's own loop runs on the config (its data, EMA, logging, snapshots, sample grids and checkpoints), for
``--steps`` optimizer steps into a temporary folder. After every optimizer step of the loop, one *bare step* of the
same model and batch runs beside it: an identical U-Net wrapped in the same ``EDM2TrainingLoss``, forward, backward
and Adam on fixed inputs, nothing else. Alternating the two step by step makes the ratio fair on a shared machine.

The loop's phases are timed by wrapping the functions it calls (this script only; the library is unchanged):

* ``data``: the next batch from the data loader;
* ``draws``: the micro-step's seeded draws (flips, σ, ε);
* ``step``: the rest of the optimizer step — loss, backward, all-reduce, the loss read back to the host, Adam;
* ``ema``: EMA update; ``snapshots``: post-hoc EMA snapshots (``ema.after_step``);
* ``grids``, ``checkpoints``: sample grids and checkpoints, on the steps the config schedules them;
* ``logging``: the rest of the step's bookkeeping (trackers, progress bar, learning rate).

A step's *hot* cost is everything but the scheduled events (snapshots, grids, checkpoints); those are timed when they
fire (the last step fires all of them) and amortized over the config's own intervals. End to end is then
``hot median + Σ event / interval`` per step, against the bare step's median.
``--generated N`` trains on N random images of the model's size held in memory (a ``datasets.Dataset``), instead of
the config's dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
from PIL import Image

from edm2_diffusers.models import EDM2UNet2DModel
from edm2_diffusers.training import load_config, loop, train
from edm2_diffusers.training.compile import compile_options
from edm2_diffusers.training.loss import EDM2TrainingLoss

EVENTS = ("snapshots", "grids", "checkpoints")


class PhaseClock:
    """Seconds spent in each named phase, per optimizer step."""

    def __init__(self):
        self.steps: list[dict] = []
        self.current = defaultdict(float)

    def add(self, phase: str, seconds: float) -> None:
        self.current[phase] += seconds

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        return timed

    def end_step(self, bare: float) -> None:
        self.current["bare"] = bare
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)


class BareStep:
    """Forward, backward and Adam on the EDM2 loss of an identical U-Net on fixed inputs: the trainer's floor
    (compiled when the run is)."""

    def __init__(self, cfg: dict, batch: int):
        torch.manual_seed(0)
        model_cfg = cfg["model"]
        self.loss = EDM2TrainingLoss(
            EDM2UNet2DModel(**model_cfg).train(),
            sigma_data=cfg["training"]["sigma_data"],
            reduction=cfg["training"]["loss_reduction"],
            compile_options=compile_options(cfg["training"]),  # compiled as the trainer compiles it
        )
        train_cfg = cfg["training"]
        self.opt = torch.optim.Adam(
            self.loss.parameters(),
            lr=1e-4,
            betas=(train_cfg["adam_beta1"], train_cfg["adam_beta2"]),
            eps=train_cfg["adam_epsilon"],
        )
        shape = (batch, model_cfg["in_channels"], model_cfg["sample_size"], model_cfg["sample_size"])
        self.images, self.noise = torch.rand(shape) * 2 - 1, torch.randn(shape)
        self.sigma = (torch.randn(batch) * train_cfg["P_std"] + train_cfg["P_mean"]).exp()
        n = model_cfg.get("num_class_embeds")
        self.labels = torch.randint(0, n, (batch,)) if n else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where Accelerate trains
        low = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(train_cfg["mixed_precision"] or "no")
        on_gpu = low is not None and self.device.type == "cuda"  # the trainer's autocast (no GradScaler here)
        self.amp = (lambda: torch.autocast("cuda", dtype=low)) if on_gpu else contextlib.nullcontext
        self.loss.to(self.device)
        for name in ("images", "noise", "sigma", "labels"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(self.device))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self) -> float:
        with torch.random.fork_rng(devices=[]):  # dropout draws must not disturb the trainer's stream
            self._sync()
            start = time.perf_counter()
            with self.amp():
                loss = self.loss(self.images, self.sigma, self.noise, self.labels)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self._sync()
            return time.perf_counter() - start


def generated_dataset(cfg: dict, count: int, seed: int = 0) -> datasets.Dataset:
    """``count`` random 8-bit images of the model's size and channels, in memory."""
    model, column = cfg["model"], cfg["data"]["image_column"]
    rng = np.random.default_rng(seed)
    size, channels = model["sample_size"], model["in_channels"]
    mode = "RGB" if channels == 3 else "L"
    shape = (size, size, channels) if channels == 3 else (size, size)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(count)]
    return datasets.Dataset.from_dict({column: images})


def instrument(clock: PhaseClock, bare: BareStep):
    """Wrap the loop's phases with timers; returns a function that undoes it."""
    saved = {
        name: getattr(loop, name)
        for name in ("_batch_stream", "micro_batch", "_optimizer_step", "_after_step", "_write_samples")
    }
    saved["_save_checkpoint"] = loop._save_checkpoint
    saved["build_ema"] = loop.build_ema

    def batch_stream(run):
        stream = saved["_batch_stream"](run)
        while True:
            start = time.perf_counter()
            batch = next(stream)
            clock.add("data", time.perf_counter() - start)
            yield batch

    def optimizer_step(run, stream):
        start = time.perf_counter()
        out = saved["_optimizer_step"](run, stream)
        clock.add("optimizer_step", time.perf_counter() - start)
        return out

    def after_step(run, mean_loss, rate, progress):
        start = time.perf_counter()
        saved["_after_step"](run, mean_loss, rate, progress)
        clock.add("after_step", time.perf_counter() - start)
        clock.end_step(bare())

    def build_ema(unet, ema_cfg):
        ema = saved["build_ema"](unet, ema_cfg)
        ema.update = clock.wrap("ema", ema.update)
        ema_after_step = ema.after_step

        def after_step(*args, **kwargs):  # a snapshot event when it writes files
            start = time.perf_counter()
            written = ema_after_step(*args, **kwargs)
            clock.add("snapshots" if written else "ema", time.perf_counter() - start)
            return written

        ema.after_step = after_step
        return ema

    loop._batch_stream = batch_stream
    loop.micro_batch = clock.wrap("draws", saved["micro_batch"])
    loop._optimizer_step = optimizer_step
    loop._after_step = after_step
    loop._write_samples = clock.wrap("grids", saved["_write_samples"])
    loop._save_checkpoint = clock.wrap("checkpoints", saved["_save_checkpoint"])
    loop.build_ema = build_ema

    def undo():
        for name, fn in saved.items():
            setattr(loop, name, fn)

    return undo


def summarize(clock: PhaseClock, cfg: dict, batch: int, warmup: int, grid_scale: float = 1.0) -> dict:
    rows = clock.steps[warmup:]
    for row in rows:
        row["step"] = row["optimizer_step"] - row.get("data", 0.0) - row.get("draws", 0.0)
        row["logging"] = row["after_step"] - sum(row.get(k, 0.0) for k in ("ema", *EVENTS))
        row["hot"] = row["optimizer_step"] + row["after_step"] - sum(row.get(k, 0.0) for k in EVENTS)
    train_cfg, ema_cfg = cfg["training"], cfg.get("ema") or {}
    intervals = {
        "snapshots": _snapshot_interval(ema_cfg),
        "grids": train_cfg["sample_every_steps"],
        "checkpoints": train_cfg["checkpointing_steps"],
    }
    events = {}
    for name in EVENTS:
        fired = [r[name] for r in clock.steps if r.get(name, 0.0) > 0]
        seconds = max(fired) if fired else 0.0
        events[name] = dict(seconds=seconds, every_steps=intervals[name])
        if name == "grids" and grid_scale != 1:  # a smaller grid than the config's: its cost scaled by images
            events[name].update(measured_grid_seconds=seconds, seconds=seconds * grid_scale, scaled_by=grid_scale)
        events[name]["per_step"] = events[name]["seconds"] / intervals[name] if intervals[name] else 0.0
    median = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("bare", "hot", "data", "draws", "step")}
    median.update({k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("ema", "logging")})
    end_to_end = median["hot"] + sum(e["per_step"] for e in events.values())
    best = {k: min(r[k] for r in rows) for k in ("bare", "hot")}  # best-of: the least disturbed step of each
    overheads = {k: median[k] / median["bare"] for k in ("data", "draws", "ema", "logging")}
    overheads["step_minus_bare"] = (median["step"] - median["bare"]) / median["bare"]
    overheads.update({k: events[k]["per_step"] / median["bare"] for k in EVENTS})
    return dict(
        measured_steps=len(rows),
        bare_img_s=batch / median["bare"],
        trainer_hot_img_s=batch / median["hot"],
        trainer_end_to_end_img_s=batch / end_to_end,
        hot_ratio=median["bare"] / median["hot"],
        end_to_end_ratio=median["bare"] / end_to_end,
        best_of_hot_ratio=best["bare"] / best["hot"],
        best_of_end_to_end_ratio=best["bare"] / (best["hot"] + end_to_end - median["hot"]),
        median_seconds=median,
        overhead_fraction_of_bare=overheads,
        events=events,
    )


def _snapshot_interval(ema_cfg: dict) -> int:
    if ema_cfg.get("type") == "power":
        return ema_cfg.get("snapshot_every_steps") or 0
    return (ema_cfg.get("posthoc") or {}).get("snapshot_every_steps") or 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits/G.yaml")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of the measured run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    parser.add_argument("--batch_size", type=int, help="global batch (default: the config's)")
    parser.add_argument("--generated", type=int, help="train on this many random in-memory images")
    parser.add_argument(
        "--grid", help="sample grid ROWSxCOLS (default: the config's); its cost is scaled to the config's by images"
    )
    parser.add_argument("--threads", type=int, help="training.cpu_threads (default: the config's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override, e.g. training.report_to=none or training.dataloader_num_workers=1 (repeatable)",
    )
    parser.add_argument("--note", help="a remark stored with the results (e.g. the machine's load)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    overrides = {"training.max_train_steps": args.steps}
    if args.batch_size:
        overrides["training.total_batch_size"] = args.batch_size
    grid_scale = 1.0
    if args.grid:
        rows, cols = (int(v) for v in args.grid.lower().split("x"))
        full = load_config(args.config)["sampling"]
        grid_scale = full["grid_rows"] * full["grid_cols"] / (rows * cols)
        overrides.update({"sampling.grid_rows": rows, "sampling.grid_cols": cols})
    if args.threads:
        overrides["training.cpu_threads"] = args.threads
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    with tempfile.TemporaryDirectory() as tmp:
        overrides["training.output_dir"] = os.path.join(tmp, "run")
        cfg = load_config(args.config, overrides)
        cfg["model"]["dropout"] = 0.0  # as benchmark_edm2.py: the same cost, fewer differences between runs
        dataset = generated_dataset(cfg, args.generated) if args.generated else None
        if dataset is not None:
            cfg["data"]["label_column"] = None
            cfg["model"]["num_class_embeds"] = None
        batch = cfg["training"]["total_batch_size"]
        threads = torch.get_num_threads()
        if cfg["training"]["cpu_threads"]:
            torch.set_num_threads(cfg["training"]["cpu_threads"])
        bare = BareStep(cfg, batch)
        torch.set_num_threads(threads)
        clock = PhaseClock()
        undo = instrument(clock, bare)
        start = time.perf_counter()
        try:
            train(cfg, dataset=dataset)
        finally:
            undo()
        wall = time.perf_counter() - start
    loop_seconds = sum(r["optimizer_step"] + r["after_step"] + r["bare"] for r in clock.steps)
    info = dict(
        config=args.config,
        batch_size=batch,
        steps=args.steps,
        generated_images=args.generated,
        grid=f"{cfg['sampling']['grid_rows']}x{cfg['sampling']['grid_cols']}",
        report_to=cfg["training"]["report_to"],
        overrides=args.set,
        threads=cfg["training"]["cpu_threads"] or threads,
        device=f"cpu ({os.cpu_count()} cores)",
        setup_and_finish_seconds=wall - loop_seconds,
        note=args.note,
    )
    result = summarize(clock, cfg, batch, args.warmup, grid_scale)
    print(json.dumps(info))
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"info": info, "result": result}, indent=1))
    return result


if __name__ == "__main__":
    main()
