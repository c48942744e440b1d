"""The end of a training run: export its EMA as a diffusers pipeline into ``output_dir/pipeline`` and push it.

What is exported:

* power-function EMA: the tracked profiles (``ema.stds``; the first at the root) reconstructed from the snapshots
  of the last step with :func:`edm2_diffusers.hub.export_run`. The loop writes a snapshot at the last step whatever
  ``ema.snapshot_every_steps`` says, so a run can always be exported (and reconstructed) where it ended;
* traditional EMA: its single average, as it is, with ``export_run(..., unet=...)`` (it has no snapshots,
  so other EMA lengths cannot be made from it, unless ``ema.posthoc`` tracked power-function profiles beside it:
  their snapshots in ``output_dir/phema`` export with ``examples/export_pipeline.py --run_dir RUN --stds ...``);
* no EMA (``ema: null``): nothing; a warning says so when the run starts.

Latent runs carry their standardization constants (``latent_info.json``) into the pipeline, and the VAE of
``sampling.vae`` when one is configured. Only the main process exports and pushes.
"""

from __future__ import annotations

import json
import os

from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from ..ema import PowerFunctionEMA
from ..hub import EXPORT_INFO_NAME, check_push_access, export_run, push_to_hub
from ..runs import PIPELINE_SUBDIR, pipeline_dir

logger = get_logger(__name__)


def check_export_target(cfg: dict, warn: bool = True) -> None:
    """Before training: the export must not replace anything but an earlier export of this package.

    Args:
        cfg (`dict`): the run's configuration.
        warn (`bool`): log that a run without EMA exports nothing (on the main process).

    Raises:
        ValueError: ``output_dir/pipeline`` holds files that are not a pipeline export.
    """
    if not cfg["training"]["export_pipeline"]:
        return
    if cfg.get("ema") is None:
        if warn:
            logger.warning("ema: null — this run has no EMA, so nothing will be exported to %s", PIPELINE_SUBDIR)
        return
    target = pipeline_dir(cfg["training"]["output_dir"])
    if not os.path.exists(target):
        return
    if not os.path.isdir(target):
        raise ValueError(f"{target} exists and is not a folder; the run exports its pipeline there")
    if os.listdir(target) and not os.path.isfile(os.path.join(target, EXPORT_INFO_NAME)):
        raise ValueError(
            f"{target} holds files that are not a pipeline export; the run would export into it at the end. Move "
            "them away, or pass --no-export_pipeline"
        )


def check_push_target(cfg: dict, accelerator, token: str | None = None) -> None:
    """Before training, with ``training.push_to_hub``: the token is valid and may write to ``hub_model_id``.

    The main process asks the Hub (:func:`~edm2_diffusers.hub.check_push_access`); every process stops on a failure.

    Raises:
        ValueError: no token, a rejected token, or no write access.
    """
    if not cfg["training"]["push_to_hub"]:
        return
    problem = None
    if accelerator.is_main_process:
        try:
            repo_id = check_push_access(cfg["training"]["hub_model_id"], token)
            logger.info("the Hub token may push to %s", repo_id)
        except ValueError as err:
            problem = str(err)
    (problem,) = broadcast_object_list([problem])
    if problem:
        raise ValueError(f"{problem} (checked before training, nothing was written)")


def export_step(target: str) -> int | None:
    """The training step an export of this package holds (``None``: no export there)."""
    try:
        with open(os.path.join(target, EXPORT_INFO_NAME), encoding="utf-8") as f:
            return int(json.load(f)["run"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_trained_run(cfg: dict, ema, step: int, images_seen: int, hub_token: str | None = None) -> str | None:
    """Export the EMA of a finished run into ``output_dir/pipeline`` (and push it when ``training.push_to_hub``).

    An export of the same step that is already there is kept as it is (a finished run resumed again exports
    nothing); an export of an earlier step is replaced.

    Args:
        cfg (`dict`): the run's configuration.
        ema: the run's EMA tracker (``PowerFunctionEMA`` or ``TraditionalEMA``; ``None``: nothing to export).
        step (`int`), images_seen (`int`): where the run ended.
        hub_token (`str`, *optional*): Hub token for the push (default: ``HF_TOKEN`` or the cached login).

    Returns:
        `str` or `None`: the export folder, or ``None`` when nothing was exported.

    Raises:
        RuntimeError: the export or the push failed; the message says how to retry (the checkpoint is complete).
    """
    train_cfg = cfg["training"]
    if not train_cfg["export_pipeline"] or ema is None:
        return None
    output_dir = train_cfg["output_dir"]
    target = pipeline_dir(output_dir)
    repo_id = train_cfg["hub_model_id"]
    private, push = train_cfg["hub_private_repo"], train_cfg["push_to_hub"]
    try:
        if export_step(target) == step:
            logger.info("%s already holds the export of step %d", target, step)
            if push:
                push_to_hub(target, repo_id, private=private, token=hub_token)
            return target
        if isinstance(ema, PowerFunctionEMA):
            what = dict(stds=list(ema.stds))
        else:
            ((_, net),) = ema.averaged_models()
            description = ema.description()
            what = dict(unet=net, nimg=images_seen, ema=description)
        export_run(
            output_dir,
            target,
            step=step,
            overwrite=True,
            push_to_hub=push,
            hub_model_id=repo_id,
            private=private,
            token=hub_token,
            **what,
        )
    except Exception as err:
        raise RuntimeError(
            f"training finished at step {step} and its checkpoint is complete, but exporting or pushing {target} "
            f"failed: {err}. Retry with the same command and --resume_from_checkpoint latest, or with "
            f"examples/export_pipeline.py --run_dir {output_dir}"
        ) from err
    logger.info("pipeline: %s", target)
    return target


__all__ = ["check_export_target", "check_push_target", "export_step", "export_trained_run"]
