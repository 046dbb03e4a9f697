"""Storage / time-to-save / time-to-recover of the model-set approaches, in the papers' style."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd
import plotly.io as pio
from plotly.subplots import make_subplots

from ...errors import StoreError
from ..display import human_bytes
from ._static import FigureOutput
from .lineage import approach_order, colour_of

if TYPE_CHECKING:
    from ...store import Store

COLUMNS = ("arch", "step", "approach", "bytes", "tts_s", "ttr_s")
#: (column, panel title, axis unit) of the three panels, left to right; a time panel's unit is
#: milliseconds or seconds, whichever its tallest bar reads best in (``time_unit``).
METRICS = (("bytes", "Storage", "bytes stored"), ("tts_s", "Time to save", "seconds"),
           ("ttr_s", "Time to recover", "seconds"))
#: A chart with a panel whose values span more than this factor starts on log axes (the toggle
#: switches every panel between log and linear axes).
LOG_RANGE = 10.0
#: Time units of an axis: (title, short name, factor from seconds).
TIME_UNITS = {"ms": ("milliseconds", "ms", 1e3), "s": ("seconds", "s", 1.0)}
#: A bar lower than this share of its panel's tallest is labelled with its value, so it can be read.
SMALL = 0.05
#: Pixels above the panels (legend and scale buttons, then column titles) and below them.
HEAD, FOOT = 120, 40


def step_label(step: int) -> str:
    """The papers' names for a benchmark step: step 0 is U1 (initial models), step i the i-th U3 update."""
    return "U1" if step == 0 else f"U3-{step}"


def normalise(rows: Any, source: str = "rows") -> pd.DataFrame:
    """Rows (dicts or a DataFrame) as a typed, ordered frame; ``source`` names them in errors.

    An optional ``label`` column names the steps (``v1``, ``v2`` for a store's versions); without it
    steps get the papers' names (``U1``, ``U3-1``), which is what benchmark files hold.
    """
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        raise StoreError(f"{source}: no rows to compare")
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise StoreError(f"{source}: missing column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")
    labels = frame["label"].astype(str) if "label" in frame.columns else None
    frame = frame[list(COLUMNS)].copy()
    try:
        frame["arch"] = frame["arch"].astype(str)
        frame["approach"] = frame["approach"].astype(str)
        frame["step"] = frame["step"].astype(int)
        frame["bytes"] = pd.to_numeric(frame["bytes"]).astype("int64")
        for col in ("tts_s", "ttr_s"):
            frame[col] = pd.to_numeric(frame[col]).astype(float)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{source}: bad values ({e})") from None
    frame["label"] = labels if labels is not None else [step_label(s) for s in frame["step"]]
    arch_rank = {a: i for i, a in enumerate(dict.fromkeys(frame["arch"]))}  # order of appearance
    approach_rank = {a: i for i, a in enumerate(approach_order(set(frame["approach"])))}
    frame = (frame.assign(_arch=frame["arch"].map(arch_rank), _approach=frame["approach"].map(approach_rank))
             .sort_values(["_arch", "step", "_approach"], kind="stable").drop(columns=["_arch", "_approach"]))
    return frame.reset_index(drop=True)


def tick_bytes(n: float) -> str:
    """Short byte label for an axis tick or a bar: ``1 kB``, ``2.5 MB`` (the notebook's decimal units)."""
    return human_bytes(n, short=True)


def time_unit(top: float) -> str:
    """The unit of a time axis whose tallest value is ``top`` seconds: ``ms`` below one second."""
    return "ms" if top < 1 else "s"


def tick_time(seconds: float, unit: str) -> str:
    """A time in ``unit`` (``ms`` or ``s``) as an axis tick shows it: a number, its unit in the title."""
    value = seconds * TIME_UNITS[unit][2]
    text = f"{value:.3g}"
    if "e" in text:  # a decade far from 1: written out, never as 1e+03
        text = f"{value:,.0f}" if abs(value) >= 1 else f"{value:.9f}".rstrip("0")
    return text


def _nice_step(top: float, ticks: int = 4) -> float:
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw))
    step: float = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    return step


@dataclass(frozen=True)
class Axis:
    """Ticks of one value axis in one scale: positions, labels, range (log ranges in decades)."""

    type: str
    tickvals: list[float]
    ticktext: list[str]
    range: list[float]


