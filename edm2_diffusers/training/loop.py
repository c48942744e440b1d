"""The EDM2 training loop on Accelerate: one process, many GPUs or many nodes with the same code.

Distribution, mixed precision, gradient all-reduce, data sharding and checkpoint I/O are Accelerate's. The loop adds
what makes a run exact and restartable:

* every random draw of a micro-step (flips, σ, ε, dropout) comes from a seed derived from (seed, step, micro-step,
  process), and the data order of an epoch from (seed, epoch), so a run resumed from a checkpoint continues
  bit-for-bit like one that was never interrupted;
* the learning rate is a pure function of the number of images seen, or of the step's epoch (:mod:`.schedule`), not
  an optimizer state;
* the step counter and data position travel in the checkpoint (:class:`TrainingState`).

Latent datasets (:mod:`edm2_diffusers.data.latents`) store the VAE posterior's moments; each micro-step draws its
latents from them with the micro-step's seed, like its σ and ε. At the end the main process exports the EMA into
``output_dir/pipeline`` (:mod:`.finish`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from ..data import (
    build_image_dataset,
    check_dataset,
    load_train_dataset,
    resolve_source,
)
from ..ema import build_ema
from ..grids import render_sample_grid, save_png_atomic
from ..models import EDM2UNet2DModel
from ..pipelines import EDM2Pipeline
from ..run_lock import RunLock
from ..runs import SAMPLES_SUBDIR, sampling_autocast, scheduler_from_config, write_run_latent_info
from . import checkpoint as ckpt
from . import elastic, nodes
from .compile import CompileWatch, compile_options, compiled_sampler
from .config import validate_config
from .draws import micro_batch
from .finish import check_export_target, check_push_target, export_trained_run
from .loss import EDM2TrainingLoss, zero_nonfinite_grads_
from .pretrained import build_unet
from .rewind import open_run, plan_rewind
from .schedule import schedule_in_images, step_learning_rate
from .setup import batch_sizes, check_latents, flat_config, load_sampling_vae, make_accelerator
from .state import NonFiniteLossError, TrainingResult, TrainingState
from .streaming import open_training_stream, refuse_stream_checkpoint
from .trackers import log_sample_grid

logger = get_logger(__name__)


def train_dataloader(train_set, per_device: int, train_cfg: dict) -> torch.utils.data.DataLoader:
    """The per-process data loader, before ``accelerator.prepare``.

    With ``training.drop_last`` false an epoch ends with a partial batch, as edm2-multi-gpu's does (ceil(N / B) steps,
    e.g. 98 of 512 on CIFAR's 50,000 images). On one process that batch is smaller; on several, Accelerate's
    ``even_batches`` (its default) completes the last step's batches with images from the start of the epoch, so
    every process runs the same number of equal batches (the same ceil(N / B) steps; DDP needs equal steps).
    """
    return torch.utils.data.DataLoader(
        train_set,
        batch_size=per_device,
        shuffle=True,
        drop_last=train_cfg.get("drop_last", True),
        num_workers=train_cfg["dataloader_num_workers"],
        persistent_workers=False,
    )


def _batch_stream(run: _Run):
    """Endless per-process batches from where the run stands: epoch after epoch, each in the seeded order of
    (seed, epoch)."""
    accelerator, dataloader = run.accelerator, run.dataloader
    accum = run.cfg["training"]["gradient_accumulation_steps"]
    epoch, skip = divmod(run.state.step * accum, run.state.batches_per_epoch)
    while True:
        dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        if skip:
            loader.set_epoch(epoch)
        yield from loader
        epoch, skip = epoch + 1, 0


def train(cfg: dict, dataset=None, hub_token: str | None = None) -> TrainingResult:
    """Train an EDM2 U-Net as ``cfg`` describes (see :func:`~edm2_diffusers.training.load_config`).

    Everything that can be checked is checked before anything is written: the config (with the ``hub_model_id`` to
    push to), the data, the batch layout, the checkpoint to resume from (its existence and architecture), the VAE of
    ``sampling.vae`` and the export folder. At the end the main process exports the EMA into ``output_dir/pipeline``
    and pushes it when ``training.push_to_hub`` (see :mod:`edm2_diffusers.training.finish`).

    Args:
        cfg (`dict`): the merged configuration (sections model, data, training, ema, sampling).
        dataset (`datasets.Dataset`, *optional*): an in-memory training set (overrides the ``data`` source).
        hub_token (`str`, *optional*): Hub token for ``training.push_to_hub`` (never stored with the run).

    Returns:
        :class:`TrainingResult` (the same on every process, except ``ema`` which lives on the main process).

    Raises:
        ValueError / FileNotFoundError: bad configuration, data or checkpoint, before anything is written.
        NonFiniteLossError: the loss became NaN or infinite (the message names the step).
        RuntimeError: training finished but the export or the push failed (the message says how to retry).
    """
    validate_config(cfg)
    previous_threads = torch.get_num_threads()
    if cfg["training"]["cpu_threads"]:
        torch.set_num_threads(cfg["training"]["cpu_threads"])
    run_lock = RunLock(cfg["training"]["output_dir"])  # one writer per run folder (edm2_diffusers.run_lock)
    try:
        return _train(cfg, dataset, hub_token, run_lock)
    finally:
        run_lock.release()
        torch.set_num_threads(previous_threads)


@dataclass
class _Run:
    """Everything one training run holds between its phases."""

    cfg: dict
    accelerator: object
    run_lock: RunLock
    unet: EDM2UNet2DModel
    ema: object | None
    resume_dir: str | None
    rewind: list[str]
    per_device: int
    global_batch: int
    train_set: object
    dataloader: object
    latent_info: dict | None
    vae: object | None
    warmup_images: int = 0
    decay_ref_images: int = 0
    model: object = None
    optimizer: object = None
    max_steps: int = 0
    step_images: int = 0  # images of the last optimizer step over all processes (smaller on a partial batch)
    state: TrainingState = field(default_factory=TrainingState)
    result: TrainingResult | None = None
    compile_options: dict | None = None  # torch.compile arguments (None: eager)
    compile_watch: CompileWatch = field(default_factory=CompileWatch)
    compiled_samplers: dict = field(default_factory=dict)
    record_resume: object = None  # writes run.json's record of this resume with its first checkpoint (.rewind)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def streaming(self) -> bool:
        return bool(self.cfg["data"].get("streaming"))

    @property
    def standardizer(self):
        return self.latent_info["standardizer"] if self.latent_info else None


def _train(cfg: dict, dataset, hub_token: str | None, run_lock: RunLock) -> TrainingResult:
    run = _prepare(cfg, dataset, run_lock, hub_token)
    _start(run)
    if run.state.step >= run.max_steps:
        if run.main:
            logger.info("nothing to do: the run is at step %d of %d", run.state.step, run.max_steps)
        return _finish(run, hub_token)
    _log_start(run)
    stream = iter(run.dataloader) if run.streaming else _batch_stream(run)  # .streaming
    progress = _progress(run.main, run.state.step, run.max_steps)
    speed = _Speed()
    while run.state.step < run.max_steps:
        with _watch(run, "training"):
            mean_loss = _optimizer_step(run, stream)
        _after_step(run, mean_loss, speed(run.global_batch), progress)
    if progress is not None:
        progress.close()
    return _finish(run, hub_token)


def _prepare(cfg: dict, dataset, run_lock: RunLock, hub_token: str | None = None) -> _Run:
    """Check everything that can be checked — config, checkpoint, data, VAE, export folder, Hub access — writing
    nothing. ``cfg`` is copied and completed with what the run resolves (precision, compilation, pretrained model)."""
    cfg = copy.deepcopy(cfg)
    data_cfg, train_cfg = cfg["data"], cfg["training"]
    output_dir = train_cfg["output_dir"]
    accelerator = make_accelerator(train_cfg)
    train_cfg["mixed_precision"] = str(accelerator.mixed_precision)  # as resolved: config, flag or Accelerate's
    options = compile_options(train_cfg)
    train_cfg["torch_compile"], train_cfg["compile_backend"] = options is not None, options and options["backend"]
    per_device, global_batch = batch_sizes(train_cfg, accelerator.num_processes)
    run_lock.take(accelerator, create=False)  # an existing run folder: before reading its checkpoints

    torch.manual_seed(train_cfg["seed"])
    unet = build_unet(cfg)
    resume_dir = nodes.resolve_resume(accelerator, train_cfg["resume_from_checkpoint"], output_dir)  # on every node
    if resume_dir is not None:
        ckpt.check_architecture(resume_dir, unet.config)
        elastic.check_resume(resume_dir, accelerator.num_processes, per_device, train_cfg)
    rewind = plan_rewind(cfg, resume_dir)  # refuses to continue beside a later trajectory without training.rewind
    ema = build_ema(unet, cfg["ema"]) if cfg.get("ema") is not None else None  # validates on every process

    source = resolve_source(data_cfg, dataset)
    streaming = data_cfg.get("streaming")
    if streaming:  # an IterableDataset, a shard per process, no DataLoader (.streaming)
        hf_dataset, train_set = open_training_stream(cfg, dataset, source, accelerator, per_device, global_batch)
    else:
        refuse_stream_checkpoint(resume_dir)
        hf_dataset = load_train_dataset(data_cfg, dataset)
        resolution = check_dataset(hf_dataset, data_cfg, cfg["model"], source)
        train_set = build_image_dataset(hf_dataset, data_cfg, cfg["model"], source, resolution, seed=train_cfg["seed"])
    latent_info = check_latents(source, hf_dataset, output_dir, resume_dir)
    vae = load_sampling_vae(cfg["sampling"], latent_info, accelerator.device, load=accelerator.is_main_process)
    check_export_target(cfg, warn=accelerator.is_main_process)
    check_push_target(cfg, accelerator, hub_token)
    if not streaming and len(train_set) < global_batch:
        raise ValueError(f"the dataset has {len(train_set)} images, fewer than one global batch of {global_batch}")
    dataloader = train_set if streaming else train_dataloader(train_set, per_device, train_cfg)
    warmup_images, decay_ref_images = schedule_in_images(train_cfg, global_batch)
    return _Run(
        cfg=cfg,
        accelerator=accelerator,
        run_lock=run_lock,
        unet=unet,
        ema=ema,
        resume_dir=resume_dir,
        rewind=rewind,
        per_device=per_device,
        global_batch=global_batch,
        train_set=train_set,
        dataloader=dataloader,
        latent_info=latent_info,
        vae=vae,
        warmup_images=warmup_images,
        decay_ref_images=decay_ref_images,
        compile_options=options,
    )


def _start(run: _Run) -> None:
    """Build the optimizer, hand everything to Accelerate, write the run's files and load the checkpoint."""
    cfg, train_cfg, accelerator = run.cfg, run.cfg["training"], run.accelerator
    output_dir = train_cfg["output_dir"]
    run.unet.train()
    loss_module = EDM2TrainingLoss(
        run.unet,
        sigma_data=train_cfg["sigma_data"],
        reduction=train_cfg["loss_reduction"],
        compile_options=run.compile_options,
    )
    optimizer = torch.optim.Adam(
        run.unet.parameters(),
        lr=train_cfg["learning_rate"],
        betas=(train_cfg["adam_beta1"], train_cfg["adam_beta2"]),
        eps=train_cfg["adam_epsilon"],
    )
    run.model, run.optimizer, run.dataloader = accelerator.prepare(loss_module, optimizer, run.dataloader)
    batches_per_epoch = len(run.dataloader)
    if train_cfg["max_train_steps"] is not None:
        run.max_steps = train_cfg["max_train_steps"]
    else:
        run.max_steps = max(1, train_cfg["num_epochs"] * batches_per_epoch // train_cfg["gradient_accumulation_steps"])

    run.state = TrainingState(batches_per_epoch=batches_per_epoch)  # saved as JSON, the EMA as safetensors by ckpt
    if not ckpt.writes_checkpoints(accelerator):
        run.ema = None  # the EMA lives where checkpoints are written; snapshots and sample grids: the main process

    run.run_lock.take(accelerator)  # a new run folder: created here, locked before anything else is written
    nodes.check_run_folder(accelerator, output_dir)  # every process sees the folder it should (several nodes)

    if run.main:
        os.makedirs(output_dir, exist_ok=True)
        for path in ckpt.remove_run_leftovers(output_dir):  # of killed runs; the lock says none is live
            logger.info("removed %s, left by an interrupted run", path)
        run.record_resume = open_run(cfg, run.resume_dir, run.rewind, run.ema, run.max_steps)  # run.json, a rewind
        if run.latent_info is not None:
            write_run_latent_info(output_dir, run.latent_info)
    elif ckpt.writes_checkpoints(accelerator):  # save_on_each_node: a node's own copy of the run folder
        nodes.prepare_node_folder(output_dir, run.rewind)
    accelerator.wait_for_everyone()
    if run.resume_dir is not None:
        current = {**_layout(run), "batches_per_epoch": batches_per_epoch}
        elastic.load_checkpoint(accelerator, run.resume_dir, run.state, run.ema, current, run.unet.config.dropout)
    state = run.state
    run.result = TrainingResult(
        unet=run.unet, ema=run.ema, step=state.step, images_seen=state.images_seen, output_dir=output_dir
    )
    existing = ckpt.list_checkpoints(output_dir)
    run.result.last_checkpoint = existing[-1][1] if existing else None


def _layout(run: _Run) -> dict:
    images = run.train_set.length if run.streaming else len(run.train_set)  # a stream's len() counts batches
    return elastic.layout(run.accelerator.num_processes, run.per_device, run.cfg["training"], images)


def _log_start(run: _Run) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    if cfg["training"]["report_to"] != "none":
        accelerator.init_trackers("edm2", config=flat_config({k: v for k, v in cfg.items() if k != "model"}))
    if run.main:
        logger.info(
            "training %s (%s parameters) on %s images: %d processes x %d per device x %d accumulation = global batch "
            "%d, steps %d -> %d",
            run.unet.config.architecture,
            f"{run.unet.num_parameters_without_logvar():,}",
            run.train_set.describe() if run.streaming else len(run.train_set),
            accelerator.num_processes,
            run.per_device,
            cfg["training"]["gradient_accumulation_steps"],
            run.global_batch,
            run.state.step,
            run.max_steps,
        )


def _optimizer_step(run: _Run, stream) -> float:
    """One optimizer step: the micro-steps' losses and gradients, the learning rate of the schedule, Adam.

    In fp16 on a GPU, Accelerate scales the loss in ``accelerator.backward`` and its GradScaler skips the update of a
    step whose gradients overflowed (and lowers the scale), as edm2-multi-gpu's ``scaler.step``. A skipped step still
    counts, as there: the step, its images and the EMA update (of unchanged weights) go on, and the rate follows its
    schedule. Only a non-finite loss stops the run. ``training.zero_nonfinite_grads`` instead zeroes non-finite
    gradient elements at loss scale 1 (NVIDIA's rule; the GradScaler is then off, see ``make_accelerator``).
    """
    train_cfg, accelerator, state = run.cfg["training"], run.accelerator, run.state
    accum = train_cfg["gradient_accumulation_steps"]
    loss_sum = torch.zeros((), device=accelerator.device)
    num_images = torch.zeros((), device=accelerator.device)
    for micro in range(accum):
        batch = next(stream)
        images, sigma, noise = micro_batch(
            run.cfg, batch, run.standardizer, state.step, micro, accelerator.num_processes, accelerator.process_index
        )
        sync = micro == accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(run.model):
            loss = run.model(images, sigma, noise, batch.get("class_labels"))
            accelerator.backward(loss / accum)
        per_image = images[0].numel() if train_cfg["loss_reduction"] == "sum_per_image" else 1
        loss_sum += loss.detach().float() / per_image  # logged per element, whatever the reduction
        num_images += images.shape[0]
    totals = accelerator.reduce(torch.stack([loss_sum / accum, num_images]), reduction="sum")
    mean_loss, step_images = torch.stack([totals[0] / accelerator.num_processes, totals[1]]).tolist()  # one sync
    if not math.isfinite(mean_loss):
        accelerator.end_training()
        raise NonFiniteLossError(
            f"the loss is {mean_loss} at step {state.step + 1}; training stopped. The last good checkpoint is "
            f"{run.result.last_checkpoint or '(none yet)'} and nothing was written after it"
        )
    run.step_images = round(step_images)  # the real batch: a partial last batch has fewer images
    images_after = state.images_seen + run.step_images
    lr = step_learning_rate(
        train_cfg, state.step, images_after, state.batches_per_epoch, run.warmup_images, run.decay_ref_images
    )
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if train_cfg["zero_nonfinite_grads"]:
        zero_nonfinite_grads_(run.model)
    run.optimizer.step()
    if accelerator.optimizer_step_was_skipped and run.main:
        logger.info("step %d: the fp16 gradients overflowed; the GradScaler skipped the update", state.step + 1)
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.images_seen = images_after
    return mean_loss


def _after_step(run: _Run, mean_loss: float, rate: float, progress) -> None:
    """Bookkeeping after an optimizer step: EMA, logs, snapshots, sample grids, checkpoints."""
    train_cfg, state = run.cfg["training"], run.state
    step, output_dir = state.step, train_cfg["output_dir"]
    final = step == run.max_steps
    lr = run.optimizer.param_groups[0]["lr"]
    if run.ema is not None:
        run.ema.update(cur_nimg=state.images_seen, batch_size=run.step_images)
    if run.main and run.ema is not None:
        run.ema.after_step(output_dir, step=step, nimg=state.images_seen, final=final)
    if train_cfg["report_to"] != "none":
        logs = {"loss": mean_loss, "lr": lr, "images_seen": state.images_seen, "images_per_sec": rate}
        run.accelerator.log(logs, step=step)
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
    every = train_cfg["sample_every_steps"]
    if run.main and ((every and step % every == 0) or final) and (run.standardizer is None or run.vae is not None):
        run.result.sample_grids.append(_write_samples(run, step))
    every = train_cfg["checkpointing_steps"]
    if (every and step % every == 0) or final:
        _save_checkpoint(run)


def _save_checkpoint(run: _Run) -> None:
    train_cfg, accelerator, state = run.cfg["training"], run.accelerator, run.state
    output_dir = train_cfg["output_dir"]
    epoch, batch = divmod(state.step * train_cfg["gradient_accumulation_steps"], state.batches_per_epoch)
    summary = {
        **state.state_dict(),
        "epoch": epoch,
        "batch_in_epoch": batch,
        **_layout(run),
        "mixed_precision": train_cfg["mixed_precision"],
        "torch_compile": train_cfg["torch_compile"],
    }
    run.result.last_checkpoint = ckpt.save_checkpoint(
        accelerator, output_dir, state.step, dict(run.unet.config), summary, ema=run.ema
    )
    if run.main and run.record_resume is not None:
        run.record_resume()
        run.record_resume = None
    if ckpt.writes_checkpoints(accelerator):
        for path in ckpt.prune_checkpoints(output_dir, train_cfg["checkpoints_total_limit"]):
            logger.info("removed old checkpoint %s", path)
    accelerator.wait_for_everyone()


def _finish(run: _Run, hub_token: str | None) -> TrainingResult:
    """End the trackers and, on the main process, export the EMA (and push it)."""
    run.accelerator.end_training()
    result, state = run.result, run.state
    result.step, result.images_seen = state.step, state.images_seen
    result.is_main_process = run.main
    if run.compile_options is not None:
        result.compile_stats = run.compile_watch.report()
    if run.main:
        logger.info(
            "done: %d steps, %d images seen; last checkpoint %s", state.step, state.images_seen, result.last_checkpoint
        )
        result.pipeline_dir = export_trained_run(run.cfg, run.ema, state.step, state.images_seen, hub_token)
    return result


class _Speed:
    """Images per second, smoothed over steps."""

    def __init__(self):
        self.last, self.rate = time.perf_counter(), None

    def __call__(self, images: int) -> float:
        now = time.perf_counter()
        inst = images / max(now - self.last, 1e-9)
        self.rate = inst if self.rate is None else 0.9 * self.rate + 0.1 * inst
        self.last = now
        return self.rate


def _progress(main: bool, start: int, total: int):
    return tqdm(total=total, initial=start, desc="steps", dynamic_ncols=True) if main else None


def _write_samples(run: _Run, step: int) -> str:
    """Sample a grid from the first EMA profile (or the raw model without EMA) and save it."""
    cfg, sampling = run.cfg, run.cfg["sampling"]
    net = run.ema.averaged_models()[0][1] if run.ema is not None else run.unet
    was_training = net.training
    latent_kwargs = run.standardizer.pipeline_kwargs() if run.standardizer is not None else {}
    sampler = compiled_sampler(net, run.compile_options, run.compiled_samplers)
    pipe = EDM2Pipeline(unet=sampler, scheduler=scheduler_from_config(cfg), vae=run.vae, **latent_kwargs)
    try:
        with sampling_autocast(cfg, run.accelerator.device), _watch(run, "sampling"):
            image = render_sample_grid(
                pipe, sampling["grid_rows"], sampling["grid_cols"], sampling["num_inference_steps"], sampling["seed"]
            )
    finally:
        net.train(was_training)
    path = os.path.join(cfg["training"]["output_dir"], SAMPLES_SUBDIR, f"step-{step:07d}.png")
    save_png_atomic(image, path)
    logger.info("sample grid: %s", path)
    if cfg["training"]["report_to"] != "none":
        log_sample_grid(run.accelerator, image, step)
    return path


def _watch(run: _Run, phase: str):
    """Count compiled graphs of a training step or a sample grid (a no-op for eager runs)."""
    return run.compile_watch.count(phase) if run.compile_options is not None else contextlib.nullcontext()


__all__ = ["NonFiniteLossError", "TrainingResult", "TrainingState", "train"]
