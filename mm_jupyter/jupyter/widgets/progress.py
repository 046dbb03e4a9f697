"""Live progress of a successive-halving model search: model preparation, per-rung bars, leaderboard,
cache, timings.

The widget is the ``progress=`` callback of ``mm.search``. Every event updates its state at once;
the widgets are redrawn at most once per ``throttle`` seconds, because a search over thousands of
candidates emits far more events than a browser can draw. Its output also carries the same view as
static HTML and text (``StaticFallback``), refreshed when the search ends, so a saved notebook shows
the final leaderboard without a kernel.
"""
from __future__ import annotations

import html
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import ipywidgets as widgets

from ..display import human_bytes
from ._static import StaticFallback

#: Clock ticks are floats: a tick that lands a rounding error short of ``throttle`` still renders.
_TICK = 1e-9
PRUNED_STYLE = "color:#999"
#: Leaderboard cells: padded, numbers right-aligned (the notebook's table styles do not reach widgets).
CELL = ' style="padding:1px 8px;text-align:left"'
NUM = ' style="padding:1px 8px;text-align:right"'


@dataclass
class RungState:
    """One rung as the events told it: who runs, on how many items, who is scored and survives."""

    index: int
    models: list[str]
    items: int
    scored: set[str] = field(default_factory=set)
    survivors: list[str] | None = None
    reused: int | None = None  # kept features (candidate x chunk) read instead of computed
    computed: int = 0


@dataclass
class Entry:
    """One candidate's row of the leaderboard."""

    model: str
    rung: int
    score: float = -math.inf
    loss: float = math.inf
    pruned: int | None = None

    def key(self) -> tuple[Any, ...]:
        """Best first, in the order of ``SearchResult.ranking``: later rung, not pruned, score, loss,
        then the name with its numbers compared as numbers (candidates 2 before 10)."""
        return (-self.rung, self.pruned is not None, -self.score, self.loss, natural_key(self.model))


