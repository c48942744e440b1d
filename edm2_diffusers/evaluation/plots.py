"""The sweep's figures, drawn with PIL (no plotting library needed): the metric against EMA length (the EDM2 paper's
Figure 5) and against network evaluations (one line per scheduler)."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

from ..files import atomic_path

BLUE, RED, AXIS, GRID = (31, 119, 180), (214, 39, 40), (60, 60, 60), (225, 225, 225)
SERIES_COLORS = (BLUE, (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75))
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 80, 24, 48, 60


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1) if first + i * step <= hi]


class _Axes:
    """A white canvas with a framed plot area, grid and ticks spanning the given points."""

    def __init__(self, size: tuple[int, int], xs: list[float], ys: list[float]):
        self.w, self.h = size
        self.img = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.img)
        self.small, self.large = _font(13), _font(16)
        xs, ys = xs or [0.0], ys or [0.0]
        x_pad = 0.04 * (max(xs) - min(xs)) or 0.01 * (abs(xs[0]) or 1.0)
        y_pad = 0.08 * (max(ys) - min(ys)) or 0.1 * (abs(ys[0]) or 1.0)
        self.x_lo, self.x_hi = min(xs) - x_pad, max(xs) + x_pad
        self.y_lo, self.y_hi = min(ys) - y_pad, max(ys) + y_pad

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, bottom = MARGIN_LEFT, self.h - MARGIN_BOTTOM
        return (
            left + (x - self.x_lo) / (self.x_hi - self.x_lo) * (self.w - MARGIN_LEFT - MARGIN_RIGHT),
            bottom - (y - self.y_lo) / (self.y_hi - self.y_lo) * (self.h - MARGIN_TOP - MARGIN_BOTTOM),
        )

    def frame(self, title: str, xlabel: str, ylabel: str, x_format: str = "{:.3g}") -> None:
        d, w, h, top, bottom = self.draw, self.w, self.h, MARGIN_TOP, self.h - MARGIN_BOTTOM
        for t in _nice_ticks(self.y_lo, self.y_hi):
            _, y = self.px(self.x_lo, t)
            d.line([(MARGIN_LEFT, y), (w - MARGIN_RIGHT, y)], fill=GRID)
            d.text((MARGIN_LEFT - 8, y), f"{t:.4g}", fill=AXIS, font=self.small, anchor="rm")
        for t in _nice_ticks(self.x_lo, self.x_hi):
            x, _ = self.px(t, self.y_lo)
            d.line([(x, top), (x, bottom)], fill=GRID)
            d.text((x, bottom + 8), x_format.format(t), fill=AXIS, font=self.small, anchor="mt")
        d.rectangle([MARGIN_LEFT, top, w - MARGIN_RIGHT, bottom], outline=AXIS)
        d.text((w / 2, top / 2), title, fill=(0, 0, 0), font=self.large, anchor="mm")
        d.text(((MARGIN_LEFT + w - MARGIN_RIGHT) / 2, h - 22), xlabel, fill=AXIS, font=self.small, anchor="mm")
        label = Image.new("RGBA", (h - top - MARGIN_BOTTOM, 20), (255, 255, 255, 0))
        ImageDraw.Draw(label).text(
            ((h - top - MARGIN_BOTTOM) / 2, 10), ylabel, fill=AXIS, font=self.small, anchor="mm"
        )
        label = label.rotate(90, expand=True)
        self.img.paste(label, (8, top), label)

    def line(self, points: list[tuple[float, float]], color) -> None:
        pixels = [self.px(x, y) for x, y in points]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=color, width=2)
        for x, y in pixels:
            self.draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=color)

    def mark(self, x: float, y: float, label: str, row: int = 0, color=RED) -> None:
        """Ring a point, draw a dashed vertical line through it and write ``label`` near the top."""
        bx, by = self.px(x, y)
        for y0 in range(MARGIN_TOP, self.h - MARGIN_BOTTOM, 8):
            self.draw.line([(bx, y0), (bx, min(y0 + 4, self.h - MARGIN_BOTTOM))], fill=color, width=1)
        self.draw.ellipse([bx - 7, by - 7, bx + 7, by + 7], outline=color, width=3)
        right_side = bx < (MARGIN_LEFT + self.w - MARGIN_RIGHT) / 2
        anchor = "lt" if right_side else "rt"
        pos = (bx + 6 if right_side else bx - 6, MARGIN_TOP + 6 + 16 * row)
        self.draw.text(pos, label, fill=color, font=self.small, anchor=anchor)

    def legend(self, entries: list[tuple[str, tuple]]) -> None:
        x, y = self.w - MARGIN_RIGHT - 150, self.h - MARGIN_BOTTOM - 18 * len(entries) - 6
        for i, (label, color) in enumerate(entries):
            yy = y + 18 * i
            self.draw.line([(x, yy + 7), (x + 18, yy + 7)], fill=color, width=3)
            self.draw.text((x + 24, yy), label, fill=AXIS, font=self.small)

    def save(self, path: str) -> str:
        with atomic_path(path) as tmp:
            self.img.save(tmp, format="PNG")
        return path


def plot_sweep(
    path: str,
    stds: list[float],
    values: list[float],
    best: int,
    metric_name: str = "fd",
    step: int | None = None,
    size: tuple[int, int] = (720, 480),
) -> str:
    """Draw the metric against EMA std (paper Figure 5 style); the best point is marked in red.

    Args:
        path (`str`): output ``.png``.
        stds (`list[float]`), values (`list[float]`): the curve (non-finite values are skipped).
        best (`int`): index of the best point.
        metric_name (`str`): y-axis label.
        step (`int`, *optional*): training step, shown in the title.
        size (`tuple[int, int]`): image size in pixels.
    """
    pts = [(s, v) for s, v in zip(stds, values) if math.isfinite(v)]
    axes = _Axes(size, [s for s, _ in pts] or list(stds), [v for _, v in pts])
    title = f"{metric_name.upper()} vs. EMA length" + (f" (step {step})" if step is not None else "")
    axes.frame(title, "EMA relative standard deviation (sigma_rel)", f"{metric_name.upper()} (lower is better)")
    axes.line(pts, BLUE)
    if 0 <= best < len(stds) and math.isfinite(values[best]):
        axes.mark(stds[best], values[best], f"best: std {stds[best]:.3f}, {metric_name} {values[best]:.4g}")
    return axes.save(path)


def plot_nfe(
    path: str,
    series: dict[str, list[tuple[int, float]]],
    metric_name: str = "fd",
    best: tuple[int, float, str] | None = None,
    cheapest: tuple[int, float, str] | None = None,
    title_suffix: str = "",
    size: tuple[int, int] = (720, 480),
) -> str:
    """Draw the metric against network evaluations per image, one line per scheduler.

    Args:
        path (`str`): output ``.png``.
        series (`dict[str, list[tuple[int, float]]]`): per scheduler, its ``(NFE, metric)`` points.
        metric_name (`str`): y-axis label.
        best, cheapest (`tuple[int, float, str]`, *optional*): ``(NFE, metric, label)`` of the points to mark.
        title_suffix (`str`): appended to the title (e.g. the EMA std and step).
        size (`tuple[int, int]`): image size in pixels.
    """
    finite = {k: sorted(p for p in v if math.isfinite(p[1])) for k, v in series.items()}
    points = [p for v in finite.values() for p in v]
    axes = _Axes(size, [float(x) for x, _ in points], [y for _, y in points])
    axes.frame(
        f"{metric_name.upper()} vs. network evaluations{title_suffix}",
        "network evaluations per image (NFE)",
        f"{metric_name.upper()} (lower is better)",
        x_format="{:.0f}",
    )
    entries = []
    for i, (name, pts) in enumerate(finite.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        axes.line(pts, color)
        entries.append((name, color))
    axes.legend(entries)
    for row, (mark, color) in enumerate(((best, RED), (cheapest, (0, 0, 0)))):
        if mark is not None and math.isfinite(mark[1]):
            axes.mark(mark[0], mark[1], mark[2], row=row, color=color)
    return axes.save(path)


__all__ = ["plot_nfe", "plot_sweep"]
