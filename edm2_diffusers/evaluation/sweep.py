"""EMA-length sweep: reconstruct many EMA profiles of one run post hoc, evaluate each, keep the best.

This is the experiment of the EDM2 paper's Figure 5: the quality metric as a function of the relative standard
deviation σ_rel of a power-function EMA, all profiles reconstructed after training from the same snapshots (Section
3.1). Every profile is sampled from the same seeds, so the curve compares EMA lengths, not noise draws. The sweep can
also vary the sampler (scheduler and step count, ``schedulers.samplers``), which puts the metric against the number of
network evaluations (NFE): the cheapest setting whose metric lies within a margin of the best is recorded, so that an
export can sample with it by default. Weights live in memory only; the sweep writes ``sweep.csv`` (one row per std
and sampler), ``sweep.png`` (metric against std, best marked), ``sweep_nfe.png`` (metric against NFE at the best std,
when several samplers are swept) and ``best.json``, which ``examples/export_pipeline.py --stds best`` reads.

``best.json`` format::

    {"std": 0.1, "metric": "fd", "value": 12.3, "step": 4000,
     "results": [{"std": 0.05, "fd": 14.1, "confident": 0.93}, ...],      # each std, under the best's sampler
     "sampler": {"scheduler": "EDMHeunScheduler", "num_inference_steps": 18, "nfe": 35},     # the best's sampler
     "samplers": [{"std": 0.05, "scheduler": ..., "num_inference_steps": ..., "nfe": ..., "fd": ...}, ...],
     "cheapest": {"std": 0.1, "scheduler": "EDMDPMSolverMultistepScheduler", "num_inference_steps": 10, "nfe": 10,
                  "value": 12.5, "margin": "2%", "threshold": 12.55},
     "settings": {"run_dir": ..., "num_images": ..., ...}}

``cheapest`` is, at the best std, the sampler with the fewest network evaluations whose metric is at most
``threshold`` (the best value plus the margin: a percentage of it, or an absolute amount). Its default place,
``<run_dir>/sweep/best.json``, is where the export looks without ``--sweep_dir``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..ema import parse_stds, reconstruct
from ..files import write_json_atomic, write_text_atomic
from ..pipelines import EDM2Pipeline
from ..runs import SWEEP_BEST_NAME, run_scheduler
from ..schedulers.samplers import SamplerSetting, parse_samplers
from .evaluate import evaluate_pipeline
from .extractors import extractor_name, get_feature_extractor
from .plots import plot_nfe, plot_sweep

logger = logging.getLogger(__name__)

CSV_NAME = "sweep.csv"
PLOT_NAME = "sweep.png"
NFE_PLOT_NAME = "sweep_nfe.png"
DEFAULT_MARGIN = "2%"


def parse_margin(margin) -> tuple[float, bool]:
    """``"2%"`` → ``(0.02, True)`` (relative to the best value); ``"0.5"`` or ``0.5`` → ``(0.5, False)`` (absolute)."""
    text = str(margin).strip()
    relative = text.endswith("%")
    try:
        value = float(text[:-1] if relative else text)
    except ValueError:
        raise ValueError(
            f"margin {margin!r} must be a percentage such as '2%' or an absolute amount such as 0.5"
        ) from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"margin {margin!r} must be finite and non-negative")
    return (value / 100 if relative else value), relative


def margin_threshold(best_value: float, margin) -> float:
    """The largest metric within ``margin`` of ``best_value`` (lower is better)."""
    value, relative = parse_margin(margin)
    return best_value + (value * abs(best_value) if relative else value)


@dataclass
class SweepResult:
    """Outcome of :func:`sweep_ema`.

    Args:
        rows (`list[dict]`): one per std and sampler: ``std``, ``scheduler``, ``num_inference_steps``, ``nfe``, the
            metric, ``confident`` (classifier extractors), ``step``, ``num_images``.
        metric_name (`str`): ``"fid"`` for Inception features, ``"fd"`` otherwise (lower is better).
        best_std (`float`), best_metric (`float`): the winner.
        step (`int`): training step the profiles were reconstructed at.
        files (`dict[str, str]`): paths written (``csv``, ``png``, ``best``, ``nfe_png``), if an output folder was
            given.
        best_row (`dict`): the winner's row.
        cheapest (`dict`): at the best std, the row with the fewest NFE within the margin of the best.
    """

    rows: list
    metric_name: str
    best_std: float
    best_metric: float
    step: int
    files: dict = field(default_factory=dict)
    best_row: dict = field(default_factory=dict)
    cheapest: dict = field(default_factory=dict)


def _reconstructed(run_dir: str, stds: list[float], step: int | None, chunk_size: int):
    """Yield ``(std, net, step)`` for each std, reconstructing ``chunk_size`` at once into one reused network."""
    net = None
    for start in range(0, len(stds), max(1, int(chunk_size))):
        rec = reconstruct(run_dir, stds[start : start + max(1, int(chunk_size))], step=step)
        for i, (std, state) in enumerate(rec):
            if net is None:
                net = rec.model(i)
            else:
                net.load_state_dict(state)
            yield std, net.eval(), rec.step
        del rec


def _output_paths(output_dir: str | None, overwrite: bool) -> dict:
    if output_dir is None:
        return {}
    names = {"csv": CSV_NAME, "png": PLOT_NAME, "nfe_png": NFE_PLOT_NAME, "best": SWEEP_BEST_NAME}
    paths = {k: os.path.join(output_dir, n) for k, n in names.items()}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists from an earlier sweep; pass --overwrite or another --output_dir")
    return paths


def sweep_ema(
    run_dir: str,
    stds,
    feature_extractor,
    reference,
    num_images: int,
    num_inference_steps: int = 18,
    batch_size: int = 64,
    seed: int = 0,
    step: int | None = None,
    accelerator=None,
    output_dir: str | None = None,
    overwrite: bool = False,
    chunk_size: int = 4,
    progress: bool = True,
    samplers=None,
    margin=DEFAULT_MARGIN,
) -> SweepResult:
    """Reconstruct each std of ``stds`` from the run's snapshots, evaluate it under each sampler, record the best.

    Args:
        run_dir (`str`): the training run (with ``phema/`` snapshots and, optionally, ``config.yaml``).
        stds (`str` or `list[float]`): EMA lengths, or a spec for :func:`parse_stds`.
        feature_extractor (`str` or `nn.Module`): ``"inception"``, ``"digits"`` or a module.
        reference (`FeatureStats`): reference statistics of the real data.
        num_images (`int`): generated images per std and sampler.
        num_inference_steps (`int`): sampler steps (of the run's Heun sampler when ``samplers`` is not given).
        batch_size (`int`): images per batch and process.
        seed (`int`): seed of image 0 (the same images' noise for every std and sampler).
        step (`int`, *optional*): snapshot step to reconstruct at (default: the last).
        accelerator (`accelerate.Accelerator`, *optional*): spreads each evaluation's images over the processes;
            only the main process writes files.
        output_dir (`str`, *optional*): where ``sweep.csv``, the plots and ``best.json`` go; nothing is written
            without it.
        overwrite (`bool`): replace the files of an earlier sweep in ``output_dir`` (otherwise refused).
        chunk_size (`int`): stds reconstructed at once (bounds memory: one model copy per std in a chunk).
        progress (`bool`): show progress bars.
        samplers (`str` or `list`, *optional*): sampler settings for :func:`.samplers.parse_samplers`, e.g.
            ``"heun:18,dpmsolver:18,dpmsolver:10"`` (default: the run's Heun sampler at ``num_inference_steps``).
        margin (`str` or `float`): how far from the best metric the cheapest setting may be: ``"2%"`` of the best,
            or an absolute amount.
    """
    stds = parse_stds(stds, sort=True)
    if not stds:
        raise ValueError("the sweep needs at least one std")
    settings = parse_samplers(samplers or [("heun", num_inference_steps)], num_inference_steps)
    parse_margin(margin)
    is_main = accelerator is None or accelerator.is_main_process
    paths = _output_paths(output_dir, overwrite)
    extractor = get_feature_extractor(feature_extractor)
    metric_name = "fid" if extractor_name(extractor) == "inception" else "fd"
    base = run_scheduler(run_dir)
    rows = []
    for std, net, rec_step in _reconstructed(run_dir, stds, step, chunk_size):
        for setting in settings:
            pipe = EDM2Pipeline(unet=net, scheduler=setting.make_scheduler(base))
            out = evaluate_pipeline(
                pipe, extractor, reference, num_images, batch_size, setting.num_inference_steps, seed, accelerator,
                progress=progress,
            )  # fmt: skip
            rows.append(_row(std, setting, metric_name, out, rec_step, num_images))
            if is_main:
                logger.info(
                    "EMA std %.4f, %s (NFE %d): %s = %.4f", std, setting.label, setting.nfe, metric_name, out.fd
                )
                if paths:
                    _write_csv(paths["csv"], rows)  # after every evaluation, so a stopped sweep keeps what it measured
    result = _result(rows, metric_name, margin)
    if paths and is_main:
        _write_outputs(paths, result, margin, settings, run_dir, num_images, seed, extractor_name(extractor))
    return result


def _row(std: float, setting: SamplerSetting, metric_name: str, out, step: int, num_images: int) -> dict:
    row = {"std": std, "scheduler": setting.scheduler_class, "num_inference_steps": setting.num_inference_steps}
    row.update({"nfe": setting.nfe, metric_name: out.fd})
    if out.confident is not None:
        row["confident"] = out.confident
    row.update(step=step, num_images=num_images)
    return row


def _result(rows: list[dict], metric_name: str, margin) -> SweepResult:
    """The best row over all stds and samplers, and the cheapest sampler within ``margin`` of it at its std."""
    values = np.array([r[metric_name] for r in rows], dtype=np.float64)
    if not np.isfinite(values).any():
        raise RuntimeError(f"no EMA length gave a finite {metric_name}")
    best = rows[int(np.nanargmin(np.where(np.isfinite(values), values, np.nan)))]
    threshold = margin_threshold(best[metric_name], margin)
    near = [r for r in rows if r["std"] == best["std"] and np.isfinite(r[metric_name]) and r[metric_name] <= threshold]
    cheapest = min(near, key=lambda r: (r["nfe"], r[metric_name]))
    result = SweepResult(rows, metric_name, best["std"], float(best[metric_name]), best["step"], best_row=best)
    result.cheapest = {k: cheapest[k] for k in ("std", "scheduler", "num_inference_steps", "nfe")}
    result.cheapest.update(value=float(cheapest[metric_name]), margin=str(margin), threshold=float(threshold))
    return result


def _same_sampler(row: dict, other: dict) -> bool:
    return (row["scheduler"], row["num_inference_steps"]) == (other["scheduler"], other["num_inference_steps"])


def _write_outputs(paths, result: SweepResult, margin, settings, run_dir, num_images, seed, extractor: str) -> None:
    """``sweep.csv``, the plots and ``best.json`` (the format :func:`edm2_diffusers.runs.read_sweep` reads)."""
    name, best = result.metric_name, result.best_row
    _write_csv(paths["csv"], result.rows)
    curve = [r for r in result.rows if _same_sampler(r, best)]
    index = next(i for i, r in enumerate(curve) if r["std"] == best["std"])
    plot_sweep(paths["png"], [r["std"] for r in curve], [r[name] for r in curve], index, name, result.step)
    files = dict(paths)
    if len(settings) > 1:
        series: dict[str, list] = {}
        for r in result.rows:
            if r["std"] == best["std"]:
                series.setdefault(r["scheduler"].removeprefix("EDM").removesuffix("Scheduler"), []).append(
                    (r["nfe"], r[name])
                )
        cheap = result.cheapest
        plot_nfe(
            paths["nfe_png"],
            series,
            name,
            (best["nfe"], best[name], f"best: {best['scheduler']} {best['num_inference_steps']} ({best['nfe']} NFE)"),
            (cheap["nfe"], cheap["value"], f"cheapest within {margin}: {cheap['scheduler']} ({cheap['nfe']} NFE)"),
            f" (EMA std {best['std']:.3f}, step {result.step})",
        )
    else:
        files.pop("nfe_png")
    # Numeric keys of `results` rows are metrics (read_sweep), so the sampler of each row lives in `samplers`.
    keys = ("std", "scheduler", "num_inference_steps", "nfe", name, "confident")
    curve = [_finite_or_none(r) for r in curve]
    best_info = {
        "std": result.best_std,
        "metric": name,
        "value": result.best_metric,
        "step": result.step,
        "results": [{k: r[k] for k in ("std", name, "confident") if k in r} for r in curve],
        "sampler": {k: best[k] for k in ("scheduler", "num_inference_steps", "nfe")},
        "samplers": [{k: r[k] for k in keys if k in r} for r in map(_finite_or_none, result.rows)],
        "cheapest": result.cheapest,
        "settings": {
            "run_dir": os.path.abspath(run_dir),
            "num_images": num_images,
            "num_inference_steps": best["num_inference_steps"],
            "seed": seed,
            "feature_extractor": extractor,
            "margin": str(margin),
        },
    }
    write_json_atomic(paths["best"], best_info)
    result.files = files


def _finite_or_none(row: dict) -> dict:
    """The row with non-finite numbers as ``None`` (``best.json`` is strict JSON)."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


def _write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


__all__ = [
    "DEFAULT_MARGIN",
    "SweepResult",
    "margin_threshold",
    "parse_margin",
    "plot_nfe",
    "plot_sweep",
    "sweep_ema",
]
