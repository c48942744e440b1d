"""Export a training run as one diffusers pipeline (safetensors only) with a model card, and push it.

The layout is in :mod:`edm2_diffusers.hub.layout`: one ``EDM2Pipeline`` whose U-Net holds each exported EMA std as a
diffusers weight variant (``variant="ema0100"``), the default weights being the first std given (or the EMA sweep's
best). :func:`export_pipelines` reconstructs post-hoc EMA stds from a run's snapshots, :func:`export_model` exports one
given U-Net, and :func:`export_run` is the one export-then-push helper (the trainer, ``examples/export_pipeline.py``
and the library all use it).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..ema import reconstruct
from ..ema.snapshots import model_class_path, model_config_of
from ..run_lock import writes_into
from ..runs import read_run_config, sampling_settings
from .checks import check_output_dir
from .push import push_to_hub as push
from .push import resolve_repo_id
from .run_info import default_stds, metrics_for, resolve_stds, run_source, sweep_metrics
from .sampler_choice import choose_sampler
from .writing import ExportOptions, ExportResult, ExportSource, Variant, write_export


def _check_dirs(run_dir, output_dir, overwrite: bool) -> tuple[Path, Path]:
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    check_output_dir(output_dir, run_dir, overwrite)
    return run_dir, output_dir


def _with_sampler(source: ExportSource, options: ExportOptions, sweep: dict, step: int, stds: list) -> ExportSource:
    """The export's default sampler: the run's Heun sampler or the EMA sweep's choice (``options.sampler``)."""
    source.sampling, source.info["sampler_choice"] = choose_sampler(
        options.sampler, sweep, step, stds, source.sampling, options.num_inference_steps
    )
    return source


@writes_into("output_dir", "run_dir")
def export_pipelines(
    run_dir: str | os.PathLike,
    stds,
    output_dir: str | os.PathLike,
    step: int | None = None,
    sweep_dir: str | os.PathLike | None = None,
    metrics: dict | None = None,
    options: ExportOptions | None = None,
    **option_kwargs,
) -> ExportResult:
    """Export post-hoc EMA reconstructions of a run as one ``EDM2Pipeline`` with a weight variant per std.

    For each std the U-Net is reconstructed from the run's EMA snapshots (:func:`edm2_diffusers.ema.reconstruct`)
    and saved as ``unet/diffusion_pytorch_model.<variant>.safetensors`` (``ema0050`` for 0.050); the first std is
    also the default weights. The pipeline carries the run's ``EDMHeunScheduler`` or, when the EMA sweep ran at this
    step and measured one of the exported stds, the sampler it chose (``sampler``, :mod:`.sampler_choice`) with its
    step count as the pipeline's default, and standalone custom code, so it also loads without this package. A latent
    run (one that recorded ``latent_info.json``) exports its latent standardization and, when a VAE is known, the VAE.

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder (with ``phema/`` snapshots).
        stds (`float`, `str` or `list`): EMA stds, e.g. ``[0.05, 0.1]``, ``"0.05,0.10"``, or ``"best"`` for the EMA
            sweep's best std (``run_dir/sweep/best.json`` or ``sweep_dir``). The first is the default.
        output_dir (`str` or `os.PathLike`): the export folder.
        step (`int`, *optional*): reconstruct at this snapshot step (default: the last one).
        sweep_dir (`str` or `os.PathLike`, *optional*): folder (or file) of the EMA sweep's ``best.json``.
        metrics (`dict`, *optional*): ``{std: {"fid": value, ...}}`` to show in the card, over those of the sweep.
        options (`ExportOptions`, *optional*), **option_kwargs: how the export is written (see
            :class:`~edm2_diffusers.hub.writing.ExportOptions`: ``overwrite``, ``license``, ``repo_id`` ...).

    Returns:
        `ExportResult`.
    """
    options = ExportOptions.of(options, **option_kwargs)
    run_dir, output_dir = _check_dirs(run_dir, output_dir, options.overwrite)
    std_list, sweep = resolve_stds(stds, run_dir, sweep_dir)
    sampling_settings(read_run_config(run_dir)[1], options.num_inference_steps)  # a bad step count fails early
    try:
        rec = reconstruct(str(run_dir), std_list, step=step)
    except (ValueError, FileNotFoundError) as err:
        stds_text = ", ".join(f"{s:g}" for s in std_list)
        raise type(err)(f"cannot reconstruct EMA std(s) {stds_text} from {run_dir}: {err}") from err
    known, note = sweep_metrics(sweep, rec.step, metrics)
    variants = [
        Variant(std=std, build=lambda i=i: rec.model(i), metrics=metrics_for(std, known))
        for i, std in enumerate(rec.stds)
    ]
    model = {"class": rec.model_class, "config": dict(rec.model_config)}
    run = {"step": rec.step, "nimg": rec.nimg}
    source = run_source(run_dir, output_dir, variants, model, run, options, metrics_note=note)
    return write_export(_with_sampler(source, options, sweep, rec.step, list(rec.stds)), output_dir, options)


