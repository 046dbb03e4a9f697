"""Tiny inline-SVG charts for outputs that are redrawn while other work runs (the live serving view).

Why not plotly or matplotlib there: JupyterLab's plotly renderer draws a figure once and ignores
later updates of the same output, a ``FigureWidget`` raises page errors when its notebook closes, and
a matplotlib frame costs tens of milliseconds of the GIL — every redraw would show up in the latency
the notebook is measuring. An SVG string costs well under a millisecond and any viewer shows it.
Static and final pictures still use plotly (+ a matplotlib PNG); this is only for the live frames.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 290, 190
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 26, 34


@dataclass(frozen=True)
class Series:
    """One line (or the bars) of a panel; ``None`` values leave a gap."""

    name: str
    colour: str
    x: list[Any]  # numbers for lines, category names for bars
    y: list[float | None]


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """0 and round steps up to at least ``top``: 0, 250, 500, 750, 1000."""
    if not top > 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def _label(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def panel(title: str, series: list[Series], xlabel: str, bars: bool = False) -> str:
    """One chart as an ``<svg>`` element: a title, a y axis from 0 with round ticks, an x axis, and
    the series as lines (or one series as bars over categories)."""
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    values = [v for s in series for v in s.y if v is not None and math.isfinite(v)]
    ticks = nice_ticks(max(values, default=0.0))
    top = ticks[-1] or 1.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'style="font:10px sans-serif" role="img" aria-label="{html.escape(title, quote=True)}">',
           f'<text x="{LEFT}" y="14" style="font-size:11px">{html.escape(title)}</text>']
    for t in ticks:
        y = TOP + h - h * t / top
        out.append(f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{LEFT - 4}" y="{y + 3:.1f}" text-anchor="end" fill="#555">{_label(t)}</text>')
    out.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 4}" text-anchor="middle" fill="#555">'
               f"{html.escape(xlabel)}</text>")
    if bars and series:
        cats = [str(c) for c in series[0].x]
        slot = w / max(1, len(cats))
        for i, (c, v) in enumerate(zip(cats, series[0].y)):
            bh = h * (v or 0) / top
            x = LEFT + i * slot
            out.append(f'<rect x="{x + slot * 0.15:.1f}" y="{TOP + h - bh:.1f}" width="{slot * 0.7:.1f}" '
                       f'height="{bh:.1f}" fill="{series[0].colour}"/>')
            if len(cats) <= 12 or i % math.ceil(len(cats) / 12) == 0:
                out.append(f'<text x="{x + slot / 2:.1f}" y="{TOP + h + 12}" text-anchor="middle" fill="#555">'
                           f"{html.escape(c)}</text>")
    else:
        xs = [float(x) for s in series for x in s.x]
        x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        span = (x1 - x0) or 1.0
        for t in (x0, x0 + span / 2, x1):
            out.append(f'<text x="{LEFT + w * (t - x0) / span:.1f}" y="{TOP + h + 12}" text-anchor="middle" '
                       f'fill="#555">{t:.0f}</text>')
        for k, s in enumerate(series):
            points: list[str] = []
            runs: list[list[str]] = []
            for xv, yv in zip(s.x, s.y):
                if yv is None or not math.isfinite(yv):
                    if points:
                        runs.append(points)
                    points = []
                    continue
                points.append(f"{LEFT + w * (float(xv) - x0) / span:.1f},{TOP + h - h * yv / top:.1f}")
            runs.append(points)
            for run in runs:
                if len(run) == 1:
                    cx, cy = run[0].split(",")
                    out.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{s.colour}"/>')
                elif run:
                    out.append(f'<polyline points="{" ".join(run)}" fill="none" stroke="{s.colour}" '
                               'stroke-width="1.5"/>')
            if len(series) > 1:
                out.append(f'<text x="{LEFT + w - 4}" y="{TOP + 10 + 11 * k}" text-anchor="end" '
                           f'fill="{s.colour}">{html.escape(s.name)}</text>')
    out.append(f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + h}" stroke="#999"/>'
               f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{TOP + h}" y2="{TOP + h}" stroke="#999"/></svg>')
    return "".join(out)
