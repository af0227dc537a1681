"""Line charts as inline SVG strings (no plotting dependency): axes with round-number ticks, one
polyline per series (optionally with point markers), a legend. Coordinates are data units."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


@dataclass(frozen=True)
class Series:
    name: str
    xs: list[float]
    ys: list[float]


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round-number ticks (1, 2, 2.5 or 5 x 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite, got [{lo}, {hi}]")
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    ticks = [round(math.floor(lo / step) * step, 12)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.4g}"
    if abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.4g}"


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str, markers: bool = False,
               y_from_zero: bool = True, width: int = 620, height: int = 340) -> str:
    """An SVG chart of the series; series without points are listed in the legend only."""
    left, right, top, bottom = 70, 170, 34, 48
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys)]
    if not pts:
        pts = [(0.0, 0.0), (1.0, 1.0)]
    xt = nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts))
    y_lo = min(0.0, min(p[1] for p in pts)) if y_from_zero else min(p[1] for p in pts)
    yt = nice_ticks(y_lo, max(p[1] for p in pts))
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * pw

    def sy(y: float) -> float:
        return top + ph - (y - yt[0]) / (yt[-1] - yt[0]) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<text x="{left + pw / 2}" y="18" text-anchor="middle" font-size="13" font-weight="bold">'
           f'{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" y1="{top}" x2="{sx(t):.1f}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 14}" text-anchor="middle">{_label(t)}</text>')
    for t in yt:
        out.append(f'<line x1="{left}" y1="{sy(t):.1f}" x2="{left + pw}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(16,{top + ph / 2}) rotate(-90)" text-anchor="middle">'
               f'{escape(y_label)}</text>')
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(s.xs, s.ys))
        if coords:
            out.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.8" points="{coords}"/>')
        if markers:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in zip(s.xs, s.ys)]
        ly = top + 6 + 16 * i
        out.append(f'<line x1="{left + pw + 10}" y1="{ly}" x2="{left + pw + 28}" y2="{ly}" stroke="{color}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{left + pw + 32}" y="{ly + 4}">{escape(s.name[:24])}</text>')
    out.append("</svg>")
    return "\n".join(out)


def cdf_points(values: list[float], max_points: int = 400) -> tuple[list[float], list[float]]:
    """The empirical CDF as points: (smallest, 0), then (i-th smallest, i / n), thinned to at most
    `max_points` sample points (the ends kept)."""
    if not values:
        return [], []
    xs = sorted(values)
    n = len(xs)
    idx = range(n) if n <= max_points else sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return [xs[0]] + [xs[i] for i in idx], [0.0] + [(i + 1) / n for i in idx]
