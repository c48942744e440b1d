"""Training configuration: one YAML file with sections ``model``, ``data``, ``training``, ``ema`` and ``sampling``.

Command-line flags override the YAML; an unknown key is an error that names it. ``model`` is passed verbatim to
:class:`~edm2_diffusers.EDM2UNet2DModel` and ``ema`` verbatim to the EMA builder, so those two are checked by their
owners; the other three sections are described by :data:`SCHEMA` below.
"""

from __future__ import annotations

import copy
import inspect
import os
from typing import Any

import yaml

from ..ema import check_ema_config
from ..hub import resolve_repo_id
from ..models import EDM2UNet2DModel

# (default, type, help). ``type`` is the type of a non-null value; ``None`` defaults mean "optional / not set".
SCHEMA: dict[str, dict[str, tuple[Any, type, str]]] = {
    "data": {
        "source": (
            None,
            str,
            "hub | imagefolder | parquet | latents | sklearn_digits | memory (default: from dataset_name / "
            "train_data_dir; a train_data_dir written by examples/encode_latents.py is a latent dataset, one of "
            "parquet files without images is parquet)",
        ),
        "dataset_name": (None, str, "a dataset on the Hugging Face Hub, e.g. uoft-cs/cifar10"),
        "dataset_config_name": (None, str, "the Hub dataset's configuration name"),
        "dataset_split": ("train", str, "split to train on"),
        "train_data_dir": (
            None,
            str,
            "a local image folder (datasets' imagefolder layout) or a latent dataset (examples/encode_latents.py)",
        ),
        "cache_dir": (None, str, "where `datasets` caches downloads"),
        "image_column": ("image", str, "column holding the images (latent datasets: 'latents' unless set otherwise)"),
        "label_column": (None, str, "column holding class labels (class-conditional models only)"),
        "resolution": (None, int, "resize (shorter side) and crop images to this size; null: keep as stored"),
        "center_crop": (
            True,
            bool,
            "crop the middle square after resizing (default); false: a random square per image and epoch, seeded "
            "(diffusers' RandomCrop)",
        ),
        "random_flip": (False, bool, "random horizontal flips"),
        "max_train_samples": (None, int, "train on the first N examples only (quick tests)"),
        "crop": (
            None,
            str,
            "null: one bicubic resize of the shorter side, then the centre square | dhariwal: ADM's centre crop "
            "(box-filter halving while the shorter side is >= 2x resolution, bicubic resize, centre square), as "
            "NVIDIA's dataset_tool.py --transform=center-crop-dhariwal; needs data.resolution",
        ),
        "streaming": (
            False,
            bool,
            "read the data as a datasets.IterableDataset while training (Hub, image folder, parquet, latents): each "
            "process its own shard, a seeded shuffle buffer, exact resume on the same number of processes",
        ),
        "shuffle_buffer_size": (
            1000,
            int,
            "streaming: examples in each process's shuffle buffer (0: shuffle the order of the files only)",
        ),
    },
    "training": {
        "output_dir": (None, str, "where checkpoints, samples, logs and snapshots go"),
        "train_batch_size": (None, int, "batch per device (process)"),
        "total_batch_size": (None, int, "global batch = train_batch_size x processes x gradient_accumulation_steps"),
        "gradient_accumulation_steps": (1, int, "micro-batches per optimizer step"),
        "num_epochs": (None, int, "train for this many passes over the data (ignored when max_train_steps is set)"),
        "max_train_steps": (None, int, "train for this many optimizer steps"),
        "learning_rate": (1e-2, float, "reference learning rate (alpha_ref)"),
        "lr_warmup_images": (0, int, "linear warm-up length in training images"),
        "lr_warmup_steps": (None, int, "linear warm-up length in optimizer steps (instead of images)"),
        "lr_decay_ref_images": (None, int, "t_ref of the 1/sqrt(t/t_ref) decay in images; null or 0: no decay"),
        "lr_decay_ref_steps": (None, int, "t_ref in optimizer steps (instead of images)"),
        "adam_beta1": (0.9, float, "Adam beta1"),
        "adam_beta2": (0.99, float, "Adam beta2"),
        "adam_epsilon": (1e-8, float, "Adam epsilon"),
        "P_mean": (-1.2, float, "mean of ln(sigma) in training"),
        "P_std": (1.2, float, "standard deviation of ln(sigma) in training"),
        "sigma_data": (0.5, float, "standard deviation of the data"),
        "mixed_precision": (
            None,
            str,
            "no | fp16 | bf16 (default: Accelerate's setting, from `accelerate config` or `accelerate launch "
            "--mixed_precision`); the run records the precision it used",
        ),
        "seed": (0, int, "seed of initialisation, data order, noise levels and flips"),
        "checkpointing_steps": (500, int, "save a checkpoint every N optimizer steps (0: only at the end)"),
        "checkpoints_total_limit": (None, int, "keep at most this many checkpoints"),
        "resume_from_checkpoint": (None, str, "a checkpoint folder, or 'latest' in output_dir"),
        "rewind": (False, bool, "resuming an earlier checkpoint: move what lies after it into output_dir/abandoned-*"),
        "save_on_each_node": (
            False,
            bool,
            "several nodes with node-local disks: the first process of every node writes complete checkpoints into "
            "its own node's output_dir (Accelerate's save_on_each_node; off: output_dir is shared by all nodes)",
        ),
        "sample_every_steps": (500, int, "save a sample grid every N optimizer steps (0: only at the end)"),
        "dataloader_num_workers": (0, int, "worker processes of the data loader"),
        "cpu_threads": (None, int, "torch intra-op CPU threads per process (null: torch's default)"),
        "report_to": ("tensorboard", str, "tensorboard | wandb | all | none"),
        "logging_dir": ("logs", str, "tracker folder, relative to output_dir"),
        "export_pipeline": (True, bool, "at the end, export the EMA variants (ema.stds) to output_dir/pipeline"),
        "push_to_hub": (False, bool, "push the final export to the Hub repository hub_model_id"),
        "hub_model_id": (None, str, "Hub repository (USER/NAME or NAME) to push to; named in the model card"),
        "hub_private_repo": (False, bool, "create the Hub repository private"),
        "pretrained_model_name_or_path": (
            None,
            str,
            "fine-tune: start from the U-Net of an exported pipeline (folder or Hub id); its model config is used",
        ),
        "variant": (None, str, "weight variant of pretrained_model_name_or_path's U-Net (e.g. ema0100)"),
        "base_model": (None, str, "recorded by the run: the model it was fine-tuned from (for the model card)"),
        "torch_compile": (
            False,
            bool,
            "torch.compile the U-Net for training and the sampler of the sample grids (also on when Accelerate's "
            "dynamo backend is set)",
        ),
        "compile_backend": (None, str, "torch.compile backend (default: Accelerate's dynamo backend, else inductor)"),
        "lr_schedule": (
            "images",
            str,
            "images: the rate is a function of the images seen (lr_warmup_*/lr_decay_ref_*) | epochs: set once per "
            "epoch as edm2-multi-gpu does (lr_warmup_epochs, lr_decay_ref_epochs)",
        ),
        "lr_warmup_epochs": (0, int, "epochs schedule: rate lr*(ep+1)/warm in epoch ep < warm (0: no warm-up)"),
        "lr_decay_ref_epochs": (None, int, "epochs schedule: then lr/sqrt(max(ep/t_ref, 1)); null: no decay"),
        "drop_last": (True, bool, "drop the last partial batch of each epoch (false: train on it too)"),
        "loss_reduction": (
            "mean",
            str,
            "mean: average the loss over every element | sum_per_image: sum over each image's elements, average "
            "over the batch (NVIDIA's EDM2 training loop)",
        ),
        "zero_nonfinite_grads": (
            False,
            bool,
            "zero NaN/inf gradient elements before each optimizer step, with fp16 at loss scale 1 instead of a "
            "GradScaler (NVIDIA's force_finite)",
        ),
    },
    "sampling": {
        "num_inference_steps": (18, int, "Heun steps of the sample grids"),
        "sigma_min": (0.002, float, "smallest noise level of the sampler"),
        "sigma_max": (80.0, float, "largest noise level of the sampler"),
        "rho": (7.0, float, "rho of the Karras et al. noise-level schedule"),
        "clip_sample": (False, bool, "clip the denoised image to [-range, range] at every sampler step"),
        "clip_sample_range": (1.0, float, "bound of clip_sample (edm2-multi-gpu clips pixels to [-1, 1])"),
        "grid_rows": (8, int, "rows of the sample grid (one class per row for class-conditional models)"),
        "grid_cols": (8, int, "columns of the sample grid"),
        "seed": (0, int, "seed of the grid's noise (the same every time, so progress is visible)"),
        "vae": (None, str, "latent models: AutoencoderKL (folder or Hub id) decoding grids; exports carry it"),
        "vae_subfolder": (None, str, "subfolder of sampling.vae holding the AutoencoderKL (e.g. vae)"),
        "mixed_precision": (
            "no",
            str,
            "no | fp16 | bf16: autocast of the U-Net while sampling grids on a GPU (a CPU samples in fp32)",
        ),
    },
}

