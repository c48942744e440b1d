"""What a run sets up before it writes anything: the Accelerator, the batch layout, latent constants, the VAE."""

from __future__ import annotations

import os

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, GradScalerKwargs, ProjectConfiguration

from ..data import read_latent_info
from ..distributed import cpu_process_group
from ..latents import load_vae
from ..runs import read_run_latent_info

logger = get_logger(__name__)


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """Config flattened to scalars for trackers (TensorBoard's hparams take no lists or None)."""
    out = {}
    for key, value in (cfg or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def make_accelerator(train_cfg: dict):
    """The run's Accelerator; ``training.mixed_precision`` unset (``None``) leaves the precision to Accelerate.

    Accelerate's own precision comes from ``accelerate config`` or ``accelerate launch --mixed_precision`` (through
    ``ACCELERATE_MIXED_PRECISION``); a value in the YAML or from ``--mixed_precision`` wins over it. Accelerate never
    compiles here: :mod:`.compile` does, honouring Accelerate's dynamo setting.
    """
    output_dir = train_cfg["output_dir"]
    report_to = train_cfg["report_to"]
    accelerator = Accelerator(
        cpu=cpu_process_group(),
        mixed_precision=train_cfg["mixed_precision"],
        dynamo_backend="no",
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(
            project_dir=output_dir,
            logging_dir=os.path.join(output_dir, train_cfg["logging_dir"]),
            save_on_each_node=train_cfg.get("save_on_each_node", False),  # node-local disks (training.nodes)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train_cfg["seed"]),
        # NVIDIA's fp16 recipe: loss scale 1 and non-finite gradients zeroed, instead of a dynamic GradScaler
        kwargs_handlers=[GradScalerKwargs(enabled=not train_cfg.get("zero_nonfinite_grads", False))],
    )
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if train_cfg["mixed_precision"] is not None and launcher and launcher != train_cfg["mixed_precision"]:
        logger.warning(
            "training.mixed_precision %r (config or --mixed_precision) overrides Accelerate's %r",
            train_cfg["mixed_precision"],
            launcher,
        )
    return accelerator


def batch_sizes(train_cfg: dict, num_processes: int) -> tuple[int, int]:
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


def check_latents(source: str, hf_dataset, output_dir: str, resume_dir: str | None) -> dict | None:
    """A latent dataset's constants (:func:`~edm2_diffusers.data.read_latent_info`); a resumed run keeps them."""
    if source != "latents":
        return None
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


def load_sampling_vae(sampling_cfg: dict, latent_info: dict | None, device, load: bool = True):
    """The ``sampling.vae`` AutoencoderKL that decodes a latent run's sample grids (checked before training)."""
    if not sampling_cfg.get("vae"):
        if latent_info is not None and load:
            logger.info("latent run without sampling.vae: no sample grids (set sampling.vae to decode them)")
        return None
    if latent_info is None:
        raise ValueError("sampling.vae decodes latent models, but this run trains on images (drop sampling.vae)")
    if not load:
        return None
    channels = latent_info["standardizer"].channels
    vae = load_vae(sampling_cfg["vae"], channels, sampling_cfg.get("vae_subfolder"), what="sampling.vae")
    return vae.to(device).requires_grad_(False)


__all__ = ["batch_sizes", "check_latents", "flat_config", "load_sampling_vae", "make_accelerator"]
