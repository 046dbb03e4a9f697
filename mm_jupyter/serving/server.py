"""``mm.serve(store, "cells@latest", ...)``: a serving system over one stored set.

Callers (Python threads, the HTTP endpoint, a load generator) ``submit`` requests; a cache hit is
answered at once, everything else goes into the bounded queue. One worker thread takes dynamic
batches from the queue and answers them with the current version's ``Runner``. A batch is answered
by exactly one version, and every ``Prediction`` names the version that produced it.

Following ``name@latest`` (or a bare ``name``): a watcher thread polls the catalog every ``watch_s``
seconds (``refresh()`` checks at once). A new version is recovered and prepared off the worker
thread, then swapped in with one reference assignment between two batches: queued requests stay
queued and are answered by the new version, a batch already running finishes on the old one, so
nothing is dropped or mixed. The cache key holds the version's catalog id, and the cache is cleared
at the switch.

The server reads the store through its own ``Store`` instance (its own SQLite connection): reads
from the watcher thread never interleave with a save running in the caller's thread.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import RefError, ServeError
from ..store import SetRef, Store
from ..store.backends import default_location, is_database
from .batching import Answer, Reply, Request, RequestQueue
from .cache import PredictionCache, input_digest
from .errors import BadInputError, QueueFullError, ServerClosedError, UnknownModelError
from .http import HTTPEndpoint
from .metrics import Metrics, Span
from .runner import Runner
from .types import Prediction

if TYPE_CHECKING:
    import torch

    from ..store import SetRef, Store
    from .http import HTTPEndpoint

#: ``multi``: one call over many models; ``model``: one call per model in a batch; ``none``: one request at a time.
BATCHING = ("multi", "model", "none")
LATEST = "latest"


def _open_store(store: "Store | str | os.PathLike[str] | None") -> "Store":
    """A private Store on the same store; a folder without a catalog is an error, never created."""

    if isinstance(store, Store):
        return store.twin()
    location = store if store is not None else default_location()
    if not is_database(location) and not (Path(location) / "catalog.sqlite").is_file():
        raise RefError(f"there is no model store at {str(location)!r} to serve from")
    return Store(location)


def _parse_ref(ref: Any) -> tuple[str, int | None]:
    """("name", None) to follow the latest version, ("name", v) for a pinned one."""

    if isinstance(ref, SetRef):
        return ref.name, ref.version
    if not isinstance(ref, str) or not ref:
        raise RefError(f"serve a set by 'name', 'name@latest' or 'name@version', not {ref!r}")
    name, at, version = ref.partition("@")
    if not at or version == LATEST:
        return name, None
    if not (version.isascii() and version.isdigit()):
        raise RefError(f"bad set reference {ref!r}: after '@' comes a version number or 'latest'")
    return name, int(version)


class Server:
    """A running server over one stored set; see the module docstring. Use ``mm.serve(...)``.

    ``max_batch`` rows per batch, ``max_wait_ms`` the longest a batch that formed while the worker
    was busy is held back to fill (a request that finds the worker idle is taken at once; None: as
    long as one batch's fixed cost, measured, see ``auto_wait_ms``),
    ``cache_size`` answers kept (0: no cache), ``max_queue`` requests waiting before ``submit``
    rejects with QueueFullError, ``max_modules`` built modules kept for the ``model`` and ``none``
    modes (0: every request builds its module with ``ms[i]``), ``input_shape`` the shape of one item
    (inferred when the first layer is ``nn.Linear``), ``watch_s`` the catalog polling interval when
    following the latest version (None: only ``refresh()`` switches), ``trust_code`` whether code
    recorded in the store may run to build the models (default: the store's).
    """

    def __init__(self, store: "Store | str | os.PathLike[str] | None", ref: "SetRef | str", *,
                 batching: str = "multi", max_batch: int = 256, max_wait_ms: float | None = None,
                 cache_size: int = 10_000, max_queue: int = 10_000, max_modules: int = 1024,
                 max_rows: int = 4096, input_shape: Sequence[int] | None = None,
                 watch_s: float | None = 1.0, trust_code: bool | None = None) -> None:
        if batching not in BATCHING:
            raise ServeError(f"batching must be one of {', '.join(BATCHING)}, not {batching!r}")
        for label, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                  ("max_rows", max_rows, 1), ("cache_size", cache_size, 0),
                                  ("max_modules", max_modules, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ServeError(f"{label} must be an integer >= {low}, not {value!r}")
        if max_wait_ms is not None and not max_wait_ms >= 0:
            raise ServeError(f"max_wait_ms must be >= 0 or None (automatic), not {max_wait_ms!r}")
        if watch_s is not None and not watch_s > 0:
            raise ServeError(f"watch_s must be > 0 seconds or None, not {watch_s!r}")
        self.batching = batching
        self.max_batch, self.max_rows = max_batch, max_rows
        #: whether the hold follows the served version's measured batch cost (``max_wait_ms=None``)
        self.auto_wait = max_wait_ms is None
        self.max_wait_ms = 0.0 if max_wait_ms is None else float(max_wait_ms)
        self.max_modules = max_modules
        self.name, pinned = _parse_ref(ref)
        self.follow = pinned is None
        self._input_shape = input_shape
        self._trust_code = trust_code
        self._store = _open_store(store)
        try:
            self._runner = self._load(pinned)
            if self.auto_wait:
                self.max_wait_ms = self._runner.wait_ms
        except BaseException:
            self._store.close()
            raise
        self.history: list[tuple["SetRef", float]] = [(self._runner.ref, time.time())]
        #: the time window of the last load run against this server (``serving.load.open_loop``)
        self.last_load: Span | None = None
        self.cache = PredictionCache(cache_size)
        self.queue = RequestQueue(max_queue, max_batch, self.max_wait_ms / 1e3)
        self._metrics = Metrics()
        self._switch = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._http: "HTTPEndpoint | None" = None
        self._worker = threading.Thread(target=self._work, name=f"mm-serve {self.name}", daemon=True)
        self._worker.start()
        self._watcher = None
        if self.follow and watch_s is not None:
            self._watcher = threading.Thread(target=self._watch, args=(watch_s,), daemon=True,
                                             name=f"mm-serve watch {self.name}")
            self._watcher.start()

    # -- versions ----------------------------------------------------------------------------------
    def _load(self, version: int | None) -> Runner:
        ref = self.name if version is None else f"{self.name}@{version}"
        runner = Runner(self._store.recover_set(ref, trust_code=self._trust_code), self.max_modules, self._input_shape)
        if self.batching == "multi":
            runner.prepare_multi()
        if self.auto_wait:
            runner.wait_ms = auto_wait_ms(runner, self.batching == "multi" and runner.multi_error is None)
        return runner

    @property
    def version(self) -> "SetRef":
        """The set version answering requests now."""
        return self._runner.ref

    @property
    def models(self) -> list[str]:
        """Model names of the version served now."""
        return list(self._runner.names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._runner.input_shape

    def refresh(self) -> "SetRef":
        """Switch to the newest version now when following ``name@latest``; returns the version served."""
        if not self.follow or self._closed:
            return self.version
        with self._switch:
            row = self._store.catalog.find(self.name, None)
            if row is None or row.id == self._runner.ref.id:
                return self.version
            runner = self._load(row.version)
            if self.auto_wait:
                self.max_wait_ms = runner.wait_ms
                self.queue.max_wait_s = runner.wait_ms / 1e3
            old, self._runner = self._runner, runner
            self.cache.clear()
            self.history.append((runner.ref, time.time()))
        old.close()
        return runner.ref

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.refresh()
            # the watcher thread outlives a failed refresh (a half-written store, a busy catalog, a
            # dropped connection): the current version keeps serving, and it tries again next time
            except Exception:  # noqa: BLE001 - any failure of one refresh, see above
                continue

    def warm(self, models: Sequence[str | int] | None = None) -> None:
        """Build modules now (``model``/``none`` modes; default: the first ``max_modules``) or map
        the stacked tensors (``multi``), so the first requests do not pay for it."""
        runner = self._runner
        if self.batching == "multi":
            runner.prepare_multi()
            return
        wanted = range(len(runner.names)) if models is None else [self._index(runner, m) for m in models]
        runner.warm(list(wanted))

    # -- requests ------------------------------------------------------------------------------------
    @staticmethod
    def _index(runner: Runner, model: str | int) -> int:
        if isinstance(model, int) and not isinstance(model, bool):
            if 0 <= model < len(runner.names):
                return model
            raise UnknownModelError(f"model index {model} is out of range: {runner.ref} has "
                                    f"{len(runner.names)} models")
        i = runner.index.get(model) if isinstance(model, str) else None
        if i is None:
            raise UnknownModelError(f"{runner.ref} has no model named {model!r}")
        return i

    def submit(self, model: str | int, x: Any, arrival: float | None = None) -> "Future[Prediction]":
        """Queue one request; the future's result is a Prediction. Raises (at once) BadInputError,
        UnknownModelError, QueueFullError when the queue is full, ServerClosedError when closed.

        ``model`` is a name of the served version (or an index into ``models``); ``x`` is one item
        of ``input_shape`` or a batch ``(rows, *input_shape)`` (tensor, numpy array or nested lists).
        ``arrival``: when the request arrived (a ``time.perf_counter()`` time, e.g. a load
        generator's schedule); latency is measured from it (default: now)."""
        reply: Future[Prediction] = Future()
        self._submit(model, x, arrival, reply)
        return reply

    def _submit(self, model: str | int, x: Any, arrival: float | None, reply: Reply) -> None:
        """``submit`` with the answer going to ``reply`` (set at once on a cache hit)."""
        t0 = time.perf_counter()
        if self._closed:
            raise ServerClosedError("the server is closed; start a new one with mm.serve(...)")
        runner = self._runner
        i = self._index(runner, model)
        name = runner.names[i]
        x_t, single = runner.as_input(x, self.max_rows)
        digest = input_digest(x_t) if self.cache.enabled else None
        if digest is not None:
            hit = self.cache.get((runner.ref.id, name, digest))
            if hit is not None:
                now = time.perf_counter()
                latency = now - (t0 if arrival is None else arrival)
                reply.set_result(Prediction(name, runner.ref, hit, True, latency, now))
                self._metrics.record((latency,), cached=True, done=now)
                return
        request = Request(name, x_t, single, digest, t0, arrival, i, runner.ref.id, reply)
        try:
            self.queue.put(request)
        except QueueFullError:
            self._metrics.record_rejected()
            raise

    def submit_many(self, models: Sequence[str | int], xs: Any) -> "list[Future[Prediction]]":
        """Queue one request per model: ``models[j]`` answers item ``xs[j]`` (``xs``: ``(len(models),
        *input_shape)``); the futures in order. The input is checked and copied once and the requests
        are queued under one lock, so a request costs a fraction of a ``submit``. All or nothing: a
        bad model or input raises before anything is queued, and so does a queue without room for all
        (QueueFullError)."""
        t0 = time.perf_counter()
        if self._closed:
            raise ServerClosedError("the server is closed; start a new one with mm.serve(...)")
        runner = self._runner
        index = [self._index(runner, m) for m in models]
        if not index:
            return []
        arr, _ = runner.as_input(xs, 1 << 62)  # (rows are counted against the models just below)
        if len(arr) != len(index):
            raise BadInputError(f"{len(index)} models but {len(arr)} inputs: submit_many takes one item per model")
        names, ref_id, cache = runner.names, runner.ref.id, self.cache.enabled
        items = list(arr[:, None])  # one (1, *input_shape) view per request, made in one C loop
        futures: list[Future[Prediction]] = [Future() for _ in index]
        if not cache:  # (a burst's common case: no lookups, one comprehension)
            queued = [Request(names[i], x, True, None, t0, None, i, ref_id, f)
                      for i, x, f in zip(index, items, futures)]
        else:
            queued = []
            for i, x, f in zip(index, items, futures):
                digest = input_digest(x)
                hit = self.cache.get((ref_id, names[i], digest))
                if hit is None:
                    queued.append(Request(names[i], x, True, digest, t0, None, i, ref_id, f))
                    continue
                now = time.perf_counter()
                f.set_result(Prediction(names[i], runner.ref, hit, True, now - t0, now))
                self._metrics.record((now - t0,), cached=True, done=now)
        try:
            self.queue.put_many(queued)
        except QueueFullError:
            self._metrics.record_rejected(len(queued))
            raise
        return futures

    def predict(self, model: str | int, x: Any, timeout: float | None = 60.0) -> Prediction:
        """Submit and wait for the answer (see ``submit``); TimeoutError after ``timeout`` seconds
        (None: no limit). The answer comes through an ``Answer`` slot, not a Future: a blocked caller
        is woken by one lock release, the cheapest hand-off between threads."""
        reply = Answer()
        self._submit(model, x, None, reply)
        prediction: Prediction = reply.result(timeout)
        return prediction

    # -- the worker ----------------------------------------------------------------------------------
    def _work(self) -> None:
        batching = self.batching != "none"
        while True:
            batch = self.queue.take(batching)
            if batch is None:
                return
            runner = self._runner
            try:
                self._answer(runner, batch)
            except Exception as e:  # noqa: BLE001 - the worker must not die: the failure is each waiting request's answer
                error = ServeError(f"serving {runner.ref} failed: {type(e).__name__}: {e}")
                failed = [r for r in batch if not r.future.done()]
                for r in failed:
                    r.future.set_exception(error)
                self._metrics.record_failed(len(failed))

    def _answer(self, runner: Runner, batch: list[Request]) -> None:
        ready: list[tuple[Request, int]] = []
        same = runner.ref.id
        for r in batch:
            if r.ref_id == same:  # checked against this version when submitted
                ready.append((r, r.index))
                continue
            i = runner.index.get(r.model)
            if i is None:  # the model is gone from a version switched to after the request was queued
                self._fail(r, UnknownModelError(f"{runner.ref} has no model named {r.model!r}"))
            elif r.x.shape[1:] != runner.input_shape:  # likewise, a new version with another input shape
                self._fail(r, BadInputError(f"{runner.ref} takes inputs of shape {list(runner.input_shape)}"))
            else:
                ready.append((r, i))
        if not ready:
            return
        # one finiteness check per batch; only a batch holding NaN/inf looks at each request
        x = ready[0][0].x if len(ready) == 1 else np.concatenate([r.x for r, _ in ready])
        if not np.isfinite(x).all():
            for r, _ in ready:
                if not np.isfinite(r.x).all():
                    self._fail(r, BadInputError("input contains NaN or infinity"))
            ready = [(r, i) for r, i in ready if not r.future.done()]
            if not ready:
                return
            x = np.concatenate([r.x for r, _ in ready])
        if self.batching == "multi" and runner.multi_error is None:
            try:
                outputs = self._multi(runner, ready, x)
            except Exception as e:  # noqa: BLE001 - vmap raises the model's own errors: answer per model from now
                runner.multi_error = f"{type(e).__name__}: {e}"
                outputs = self._per_model(runner, ready)
        elif self.batching == "none":
            outputs = []
            for r, i in ready:
                y = runner.run_one(i, runner.batch([r.x]))
                self._metrics.record_batch(1, r.rows)
                outputs.append(y[0] if r.single else y)
        else:
            outputs = self._per_model(runner, ready)
        self._deliver(runner, ready, outputs)

    def _fail(self, request: Request, error: Exception) -> None:
        request.future.set_exception(error)
        self._metrics.record_failed()

    def _multi(self, runner: Runner, ready: list[tuple[Request, int]], x: np.ndarray) -> Sequence["torch.Tensor"]:
        import torch

        idx = torch.from_numpy(np.fromiter([i for _, i in ready], np.int64, len(ready)))  # (torch.tensor(list): 4x)
        rows = [r.rows for r, _ in ready]
        if len(rows) != len(x):
            idx = idx.repeat_interleave(torch.tensor(rows))
        y = runner.run_multi(idx, runner.batch([x]))
        self._metrics.record_batch(len(ready), len(x))
        return _unstack(y, ready, rows)

    def _per_model(self, runner: Runner, ready: list[tuple[Request, int]]) -> list["torch.Tensor"]:
        groups: dict[int, list[int]] = {}
        for j, (_, i) in enumerate(ready):
            groups.setdefault(i, []).append(j)
        outputs: list[Any] = [None] * len(ready)
        for i, members in groups.items():
            group = [ready[j] for j in members]
            rows = [r.rows for r, _ in group]
            y = runner.run_one(i, runner.batch([r.x for r, _ in group]))
            self._metrics.record_batch(len(members), sum(rows))
            for j, out in zip(members, _unstack(y, group, rows)):
                outputs[j] = out
        return outputs

    def _deliver(self, runner: Runner, ready: list[tuple[Request, int]], outputs: Sequence["torch.Tensor"]) -> None:
        now = time.perf_counter()
        cache = self.cache.enabled and runner is self._runner  # answers of a replaced version are not kept
        latencies = []
        waiting: list[Answer] = []  # predict callers, woken as one chain (see Answer)
        values: list[Prediction] = []
        ref = runner.ref
        for (r, _), y in zip(ready, outputs):
            latency = now - (r.t_submit if r.t_arrival is None else r.t_arrival)
            if cache and r.digest is not None:
                self.cache.put((ref.id, r.model, r.digest), y)
            prediction = Prediction(r.model, ref, y, False, latency, now)
            if type(r.future) is Answer:
                waiting.append(r.future)
                values.append(prediction)
            else:
                r.future.set_result(prediction)
            latencies.append(latency)
        if waiting:
            self.queue.hand_over(waiting, values)
        self._metrics.record(latencies, done=now)

    # -- metrics -------------------------------------------------------------------------------------
    def metrics(self, window_s: float = 10.0, since: float | None = None, until: float | None = None,
                label: str | None = None) -> dict[str, Any]:
        """Throughput and latency p50/p95/p99 (ms) of the answers in one time window — the last
        ``window_s`` seconds, or ``[since, until]`` in ``time.perf_counter()`` time — named under
        ``window`` with its length; queue depth, batch-size histogram (requests per model call), cache
        hit rate and the version served. A load run's window: ``last_load`` (see ``load_metrics``)."""
        self._metrics.record_depth(self.queue.peak)
        snap = self._metrics.snapshot(window_s, len(self.queue), self.cache.hits, self.cache.misses,
                                      since, until, label)
        runner = self._runner
        return {
            "set": f"{self.name}@latest" if self.follow else str(runner.ref),
            "version": str(runner.ref),
            "versions_served": len(self.history),
            "batching": self.batching if runner.multi_error is None else "model (multi failed)",
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait_ms,
            "max_wait_auto": self.auto_wait,
            "models": len(runner.names),
            "cache_size": len(self.cache),
            **snap,
        }

    def load_metrics(self) -> dict[str, Any] | None:
        """``metrics()`` over the window of the last load run (None before any): the numbers its
        ``LoadResult`` reports, from the same answers."""
        span = self.last_load
        return None if span is None else self.metrics(since=span.start, until=span.end, label=span.label)

    # -- HTTP and lifetime ---------------------------------------------------------------------------
    def http(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None) -> "HTTPEndpoint":
        """Serve this server over HTTP too (see ``mm_jupyter.serving.http``); port 0 picks a free port.
        Returns the endpoint (``.url``, ``.token``); it stops when the server closes."""

        if self._closed:
            raise ServerClosedError("the server is closed")
        if self._http is not None:
            return self._http
        self._http = HTTPEndpoint(self, host=host, port=port, token=token)
        return self._http

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, drain: bool = True, timeout: float | None = 30.0) -> None:
        """Stop: no new requests; queued ones are answered (``drain``) or fail with ServerClosedError."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._http is not None:
            self._http.close()
        self.queue.close()
        if not drain:
            for r in self.queue.drain():
                r.future.set_exception(ServerClosedError("the server was closed before answering"))
        self._worker.join(timeout)
        if self._watcher is not None:
            self._watcher.join(timeout)
        with self._switch:
            self._runner.close()
            self._store.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        target = f"{self.name}@latest -> {self.version}" if self.follow else str(self.version)
        return (f"Server({target}, {len(self._runner.names)} models, {state}; batching {self.batching}, "
                f"max_batch {self.max_batch}, max_wait {self.max_wait_ms:g} ms, cache {self.cache.size})")


def auto_wait_ms(runner: Runner, multi: bool) -> float:
    """The default hold of a forming batch: one batch's fixed cost (one row through the batched call,
    measured), at most 2 ms. Holding a batch longer than that delays the requests already in it by
    more than a separate batch for the latecomers costs; holding it that long is what lets a busy
    server's batches fill. Closed-loop callers (threads waiting in ``predict``) never gain from a
    hold: the requests that can come are already queued."""
    try:
        return min(2.0, runner.batch_cost(multi) * 1e3)
    except Exception:  # noqa: BLE001 - a model that fails on zeros fails its real requests clearly; hold 2 ms
        return 2.0


def _unstack(y: "torch.Tensor", requests: Sequence[tuple[Request, int]], rows: list[int]) -> Sequence["torch.Tensor"]:
    """Each request's part of a batched output: one item for a single-item request, else its rows."""
    if len(y) == len(requests) and all(r.single for r, _ in requests):
        return y.unbind(0)  # one view per request in one call (the common case: one item each)
    parts = y.split(rows)
    return [part[0] if r.single else part for (r, _), part in zip(requests, parts)]


def serve(store: "Store | str | os.PathLike[str] | None", ref: "SetRef | str", *, batching: str = "multi",
          max_batch: int = 256, max_wait_ms: float | None = None, cache_size: int = 10_000, max_queue: int = 10_000,
          max_modules: int = 1024, max_rows: int = 4096, input_shape: Sequence[int] | None = None,
          watch_s: float | None = 1.0, trust_code: bool | None = None) -> Server:
    """Serve the models of a stored set: a request queue with dynamic batching, a prediction cache and metrics.

    Args:
        store: a ``Store``, its folder or URL (None: ``$MM_JUPYTER_STORE`` or ``./.mm_store``); never created.
        ref: ``"name"`` or ``"name@latest"`` follows new versions; ``"name@3"`` or a ``SetRef`` is pinned.
        batching: ``"multi"`` (requests for different models share a batch), ``"model"`` (one model per batch)
            or ``"none"`` (one request at a time).
        max_batch: rows per batch at most.
        max_wait_ms: the longest a batch that formed while the worker was busy is held back to fill
            (from its oldest request's arrival); a request that finds the worker idle never waits (the
            worker is busy, too, while it hands a batch's answers to waiting ``predict`` callers, who
            come back with more: that hand-over is waited for, at most max(max_wait_ms, 2 ms)).
            None (default): the fixed cost of one batch, measured when a version is loaded (``auto_wait_ms``).
        cache_size: answers kept for repeated requests (0: no cache).
        max_queue: requests waiting before ``submit`` rejects one with ``QueueFullError``.
        max_modules: built modules kept for the ``model`` and ``none`` modes (0: build per request).
        max_rows: rows a single request may hold.
        input_shape: the shape of one item (inferred when the first layer is ``nn.Linear``).
        watch_s: how often the catalog is polled while following the latest version (None: only ``refresh()``).
        trust_code: whether code recorded in the store may run to build the models (default: the store's).

    Returns:
        A running ``Server``: ``predict(model, x)``, ``submit``, ``metrics()``, ``http()``, ``close()``.

    Raises:
        RefError: no store at that location, or no such set or version.
        ServeError: a bad option.

    Example:
        >>> server = mm.serve(store, "cells@latest", max_batch=256)
        >>> server.predict("cell-17", x).output
    """
    return Server(store, ref, batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                  cache_size=cache_size, max_queue=max_queue, max_modules=max_modules, max_rows=max_rows,
                  input_shape=input_shape, watch_s=watch_s, trust_code=trust_code)
