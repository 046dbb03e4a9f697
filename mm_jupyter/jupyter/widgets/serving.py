"""Live view of a model server: throughput and latency over time, the last load run, batch sizes, cache.

Not an ipywidget: a display output that a daemon thread *replaces* every ``interval`` seconds
(``update_display_data``) while the kernel runs other cells (a load test). Live frames are HTML with
inline SVG charts (``_svg.py``: JupyterLab's plotly renderer ignores updates of a drawn output, and a
frame must cost the measured server next to nothing); when the server stops, the last update holds the
plotly figure, a PNG of it and the text, so a saved notebook shows it in JupyterLab and on GitHub.
Nothing lives in the page but a plain output, so closing the notebook, reloading it or restarting
the kernel raises nothing (a plotly ``FigureWidget`` threw "Resize must be passed a displayed plot
div element" and "Cannot send" errors when its notebook closed).

Every number comes from ``Server.metrics`` over a named window (``serving.metrics.summarize``): the
live readings over the last ``2 × interval`` seconds (at least 1 s), and the last load run over its
own window — the numbers its ``LoadResult`` and ``%modelserve metrics`` report.
"""
from __future__ import annotations

import base64
import html
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ...serving.metrics import WindowStats, ms
from ._static import PLOTLY_MIME, add_log_toggle, figure_json, png
from ._svg import Series, panel

if TYPE_CHECKING:
    from ...serving import Server

LATENCY_COLOURS = {"p50": "#2ca02c", "p95": "#ff7f0e", "p99": "#d62728"}
LOAD_SHADE = "rgba(31, 119, 180, 0.12)"
PNG_SIZE = (1000, 330)


@dataclass(frozen=True)
class Sample:
    """One reading of the server's metrics over the live window."""

    t: float                    # seconds since the monitor started
    throughput: float           # answers/s over the live window
    p50: float | None
    p95: float | None
    p99: float | None
    queue: int
    hit_rate: float | None
    version: str