def survivors(n: int) -> str:
    """'1 survivor', '3 survivors'."""
    return f"{n} survivor" + ("" if n == 1 else "s")


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """``"cand-10"`` sorts after ``"cand-2"``: digit runs compare as numbers, the rest as text."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


class SearchProgress(StaticFallback, widgets.VBox):
    """Callable progress widget for ``mm.search(..., progress=SearchProgress())``.

    ``renders`` counts redraws (the throttle is testable with an injected ``clock``); call
    ``interrupted()`` when the search is stopped so the widget does not keep saying "running".
    Shown with ``display_live()``, the end of the search also refreshes the output's static picture.
    """

    def __init__(self, throttle: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 max_rows: int = 30) -> None:
        super().__init__()
        self.throttle = throttle
        self.max_rows = max_rows
        self.renders = 0
        self.state = "waiting"
        self.prepared: tuple[int, int] | None = None  # (candidates prepared, candidates)
        self.blocks = 0  # distinct blocks hashed while preparing
        self.total_rungs: int | None = None
        self.rungs: dict[int, RungState] = {}
        self.entries: dict[str, Entry] = {}
        self.cache_bytes: int | None = None
        self.cache_peak = 0
        self.chunks = 0
        self.timings: dict[str, float] = {}
        self.stats: dict[str, Any] = {}
        self._clock = clock
        self._last: float | None = None
        self.status = widgets.HTML()
        self.preparation = widgets.IntProgress(min=0, max=1, description="preparing candidates",
                                               style={"description_width": "initial"},
                                               layout={"display": "none"})
        self.bars = widgets.VBox()
        self.cache = widgets.HTML()
        self.reuse = widgets.HTML()
        self.leaderboard = widgets.HTML()
        self.summary = widgets.HTML()
        self.children = [self.status, self.preparation, self.bars, self.reuse, self.cache, self.leaderboard,
                         self.summary]
        self.flush()

    # -- events ------------------------------------------------------------------------------
    def __call__(self, event: dict[str, Any]) -> None:
        """Take one search event; unknown or malformed events are ignored, never raised."""
        name = event.get("event") if isinstance(event, dict) else None
        handler = self._HANDLERS.get(name) if isinstance(name, str) else None
        if handler is None:
            return
        try:
            handler(self, event)
        except (KeyError, TypeError, ValueError, AttributeError):
            return
        now = self._clock()
        if name == "done" or self._last is None or now - self._last >= self.throttle - _TICK:
            self._last = now
            self.flush()
        if name == "done":
            self.refresh_static()

    def _prepare(self, e: dict[str, Any]) -> None:
        done, total = int(e["done"]), int(e["total"])
        self.prepared = (done, total)
        self.blocks = int(e.get("blocks", self.blocks))
        self.state = "preparing"

    def _rung_start(self, e: dict[str, Any]) -> None:
        rung, items, total = int(e["rung"]), int(e["items"]), int(e["rungs"])
        models = [str(m) for m in e["models"]]
        self.rungs[rung] = RungState(rung, models, items)
        self.total_rungs = total
        self.state = "running"
        for name in models:
            entry = self.entries.setdefault(name, Entry(name, rung))
            entry.rung = rung

    def _model_scored(self, e: dict[str, Any]) -> None:
        rung, name, score = int(e["rung"]), str(e["model"]), float(e["score"])
        loss = float(e.get("loss", math.inf))
        self.rungs[rung].scored.add(name)
        entry = self.entries.setdefault(name, Entry(name, rung))
        entry.rung, entry.score, entry.loss = rung, score, loss

    def _model_pruned(self, e: dict[str, Any]) -> None:
        rung, name = int(e["rung"]), str(e["model"])
        entry = self.entries[name]
        entry.score = float(e.get("score", entry.score))
        entry.pruned = rung

    def _rung_end(self, e: dict[str, Any]) -> None:
        rung, survivors = int(e["rung"]), [str(m) for m in e["survivors"]]
        self.rungs[rung].survivors = survivors

    def _reuse(self, e: dict[str, Any]) -> None:
        rung = self.rungs[int(e["rung"])]
        rung.reused, rung.computed = int(e["reused"]), int(e["computed"])

    def _cache(self, e: dict[str, Any]) -> None:
        size = int(e["bytes"])
        chunks = int(e.get("chunk", self.chunks))
        self.cache_bytes, self.chunks = size, chunks
        self.cache_peak = max(self.cache_peak, size)

    def _done(self, e: dict[str, Any]) -> None:
        timings = {str(k): float(v) for k, v in e["timings"].items()}
        stats = dict(e["stats"])
        self.timings, self.stats, self.state = timings, stats, "done"

    _HANDLERS: ClassVar[dict[str, Callable[["SearchProgress", dict[str, Any]], None]]] = {
        "prepare": _prepare, "rung_start": _rung_start, "model_scored": _model_scored, "model_pruned": _model_pruned,
        "rung_end": _rung_end, "cache": _cache, "done": _done, "reuse": _reuse,
    }

    def interrupted(self) -> None:
        """Mark the search as stopped (KeyboardInterrupt or an error) and redraw now."""
        if self.state != "done":
            self.state = "interrupted"
        self.flush()
        self.refresh_static()

    # -- derived state -----------------------------------------------------------------------
    @property
    def ranking(self) -> list[Entry]:
        """Every candidate seen so far, best first."""
        return sorted(self.entries.values(), key=Entry.key)

    @property
    def survivors(self) -> list[str]:
        """Survivors of the last finished rung (empty before the first rung ends)."""
        ended = [r for r in self.rungs.values() if r.survivors is not None]
        return list(max(ended, key=lambda r: r.index).survivors or []) if ended else []

    # -- drawing -----------------------------------------------------------------------------
    def flush(self) -> None:
        """Redraw every part of the widget from the current state."""
        self.renders += 1
        self.status.value = f"<b>search</b>: {html.escape(self._status_text())}"
        self._draw_preparation()
        self._draw_bars()
        self.cache.value = (f"cache: peak {human_bytes(self.cache_bytes)} in this rung · "
                            f"{human_bytes(self.cache_peak)} overall · {self.chunks} chunk(s)"
                            if self.cache_bytes is not None else "")
        self.reuse.value = self._reuse_html()
        self.leaderboard.value = self._leaderboard_html() if self.entries else ""
        self.summary.value = self._summary_html() if self.state == "done" else ""

    def _status_text(self) -> str:
        if self.state == "running" and self.rungs:
            rung = max(self.rungs)
            return f"running rung {rung} ({rung + 1}/{self.total_rungs}), {len(self.rungs[rung].models)} models"
        if self.state == "preparing" and self.prepared is not None:
            done, total = self.prepared
            blocks = f" ({self.blocks} distinct blocks)" if self.blocks else ""
            return f"preparing candidates: {done}/{total}{blocks}"
        return self.state

    def _draw_preparation(self) -> None:
        """The preparation bar: shown from the first ``prepare`` event until the first rung starts."""
        if self.prepared is None:
            return
        done, total = self.prepared
        self.preparation.max = max(1, total)
        self.preparation.value = done
        self.preparation.bar_style = "success" if done >= total else ""
        self.preparation.layout.display = "none" if self.rungs else None

    def _draw_bars(self) -> None:
        bars = list(self.bars.children)
        for rung in sorted(self.rungs.values(), key=lambda r: r.index)[len(bars):]:
            bars.append(widgets.IntProgress(min=0, description=f"rung {rung.index}: {rung.items:,} items"))
        # one label width for every bar, so the bars start at the same left edge
        width = f"{max((len(b.description) for b in bars), default=0) + 1}ch"
        for bar in bars:
            if bar.style.description_width != width:
                bar.style.description_width = width
        for bar, rung in zip(bars, sorted(self.rungs.values(), key=lambda r: r.index)):
            bar.max = max(1, len(rung.models))
            bar.value = len(rung.scored)
            complete = len(rung.scored) >= len(rung.models)
            bar.bar_style = "success" if complete else "danger" if self.state == "interrupted" else ""
        if len(bars) != len(self.bars.children):
            self.bars.children = bars

    def _reuse_html(self) -> str:
        """Per rung, kept features read (green) beside features computed (blue): a search with
        ``reuse=True`` shows what the store saved it; empty otherwise."""
        rows = []
        for r in sorted(self.rungs.values(), key=lambda r: r.index):
            if r.reused is None:
                continue
            total = max(1, r.reused + r.computed)
            bar = (f'<div style="display:flex;width:160px;height:0.8em;background:#eee">'
                   f'<div style="background:#2ca02c;width:{100 * r.reused / total:.1f}%"></div>'
                   f'<div style="background:#1f77b4;width:{100 * r.computed / total:.1f}%"></div></div>')
            rows.append(f"<tr><td{CELL}>rung {r.index}</td><td{NUM}>{r.reused} reused</td>"
                        f"<td{NUM}>{r.computed} computed</td><td{CELL}>{bar}</td></tr>")
        if not rows:
            return ""
        return ("<b>kept features</b> (candidate × chunk; "
                '<span style="color:#2ca02c">reused</span> / <span style="color:#1f77b4">computed</span>)'
                f'<table style="border-collapse:collapse">{"".join(rows)}</table>')

    def _leaderboard_html(self) -> str:
        done = self.state == "done"
        finalists = set(self.survivors) if done else set()
        rows = []
        ranking = self.ranking
        for i, e in enumerate(ranking[: self.max_rows], start=1):
            if e.pruned is not None:
                note, style = f"pruned in rung {e.pruned}", f' style="{PRUNED_STYLE}"'
            else:
                note, style = ("selected" if e.model in finalists else "active"), ""
            score = f"{e.score:.4f}" if math.isfinite(e.score) else "–"
            rows.append(f"<tr{style}><td{NUM}>{i}</td><td{CELL}>{html.escape(e.model)}</td><td{NUM}>{score}</td>"
                        f"<td{NUM}>{e.rung}</td><td{CELL}>{note}</td></tr>")
        more = len(ranking) - self.max_rows
        if more > 0:
            rows.append(f'<tr style="{PRUNED_STYLE}"><td colspan="5"{CELL}>… {more} more</td></tr>')
        head = "".join(f"<th{NUM if h in ('#', 'score', 'rung') else CELL}>{h}</th>"
                       for h in ("#", "model", "score", "rung", ""))
        return (f'<table style="border-collapse:collapse"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(rows)}</tbody></table>")

    def _summary_html(self) -> str:
        total = sum(self.timings.values()) or 1.0
        times = "".join(
            f"<tr><td{CELL}>{html.escape(k)}</td><td{NUM}>{v:.3f} s</td><td{CELL}><div style=\"background:#1f77b4;"
            f"height:0.8em;width:{100 * v / total:.0f}px\"></div></td></tr>"
            for k, v in self.timings.items()
        )
        stats = "".join(
            f"<tr><td{CELL}>{html.escape(str(k))}</td><td{NUM}>"
            f"{human_bytes(v) if 'bytes' in str(k) and isinstance(v, (int, float)) else html.escape(str(v))}"
            "</td></tr>"
            for k, v in self.stats.items()
        )
        return (f"<b>time breakdown</b> ({sum(self.timings.values()):.3f} s)<table>{times}</table>"
                f"<b>stats</b><table>{stats}</table>")

    # -- the static picture ------------------------------------------------------------------
    def static_bundle(self) -> dict[str, Any]:
        """The widget's state as HTML and text, for viewers without the live widget (saved notebooks)."""
        rungs = "".join(
            f"<li>rung {r.index}: {len(r.models)} models on {r.items} items, {len(r.scored)} scored"
            + (f" &rarr; {survivors(len(r.survivors))}" if r.survivors is not None else "")
            + (f"; features {r.reused} reused, {r.computed} computed" if r.reused is not None else "") + "</li>"
            for r in sorted(self.rungs.values(), key=lambda r: r.index)
        )
        parts = [self.status.value, f"<ul>{rungs}</ul>" if rungs else "", self.reuse.value, self.cache.value,
                 self.leaderboard.value, self.summary.value]
        return {"text/html": "<div>" + "".join(f"<div>{p}</div>" for p in parts if p) + "</div>",
                "text/plain": "\n".join([repr(self), *self.leaderboard_lines()])}

    def leaderboard_lines(self) -> list[str]:
        """The leaderboard as aligned text lines (best first, at most ``max_rows``)."""
        if not self.entries:
            return []
        finalists = set(self.survivors) if self.state == "done" else set()
        ranking = self.ranking
        width = max(len(e.model) for e in ranking[: self.max_rows])
        lines = [f"  {'#':>3}  {'model':<{width}}  {'score':>7}  rung"]
        for i, e in enumerate(ranking[: self.max_rows], start=1):
            note = (f"pruned in rung {e.pruned}" if e.pruned is not None
                    else "selected" if e.model in finalists else "active")
            score = f"{e.score:.4f}" if math.isfinite(e.score) else "–"
            lines.append(f"  {i:>3}  {e.model:<{width}}  {score:>7}  {e.rung:>4}  {note}")
        if len(ranking) > self.max_rows:
            lines.append(f"  … {len(ranking) - self.max_rows} more")
        return lines

    def __repr__(self) -> str:
        lines = [f"SearchProgress: {self.state}, {len(self.rungs)} rung(s), {len(self.entries)} models"]
        for rung in sorted(self.rungs.values(), key=lambda r: r.index):
            end = f" -> {survivors(len(rung.survivors))}" if rung.survivors is not None else ""
            kept = (f", features {rung.reused} reused / {rung.computed} computed" if rung.reused is not None
                    else "")
            lines.append(f"  rung {rung.index}: {len(rung.models)} models, {rung.items} items, "
                         f"{len(rung.scored)} scored{end}{kept}")
        if self.state == "done" and self.entries:
            lines.append(f"  best: {self.ranking[0].model!r}")
        return "\n".join(lines)
