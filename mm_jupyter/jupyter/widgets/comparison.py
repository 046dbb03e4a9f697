"""Storage / time-to-save / time-to-recover of the model-set approaches, in the papers' style."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ...errors import StoreError
from ..display import human_bytes
from .lineage import approach_order, colour_of

if TYPE_CHECKING:
    from ...store import Store

COLUMNS = ("arch", "step", "approach", "bytes", "tts_s", "ttr_s")
#: (column, subplot title, axis title) of the three panels, left to right.
METRICS = (("bytes", "Storage", "bytes"), ("tts_s", "Time to save", "seconds"),
           ("ttr_s", "Time to recover", "seconds"))
ALL = "all use cases"


def step_label(arch: str, step: int) -> str:
    """The papers' names: step 0 is U1 (initial models), step i the i-th U3 update."""
    return f"{arch} U1" if step == 0 else f"{arch} U3-{step}"


def normalise(rows: Any, source: str = "rows") -> pd.DataFrame:
    """Rows (dicts or a DataFrame) as a typed, ordered frame; ``source`` names them in errors."""
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if frame.empty:
        raise StoreError(f"{source}: no rows to compare")
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise StoreError(f"{source}: missing column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")
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
    arch_rank = {a: i for i, a in enumerate(dict.fromkeys(frame["arch"]))}  # order of appearance
    approach_rank = {a: i for i, a in enumerate(approach_order(set(frame["approach"])))}
    frame = (frame.assign(_arch=frame["arch"].map(arch_rank), _approach=frame["approach"].map(approach_rank))
             .sort_values(["_arch", "step", "_approach"], kind="stable").drop(columns=["_arch", "_approach"]))
    frame["label"] = [step_label(a, s) for a, s in zip(frame["arch"], frame["step"])]
    return frame.reset_index(drop=True)


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
    """One row per stored version; TTR is measured now by recovering and materialising it."""
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
            rows.append({"arch": name, "step": step, "approach": v.approach, "bytes": v.bytes,
                         "tts_s": v.tts_s, "ttr_s": ttr_s})
    return rows


class ComparisonChart(widgets.VBox):
    """Grouped bars per approach (storage on a log axis, TTS, TTR) for each use case and step.

    ``frame`` holds the normalised rows; with several use cases a dropdown narrows the chart to one.
    """

    def __init__(self, rows: Any) -> None:
        super().__init__()
        self.frame = normalise(rows)
        self.approaches = approach_order(set(self.frame["approach"]))
        self.use_cases = list(dict.fromkeys(self.frame["arch"]))
        self.figure = go.FigureWidget(self._figure())
        children: list[widgets.Widget] = [self.figure]
        if len(self.use_cases) > 1:
            self.picker = widgets.Dropdown(options=[ALL, *self.use_cases], value=ALL, description="use case")
            self.picker.observe(lambda change: self.show(change["new"]), names="value")
            children.insert(0, self.picker)
        self.show(ALL)
        self.children = children

    @classmethod
    def from_benchmark(cls, path: str | Path) -> "ComparisonChart":
        """Rows of ``python -m mm_jupyter.bench modelsets``: a results.json, a results.csv, or a
        folder (every modelsets results.json below it, so several use cases show together)."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no such benchmark results file or folder")
        files = _result_files(path) if path.is_dir() else [path]
        if not files:
            raise StoreError(f"{path}: no modelsets results.json below this folder")
        return cls(pd.concat([normalise(_read(f), str(f)) for f in files], ignore_index=True))

    @classmethod
    def from_store(cls, store: "Store", names: Iterable[str] | None = None, ttr: bool = True) -> "ComparisonChart":
        """Every version of the named sets (default: all) from ``store``: use case = set name,
        step = version order; ``ttr=False`` skips recovering (TTR stays empty)."""
        rows = store_rows(store, names, ttr)
        if not rows:
            raise StoreError(f"store {store.location!r} has no sets to compare")
        return cls(rows)

    def _figure(self) -> go.Figure:
        fig = make_subplots(rows=1, cols=3, subplot_titles=[title for _, title, _ in METRICS],
                            horizontal_spacing=0.07)
        for col, (metric, _, unit) in enumerate(METRICS, start=1):
            for approach in self.approaches:
                fig.add_bar(name=approach, legendgroup=approach, showlegend=col == 1,
                            marker_color=colour_of(approach), meta=metric, row=1, col=col)
            fig.update_yaxes(title_text=unit, type="log" if metric == "bytes" else "linear", row=1, col=col)
        fig.update_layout(barmode="group", height=420, template="plotly_white", legend_title_text="approach",
                          margin={"l": 40, "r": 20, "t": 50, "b": 80})
        fig.update_xaxes(tickangle=-30)
        return fig

    def show(self, use_case: str = ALL) -> None:
        """Narrow the bars to one use case (``ALL``: every use case, side by side)."""
        frame = self.frame if use_case == ALL else self.frame[self.frame["arch"] == use_case]
        with self.figure.batch_update():
            self.figure.update_xaxes(categoryorder="array", categoryarray=list(dict.fromkeys(frame["label"])))
            for trace in self.figure.data:
                rows = frame[frame["approach"] == trace.name]
                trace.x = list(rows["label"])
                trace.y = list(rows[trace.meta])
                if trace.meta == "bytes":
                    trace.customdata = [human_bytes(b) for b in rows["bytes"]]
                    trace.hovertemplate = f"{trace.name}<br>%{{x}}: %{{customdata}}<extra></extra>"
                else:
                    trace.hovertemplate = f"{trace.name}<br>%{{x}}: %{{y:.3f}} s<extra></extra>"

    def __repr__(self) -> str:
        steps = self.frame["step"].nunique()
        head = (f"ComparisonChart: {len(self.use_cases)} use case(s) ({', '.join(self.use_cases)}), "
                f"approaches {', '.join(self.approaches)}, {steps} step(s)")
        lines = [head]
        for label, rows in self.frame.groupby("label", sort=False):
            sizes = ", ".join(f"{a} {human_bytes(b)}" for a, b in zip(rows["approach"], rows["bytes"]))
            lines.append(f"  {label}: {sizes}")
        return "\n".join(lines)
