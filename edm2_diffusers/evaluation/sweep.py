"""EMA-length sweep: reconstruct many EMA profiles of one run post hoc, evaluate each, keep the best.

This is the experiment of the EDM2 paper's Figure 5: the quality metric as a function of the relative standard
deviation σ_rel of a power-function EMA, all profiles reconstructed after training from the same snapshots (Section
3.1). Every profile is sampled from the same seeds, so the curve compares EMA lengths, not noise draws. Weights live in
memory only; the sweep writes ``sweep.csv`` (one row per std), ``sweep.png`` (the curve, best point marked) and
``best.json``, which ``examples/export_pipeline.py --stds best`` reads.

``best.json`` format: ``{"std": 0.1, "metric": "fd", "value": 12.3, "step": 4000, "results": [{"std": 0.05,
"fd": 14.1, "confident": 0.93}, ...], "settings": {"run_dir": ..., "num_images": ..., ...}}``. Its default place,
``<run_dir>/sweep/best.json``, is where the export looks without ``--sweep_dir``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..ema import parse_stds, reconstruct
from ..files import atomic_path, write_text_atomic
from ..pipelines import EDM2Pipeline
from ..runs import SWEEP_BEST_NAME, run_scheduler
from .evaluate import evaluate_pipeline
from .extractors import extractor_name, get_feature_extractor

logger = logging.getLogger(__name__)

CSV_NAME = "sweep.csv"
PLOT_NAME = "sweep.png"


@dataclass
class SweepResult:
    """Outcome of :func:`sweep_ema`.

    Args:
        rows (`list[dict]`): one per std: ``std``, the metric, ``confident`` (classifier extractors), settings.
        metric_name (`str`): ``"fid"`` for Inception features, ``"fd"`` otherwise (lower is better).
        best_std (`float`), best_metric (`float`): the winner.
        step (`int`): training step the profiles were reconstructed at.
        files (`dict[str, str]`): paths written (``csv``, ``png``, ``best``), if an output folder was given.
    """

    rows: list
    metric_name: str
    best_std: float
    best_metric: float
    step: int
    files: dict = field(default_factory=dict)


def _chunks(values: list, size: int):
    for i in range(0, len(values), size):
        yield values[i : i + size]


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
) -> SweepResult:
    """Reconstruct each std of ``stds`` from the run's snapshots, evaluate it, and record the best.

    Args:
        run_dir (`str`): the training run (with ``phema/`` snapshots and, optionally, ``config.yaml``).
        stds (`str` or `list[float]`): EMA lengths, or a spec for :func:`parse_stds`.
        feature_extractor (`str` or `nn.Module`): ``"inception"``, ``"digits"`` or a module.
        reference (`FeatureStats`): reference statistics of the real data.
        num_images (`int`): generated images per std.
        num_inference_steps (`int`): sampler steps.
        batch_size (`int`): images per batch and process.
        seed (`int`): seed of image 0 (the same images' noise for every std).
        step (`int`, *optional*): snapshot step to reconstruct at (default: the last).
        accelerator (`accelerate.Accelerator`, *optional*): spreads each std's images over the processes; only the
            main process writes files.
        output_dir (`str`, *optional*): where ``sweep.csv``, ``sweep.png`` and ``best.json`` go; nothing is
            written without it.
        overwrite (`bool`): replace the files of an earlier sweep in ``output_dir`` (otherwise refused).
        chunk_size (`int`): stds reconstructed at once (bounds memory: one model copy per std in a chunk).
        progress (`bool`): show progress bars.
    """
    stds = parse_stds(stds, sort=True)
    if not stds:
        raise ValueError("the sweep needs at least one std")
    is_main = accelerator is None or accelerator.is_main_process
    paths = {}
    if output_dir is not None:
        names = {"csv": CSV_NAME, "png": PLOT_NAME, "best": SWEEP_BEST_NAME}
        paths = {k: os.path.join(output_dir, n) for k, n in names.items()}
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing and not overwrite:
            raise FileExistsError(
                f"{existing[0]} exists from an earlier sweep; pass --overwrite or another --output_dir"
            )
    extractor = get_feature_extractor(feature_extractor)
    name = extractor_name(extractor)
    metric_name = "fid" if name == "inception" else "fd"
    scheduler = run_scheduler(run_dir)

    rows = []
    net = None
    rec_step = None
    for chunk in _chunks(stds, max(1, int(chunk_size))):
        rec = reconstruct(run_dir, chunk, step=step)
        rec_step = rec.step
        for i, (std, state) in enumerate(rec):
            if net is None:
                net = rec.model(i)
            else:
                net.load_state_dict(state)
            pipe = EDM2Pipeline(unet=net.eval(), scheduler=scheduler)
            out = evaluate_pipeline(
                pipe,
                extractor,
                reference,
                num_images,
                batch_size,
                num_inference_steps,
                seed,
                accelerator,
                progress=progress,
            )
            row = {"std": std, metric_name: out.fd}
            if out.confident is not None:
                row["confident"] = out.confident
            row.update(step=rec.step, num_images=num_images, num_inference_steps=num_inference_steps)
            rows.append(row)
            if is_main:
                logger.info("EMA std %.4f: %s = %.4f", std, metric_name, out.fd)
                if paths:
                    _write_csv(paths["csv"], rows)  # after every std, so a stopped sweep keeps what it measured
        del rec

    values = np.array([r[metric_name] for r in rows], dtype=np.float64)
    if not np.isfinite(values).any():
        raise RuntimeError(f"no EMA length gave a finite {metric_name}")
    best = int(np.nanargmin(np.where(np.isfinite(values), values, np.nan)))
    result = SweepResult(rows, metric_name, rows[best]["std"], float(values[best]), rec_step)
    if paths and is_main:
        _write_csv(paths["csv"], rows)
        plot_sweep(paths["png"], [r["std"] for r in rows], values.tolist(), best, metric_name, rec_step)
        # The format hub.export.read_sweep reads (export_pipeline.py --stds best): numeric keys of `results` rows and
        # of the top level are metrics, so the settings live in a nested object.
        best_info = {
            "std": result.best_std,
            "metric": metric_name,
            "value": result.best_metric,
            "step": rec_step,
            "results": [{k: r[k] for k in ("std", metric_name, "confident") if k in r} for r in rows],
            "settings": {
                "run_dir": os.path.abspath(run_dir),
                "num_images": num_images,
                "num_inference_steps": num_inference_steps,
                "seed": seed,
                "feature_extractor": name,
            },
        }
        write_text_atomic(paths["best"], json.dumps(best_info, indent=2) + "\n")
        result.files = paths
    return result


def _write_csv(path: str, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1) if first + i * step <= hi]


def plot_sweep(
    path: str,
    stds: list[float],
    values: list[float],
    best: int,
    metric_name: str = "fd",
    step: int | None = None,
    size: tuple[int, int] = (720, 480),
) -> str:
    """Draw the metric against EMA std (paper Figure 5 style) with PIL; the best point is marked in red.

    Args:
        path (`str`): output ``.png``.
        stds (`list[float]`), values (`list[float]`): the curve (non-finite values are skipped).
        best (`int`): index of the best point.
        metric_name (`str`): y-axis label.
        step (`int`, *optional*): training step, shown in the title.
        size (`tuple[int, int]`): image size in pixels.
    """

    def font(px):
        try:
            return ImageFont.load_default(size=px)
        except TypeError:  # Pillow < 10.1 has one bitmap size
            return ImageFont.load_default()

    small, large = font(13), font(16)
    w, h = size
    left, right, top, bottom = 80, 24, 48, 60
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    pts = [(s, v) for s, v in zip(stds, values) if math.isfinite(v)]
    xs = [s for s, _ in pts] or list(stds)
    ys = [v for _, v in pts] or [0.0]
    x_pad = 0.04 * (max(xs) - min(xs)) or 0.01
    y_pad = 0.08 * (max(ys) - min(ys)) or 0.1 * (abs(ys[0]) or 1.0)
    x_lo, x_hi = min(xs) - x_pad, max(xs) + x_pad
    y_lo, y_hi = min(ys) - y_pad, max(ys) + y_pad
    x_ticks, y_ticks = _nice_ticks(x_lo, x_hi), _nice_ticks(y_lo, y_hi)

    def px(s, v):
        return (
            left + (s - x_lo) / (x_hi - x_lo) * (w - left - right),
            h - bottom - (v - y_lo) / (y_hi - y_lo) * (h - top - bottom),
        )

    grey, axis = (225, 225, 225), (60, 60, 60)
    for t in y_ticks:
        _, y = px(x_lo, t)
        draw.line([(left, y), (w - right, y)], fill=grey)
        draw.text((left - 8, y), f"{t:.4g}", fill=axis, font=small, anchor="rm")
    for t in x_ticks:
        x, _ = px(t, y_lo)
        draw.line([(x, top), (x, h - bottom)], fill=grey)
        draw.text((x, h - bottom + 8), f"{t:.3g}", fill=axis, font=small, anchor="mt")
    draw.rectangle([left, top, w - right, h - bottom], outline=axis)
    line = [px(s, v) for s, v in pts]
    if len(line) > 1:
        draw.line(line, fill=(31, 119, 180), width=2)
    for x, y in line:
        draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=(31, 119, 180))
    if 0 <= best < len(stds) and math.isfinite(values[best]):
        red = (214, 39, 40)
        bx, by = px(stds[best], values[best])
        for y0 in range(top, h - bottom, 8):  # dashed vertical line at the best std
            draw.line([(bx, y0), (bx, min(y0 + 4, h - bottom))], fill=red, width=1)
        draw.ellipse([bx - 7, by - 7, bx + 7, by + 7], outline=red, width=3)
        label = f"best: std {stds[best]:.3f}, {metric_name} {values[best]:.4g}"
        right_side = bx < (left + w - right) / 2
        draw.text(
            (bx + 6 if right_side else bx - 6, top + 6),
            label,
            fill=red,
            font=small,
            anchor="lt" if right_side else "rt",
        )
    title = f"{metric_name.upper()} vs. EMA length" + (f" (step {step})" if step is not None else "")
    draw.text((w / 2, top / 2), title, fill=(0, 0, 0), font=large, anchor="mm")
    draw.text(
        ((left + w - right) / 2, h - 22),
        "EMA relative standard deviation (sigma_rel)",
        fill=axis,
        font=small,
        anchor="mm",
    )
    ylab = Image.new("RGBA", (h - top - bottom, 20), (255, 255, 255, 0))
    ImageDraw.Draw(ylab).text(
        ((h - top - bottom) / 2, 10), f"{metric_name.upper()} (lower is better)", fill=axis, font=small, anchor="mm"
    )
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (8, top), ylab)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


__all__ = ["SweepResult", "plot_sweep", "sweep_ema"]
