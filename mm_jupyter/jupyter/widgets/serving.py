"""Live view of a model server: throughput and latency over time, batch sizes, cache hits, queue.

A daemon thread samples ``server.metrics()`` every ``interval`` seconds and redraws (the notebook's
kernel may be busy running a load test meanwhile; ipywidgets sends the updates from that thread).
Besides the live widget, the display bundle carries a static picture: the same plotly figure as
``application/vnd.plotly.v1+json`` and an HTML table, so a saved notebook shows it without a kernel.
"""
from __future__ import annotations

import html
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as widgets
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from ...serving import Server

PLOTLY_MIME = "application/vnd.plotly.v1+json"
LATENCY_COLOURS = {"p50": "#2ca02c", "p95": "#ff7f0e", "p99": "#d62728"}


@dataclass(frozen=True)
class Sample:
    """One reading of the server's metrics."""

    t: float                    # seconds since the monitor started
    throughput: float           # answers/s over the sampling window
    p50: float | None
    p95: float | None
    p99: float | None
    queue: int
    hit_rate: float | None
    version: str


class ServingMonitor(widgets.VBox):
    """Live throughput/latency/batch-size/cache view of a ``Server`` (``%modelserve`` shows one).

    ``sample()`` takes one reading and redraws; ``start()`` runs it every ``interval`` seconds in a
    thread until ``stop()`` or the server closes. ``history`` readings are kept.
    """

    def __init__(self, server: "Server", interval: float = 0.5, history: int = 240, start: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval}")
        self.server = server
        self.interval = interval
        self.history = history
        self.samples: list[Sample] = []
        self.last: dict[str, Any] = {}
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.status = widgets.HTML()
        self.figure = go.FigureWidget(self._figure())
        self.children = [self.status, self.figure]
        self.sample()
        if start:
            self.start()

    # -- sampling --------------------------------------------------------------------------------
    def sample(self) -> Sample:
        """Read the server's metrics now and redraw."""
        m = self.server.metrics(window_s=max(1.0, 2 * self.interval))
        lat = m["latency_ms"]
        s = Sample(self._clock() - self._t0, m["throughput_rps"], lat["p50"], lat["p95"], lat["p99"],
                   m["queue_depth"], m["cache_hit_rate"], m["version"])
        self.last = m
        self.samples = (self.samples + [s])[-self.history:]
        self.flush()
        return s

    def start(self) -> None:
        """Sample every ``interval`` seconds in a daemon thread (until ``stop`` or the server closes)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mm-serve monitor")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
            if self.server.closed:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5 * self.interval + 1)

    # -- drawing ---------------------------------------------------------------------------------
    def _figure(self) -> go.Figure:
        fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09,
                            subplot_titles=("throughput (answers/s)", "latency (ms)", "requests per model call"))
        fig.add_scatter(name="throughput", mode="lines", line={"color": "#1f77b4"}, showlegend=False, row=1, col=1)
        for q, colour in LATENCY_COLOURS.items():
            fig.add_scatter(name=q, mode="lines", line={"color": colour}, row=1, col=2)
        fig.add_bar(name="model calls", marker_color="#9467bd", showlegend=False, row=1, col=3)
        fig.update_xaxes(title_text="seconds", row=1, col=1)
        fig.update_xaxes(title_text="seconds", row=1, col=2)
        fig.update_xaxes(title_text="batch size (requests)", type="category", row=1, col=3)
        fig.update_yaxes(rangemode="tozero", row=1, col=1)
        fig.update_yaxes(rangemode="tozero", row=1, col=2)
        fig.update_yaxes(title_text="calls", row=1, col=3)
        fig.update_layout(height=330, template="plotly_white", margin={"l": 50, "r": 20, "t": 40, "b": 50},
                          legend={"orientation": "h", "y": -0.25, "x": 0.36})
        return fig

    def flush(self) -> None:
        """Redraw from the samples and the last metrics."""
        t = [s.t for s in self.samples]
        sizes = self.last.get("batch_sizes", {})
        with self.figure.batch_update():
            self.figure.data[0].x, self.figure.data[0].y = t, [s.throughput for s in self.samples]
            for trace, q in zip(self.figure.data[1:4], LATENCY_COLOURS):
                trace.x, trace.y = t, [getattr(s, q) for s in self.samples]
            self.figure.data[4].x = [str(k) for k in sizes]
            self.figure.data[4].y = list(sizes.values())
        self.status.value = self._status_html()

    def _status_html(self) -> str:
        m = self.last
        if not m:
            return ""
        hit = m["cache_hit_rate"]
        p99 = m["latency_ms"]["p99"]
        parts = [f"<b>{html.escape(m['set'])}</b> → {html.escape(m['version'])}",
                 f"{m['batching']} batching", f"{m['throughput_rps']:,.0f} answers/s",
                 f"p99 {p99:.1f} ms" if p99 is not None else "p99 –",
                 f"queue {m['queue_depth']} (peak {m['queue_peak']})",
                 f"cache hits {100 * hit:.0f}%" if hit is not None else "cache hits –",
                 f"{m['answered']:,} answered, {m['rejected']:,} rejected, {m['failed']:,} failed"]
        if self.server.closed:
            parts.append("closed")
        return " · ".join(parts)

    # -- static representation -------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live widget plus a static picture (plotly JSON, HTML table) and the text repr."""
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        data[PLOTLY_MIME] = json.loads(go.Figure(self.figure).to_json())
        data["text/html"] = self.to_html()
        data["text/plain"] = repr(self)
        return bundle

    def to_html(self) -> str:
        """A self-contained HTML summary (no scripts): the status line and the last readings."""
        rows = "".join(
            f"<tr><td>{s.t:.1f}</td><td>{s.throughput:,.0f}</td>"
            + "".join(f"<td>{v:.2f}</td>" if v is not None else "<td>–</td>" for v in (s.p50, s.p95, s.p99))
            + f"<td>{s.queue}</td><td>{'–' if s.hit_rate is None else f'{100 * s.hit_rate:.0f}%'}</td>"
            f"<td>{html.escape(s.version)}</td></tr>"
            for s in self.samples[-10:]
        )
        return (f"<div>{self._status_html()}</div><table><thead><tr><th>s</th><th>answers/s</th><th>p50 ms</th>"
                "<th>p95 ms</th><th>p99 ms</th><th>queue</th><th>cache hits</th><th>version</th></tr></thead>"
                f"<tbody>{rows}</tbody></table>")

    def __repr__(self) -> str:
        s = self.server
        target = f"{s.name}@latest" if s.follow else str(s.version)
        return f"ServingMonitor({target}, {s.batching} batching, max_batch {s.max_batch}, cache {s.cache.size})"