SECTIONS = ("model", "data", "training", "ema", "sampling")

# Older spellings of config keys, still read from YAML files.
ALIASES = {"training": {"hub_private": "hub_private_repo"}}

# Setting one of these on the command line clears the keys it replaces, so a flag wins over a YAML value that is
# spelled differently (e.g. --train_batch_size over the YAML's total_batch_size).
REPLACES = {
    "data.dataset_name": ("data.source", "data.train_data_dir"),
    "data.train_data_dir": ("data.source", "data.dataset_name", "data.dataset_config_name"),
    "training.train_batch_size": ("training.total_batch_size",),
    "training.total_batch_size": ("training.train_batch_size",),
    "training.num_epochs": ("training.max_train_steps",),
    "training.lr_warmup_steps": ("training.lr_warmup_images",),
    "training.lr_warmup_images": ("training.lr_warmup_steps",),
    "training.lr_decay_ref_steps": ("training.lr_decay_ref_images",),
    "training.lr_decay_ref_images": ("training.lr_decay_ref_steps",),
}


def default_config() -> dict:
    """The defaults of every schema section (``model`` empty, ``ema`` empty = the EMA builder's defaults)."""
    cfg: dict[str, Any] = {"model": {}, "ema": {}}
    for section, keys in SCHEMA.items():
        cfg[section] = {key: copy.deepcopy(spec[0]) for key, spec in keys.items()}
    return cfg