@dataclass(frozen=True)
class Panel:
    """One facet: a use case's metric over its steps, and both scales of its value axis."""

    use_case: str
    metric: str
    title: str
    unit: str
    steps: list[str]
    top: float
    log: bool
    axes: dict[str, Axis]
    #: a time panel's unit (``ms`` or ``s``); None for bytes
    time: str | None = None

    def axis(self, log: bool) -> Axis:
        return self.axes["log" if log else "linear"]

    def title_of(self, log: bool) -> str:
        return f"{self.unit} (log scale)" if log else self.unit

    def exact(self, value: float) -> str:
        """The value as a hover shows it (a time in the axis's unit)."""
        if self.time is None:
            return human_bytes(value)
        _, short, factor = TIME_UNITS[self.time]
        return f"{value * factor:,.3f} {short}" if short == "s" else f"{value * factor:,.2f} {short}"

    def labels(self, values: list[float], log: bool) -> list[str]:
        """Texts on the bars: on a linear axis, the values of bars too small to read against the
        panel's tallest (a log axis shows every bar at a readable height)."""
        return ["" if log or not (math.isfinite(v) and v < SMALL * self.top) else self.short(v) for v in values]

    def short(self, value: float) -> str:
        """A value with its unit, short: ``1.2 kB``, ``4 ms``."""
        if self.time is None:
            return tick_bytes(value)
        return f"{tick_time(value, self.time)} {TIME_UNITS[self.time][1]}"


def make_panel(use_case: str, metric: str, title: str, unit: str, frame: pd.DataFrame) -> Panel:
    """Scales and ticks of one facet, from its positive finite values."""
    values = [v for v in frame[metric] if math.isfinite(v) and v > 0]
    top = max(values, default=1.0)
    low = min(values, default=1.0)
    time = None if metric == "bytes" else time_unit(top)
    if time is not None:
        unit = TIME_UNITS[time][0]

    def fmt(v: float) -> str:
        return tick_bytes(v) if time is None else tick_time(v, time)

    step = _nice_step(top)
    linear_vals = [i * step for i in range(int(top / step) + 2) if i * step <= top * 1.15]
    linear = Axis("linear", linear_vals, [fmt(v) for v in linear_vals], [0.0, top * 1.15])
    # from the decade below the lowest value (a log bar grows from the bottom: the lowest keeps some
    # height) to just above the tallest; every decade in between labelled, and 2 and 5 times each decade
    # where fewer than three decades fall in the range (a panel within one decade still reads)
    first, last = math.floor(math.log10(low) - 0.05), math.log10(top) + 0.15
    decades = [10.0 ** e for e in range(first, math.floor(last) + 1)]
    if len(decades) < 3:
        decades = [m * d for d in decades for m in (1, 2, 5) if math.log10(m * d) <= last]
    log = Axis("log", decades, [fmt(v) for v in decades], [float(first), last])
    return Panel(use_case, metric, title, unit, list(dict.fromkeys(frame["label"])), top,
                 top / low > LOG_RANGE, {"linear": linear, "log": log}, time)


def _read(file: Path) -> pd.DataFrame:
    if file.suffix == ".csv":
        try:
            return pd.read_csv(file)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise StoreError(f"{file}: not a readable CSV file ({e})") from None
    if file.suffix != ".json":
        raise StoreError(f"{file}: expected a results.json, a results.csv or a folder of results")
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise StoreError(f"{file}: no 'rows' list (expected the modelsets benchmark's results.json)")
    return pd.DataFrame(doc["rows"])


def _result_files(folder: Path) -> list[Path]:
    """Every modelsets ``results.json`` below ``folder`` (other experiments' results are skipped)."""
    files = []
    for file in sorted(folder.rglob("results.json")):
        try:
            experiment = json.loads(file.read_text()).get("experiment", "modelsets")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            experiment = "modelsets"  # let _read report what is wrong with it
        if experiment == "modelsets":
            files.append(file)
    return files


def store_rows(store: "Store", names: Iterable[str] | None = None, ttr: bool = True) -> list[dict[str, Any]]:
    """One row per stored version, labelled with its version (``v1``); TTR is measured now by
    recovering and materialising it."""
    listing = store.sets()
    wanted = list(dict.fromkeys(listing["name"])) if names is None else list(names)
    rows = []
    for name in wanted:
        for step, v in enumerate(store.lineage(name).versions):
            ttr_s = math.nan
            if ttr:
                t0 = time.perf_counter()
                ms = store.recover_set(f"{name}@{v.version}")
                try:
                    ms.state_dicts()
                finally:
                    ms.close()
                ttr_s = time.perf_counter() - t0
            rows.append({"arch": name, "step": step, "label": f"v{v.version}", "approach": v.approach,
                         "bytes": v.bytes, "tts_s": v.tts_s, "ttr_s": ttr_s})
    return rows


