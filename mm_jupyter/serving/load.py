"""Open-loop load for a server: Poisson arrivals at a fixed rate, requests spread over the models.

Open loop means requests arrive on a schedule drawn in advance, whether or not earlier ones were
answered (as independent clients do), so an overloaded server shows growing latency and rejections
instead of silently slowing the load down. Latency is measured from each request's *scheduled*
arrival to its answer, so a generator that falls behind its schedule still counts the delay
(no coordinated omission).
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import CancelledError
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import QueueFullError, ServeError
from .metrics import Span, WindowStats, ms, summarize

if TYPE_CHECKING:
    from .server import Server

SPREADS = ("uniform", "zipf")


@dataclass(frozen=True)
class Workload:
    """Which model each request asks and which input row it sends (an index into ``inputs``)."""

    models: np.ndarray   # (requests,) model index
    rows: np.ndarray     # (requests,) index into the input pool
    repeat: float        # fraction of requests that repeat an earlier (model, input) pair


def make_workload(n_models: int, requests: int, pool: int, spread: str = "uniform", zipf_s: float = 1.1,
                  repeat: float = 0.0, seed: int = 0) -> Workload:
    """``requests`` requests over ``n_models`` models: ``uniform`` or ``zipf`` (model popularity
    ~ 1/rank^zipf_s, ranks shuffled over the models). With probability ``repeat`` a request copies
    an earlier request's model and input exactly (what a prediction cache can answer); otherwise its
    input is a fresh draw from a pool of ``pool`` rows."""
    if spread not in SPREADS:
        raise ValueError(f"spread must be one of {SPREADS}, not {spread!r}")
    if not 0.0 <= repeat < 1.0 or requests < 1 or n_models < 1 or pool < 1:
        raise ValueError("need requests, models and pool >= 1 and 0 <= repeat < 1")
    rng = np.random.default_rng([seed, 13])
    if spread == "uniform":
        models = rng.integers(0, n_models, size=requests)
    else:
        weights = 1.0 / np.arange(1, n_models + 1) ** zipf_s
        models = rng.permutation(n_models)[rng.choice(n_models, size=requests, p=weights / weights.sum())]
    rows = rng.integers(0, pool, size=requests)
    again = rng.random(requests) < repeat
    again[0] = False
    earlier = (rng.random(requests) * np.arange(requests)).astype(np.int64)  # a uniformly drawn earlier request
    for j in np.flatnonzero(again):  # in order, so a repeat of a repeat copies what that one sent
        models[j], rows[j] = models[earlier[j]], rows[earlier[j]]
    return Workload(models, rows, repeat)


@dataclass(frozen=True)
class LoadResult:
    """What one open-loop run measured. Throughput and latency come from ``metrics.summarize`` over
    the run's window (its start to its last answer), as the server's ``load_metrics()`` reports them."""

    offered_rps: float
    sent: int
    answered: int
    rejected: int
    failed: int
    cached: int
    seconds: float            # start to last answer: the window
    throughput_rps: float     # answered / seconds
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    behind_ms: float          # how far the generator fell behind its schedule at worst
    window: str = ""          # the window in words
    started: float = 0.0      # the window in time.perf_counter() time
    ended: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def stats(self) -> WindowStats:
        """The run's window as ``WindowStats`` (what ``server.load_metrics()["window"]`` holds)."""
        return WindowStats(self.window, self.seconds, self.answered, self.cached, self.throughput_rps,
                           self.p50_ms, self.p95_ms, self.p99_ms, None, self.max_ms)

    def __repr__(self) -> str:
        """Rounded, the window named (the fields keep full precision)."""
        return "\n".join([
            f"LoadResult: {self.sent:,} requests offered at {self.offered_rps:,.0f}/s (Poisson arrivals; "
            "latency from each scheduled arrival)",
            "  " + self.stats().describe(),
            f"  max {ms(self.max_ms)}; rejected {self.rejected:,}; failed {self.failed:,}; "
            f"the generator fell behind by up to {ms(self.behind_ms)}"])

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def open_loop(server: "Server", workload: Workload, inputs: Sequence[Any], rate: float,
              names: Sequence[str] | None = None, timeout: float = 120.0) -> LoadResult:
    """Send ``workload`` to ``server`` at ``rate`` requests/s (Poisson arrivals) and wait for every
    answer. ``inputs[k]`` is the input of pool row ``k``; ``names`` maps model indices to names
    (default: the served version's). Each request arrives at its scheduled time (latency runs from
    there); the run's window is remembered as ``server.last_load``."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, not {rate}")
    names = list(names) if names is not None else server.models
    n = len(workload.models)
    rng = np.random.default_rng([len(workload.models), int(rate)])
    schedule = np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()
    models = [names[i] for i in workload.models.tolist()]
    rows = workload.rows.tolist()
    pending: list[Any] = []
    behind, rejected = 0.0, 0
    start = time.perf_counter()
    for j in range(n):
        due = start + schedule[j]
        now = time.perf_counter()
        if due - now > 2e-4:
            time.sleep(due - now)
            now = time.perf_counter()
        behind = max(behind, now - due)
        try:
            pending.append(server.submit(models[j], inputs[rows[j]], arrival=due))
        except QueueFullError:
            rejected += 1
    answers, failed = [], 0
    for future in pending:
        try:
            answers.append(future.result(timeout))
        except (ServeError, TimeoutError, CancelledError):  # answered with an error, late, or never
            failed += 1
    end = max([start] + [a.answered_at for a in answers])
    label = f"load at {rate:,.0f}/s"
    stats = summarize(np.array([a.answered_at for a in answers], dtype=np.float64),
                      np.array([a.latency_s for a in answers], dtype=np.float64),
                      np.array([a.cached for a in answers], dtype=bool), start, end, label)
    server.last_load = Span(label, start, end)
    return LoadResult(offered_rps=rate, sent=len(pending), answered=stats.answered, rejected=rejected,
                      failed=failed, cached=stats.cached, seconds=stats.seconds, throughput_rps=stats.throughput_rps,
                      p50_ms=stats.p50_ms, p95_ms=stats.p95_ms, p99_ms=stats.p99_ms, max_ms=stats.max_ms,
                      behind_ms=behind * 1e3, window=label, started=start, ended=end)


def capacity(server: "Server", workload: Workload, inputs: Sequence[Any], seconds: float = 1.0,
             names: Sequence[str] | None = None, window: int | None = None) -> float:
    """Answers per second with the queue kept busy for about ``seconds`` (closed loop: ``window``
    requests in flight — default twice ``max_batch``, or 4 for one-at-a-time serving, which a deeper
    queue would only slow to drain — cycling through ``workload``): what places the open-loop rates."""
    names = list(names) if names is not None else server.models
    window = window or (2 * server.max_batch if server.batching != "none" else 4)
    models = [names[i] for i in workload.models.tolist()]
    rows = workload.rows.tolist()
    inflight: deque[Any] = deque()
    answered, j = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or not answered:
        if len(inflight) >= window:
            inflight.popleft().result()
            answered += 1
        k = j % len(models)
        inflight.append(server.submit(models[k], inputs[rows[k]]))
        j += 1
    for f in inflight:
        f.result()
    return (answered + len(inflight)) / (time.perf_counter() - start)