def _coerce(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"config key {name!r} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"config key {name!r} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                as_float = float(value.replace("_", ""))
            except ValueError:
                raise ValueError(f"config key {name!r} must be an integer, got {value!r}") from None
            if as_float.is_integer():
                return int(as_float)
        if isinstance(value, int):
            return value
        raise ValueError(f"config key {name!r} must be an integer, got {value!r}")
    if kind is float:
        # PyYAML reads `4e-4` (no dot) as a string; accept it.
        if isinstance(value, bool):
            raise ValueError(f"config key {name!r} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {name!r} must be a number, got {value!r}") from None
    if not isinstance(value, str):
        raise ValueError(f"config key {name!r} must be a string, got {value!r}")
    return value


def _model_keys() -> set[str]:
    params = inspect.signature(EDM2UNet2DModel.__init__).parameters
    return {name for name in params if name != "self"}


def merge_config(cfg: dict, update: dict, source: str = "config") -> dict:
    """Merge ``update`` (nested mapping, e.g. a parsed YAML file) into a copy of ``cfg``.

    Raises:
        ValueError: on an unknown section or key, naming it and ``source``.
    """
    cfg = copy.deepcopy(cfg)
    if update is None:
        return cfg
    if not isinstance(update, dict):
        raise ValueError(f"{source}: the top level must be a mapping of sections {', '.join(SECTIONS)}")
    for section, values in update.items():
        if section not in SECTIONS:
            raise ValueError(f"{source}: unknown config key {section!r}; known sections: {', '.join(SECTIONS)}")
        if section == "ema":
            if values is not None and not isinstance(values, dict):
                raise ValueError(f"{source}: 'ema' must be a mapping or null (no EMA)")
            cfg["ema"] = copy.deepcopy(values)
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping")
        if section == "model":
            known = _model_keys()
            for key in values:
                if key not in known:
                    raise ValueError(
                        f"{source}: unknown config key 'model.{key}'; EDM2UNet2DModel takes {', '.join(sorted(known))}"
                    )
            cfg["model"].update(copy.deepcopy(values))
            continue
        for key, value in values.items():
            key = ALIASES.get(section, {}).get(key, key)
            if key not in SCHEMA[section]:
                raise ValueError(
                    f"{source}: unknown config key '{section}.{key}'; known keys of {section!r}: "
                    f"{', '.join(SCHEMA[section])}"
                )
            cfg[section][key] = _coerce(f"{section}.{key}", value, SCHEMA[section][key][1])
    return cfg


def apply_overrides(cfg: dict, overrides: dict[str, Any]) -> dict:
    """Apply command-line overrides ``{"section.key": value}`` on top of ``cfg``; flags win over the YAML.

    ``ema.snapshot_every_steps`` is accepted although ``ema`` is otherwise passed through verbatim (for a traditional
    EMA with post-hoc profiles it sets ``ema.posthoc.snapshot_every_steps``).
    """
    cfg = copy.deepcopy(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section == "ema":
            if cfg.get("ema") is None:
                raise ValueError(f"--{key} was given but the config disables the EMA (ema: null)")
            if isinstance(cfg["ema"].get("posthoc"), dict):  # a traditional EMA's post-hoc profiles
                cfg["ema"]["posthoc"][key] = value
            else:
                cfg["ema"][key] = value
            continue
        if section not in SCHEMA or key not in SCHEMA[section]:
            raise ValueError(f"unknown config key {dotted!r}")
        for cleared in REPLACES.get(dotted, ()):
            if cleared not in overrides:  # two flags for one quantity stay both set, and validation says so
                csec, _, ckey = cleared.partition(".")
                cfg[csec][ckey] = None
        cfg[section][key] = _coerce(dotted, value, SCHEMA[section][key][1])
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """Read a YAML training config over the defaults, then apply command-line ``overrides``.

    Args:
        path (`str`, *optional*): a YAML file with sections ``model``, ``data``, ``training``, ``ema``, ``sampling``.
        overrides (`dict`, *optional*): ``{"training.learning_rate": 1e-3, ...}`` from command-line flags.

    Returns:
        `dict`: the merged configuration (validate it with :func:`validate_config`).
    """
    cfg = default_config()
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                parsed = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML: {err}") from None
        cfg = merge_config(cfg, parsed, source=str(path))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def validate_config(cfg: dict) -> dict:
    """Check values and their combinations; return ``cfg`` unchanged.

    Raises:
        ValueError: naming the first problem found.
    """
    data, train, samp = cfg["data"], cfg["training"], cfg["sampling"]
    if not cfg.get("model") and train["pretrained_model_name_or_path"] is None:
        raise ValueError(
            "the config has no 'model' section (EDM2UNet2DModel arguments) and no --pretrained_model_name_or_path"
        )
    if train["output_dir"] is None:
        raise ValueError("no output directory: pass --output_dir (or set training.output_dir)")
    sources = ("hub", "imagefolder", "parquet", "latents", "sklearn_digits", "memory")
    if data["source"] is not None and data["source"] not in sources:
        raise ValueError(f"data.source must be one of {', '.join(sources)}, got {data['source']!r}")
    if data["dataset_name"] is not None and data["train_data_dir"] is not None:
        raise ValueError("give either --dataset_name or --train_data_dir, not both")
    for key in ("gradient_accumulation_steps",):
        if train[key] < 1:
            raise ValueError(f"training.{key} must be at least 1, got {train[key]}")
    for key in ("train_batch_size", "total_batch_size", "num_epochs", "max_train_steps"):
        if train[key] is not None and train[key] < 1:
            raise ValueError(f"training.{key} must be positive, got {train[key]}")
    if data["max_train_samples"] is not None and data["max_train_samples"] < 1:
        raise ValueError(f"data.max_train_samples must be positive, got {data['max_train_samples']}")
    if train["train_batch_size"] is None and train["total_batch_size"] is None:
        raise ValueError("no batch size: set training.train_batch_size (per device) or training.total_batch_size")
    if train["num_epochs"] is None and train["max_train_steps"] is None:
        raise ValueError("no training length: set --max_train_steps or --num_epochs")
    for a, b in (("lr_warmup_images", "lr_warmup_steps"), ("lr_decay_ref_images", "lr_decay_ref_steps")):
        if train[a] and train[b]:
            raise ValueError(f"set only one of training.{a} and training.{b}")
    for key in ("lr_warmup_images", "lr_warmup_steps", "lr_decay_ref_images", "lr_decay_ref_steps"):
        if train[key] is not None and train[key] < 0:
            raise ValueError(f"training.{key} must not be negative, got {train[key]}")
    if train["learning_rate"] <= 0:
        raise ValueError(f"training.learning_rate must be positive, got {train['learning_rate']}")
    if train["P_std"] <= 0 or train["sigma_data"] <= 0:
        raise ValueError("training.P_std and training.sigma_data must be positive")
    if train["mixed_precision"] not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"training.mixed_precision must be no, fp16 or bf16, got {train['mixed_precision']!r}")
    _validate_schedule_and_precision(cfg)
    if train["cpu_threads"] is not None and train["cpu_threads"] < 1:
        raise ValueError(f"training.cpu_threads must be at least 1, got {train['cpu_threads']}")
    for key in ("checkpointing_steps", "sample_every_steps", "dataloader_num_workers"):
        if train[key] < 0:
            raise ValueError(f"training.{key} must not be negative, got {train[key]}")
    if train["checkpoints_total_limit"] is not None and train["checkpoints_total_limit"] < 1:
        limit = train["checkpoints_total_limit"]
        raise ValueError(f"training.checkpoints_total_limit must be at least 1, got {limit}")
    if train["report_to"] not in ("tensorboard", "wandb", "all", "none"):
        raise ValueError(f"training.report_to must be tensorboard, wandb, all or none, got {train['report_to']!r}")
    if samp["num_inference_steps"] < 1 or samp["grid_rows"] < 1 or samp["grid_cols"] < 1:
        raise ValueError("sampling.num_inference_steps, grid_rows and grid_cols must be positive")
    if not 0 < samp["sigma_min"] < samp["sigma_max"]:
        raise ValueError("sampling needs 0 < sigma_min < sigma_max")
    if not samp["clip_sample_range"] > 0:
        raise ValueError(f"sampling.clip_sample_range must be positive, got {samp['clip_sample_range']}")

    check_ema_config(cfg.get("ema"))  # unknown keys and malformed values fail before anything runs
    if train["push_to_hub"]:
        if not train["export_pipeline"]:
            raise ValueError("--push_to_hub pushes the final export: it needs training.export_pipeline true")
        if cfg.get("ema") is None:
            raise ValueError("--push_to_hub needs an EMA to export, but the config disables it (ema: null)")
        resolve_repo_id(train["hub_model_id"])  # a missing or malformed id fails before training
    return cfg


def _validate_schedule_and_precision(cfg: dict) -> None:
    """The epoch schedule, loss reduction, crop and sampling precision options."""
    data, train, samp = cfg["data"], cfg["training"], cfg["sampling"]
    if train["lr_schedule"] not in ("images", "epochs"):
        raise ValueError(f"training.lr_schedule must be images or epochs, got {train['lr_schedule']!r}")
    image_keys = ("lr_warmup_images", "lr_warmup_steps", "lr_decay_ref_images", "lr_decay_ref_steps")
    epoch_keys = ("lr_warmup_epochs", "lr_decay_ref_epochs")
    for key in epoch_keys:
        if train[key] is not None and train[key] < 0:
            raise ValueError(f"training.{key} must not be negative, got {train[key]}")
    unused = image_keys if train["lr_schedule"] == "epochs" else epoch_keys
    for key in unused:
        if train[key]:
            raise ValueError(
                f"training.{key} is set but training.lr_schedule is {train['lr_schedule']}, which does not read it; "
                f"use the {'lr_*_epochs' if train['lr_schedule'] == 'epochs' else 'lr_*_images / lr_*_steps'} keys"
            )
    if train["loss_reduction"] not in ("mean", "sum_per_image"):
        raise ValueError(f"training.loss_reduction must be mean or sum_per_image, got {train['loss_reduction']!r}")
    if data["crop"] not in (None, "dhariwal"):
        raise ValueError(f"data.crop must be null or dhariwal, got {data['crop']!r}")
    if data["crop"] is not None and data["resolution"] is None:
        raise ValueError("data.crop dhariwal crops to data.resolution: set it")
    if samp["mixed_precision"] not in ("no", "fp16", "bf16"):
        raise ValueError(f"sampling.mixed_precision must be no, fp16 or bf16, got {samp['mixed_precision']!r}")


__all__ = [
    "SCHEMA",
    "apply_overrides",
    "default_config",
    "load_config",
    "merge_config",
    "validate_config",
]