@writes_into("output_dir", "run_dir")
def export_model(
    run_dir: str | os.PathLike,
    unet,
    output_dir: str | os.PathLike,
    step: int,
    nimg: int,
    ema: dict | None = None,
    metrics: dict | None = None,
    options: ExportOptions | None = None,
    **option_kwargs,
) -> ExportResult:
    """Export one given U-Net of a run (e.g. a traditional EMA, which has no snapshots) as an ``EDM2Pipeline``.

    The same export as :func:`export_pipelines` with a single set of weights (no variants) and the run's Heun sampler
    (the EMA sweep measured post-hoc reconstructions, not this model).

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder (its ``config.yaml`` gives the sampling
            settings and the card's details).
        unet (`EDM2UNet2DModel`): the weights to export.
        output_dir (`str` or `os.PathLike`): the export folder.
        step (`int`), nimg (`int`): optimizer steps and training images behind ``unet``.
        ema (`dict`, *optional*): how ``unet`` was averaged, for the card, e.g. ``{"type": "traditional", "beta":
            0.9993, "warmup_steps": 0}``; ``None`` for raw training weights.
        metrics (`dict`, *optional*): ``{"fid": value, ...}`` of this model, shown in the card.
        options (`ExportOptions`, *optional*), **option_kwargs: as in :func:`export_pipelines`.

    Returns:
        `ExportResult` (its single variant is ``(None, None)``).
    """
    options = ExportOptions.of(options, **option_kwargs)
    run_dir, output_dir = _check_dirs(run_dir, output_dir, options.overwrite)
    variants = [Variant(std=None, build=lambda: unet, metrics=dict(metrics or {}))]
    model = {"class": model_class_path(unet), "config": model_config_of(unet)}
    ema = dict(ema) if ema is not None else {"type": "none"}
    source = run_source(run_dir, output_dir, variants, model, {"step": step, "nimg": nimg}, options, ema=ema)
    return write_export(_with_sampler(source, options, {}, step, [None]), output_dir, options)


def export_run(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    stds=None,
    *,
    unet=None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    **kwargs,
) -> ExportResult:
    """Export a run and optionally push it: the one export-then-push helper.

    The repository id is checked before anything is exported; the push is one commit that also deletes the files an
    earlier export left in the repository (:func:`edm2_diffusers.hub.push_to_hub`).

    Args:
        run_dir (`str` or `os.PathLike`): the training run's output folder.
        output_dir (`str` or `os.PathLike`, *optional*): the export folder; defaults to ``run_dir/pipeline``.
        stds (*optional*): as in :func:`export_pipelines`; defaults to :func:`default_stds`.
        unet (`EDM2UNet2DModel`, *optional*): export this one model with :func:`export_model` instead (then
            ``step`` and ``nimg`` are required, ``ema`` describes it).
        push_to_hub (`bool`): upload the export.
        hub_model_id (`str`, *optional*): the repository (``user/name``); required with ``push_to_hub``.
        private (`bool`): create the repository private.
        token (`str`, *optional*): Hub token (default: ``HF_TOKEN`` or the cached login).
        commit_message (`str`, *optional*): message of the Hub commit.
        **kwargs: passed to :func:`export_pipelines` or :func:`export_model` (``step``, ``overwrite``, ...).
    """
    if push_to_hub:
        hub_model_id = resolve_repo_id(hub_model_id)  # fail before any work
    output_dir = Path(run_dir) / "pipeline" if output_dir is None else output_dir
    kwargs.setdefault("repo_id", hub_model_id)
    if unet is not None:
        result = export_model(run_dir, unet, output_dir, **kwargs)
    else:
        stds = default_stds(run_dir, kwargs.get("sweep_dir")) if stds is None else stds
        result = export_pipelines(run_dir, stds, output_dir, **kwargs)
    if push_to_hub:
        result.commit = push(
            result.output_dir, hub_model_id, private=private, token=token, commit_message=commit_message
        )
    return result


__all__ = ["ExportOptions", "ExportResult", "default_stds", "export_model", "export_pipelines", "export_run"]