class ComparisonChart(FigureOutput):
    """Grouped bars per approach: storage, time to save and time to recover (columns) for each use
    case (rows) and its steps.

    When a panel's values span more than ``LOG_RANGE`` the chart starts on log axes; the figure's "log /
    linear axes" buttons switch every panel (they work without a kernel). Bars too small to see on a
    linear axis carry their value. Time panels read in one unit, milliseconds or seconds, named in the
    axis title. ``frame`` holds the normalised rows, ``panels`` the facets as drawn.
    """

    def __init__(self, rows: Any) -> None:
        self.frame = normalise(rows)
        self.approaches = approach_order(set(self.frame["approach"]))
        self.use_cases = list(dict.fromkeys(self.frame["arch"]))
        self.metrics = [m for m in METRICS if self.frame[m[0]].notna().any()]  # --no-ttr: no TTR column
        self.panels = [[make_panel(uc, metric, title, unit, self.frame[self.frame["arch"] == uc])
                        for metric, title, unit in self.metrics] for uc in self.use_cases]
        #: whether the chart starts on log axes (some panel's values span more than LOG_RANGE)
        self.log = any(p.log for row in self.panels for p in row)
        self._groups = {key: rows for key, rows in self.frame.groupby(["arch", "approach"], sort=False)}
        self.png_size = (1000, HEAD + FOOT + 250 * len(self.use_cases))
        self.figure = self._figure()

    @classmethod
    def from_benchmark(cls, path: str | Path) -> "ComparisonChart":
        """Rows of ``python -m mm_jupyter.bench modelsets``: a results.json, a results.csv, or a
        folder (every modelsets results.json below it, one row of panels per use case)."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no such benchmark results file or folder")
        files = _result_files(path) if path.is_dir() else [path]
        if not files:
            raise StoreError(f"{path}: no modelsets results.json below this folder")
        return cls(pd.concat([normalise(_read(f), str(f)) for f in files], ignore_index=True))

    @classmethod
    def from_store(cls, store: "Store", names: Iterable[str] | None = None, ttr: bool = True) -> "ComparisonChart":
        """Every version of the named sets (default: all) from ``store``: use case = set name, steps =
        versions (``v1``, ``v2``...); ``ttr=False`` skips recovering (no TTR panel)."""
        rows = store_rows(store, names, ttr)
        if not rows:
            raise StoreError(f"store {store.location!r} has no sets to compare")
        return cls(rows)

    def _figure(self) -> dict[str, Any]:
        """The figure as plotly JSON: the subplot grid from ``make_subplots``, traces and axes as plain
        dicts (45 traces through plotly's validators take seconds; the dict is what is displayed)."""
        n_rows, n_cols = len(self.use_cases), len(self.metrics)
        grid = make_subplots(rows=n_rows, cols=n_cols, horizontal_spacing=0.1, vertical_spacing=60 / (250 * n_rows),
                             column_titles=[title for _, title, _ in self.metrics],
                             row_titles=self.use_cases if n_rows > 1 else None)
        layout = grid.layout.to_plotly_json()
        traces: list[dict[str, Any]] = []
        texts: dict[str, list[list[str]]] = {"log": [], "linear": []}
        axes: dict[str, dict[str, dict[str, Any]]] = {"log": {}, "linear": {}}
        for r, row in enumerate(self.panels):
            for c, panel in enumerate(row):
                n = r * n_cols + c + 1
                xaxis, yaxis = ("xaxis", "yaxis") if n == 1 else (f"xaxis{n}", f"yaxis{n}")
                for approach in self.approaches:
                    rows = self._groups.get((panel.use_case, approach))
                    if rows is None:
                        continue
                    values = [float(v) for v in rows[panel.metric]]
                    for scale in texts:
                        texts[scale].append(panel.labels(values, log=scale == "log"))
                    traces.append({
                        "type": "bar", "x": list(rows["label"]), "y": values, "name": approach,
                        "legendgroup": approach, "showlegend": r == 0 and c == 0, "meta": panel.metric,
                        "marker": {"color": colour_of(approach)}, "text": texts[self._scale][-1],
                        "textposition": "outside", "textangle": -90, "constraintext": "none",
                        "textfont": {"size": 10}, "cliponaxis": False,
                        "customdata": [panel.exact(v) for v in values],
                        "hovertemplate": f"{approach}<br>{panel.use_case} %{{x}}: %{{customdata}}<extra></extra>",
                        "xaxis": xaxis.replace("axis", ""), "yaxis": yaxis.replace("axis", ""),
                    })
                layout[xaxis].update(type="category", categoryorder="array", categoryarray=panel.steps)
                for scale in axes:
                    log = scale == "log"
                    ticks = panel.axis(log)
                    axes[scale][yaxis] = {"type": ticks.type, "tickmode": "array", "tickvals": ticks.tickvals,
                                          "ticktext": ticks.ticktext, "range": ticks.range,
                                          "title": {"text": panel.title_of(log), "standoff": 4,
                                                    "font": {"size": 12}}}
                layout[yaxis].update(axes[self._scale][yaxis])
        # legend and buttons sit on one line in the head, below the corner plotly's mode bar takes on hover
        top = 1 + 60 / (self.png_size[1] - HEAD - FOOT)
        layout.update(barmode="group", height=self.png_size[1], template=pio.templates["plotly_white"].to_plotly_json(),
                      legend={"orientation": "h", "x": 0, "y": top, "yanchor": "bottom", "title": {"text": "approach"}},
                      margin={"l": 60, "r": 40 if n_rows > 1 else 20, "t": HEAD, "b": FOOT})

        def relayout(scale: str) -> dict[str, Any]:
            return {f"{axis}.{key}": value for axis, keys in axes[scale].items() for key, value in keys.items()}

        layout["updatemenus"] = [{
            "type": "buttons", "direction": "right", "x": 1, "xanchor": "right", "y": top, "yanchor": "bottom",
            "showactive": True, "active": 0 if self.log else 1, "pad": {"t": 0, "r": 0},
            "buttons": [{"label": f"{scale} axes", "method": "update",
                         "args": [{"text": texts[scale]}, relayout(scale)]} for scale in ("log", "linear")],
        }]
        return {"data": traces, "layout": layout}

    @property
    def _scale(self) -> str:
        return "log" if self.log else "linear"

    def draw_png(self, fig: Any) -> None:
        """The same panels with matplotlib, in the chart's starting scale (the toggle needs a browser)."""
        n_rows, n_cols = len(self.use_cases), len(self.metrics)
        width, height = self.png_size
        axes = fig.subplots(n_rows, n_cols, squeeze=False)
        fig.subplots_adjust(left=75 / width, right=1 - 35 / width, top=1 - 110 / height, bottom=35 / height,
                            wspace=0.42, hspace=0.35)
        bar = 0.8 / len(self.approaches)
        for r, row in enumerate(self.panels):
            for c, panel in enumerate(row):
                ax = axes[r][c]
                for i, approach in enumerate(self.approaches):
                    rows = self._groups.get((panel.use_case, approach))
                    if rows is None:
                        continue
                    xs = [panel.steps.index(s) + (i - (len(self.approaches) - 1) / 2) * bar for s in rows["label"]]
                    values = [float(v) for v in rows[panel.metric]]
                    bars = ax.bar(xs, values, bar, color=colour_of(approach), label=approach)
                    ax.bar_label(bars, panel.labels(values, log=self.log), fontsize=7, padding=2, rotation=90)
                ticks = panel.axis(self.log)
                if self.log:
                    ax.set_yscale("log")
                    ax.set_ylim(10 ** ticks.range[0], 10 ** ticks.range[1])
                else:
                    ax.set_ylim(*ticks.range)
                ax.set_yticks(ticks.tickvals, ticks.ticktext, fontsize=8)
                ax.minorticks_off()
                ax.set_xticks(range(len(panel.steps)), panel.steps, fontsize=8)
                ax.set_ylabel(panel.title_of(self.log), fontsize=9)
                ax.grid(axis="y", color="#e5e5e5")
                ax.set_axisbelow(True)
                for side in ("top", "right"):
                    ax.spines[side].set_visible(False)
                if r == 0:
                    ax.set_title(panel.title, fontsize=11)
                if c == n_cols - 1 and n_rows > 1:
                    ax.annotate(panel.use_case, (1.03, 0.5), xycoords="axes fraction", rotation=-90,
                                va="center", fontsize=10)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper left", ncol=len(labels), frameon=False, title="approach",
                   alignment="left", fontsize=9)

    def __repr__(self) -> str:
        steps = self.frame["step"].nunique()
        head = (f"ComparisonChart: {len(self.use_cases)} use case(s) ({', '.join(self.use_cases)}), "
                f"approaches {', '.join(self.approaches)}, {steps} step(s)")
        lines = [head]
        for (arch, label), rows in self.frame.groupby(["arch", "label"], sort=False):
            sizes = ", ".join(f"{a} {human_bytes(b)}" for a, b in zip(rows["approach"], rows["bytes"]))
            lines.append(f"  {arch} {label}: {sizes}")
        return "\n".join(lines)
