"""Serving metrics: throughput, latency percentiles, queue depth, batch sizes, cache hit rate.

Answers are recorded per batch (one lock per batch, not per request). Latencies and completion
times of the last ``window`` answers are kept, so percentiles and throughput describe recent
traffic; counters cover the server's whole life (or since ``reset``).
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Any, Callable, Iterable

import numpy as np


class Metrics:
    """Counters and a sliding window of (completion time, latency) of recent answers."""

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

    def record(self, latencies: Iterable[float], cached: bool = False) -> None:
        """Answers that completed now, with their latencies in seconds."""
        now = self._clock()
        lat = list(latencies)
        with self._lock:
            self.answered += len(lat)
            if cached:
                self.cached += len(lat)
            self._latency.extend(lat)
            self._done.extend([now] * len(lat))

    def record_batch(self, requests: int, rows: int) -> None:
        """One model call (or one group of calls) over ``requests`` requests holding ``rows`` rows."""
        with self._lock:
            self.batches += 1
            self.rows += rows
            self.batch_sizes[requests] += 1

    def record_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def record_failed(self, n: int = 1) -> None:
        with self._lock:
            self.failed += n

    def record_depth(self, depth: int) -> None:
        if depth > self.queue_peak:
            self.queue_peak = depth

    def snapshot(self, window_s: float = 10.0, queue_depth: int = 0,
                 cache_hits: int = 0, cache_misses: int = 0) -> dict[str, Any]:
        """A plain dict: throughput over the last ``window_s`` seconds, latency percentiles of the
        answers in that window (ms), counters, batch-size histogram and cache hit rate."""
        now = self._clock()
        with self._lock:
            done = np.fromiter(self._done, dtype=np.float64, count=len(self._done))
            lat = np.fromiter(self._latency, dtype=np.float64, count=len(self._latency))
            counts = {"answered": self.answered, "cached": self.cached, "rejected": self.rejected,
                      "failed": self.failed, "batches": self.batches, "rows": self.rows}
            sizes = dict(sorted(self.batch_sizes.items()))
            peak = max(self.queue_peak, queue_depth)
            started = self.started
        recent = done >= now - window_s
        span = min(window_s, now - started)
        if len(done) and len(done) == self._window and done[0] >= now - window_s:
            span = now - done[0]  # the window holds fewer seconds than asked for
        lat_ms = lat[recent] * 1e3
        pct = np.percentile(lat_ms, [50, 95, 99]) if len(lat_ms) else [None, None, None]
        lookups = cache_hits + cache_misses
        return {
            **counts,
            "throughput_rps": float(recent.sum() / span) if span > 0 else 0.0,
            "latency_ms": {"p50": _f(pct[0]), "p95": _f(pct[1]), "p99": _f(pct[2]),
                           "mean": _f(lat_ms.mean()) if len(lat_ms) else None},
            "queue_depth": queue_depth,
            "queue_peak": peak,
            "batch_sizes": sizes,
            "mean_batch": sum(k * v for k, v in sizes.items()) / counts["batches"] if counts["batches"] else None,
            "cache_hit_rate": cache_hits / lookups if lookups else None,
            "cache_hits": cache_hits,
            "uptime_s": now - started,
        }


def _f(value: Any) -> float | None:
    return None if value is None else float(value)
