"""Serving metrics: throughput, latency percentiles, queue depth, batch sizes, cache hit rate.

Answers are recorded per batch (one lock per batch, not per request). Completion time, latency and
whether the cache answered are kept for the last ``window`` answers, so throughput and percentiles
describe a stated *time window*: the last N seconds, or a span such as one load run. One function,
``summarize``, turns answers and a window into those numbers; the server's ``metrics()``, the load
generator's ``LoadResult`` and the notebook widget all use it, so the same answers over the same
window give the same numbers everywhere. Latency runs from a request's arrival (its submission, or
the arrival a load generator scheduled) to its answer. Counters cover the server's whole life (or
since ``reset``).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np


@dataclass(frozen=True)
class WindowStats:
    """What the answers completed inside one time window tell (times in ms, rates per second)."""

    label: str                 # which window, in words: "last 10 s", "load 1 (2,000 requests)"
    seconds: float             # its length
    answered: int
    cached: int
    throughput_rps: float      # answered / seconds
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    complete: bool = True      # False: older answers of the window were no longer kept

    def describe(self) -> str:
        """One line, rounded: what a person reads (the fields keep full precision)."""
        hits = f", {self.cached / self.answered:.0%} from the cache" if self.answered and self.cached else ""
        gap = "" if self.complete else " (shortened to the answers still kept)"
        return (f"{self.label}{gap}: {self.answered:,} answered in {seconds(self.seconds)}, "
                f"{self.throughput_rps:,.0f} answers/s; latency p50 {ms(self.p50_ms)}, p95 {ms(self.p95_ms)}, "
                f"p99 {ms(self.p99_ms)}{hits}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def ms(value: float | None) -> str:
    """A latency in milliseconds with three significant digits: '0.412 ms', '25.6 ms', '–'."""
    return "–" if value is None else f"{value:.3g} ms" if value < 1000 else f"{value:,.0f} ms"


def seconds(value: float) -> str:
    """A span: '0.41 s', '12.3 s'."""
    return f"{value:.2f} s" if value < 10 else f"{value:,.1f} s"


def summarize(done: np.ndarray, latency_s: np.ndarray, cached: np.ndarray, start: float, end: float,
              label: str, complete: bool = True) -> WindowStats:
    """The answers completed in ``[start, end]`` (``done``: completion times, ``latency_s``: their
    latencies, ``cached``: answered from the cache): throughput over the window's length and latency
    percentiles. The one definition of these numbers (server metrics, load results, widget)."""
    inside = (done >= start) & (done <= end)
    lat_ms = latency_s[inside] * 1e3
    span = max(end - start, 1e-9)
    pct = np.percentile(lat_ms, [50, 95, 99]).tolist() if len(lat_ms) else [None, None, None]
    return WindowStats(
        label=label, seconds=end - start, answered=int(inside.sum()), cached=int(cached[inside].sum()),
        throughput_rps=float(inside.sum() / span), p50_ms=_f(pct[0]), p95_ms=_f(pct[1]), p99_ms=_f(pct[2]),
        mean_ms=_f(lat_ms.mean()) if len(lat_ms) else None, max_ms=_f(lat_ms.max()) if len(lat_ms) else None,
        complete=complete)


@dataclass(frozen=True)
class Span:
    """A named time window in ``time.perf_counter()`` time (e.g. one load run)."""

    label: str
    start: float
    end: float


class Metrics:
    """Counters and a sliding record of (completion time, latency, cached) of recent answers."""

    def __init__(self, window: int = 100_000, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._window = window
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded so far (e.g. after a warm-up)."""
        with self._lock:
            self.started = self._clock()
            self.answered = 0
            self.cached = 0
            self.rejected = 0
            self.failed = 0
            self.batches = 0
            self.rows = 0
            self.batch_sizes: Counter[int] = Counter()
            self.queue_peak = 0
            self._done: deque[float] = deque(maxlen=self._window)
            self._latency: deque[float] = deque(maxlen=self._window)
            self._cached: deque[bool] = deque(maxlen=self._window)
            self._dropped = False  # whether the record ever overflowed

    def record(self, latencies: Iterable[float], cached: bool = False, done: float | None = None) -> None:
        """Answers that completed at ``done`` (default: now), with their latencies in seconds."""
        now = self._clock() if done is None else done
        lat = list(latencies)
        with self._lock:
            self.answered += len(lat)
            if cached:
                self.cached += len(lat)
            self._dropped = self._dropped or len(self._done) + len(lat) > self._window
            self._latency.extend(lat)
            self._done.extend([now] * len(lat))
            self._cached.extend([cached] * len(lat))

    def record_batch(self, requests: int, rows: int) -> None:
        """One model call (or one group of calls) over ``requests`` requests holding ``rows`` rows."""
        with self._lock:
            self.batches += 1
            self.rows += rows
            self.batch_sizes[requests] += 1

    def record_rejected(self, n: int = 1) -> None:
        with self._lock:
            self.rejected += n

    def record_failed(self, n: int = 1) -> None:
        with self._lock:
            self.failed += n

    def record_depth(self, depth: int) -> None:
        if depth > self.queue_peak:
            self.queue_peak = depth

    def window(self, window_s: float = 10.0, since: float | None = None, until: float | None = None,
               label: str | None = None) -> WindowStats:
        """The answers of one time window: ``[since, until]`` (clock times; ``until`` defaults to now),
        else the last ``window_s`` seconds (never reaching back before the start or a reset)."""
        now = self._clock()
        with self._lock:
            done = np.fromiter(self._done, dtype=np.float64, count=len(self._done))
            lat = np.fromiter(self._latency, dtype=np.float64, count=len(self._latency))
            cached = np.fromiter(self._cached, dtype=bool, count=len(self._cached))
            started, dropped = self.started, self._dropped
        end = now if until is None else until
        if since is None:
            start = max(end - window_s, started)
            label = label or f"last {window_s:g} s"
        else:
            start = since
            label = label or f"{seconds(end - start)} window"
        complete = not (dropped and len(done) and done[0] > start)
        if not complete:  # older answers were dropped: the window shrinks to what is kept
            start = float(done[0])
        return summarize(done, lat, cached, start, end, label, complete)

    def snapshot(self, window_s: float = 10.0, queue_depth: int = 0, cache_hits: int = 0, cache_misses: int = 0,
                 since: float | None = None, until: float | None = None, label: str | None = None) -> dict[str, Any]:
        """A plain dict: the window's throughput and latency percentiles (ms) — see ``window`` —
        under ``window``, counters, batch-size histogram and cache hit rate since the start."""
        stats = self.window(window_s, since, until, label)
        with self._lock:
            counts = {"answered": self.answered, "cached": self.cached, "rejected": self.rejected,
                      "failed": self.failed, "batches": self.batches, "rows": self.rows}
            sizes = dict(sorted(self.batch_sizes.items()))
            peak = max(self.queue_peak, queue_depth)
            started = self.started
        lookups = cache_hits + cache_misses
        return {
            **counts,
            "window": stats.to_json(),
            "throughput_rps": stats.throughput_rps,
            "latency_ms": {"p50": stats.p50_ms, "p95": stats.p95_ms, "p99": stats.p99_ms, "mean": stats.mean_ms},
            "queue_depth": queue_depth,
            "queue_peak": peak,
            "batch_sizes": sizes,
            "mean_batch": sum(k * v for k, v in sizes.items()) / counts["batches"] if counts["batches"] else None,
            "cache_hit_rate": cache_hits / lookups if lookups else None,
            "cache_hits": cache_hits,
            "uptime_s": self._clock() - started,
        }


def _f(value: Any) -> float | None:
    return None if value is None else float(value)
