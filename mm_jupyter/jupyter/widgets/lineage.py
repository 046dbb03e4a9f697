"""Lineage graph of a model set: versions as nodes, base -> derived edges, coloured by approach."""
from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

import plotly.graph_objects as go

from ..display import human_bytes
from ._static import FigureOutput

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


class LineageGraph(FigureOutput):
    """The version graph of one set name: a plotly figure (hover tells each version's story), a PNG of
    the same graph and the lineage's text.

    Versions are nodes (x: version number, y: branch lane) labelled with the bytes they added, arrows
    run from base to derived version, one trace per approach so the legend names the colours.
    ``compact`` fits a narrow panel (the JupyterLab sidebar): no title, the legend below the graph.
    """

    log_toggle = False  # its axes are versions and branch lanes: nothing to switch

    def __init__(self, lineage: "Lineage", compact: bool = False) -> None:
        self.lineage = lineage
        self.compact = compact
        self.lanes = lanes(lineage.versions)
        self.n_lanes = max(self.lanes.values(), default=0) + 1
        self.png_size = (820, 200 + 60 * self.n_lanes)
        self.figure = self._figure()

    @property
    def summary(self) -> str:
        """One line: versions, edges and bytes stored in all versions together."""
        versions = self.lineage.versions
        return (f"{self.lineage.name}: {len(versions)} version(s), {len(self.lineage.edges)} edge(s), "
                f"{human_bytes(sum(v.bytes for v in versions))} stored")

    def _by_approach(self) -> list[tuple[str, list["Version"]]]:
        versions = self.lineage.versions
        return [(a, [v for v in versions if v.approach == a]) for a in approach_order({v.approach for v in versions})]

    def _figure(self) -> go.Figure:
        versions = self.lineage.versions
        fig = go.Figure()
        for approach, nodes in self._by_approach():
            fig.add_scatter(
                x=[v.version for v in nodes], y=[self.lanes[v.version] for v in nodes],
                mode="markers+text", name=approach, text=[human_bytes(v.bytes) for v in nodes],
                textposition="top center", textfont={"size": 11, "color": "#555"},
                customdata=[v.version for v in nodes], hovertext=[hover_text(v) for v in nodes], hoverinfo="text",
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
        numbers = [v.version for v in versions]
        fig.update_xaxes(title_text=None if self.compact else "version", tickvals=numbers,
                         ticktext=[f"v{n}" for n in numbers], zeroline=False,
                         range=[min(numbers, default=1) - 0.5, max(numbers, default=1) + 0.5])
        fig.update_yaxes(title_text="branch" if self.n_lanes > 1 else None, showticklabels=False, zeroline=False,
                         range=[self.n_lanes - 0.5, -0.7], tickvals=list(range(self.n_lanes)), fixedrange=True)
        if self.compact:
            fig.update_layout(height=150 + 45 * self.n_lanes, margin={"l": 10, "r": 10, "t": 10, "b": 40},
                              legend={"orientation": "h", "y": -0.2, "x": 0, "yanchor": "top"}, template="plotly_white")
        else:
            fig.update_layout(title=f"Lineage of {self.summary}", height=self.png_size[1],
                              template="plotly_white", legend_title_text="approach",
                              margin={"l": 30, "r": 20, "t": 60, "b": 40})
        return fig

    def draw_png(self, fig: Any) -> None:
        """The same graph with matplotlib: nodes, size labels, base -> derived arrows, legend."""
        ax = fig.add_subplot()
        for approach, nodes in self._by_approach():
            xs, ys = [v.version for v in nodes], [self.lanes[v.version] for v in nodes]
            ax.scatter(xs, ys, s=220, color=colour_of(approach), edgecolors="#333", linewidths=1, label=approach,
                       zorder=3)
            for v, x, y in zip(nodes, xs, ys):
                ax.annotate(human_bytes(v.bytes), (x, y), xytext=(0, 13), textcoords="offset points",
                            ha="center", fontsize=9, color="#555")
        for base, derived in self.lineage.edges:
            if base in self.lanes:
                ax.annotate("", (derived, self.lanes[derived]), (base, self.lanes[base]),
                            arrowprops={"arrowstyle": "-|>", "color": "#666", "lw": 1.5, "shrinkA": 10,
                                        "shrinkB": 10}, zorder=2)
        numbers = [v.version for v in self.lineage.versions]
        ax.set_xticks(numbers, [f"v{n}" for n in numbers])
        ax.set_xlim(min(numbers, default=1) - 0.5, max(numbers, default=1) + 0.5)
        ax.set_ylim(self.n_lanes - 0.5, -0.7)
        ax.set_yticks([])
        ax.set_xlabel("version")
        if self.n_lanes > 1:
            ax.set_ylabel("branch")
        ax.grid(axis="x", color="#eee")
        for side in ("top", "right", "left"):
            ax.spines[side].set_visible(False)
        ax.set_title(f"Lineage of {self.summary}", loc="left", fontsize=12)
        ax.legend(title="approach", loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        fig.tight_layout()

    def __repr__(self) -> str:
        return repr(self.lineage)