class ServingMonitor:
    """Live throughput/latency/batch-size/cache view of a ``Server`` (``%modelserve start`` shows one).

    ``show()`` displays it and starts a thread that samples every ``interval`` seconds and replaces the
    displayed output, until ``stop()`` or the server closes (then one last update carries a PNG).
    ``sample()`` takes one reading; ``history`` readings are kept.
    """

    def __init__(self, server: "Server", interval: float = 0.5, history: int = 240, start: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, not {interval}")
        self.server = server
        self.interval = interval
        #: the live window: long enough to hold several batches, short enough to follow a load
        self.window_s = max(1.0, 2 * interval)
        self.history = history
        self.samples: list[Sample] = []
        self.last: dict[str, Any] = {}
        self.load: dict[str, Any] | None = None
        self.final = False
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: Any = None
        self._lock = threading.Lock()
        self.sample()
        if start:
            self.start()

    # -- sampling --------------------------------------------------------------------------------
    def sample(self) -> Sample:
        """Read the server's metrics now (the live window and the last load's)."""
        m = self.server.metrics(window_s=self.window_s)
        lat = m["latency_ms"]
        s = Sample(self._clock() - self._t0, m["throughput_rps"], lat["p50"], lat["p95"], lat["p99"],
                   m["queue_depth"], m["cache_hit_rate"], m["version"])
        with self._lock:
            self.last = m
            self.load = self.server.load_metrics()
            self.samples = (self.samples + [s])[-self.history:]
        return s

    def show(self) -> None:
        """Display the monitor under a display id; the sampling thread replaces that output."""
        from IPython.display import display

        self._handle = display(self, display_id=True)
        self.start()

    def start(self) -> None:
        """Sample every ``interval`` seconds in a daemon thread (until ``stop`` or the server closes)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mm-serve monitor")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.server.closed:
                self._finish()
                return
            self.sample()
            self._redraw()

    def stop(self) -> None:
        """Stop sampling; the displayed output keeps a last reading with its PNG."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5 * self.interval + 1)
        self._finish()

    def _finish(self) -> None:
        with self._lock:
            if self.final:
                return
            self.final = True
        self.sample()  # a closed server still reports what it answered: the last picture is complete
        self._redraw()

    def _redraw(self) -> None:
        if self._handle is not None:
            self._handle.update(self)

    # -- drawing ---------------------------------------------------------------------------------
    def figure(self) -> dict[str, Any]:
        """The plotly figure (as JSON): throughput and latency over time (the last load's window
        shaded), requests per model call; log/linear buttons switch every panel."""
        from plotly.subplots import make_subplots

        with self._lock:
            samples, last, load = list(self.samples), dict(self.last), self.load
        w = f"{self.window_s:g} s"
        fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09,
                            subplot_titles=(f"throughput (answers/s, last {w})", f"latency (ms, last {w})",
                                            "requests per model call (since the start)"))
        t = [s.t for s in samples]
        fig.add_scatter(x=t, y=[s.throughput for s in samples], name="throughput", mode="lines+markers",
                        line={"color": "#1f77b4"}, marker={"size": 4}, showlegend=False, row=1, col=1)
        for q, colour in LATENCY_COLOURS.items():
            fig.add_scatter(x=t, y=[getattr(s, q) for s in samples], name=q, mode="lines+markers",
                            line={"color": colour}, marker={"size": 4}, row=1, col=2)
        sizes = last.get("batch_sizes", {})
        fig.add_bar(x=[str(k) for k in sizes], y=list(sizes.values()), name="model calls", marker_color="#9467bd",
                    showlegend=False, row=1, col=3)
        if load is not None:
            label = load["window"]["label"]
            x0 = max(0.0, self._since(load) - load["window"]["seconds"])
            for col in (1, 2):
                fig.add_vrect(x0=x0, x1=self._since(load), fillcolor=LOAD_SHADE, line_width=0, row=1, col=col)
            fig.add_annotation(x=x0, y=1, xref="x", yref="y domain", text=html.escape(label), showarrow=False,
                               xanchor="left", yanchor="top", font={"size": 10, "color": "#1f77b4"})
        fig.update_xaxes(title_text="seconds since the monitor started", row=1, col=1)
        fig.update_xaxes(title_text="seconds since the monitor started", row=1, col=2)
        fig.update_xaxes(title_text="requests in one call", type="category", row=1, col=3)
        fig.update_yaxes(title_text="calls", row=1, col=3)
        fig.update_layout(height=PNG_SIZE[1], template="plotly_white", margin={"l": 50, "r": 20, "t": 60, "b": 50},
                          legend={"orientation": "h", "y": -0.25, "x": 0.36})
        return add_log_toggle(figure_json(fig))

    def _since(self, load: dict[str, Any]) -> float:
        """Seconds from the monitor's start to the end of the last load's window."""
        return max(0.0, self.server.last_load.end - self._t0) if self.server.last_load is not None else 0.0

    def status_lines(self) -> list[str]:
        """The status as text: what is served, the live window, the last load run, the counters."""
        with self._lock:
            m, load = dict(self.last), self.load
        if not m:
            return []
        hit = m["cache_hit_rate"]
        lines = [f"{m['set']} -> {m['version']}, {m['batching']} batching"
                 + (" (stopped)" if self.server.closed else ""),
                 "now, " + WindowStats(**m["window"]).describe()]
        if load is not None:
            lines.append("last " + WindowStats(**load["window"]).describe())
        lines.append(f"since the start: {m['answered']:,} answered, {m['rejected']:,} rejected, {m['failed']:,} "
                     f"failed; queue {m['queue_depth']:,} (peak {m['queue_peak']:,})"
                     + (f"; cache hits {hit:.0%}" if hit is not None else ""))
        return lines

    def to_html(self) -> str:
        """A self-contained HTML summary (no scripts): the status, the PNG once stopped, the last
        readings as a table."""
        lines = self.status_lines()
        status = "".join(f"<div>{'<b>' if i == 0 else ''}{html.escape(line)}{'</b>' if i == 0 else ''}</div>"
                         for i, line in enumerate(lines))
        picture = ""
        if self.final:
            data = base64.b64encode(png(self.draw_png, *PNG_SIZE)).decode("ascii")
            alt = html.escape(lines[0] if lines else repr(self), quote=True)
            picture = f'<img src="data:image/png;base64,{data}" alt="{alt}" style="max-width:100%">'
        rows = "".join(
            f"<tr><td>{s.t:.1f}</td><td>{s.throughput:,.0f}</td>"
            + "".join(f"<td>{ms(v)}</td>" for v in (s.p50, s.p95, s.p99))
            + f"<td>{s.queue}</td><td>{'–' if s.hit_rate is None else f'{s.hit_rate:.0%}'}</td>"
            f"<td>{html.escape(s.version)}</td></tr>"
            for s in self.samples[-10:]
        )
        return (f"<div>{status}{picture}<table><thead><tr><th>s</th><th>answers/s</th><th>p50</th><th>p95</th>"
                "<th>p99</th><th>queue</th><th>cache hits</th><th>version</th></tr></thead>"
                f"<tbody>{rows}</tbody></table></div>")

    def draw_png(self, fig: Any) -> None:
        """The same three panels with matplotlib (the static picture of a stopped monitor)."""
        with self._lock:
            samples, last, load = list(self.samples), dict(self.last), self.load
        axes = fig.subplots(1, 3)
        fig.subplots_adjust(left=0.06, right=0.98, top=0.85, bottom=0.2, wspace=0.3)
        t = [s.t for s in samples]
        w = f"{self.window_s:g} s"
        axes[0].plot(t, [s.throughput for s in samples], color="#1f77b4")
        for q, colour in LATENCY_COLOURS.items():
            axes[1].plot(t, [getattr(s, q) if getattr(s, q) is not None else float("nan") for s in samples],
                         color=colour, label=q)
        if load is not None:
            x1 = self._since(load)
            for ax in axes[:2]:
                ax.axvspan(max(0.0, x1 - load["window"]["seconds"]), x1, color="#1f77b4", alpha=0.12, lw=0)
        sizes = last.get("batch_sizes", {})
        axes[2].bar(range(len(sizes)), list(sizes.values()), color="#9467bd")
        step = max(1, -(-len(sizes) // 12))  # at most about 12 labels, so they never overlap
        axes[2].set_xticks(range(0, len(sizes), step), [str(k) for k in list(sizes)[::step]])
        titles = (f"throughput (answers/s, last {w})", f"latency (ms, last {w})", "requests per model call")
        for ax, title in zip(axes, titles):
            ax.set_title(title, fontsize=10)
            ax.grid(color="#eee")
            for side in ("top", "right"):
                ax.spines[side].set_visible(False)
        for ax in axes[:2]:
            ax.set_xlabel("seconds since the monitor started", fontsize=9)
        axes[2].set_xlabel("requests in one call", fontsize=9)
        axes[1].legend(fontsize=8, frameon=False)

    def live_html(self) -> str:
        """A live frame: the status and three inline-SVG panels (cheap enough to redraw often)."""
        with self._lock:
            samples, last = list(self.samples), dict(self.last)
        t = [s.t for s in samples]
        w = f"{self.window_s:g} s"
        sizes = last.get("batch_sizes", {})
        charts = [
            panel(f"throughput (answers/s, last {w})", [Series("throughput", "#1f77b4", t,
                                                               [s.throughput for s in samples])], "seconds"),
            panel(f"latency (ms, last {w})", [Series(q, c, t, [getattr(s, q) for s in samples])
                                              for q, c in LATENCY_COLOURS.items()], "seconds"),
            panel("requests per model call", [Series("calls", "#9467bd", [str(k) for k in sizes],
                                                     list(sizes.values()))], "requests in one call", bars=True),
        ]
        lines = self.status_lines()
        status = "".join(f"<div>{'<b>' if i == 0 else ''}{html.escape(line)}{'</b>' if i == 0 else ''}</div>"
                         for i, line in enumerate(lines))
        return f'<div>{status}<div style="display:flex;flex-wrap:wrap;gap:8px">{"".join(charts)}</div></div>'

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        """Live: HTML with SVG charts and the text. Stopped: the plotly figure, HTML with its PNG, the
        text. A plain output either way, no widget."""
        text = "\n".join([repr(self), *self.status_lines()])
        if not self.final:
            return {"text/html": self.live_html(), "text/plain": text}
        return {PLOTLY_MIME: self.figure(), "text/html": self.to_html(), "text/plain": text}

    def __repr__(self) -> str:
        s = self.server
        target = f"{s.name}@latest" if s.follow else str(s.version)
        return f"ServingMonitor({target}, {s.batching} batching, max_batch {s.max_batch}, cache {s.cache.size})"
