"""Figures of the Alsatian evaluation (``mm_jupyter.bench.alsatian``) for notebooks.

``PaperChart`` is a grid of panels (grouped bars, stacked bars or lines, optional log axes and
min-max error bars) drawn twice from one description: as a plotly figure and, for saved notebooks
without a kernel, as a matplotlib PNG (``FigureOutput``). ``alsatian_chart(artefact)`` turns each
artefact's rows into its panels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .widgets._static import FigureOutput

COLOURS = {"base": "#9E9E9E", "shift": "#F58518", "alsatian": "#4C78A8"}
PALETTE = ("#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2", "#FF9DA6", "#9D755D", "#BAB0AC")


@dataclass
class Series:
    """One bar group member or line: ``y`` per ``x``; ``lo``/``hi``: the min and max of repeats."""

    name: str
    x: list[Any]
    y: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None


@dataclass
class Panel:
    """One subplot: ``kind`` is ``bar`` (grouped), ``stack`` (stacked bars) or ``line``."""

    title: str
    x_title: str
    y_title: str
    series: list[Series]
    kind: str = "bar"
    log_y: bool = False
    log_x: bool = False

    @property
    def disjoint(self) -> bool:
        """No two series share a category (e.g. one bar per approach): bars need no group offsets."""
        names = [str(x) for s in self.series for x in s.x]
        return len(names) == len(set(names))


def colour(name: str, i: int) -> str:
    """Fixed colours for the approaches (also inside labels such as 'alsatian 25%'), else the palette."""
    for key, c in COLOURS.items():
        if name == key or name.startswith(f"{key} "):
            return c if name == key else PALETTE[(i + 2) % len(PALETTE)]
    return PALETTE[i % len(PALETTE)]


@dataclass
class PaperChart(FigureOutput):
    """A reproduced figure: ``panels`` in a row (at most ``cols`` per row), a title and a note."""

    title: str
    panels: list[Panel]
    cols: int = 3
    text: str = ""
    png_size: tuple[int, int] = field(default=(1000, 420))

    def __post_init__(self) -> None:
        rows = -(-len(self.panels) // self.cols)
        self.png_size = (self.png_size[0], 120 + 300 * rows)

    @property
    def grid(self) -> tuple[int, int]:
        cols = min(self.cols, len(self.panels))
        return -(-len(self.panels) // cols), cols

    @property
    def figure(self) -> Any:
        from plotly.subplots import make_subplots

        rows, cols = self.grid
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[p.title for p in self.panels],
                            horizontal_spacing=0.08, vertical_spacing=0.5 / rows)
        seen: set[str] = set()
        for n, panel in enumerate(self.panels):
            r, c = n // cols + 1, n % cols + 1
            for i, s in enumerate(panel.series):
                err = None
                if s.lo is not None and s.hi is not None:
                    err = {"type": "data", "symmetric": False, "array": [h - y for h, y in zip(s.hi, s.y)],
                           "arrayminus": [y - lo for y, lo in zip(s.y, s.lo)], "thickness": 1}
                common = {"name": s.name, "legendgroup": s.name, "showlegend": s.name not in seen,
                          "x": [str(x) for x in s.x] if panel.kind != "line" else s.x, "y": s.y}
                seen.add(s.name)
                if panel.kind == "line":
                    fig.add_scatter(mode="lines+markers", line_color=colour(s.name, i), error_y=err, **common,
                                    row=r, col=c)
                else:  # series on categories of their own (one bar per approach) sit centred, not grouped
                    fig.add_bar(marker_color=colour(s.name, i), error_y=err, **common, row=r, col=c,
                                offsetgroup="0" if panel.disjoint else None)
            fig.update_yaxes(title_text=panel.y_title + (", log scale" if panel.log_y else ""),
                             type="log" if panel.log_y else None, row=r, col=c)
            fig.update_xaxes(title_text=panel.x_title, type="log" if panel.log_x else None, row=r, col=c)
        fig.update_layout(title=self.title, template="plotly_white", height=self.png_size[1], showlegend=self.legend,
                          barmode="stack" if any(p.kind == "stack" for p in self.panels) else "group",
                          margin={"t": 90})
        return fig

    def draw_png(self, fig: Any) -> None:
        from matplotlib import ticker

        rows, cols = self.grid
        axes = fig.subplots(rows, cols, squeeze=False)
        fig.subplots_adjust(left=0.07, right=0.98, top=1 - 90 / self.png_size[1], bottom=75 / self.png_size[1],
                            wspace=0.3, hspace=0.75)
        fig.suptitle(self.title, fontsize=11)
        handles: dict[str, Any] = {}
        for n, panel in enumerate(self.panels):
            ax = axes[n // cols][n % cols]
            cats = list(dict.fromkeys(str(x) for s in panel.series for x in s.x))
            width = 0.6 if panel.disjoint else 0.8 / max(1, len(panel.series))
            bottom = [0.0] * len(cats)
            for i, s in enumerate(panel.series):
                yerr = None
                if s.lo is not None and s.hi is not None:
                    yerr = [[y - lo for y, lo in zip(s.y, s.lo)], [h - y for h, y in zip(s.hi, s.y)]]
                if panel.kind == "line":
                    h = ax.errorbar(s.x, s.y, yerr=yerr, marker="o", color=colour(s.name, i), capsize=2)
                else:
                    pos = [cats.index(str(x)) for x in s.x]
                    if panel.kind == "stack":
                        base = [bottom[p] for p in pos]
                        h = ax.bar(pos, s.y, 0.6, bottom=base, color=colour(s.name, i))
                        for p, y in zip(pos, s.y):
                            bottom[p] += y
                    else:
                        shift = 0 if panel.disjoint else (i - (len(panel.series) - 1) / 2) * width
                        xs = [p + shift for p in pos]
                        h = ax.bar(xs, s.y, width, color=colour(s.name, i), yerr=yerr, capsize=2,
                                   error_kw={"elinewidth": 0.8})
                        if sum(len(t.y) for t in panel.series) <= 12:  # values on the bars while they fit
                            ax.bar_label(h, labels=[f"{y:.3g}" for y in s.y], fontsize=6, padding=1)
                            ax.margins(y=0.12)  # room above the tallest bar's label
                handles.setdefault(s.name, h)
            if panel.kind != "line":
                ax.set_xticks(range(len(cats)), cats, fontsize=7, rotation=20 if len(cats) > 3 else 0)
            for log, axis, scale in ((panel.log_y, ax.yaxis, ax.set_yscale), (panel.log_x, ax.xaxis, ax.set_xscale)):
                if log:
                    scale("log")
                    # 1-2-5 ticks: a range under a decade still gets several labels
                    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                    axis.set_minor_formatter(ticker.NullFormatter())
            ax.set_title(panel.title, fontsize=9)
            ax.set_xlabel(panel.x_title, fontsize=8)
            ax.set_ylabel(panel.y_title + (", log scale" if panel.log_y else ""), fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(axis="y", color="#e5e5e5")
            ax.set_axisbelow(True)
        for n in range(len(self.panels), rows * cols):
            axes[n // cols][n % cols].set_visible(False)
        if self.legend:
            fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(6, len(handles)),
                       fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 30 / self.png_size[1]))

    @property
    def legend(self) -> bool:
        """A legend only where a panel has several series (Table 1's panels each show one quantity)."""
        return any(len(p.series) > 1 for p in self.panels)

    def __repr__(self) -> str:
        return "\n".join([self.title] + [f"  {p.title}: " + ", ".join(s.name for s in p.series)
                                         for p in self.panels] + ([self.text] if self.text else []))


# --------------------------------------------------------------------------------------------
# The artefacts' panels


def _timing(rows: Sequence[dict[str, Any]], x_key: str, approaches: Sequence[str] | None = None) -> list[Series]:
    """One series per approach: median seconds with min-max, over the rows' ``x_key`` values."""
    names = approaches or list(dict.fromkeys(r["approach"] for r in rows))
    out = []
    for a in names:
        sel = [r for r in rows if r["approach"] == a]
        out.append(Series(a, [r[x_key] for r in sel], [r["seconds"] for r in sel],
                          [r["min_s"] for r in sel], [r["max_s"] for r in sel]))
    return out


def _log(series: Sequence[Series]) -> bool:
    """Log axis when the values span more than a decade."""
    values = [v for s in series for v in s.y if v and v > 0]
    return bool(values) and max(values) / min(values) > 10


def _time_panel(title: str, x_title: str, series: list[Series], kind: str = "bar") -> Panel:
    return Panel(title, x_title, "search time (s, median; bars: min-max)", series, kind, log_y=_log(series))


def alsatian_chart(art: Any) -> PaperChart:
    """The figure of one artefact of ``mm_jupyter.bench.alsatian``."""
    rows, fig = art.rows, art.figure
    panels: list[Panel] = []
    if fig == "table1":
        names = [r["architecture"] for r in rows]
        for key, title, unit in (("params", "parameters", "count"), ("blocks", "blocks", "count"),
                                 ("model_ms", "inference per item (all blocks)", "ms"),
                                 ("block_ms_mean", "inference per item and block (mean)", "ms"),
                                 ("inter_bytes_max", "largest intermediate output per item", "bytes"),
                                 ("model_bytes", "model size", "bytes")):
            s = [Series(title, names, [float(r[key]) for r in rows])]
            panels.append(Panel(title, "architecture", unit, s, log_y=_log(s)))
    elif fig == "fig5":
        from ..bench.alsatian import PARTS

        for arch in dict.fromkeys(r["arch"] for r in rows):
            sel = [r for r in rows if r["arch"] == arch]
            series = [Series(p, [r["approach"].split(" (")[0] for r in sel], [100 * r[f"share_{p}"] for r in sel])
                      for p in PARTS]
            panels.append(Panel(arch, "cached intermediates", "share of search time (%)", series, "stack"))
    elif fig == "fig10":
        for arch in dict.fromkeys(r["arch"] for r in rows):
            items = art.config["items"]
            sel = [r for r in rows if r["arch"] == arch and r["items"] == items]
            panels.append(_time_panel(f"{arch}: per distribution ({items} items)", "distribution",
                                      _timing(sel, "distribution")))
            sel = sorted((r for r in rows if r["arch"] == arch and r["distribution"] == "top-layers"),
                         key=lambda r: r["items"])
            panel = _time_panel(f"{arch}: per dataset size (top-layers)", "items", _timing(sel, "items"), "line")
            panels.append(panel)
    elif fig == "fig13":
        for name in dict.fromkeys(r["set"] for r in rows):
            sel = [r for r in rows if r["set"] == name]
            panels.append(_time_panel(f"{name} ({sel[0]['models']} fine-tunes)", "approach",
                                      _timing(sel, "approach")))
    elif fig == "fig15":
        for modality in dict.fromkeys(r["modality"] for r in rows):
            sel = [r for r in rows if r["modality"] == modality]
            panels.append(_time_panel(f"{modality} models ({sel[0]['models']} candidates)", "approach",
                                      _timing(sel, "approach")))
    elif fig == "fig16":
        panels.append(_time_panel("search time by cache budget (share of C_min)", "approach / budget",
                                  _timing(rows, "approach")))
        al = [r for r in rows if r["budget"] is not None]
        panels.append(Panel("chunks the plan needs", "budget", "chunks",
                            [Series("chunks", [r["approach"] for r in al], [float(r["chunks"] or 0) for r in al])]))
    elif fig == "fig17":
        for n in dict.fromkeys(r["items"] for r in rows):
            sel = [r for r in rows if r["items"] == n]
            panels.append(_time_panel(f"BERT, {n} items", "distribution", _timing(sel, "distribution")))
    else:
        raise ValueError(f"no chart for artefact {fig!r}")
    checks = "all correctness checks hold" if art.ok else "FAILED: " + ", ".join(
        k for k, v in art.checks.items() if not v)
    return PaperChart(art.title, panels, text=checks)
