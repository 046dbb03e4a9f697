"""Lineage graph of a model set: versions as nodes, base -> derived edges, coloured by approach."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING

import ipywidgets as widgets
import plotly.graph_objects as go

from ..display import human_bytes

if TYPE_CHECKING:
    from ...store.lineage import Lineage, Version

#: One colour per storage approach, shared by every widget so a legend reads the same everywhere.
APPROACH_COLOURS: dict[str, str] = {
    "mmlib-base": "#d62728",
    "baseline": "#1f77b4",
    "update": "#2ca02c",
    "provenance": "#9467bd",
}
LIMIT_COLOUR = "#9e9e9e"
OTHER_COLOUR = "#17becf"
#: How many names (added/dropped models, dataset references) a hover lists before "…".
HOVER_NAMES = 3


def colour_of(approach: str) -> str:
    """Palette colour of ``approach`` (grey for the physical limit, teal for anything unknown)."""
    return LIMIT_COLOUR if approach == "limit" else APPROACH_COLOURS.get(approach, OTHER_COLOUR)


def approach_order(approaches: set[str] | list[str]) -> list[str]:
    """Palette order first, then unknown approaches by name, ``limit`` last: stable legends."""
    known = [a for a in APPROACH_COLOURS if a in approaches]
    rest = sorted(a for a in approaches if a not in APPROACH_COLOURS and a != "limit")
    return known + rest + (["limit"] if "limit" in approaches else [])


def lanes(versions: tuple["Version", ...]) -> dict[int, int]:
    """Branch lane of every version, so that no edge runs through another node.

    A version continues its base's lane only if the base is still the last node on it; otherwise
    (a second branch from the same base, or a node placed in between) it opens a new lane.
    """
    lane: dict[int, int] = {}
    tail: list[int] = []  # last version placed on each lane
    for v in sorted(versions, key=lambda v: v.version):
        base = v.base if v.base in lane else None
        if base is None:
            at = 0
        elif tail[lane[base]] == base:
            at = lane[base]
        else:
            at = len(tail)
        if at == len(tail):
            tail.append(v.version)
        tail[at] = v.version
        lane[v.version] = at
    return lane


def _names(names: tuple[str, ...]) -> str:
    shown = ", ".join(html.escape(n) for n in names[:HOVER_NAMES])
    return shown + (", …" if len(names) > HOVER_NAMES else "")


def hover_text(v: "Version") -> str:
    """Everything one node tells: approach, size, cost, and what changed against its base."""
    how = v.approach if v.requested == v.approach else f"{v.approach} (asked: {v.requested})"
    lines = [
        f"<b>v{v.version}</b> {html.escape(how)}" + (f" ← v{v.base}" if v.base is not None else ""),
        f"models: {v.models}" + (f" · changed: {v.changed}" if v.changed is not None else ""),
        f"bytes: {human_bytes(v.bytes)} · TTS {v.tts_s:.3f} s · chain {v.chain}",
    ]
    if v.added:
        lines.append(f"added {len(v.added)}: {_names(v.added)}")
    if v.dropped:
        lines.append(f"dropped {len(v.dropped)}: {_names(v.dropped)}")
    if v.datasets:
        refs = [f"{html.escape(m)}: {html.escape(loader)} ({digest[:12]})"
                for m, loader, digest in v.datasets[:HOVER_NAMES]]
        lines.append(f"datasets {len(v.datasets)}:<br>  " + "<br>  ".join(refs)
                     + ("<br>  …" if len(v.datasets) > HOVER_NAMES else ""))
    return "<br>".join(lines)


class LineageGraph(widgets.VBox):
    """The version graph of one set name as an interactive plotly figure plus an HTML summary.

    Versions are nodes (x: version number, y: branch lane), arrows run from base to derived
    version, one trace per approach so the legend names the colours.
    """

    def __init__(self, lineage: "Lineage") -> None:
        super().__init__()
        self.lineage = lineage
        self.lanes = lanes(lineage.versions)
        self.figure = go.FigureWidget(self._figure())
        self.summary = widgets.HTML(self._summary())
        self.children = [self.summary, self.figure]

    def _figure(self) -> go.Figure:
        versions = self.lineage.versions
        fig = go.Figure()
        for approach in approach_order({v.approach for v in versions}):
            nodes = [v for v in versions if v.approach == approach]
            fig.add_scatter(
                x=[v.version for v in nodes], y=[self.lanes[v.version] for v in nodes],
                mode="markers+text", name=approach, text=[f"v{v.version}" for v in nodes],
                textposition="top center", customdata=[v.version for v in nodes],
                hovertext=[hover_text(v) for v in nodes], hoverinfo="text",
                marker={"size": 18, "color": colour_of(approach), "line": {"width": 1, "color": "#333"}},
            )
        for base, derived in self.lineage.edges:
            if base not in self.lanes:
                continue
            fig.add_annotation(
                x=derived, y=self.lanes[derived], ax=base, ay=self.lanes[base], xref="x", yref="y",
                axref="x", ayref="y", showarrow=True, arrowhead=2, arrowsize=1.2, arrowwidth=1.5,
                arrowcolor="#666", standoff=11, startstandoff=11, text="",
            )
        n_lanes = max(self.lanes.values(), default=0) + 1
        fig.update_layout(
            title=f"Lineage of {self.lineage.name!r}", height=220 + 70 * n_lanes, template="plotly_white",
            legend_title_text="approach", margin={"l": 30, "r": 20, "t": 60, "b": 40},
        )
        fig.update_xaxes(title_text="version", tickvals=[v.version for v in versions],
                         ticktext=[f"v{v.version}" for v in versions], zeroline=False)
        fig.update_yaxes(title_text="branch", showticklabels=False, zeroline=False, autorange="reversed",
                         tickvals=list(range(n_lanes)))
        return fig

    def _summary(self) -> str:
        versions = self.lineage.versions
        total = sum(v.bytes for v in versions)
        legend = " ".join(
            f'<span style="color:{colour_of(a)}">&#9679;</span> {html.escape(a)} '
            f"({sum(v.approach == a for v in versions)})"
            for a in approach_order({v.approach for v in versions})
        )
        return (f"<b>{html.escape(self.lineage.name)}</b>: {len(versions)} version(s), "
                f"{len(self.lineage.edges)} edge(s), {human_bytes(total)} stored<br>{legend}")

    def __repr__(self) -> str:
        return repr(self.lineage)
