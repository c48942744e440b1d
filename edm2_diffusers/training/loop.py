"""The EDM2 training loop on Accelerate: one process, many GPUs or many nodes with the same code.

Distribution, mixed precision, gradient all-reduce, data sharding and checkpoint I/O are Accelerate's. The loop adds
what makes a run exact and restartable:

* every random draw of a micro-step (flips, σ, ε, dropout) comes from a seed derived from (seed, step, micro-step,
  process), and the data order of an epoch from (seed, epoch), so a run resumed from a checkpoint continues
  bit-for-bit like one that was never interrupted;
* the learning rate is a pure function of the number of images seen (:mod:`.schedule`), not an optimizer state;
* the step counter and data position travel in the checkpoint (:class:`TrainingState`).

Latent datasets (:mod:`.latents`) store the VAE posterior's moments; each micro-step draws its latents from them with
the micro-step's seed, like its σ and ε. At the end the main process exports the EMA into ``output_dir/pipeline``
(:mod:`.finish`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models import EDM2UNet2DModel
from ..run_lock import RunLock
from . import checkpoint as ckpt
from .config import dump_config, validate_config
from .data import build_image_dataset, check_dataset, load_train_dataset, random_flip, resolve_source
from .finish import check_export_target, export_trained_run
from .loss import EDM2TrainingLoss, sample_sigma
from .samples import sample_grid, save_grid
from .schedule import learning_rate, schedule_in_images

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without writing anything after the last good checkpoint."""


class TrainingState:
    """Counters saved in every checkpoint (as ``training_state.json``, see :mod:`.checkpoint`).

    Args:
        step (`int`): optimizer steps done.
        images_seen (`int`): training images seen over all processes.
        batches_per_epoch (`int`): per-process batches in one epoch (to detect a changed data layout on resume).
    """

    def __init__(self, step: int = 0, images_seen: int = 0, batches_per_epoch: int = 0):
        self.step = step
        self.images_seen = images_seen
        self.batches_per_epoch = batches_per_epoch

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen, "batches_per_epoch": self.batches_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.images_seen = int(state["images_seen"])
        self.batches_per_epoch = int(state["batches_per_epoch"])


@dataclass
class TrainingResult:
    """What :func:`train` returns.

    Args:
        unet (`EDM2UNet2DModel`): the trained (raw, not averaged) model, unwrapped.
        ema: the EMA tracker on the main process (``None`` elsewhere or when disabled).
        step (`int`): optimizer steps done.
        images_seen (`int`): training images seen over all processes.
        output_dir (`str`): the run folder.
        last_checkpoint (`str`, *optional*): the newest checkpoint folder.
        sample_grids (`list[str]`): sample grid PNGs written by this call.
        pipeline_dir (`str`, *optional*): the exported pipeline (``output_dir/pipeline``; main process only).
        is_main_process (`bool`): whether this process is the main one (the one that exports).
    """

    unet: EDM2UNet2DModel
    ema: object | None
    step: int
    images_seen: int
    output_dir: str
    last_checkpoint: str | None = None
    sample_grids: list[str] = field(default_factory=list)
    pipeline_dir: str | None = None
    is_main_process: bool = True


def micro_step_seed(seed: int, step: int, micro: int, process: int) -> int:
    """A 63-bit seed for one micro-step of one process, independent of everything that ran before it."""
    state = np.random.SeedSequence([seed, step, micro, process]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _flat(cfg: dict, prefix: str = "") -> dict:
    """Config flattened to scalars for trackers (TensorBoard's hparams take no lists or None)."""
    out = {}
    for key, value in (cfg or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def _make_accelerator(train_cfg: dict):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    from ..distributed import cpu_process_group

    output_dir = train_cfg["output_dir"]
    report_to = train_cfg["report_to"]
    return Accelerator(
        cpu=cpu_process_group(),
        mixed_precision=train_cfg["mixed_precision"],
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(
            project_dir=output_dir, logging_dir=os.path.join(output_dir, train_cfg["logging_dir"])
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg["seed"]),
    )


def _batch_sizes(train_cfg: dict, num_processes: int) -> tuple[int, int]:
    """(per-device batch, global batch) from the config and the number of processes."""
    accum = train_cfg["gradient_accumulation_steps"]
    per_device, total = train_cfg["train_batch_size"], train_cfg["total_batch_size"]
    if per_device is None:
        if total % (num_processes * accum):
            raise ValueError(
                f"total_batch_size {total} is not divisible by processes ({num_processes}) x "
                f"gradient_accumulation_steps ({accum}); set --train_batch_size or another total"
            )
        per_device = total // (num_processes * accum)
    elif total is not None and total != per_device * num_processes * accum:
        raise ValueError(
            f"train_batch_size {per_device} x processes {num_processes} x gradient_accumulation_steps {accum} "
            f"= {per_device * num_processes * accum}, not total_batch_size {total}; set only one of the two"
        )
    return per_device, per_device * num_processes * accum


def _batch_stream(accelerator, dataloader, epoch: int, skip: int):
    """Endless per-process batches: epoch after epoch, each in the seeded order of (seed, epoch)."""
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


def _train(cfg: dict, dataset, hub_token: str | None, run_lock: RunLock) -> TrainingResult:
    data_cfg, train_cfg = cfg["data"], cfg["training"]
    output_dir = train_cfg["output_dir"]
    seed = train_cfg["seed"]

    accelerator = _make_accelerator(train_cfg)
    main = accelerator.is_main_process
    accum = train_cfg["gradient_accumulation_steps"]
    per_device, global_batch = _batch_sizes(train_cfg, accelerator.num_processes)
    run_lock.take(accelerator, create=False)  # an existing run folder: before reading its checkpoints

    # --- the model, and the checkpoint to resume from (checked before anything is written) ---
    torch.manual_seed(seed)
    unet = EDM2UNet2DModel(**cfg["model"])
    resume_dir = ckpt.resolve_resume(train_cfg["resume_from_checkpoint"], output_dir)
    if resume_dir is not None:
        ckpt.check_architecture(resume_dir, unet.config)
    elif ckpt.list_checkpoints(output_dir):
        raise ValueError(
            f"{output_dir!r} already holds checkpoints of another run; pass --resume_from_checkpoint latest to "
            "continue it, or choose a fresh --output_dir"
        )
    if cfg.get("ema") is not None:
        from ..ema import build_ema

        ema = build_ema(unet, cfg["ema"])  # also validates the ema section on every process
    else:
        ema = None

    # --- data ---
    source = resolve_source(data_cfg, dataset)
    hf_dataset = load_train_dataset(data_cfg, dataset)
    resolution = check_dataset(hf_dataset, data_cfg, cfg["model"], source)
    train_set = build_image_dataset(hf_dataset, data_cfg, cfg["model"], source, resolution)
    latent_info = _check_latents(source, hf_dataset, output_dir, resume_dir)
    standardizer = latent_info["standardizer"] if latent_info else None
    vae = _load_vae(cfg["sampling"], latent_info, accelerator.device, load=main)  # grids: main process only
    check_export_target(cfg, warn=main)
    if len(train_set) < global_batch:
        raise ValueError(f"the dataset has {len(train_set)} images, fewer than one global batch of {global_batch}")
    dataloader = torch.utils.data.DataLoader(
        train_set,
        batch_size=per_device,
        shuffle=True,
        drop_last=True,
        num_workers=train_cfg["dataloader_num_workers"],
        persistent_workers=False,
    )
    warmup_images, decay_ref_images = schedule_in_images(train_cfg, global_batch)

    # --- from here on, things are written ---
    unet.train()
    loss_module = EDM2TrainingLoss(unet, sigma_data=train_cfg["sigma_data"])
    optimizer = torch.optim.Adam(
        unet.parameters(),
        lr=train_cfg["learning_rate"],
        betas=(train_cfg["adam_beta1"], train_cfg["adam_beta2"]),
        eps=train_cfg["adam_epsilon"],
    )
    model, optimizer, dataloader = accelerator.prepare(loss_module, optimizer, dataloader)
    batches_per_epoch = len(dataloader)
    if train_cfg["max_train_steps"] is not None:
        max_steps = train_cfg["max_train_steps"]
    else:
        max_steps = max(1, train_cfg["num_epochs"] * batches_per_epoch // accum)

    state = TrainingState(batches_per_epoch=batches_per_epoch)  # saved as JSON and the EMA as safetensors by ckpt
    if not main:
        ema = None  # EMA, sample grids and snapshots live on the main process

    run_lock.take(accelerator)  # a new run folder: created here, locked before anything else is written
    if main:
        os.makedirs(output_dir, exist_ok=True)
        if resume_dir is None:
            with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(dump_config(cfg))
        if latent_info is not None:
            from .latents import write_run_latent_info

            write_run_latent_info(output_dir, latent_info)
    accelerator.wait_for_everyone()
    if resume_dir is not None:
        accelerator.load_state(resume_dir)  # every file was checked by ckpt.verify_checkpoint
        state.load_state_dict(ckpt.read_state(resume_dir))
        if ema is not None:
            ckpt.load_ema_state(ema, resume_dir)
        if state.batches_per_epoch != batches_per_epoch:
            logger.warning(
                "the checkpoint was written with %d batches per epoch and process, this run has %d: the data order "
                "differs from an uninterrupted run",
                state.batches_per_epoch,
                batches_per_epoch,
            )
            state.batches_per_epoch = batches_per_epoch
        if main:
            logger.info("resumed from %s at step %d (%d images seen)", resume_dir, state.step, state.images_seen)
    result = TrainingResult(unet=unet, ema=ema, step=state.step, images_seen=state.images_seen, output_dir=output_dir)
    existing = ckpt.list_checkpoints(output_dir)
    result.last_checkpoint = existing[-1][1] if existing else None
    if state.step >= max_steps:
        if main:
            logger.info("nothing to do: the run is at step %d of %d", state.step, max_steps)
        accelerator.end_training()
        if main:  # a run stopped while exporting exports now; an export of this step is kept as it is
            result.pipeline_dir = export_trained_run(cfg, ema, state.step, state.images_seen, hub_token)
        result.is_main_process = main
        return result
    if train_cfg["report_to"] != "none":
        accelerator.init_trackers("edm2", config=_flat({k: v for k, v in cfg.items() if k != "model"}))

    if main:
        logger.info(
            "training %s (%s parameters) on %d images: %d processes x %d per device x %d accumulation = global batch "
            "%d, steps %d -> %d",
            unet.config.architecture,
            f"{unet.num_parameters_without_logvar():,}",
            len(train_set),
            accelerator.num_processes,
            per_device,
            accum,
            global_batch,
            state.step,
            max_steps,
        )

    epoch, skip = divmod(state.step * accum, batches_per_epoch)
    stream = _batch_stream(accelerator, dataloader, epoch, skip)
    progress = _progress(main, state.step, max_steps)
    last_time, rate = time.perf_counter(), None
    process = accelerator.process_index

    while state.step < max_steps:
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(accum):
            batch = next(stream)
            torch.manual_seed(micro_step_seed(seed, state.step, micro, process))
            if standardizer is not None:  # a fresh latent z = mean + std·ε from this micro-step's seed
                images = standardizer.sample(batch["latent_moments"])
            else:
                images = batch["pixel_values"]
            if data_cfg["random_flip"]:
                images = random_flip(images)
            sigma = sample_sigma(images.shape[0], train_cfg["P_mean"], train_cfg["P_std"], device=images.device)
            noise = torch.randn_like(images)
            sync = micro == accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss = model(images, sigma, noise, batch.get("class_labels"))
                accelerator.backward(loss / accum)
            loss_sum += loss.detach().float()
        mean_loss = accelerator.reduce(loss_sum / accum, reduction="mean").item()
        if not math.isfinite(mean_loss):
            accelerator.end_training()
            raise NonFiniteLossError(
                f"the loss is {mean_loss} at step {state.step + 1}; training stopped. The last good checkpoint is "
                f"{result.last_checkpoint or '(none yet)'} and nothing was written after it"
            )

        images_after = state.images_seen + global_batch
        lr = learning_rate(images_after, train_cfg["learning_rate"], warmup_images, decay_ref_images)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.images_seen = images_after
        step = state.step
        if ema is not None:
            ema.update(cur_nimg=state.images_seen, batch_size=global_batch)

        now = time.perf_counter()
        inst = global_batch / max(now - last_time, 1e-9)
        rate = inst if rate is None else 0.9 * rate + 0.1 * inst
        last_time = now
        logs = {"loss": mean_loss, "lr": lr, "images_seen": state.images_seen, "images_per_sec": rate}
        if train_cfg["report_to"] != "none":
            accelerator.log(logs, step=step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")

        final = step == max_steps
        # Power-function EMA: snapshots every snapshot_every_steps, and always at the last step, so that the run
        # can be exported and reconstructed where it ends (also with snapshot_every_steps 0).
        snap_every = getattr(ema, "snapshot_every_steps", 0)
        if hasattr(ema, "stds") and ((snap_every and step % snap_every == 0) or final):
            ema.save_snapshots(output_dir, step=step, nimg=state.images_seen)
        every = train_cfg["sample_every_steps"]
        if main and ((every and step % every == 0) or final) and (standardizer is None or vae is not None):
            latent_kwargs = standardizer.pipeline_kwargs() if standardizer is not None else None
            result.sample_grids.append(_write_samples(ema, unet, cfg, output_dir, step, vae, latent_kwargs))
        every = train_cfg["checkpointing_steps"]
        if (every and step % every == 0) or final:
            result.last_checkpoint = ckpt.save_checkpoint(
                accelerator,
                output_dir,
                step,
                dict(unet.config),
                _state_summary(state, accelerator, global_batch, accum),
                ema=ema,
            )
            if main:
                for path in ckpt.prune_checkpoints(output_dir, train_cfg["checkpoints_total_limit"]):
                    logger.info("removed old checkpoint %s", path)
            accelerator.wait_for_everyone()

    if progress is not None:
        progress.close()
    accelerator.end_training()
    result.step, result.images_seen = state.step, state.images_seen
    result.is_main_process = main
    if main:
        logger.info(
            "done: %d steps, %d images seen; last checkpoint %s", state.step, state.images_seen, result.last_checkpoint
        )
        result.pipeline_dir = export_trained_run(cfg, ema, state.step, state.images_seen, hub_token)
    return result


def _progress(main: bool, start: int, total: int):
    if not main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="steps", dynamic_ncols=True)


def _state_summary(state: TrainingState, accelerator, global_batch: int, accum: int) -> dict:
    epoch, batch = divmod(state.step * accum, state.batches_per_epoch)
    return {
        **state.state_dict(),
        "epoch": epoch,
        "batch_in_epoch": batch,
        "num_processes": accelerator.num_processes,
        "global_batch_size": global_batch,
    }


def _check_latents(source: str, hf_dataset, output_dir: str, resume_dir: str | None) -> dict | None:
    """A latent dataset's constants (:func:`~.latents.read_latent_info`); a resumed run must keep its constants."""
    if source != "latents":
        return None
    from .latents import read_latent_info, read_run_latent_info

    info = read_latent_info(hf_dataset)
    recorded = read_run_latent_info(output_dir) if resume_dir is not None else None
    if recorded is not None and info["standardizer"].to_dict() != {
        k: recorded[k] for k in ("latent_mean", "latent_std", "final_std")
    }:
        raise ValueError(
            f"the latent dataset's standardization constants differ from those the run recorded in {output_dir}: "
            "resume with the dataset the run was trained on"
        )
    return info


def _load_vae(sampling_cfg: dict, latent_info: dict | None, device, load: bool = True):
    """The ``sampling.vae`` AutoencoderKL that decodes a latent run's sample grids (checked before training)."""
    if not sampling_cfg.get("vae"):
        if latent_info is not None and load:
            logger.info("latent run without sampling.vae: no sample grids (set sampling.vae to decode them)")
        return None
    if latent_info is None:
        raise ValueError("sampling.vae decodes latent models, but this run trains on images (drop sampling.vae)")
    if not load:
        return None
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(sampling_cfg["vae"], subfolder=sampling_cfg.get("vae_subfolder"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the VAE of sampling.vae {sampling_cfg['vae']!r}: {err}") from None
    channels = latent_info["standardizer"].channels
    if vae.config.latent_channels != channels:
        raise ValueError(f"sampling.vae has {vae.config.latent_channels} latent channels, the dataset {channels}")
    return vae.to(device).eval().requires_grad_(False)


def _write_samples(ema, unet, cfg: dict, output_dir: str, step: int, vae=None, latent_kwargs=None) -> str:
    """Sample a grid from the first EMA profile (or the raw model without EMA) and save it."""
    net = ema.averaged_models()[0][1] if ema is not None else unet
    was_training = net.training
    try:
        image = sample_grid(
            net, cfg["sampling"], sigma_data=cfg["training"]["sigma_data"], vae=vae, latent_kwargs=latent_kwargs
        )
    finally:
        net.train(was_training)
    path = save_grid(image, output_dir, step)
    logger.info("sample grid: %s", path)
    return path


__all__ = ["NonFiniteLossError", "TrainingResult", "TrainingState", "micro_step_seed", "train"]
