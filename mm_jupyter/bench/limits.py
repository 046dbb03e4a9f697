"""``python -m mm_jupyter.bench limits``: every hot path of the product beside its physical limit.

One run measures each path and the least work that path needs, interleaved: each round runs every
path and then its limit, so both see the same machine load. A path's number is the median over the
rounds (min–max beside it); the ratio is path / limit (for throughputs: path / limit of the rate),
judged against the goal. The load average is printed before and after, because on a shared machine
it decides how far the numbers can be trusted.

Paths (one store of ``models`` FFNN-48 models, one torch thread throughout):

* **save** — Baseline save into a fresh store, against one ``safetensors`` write of the same
  parameter bytes as a flat buffer + fsync;
* **update save** — an Update save of one U3-like step (``update_rate`` of the models changed:
  half of them every tensor, half only the last layer) on top of an Update save of the set, against
  a Baseline save of the same step into a fresh store;
* **one small save** — the median of ``small_saves`` Baseline saves of one 2-layer MLP into one
  store, minus the median write + fsync of its bytes as one ``safetensors`` file: the fixed cost
  (catalog commit, manifest, ref, folder fsyncs), judged in absolute seconds;
* **every model as a module** — ``list(ms)`` against constructing each model and ``load_state_dict``,
  each kept in a list as ``list(ms)`` keeps its models (the collector's full passes walk what is kept:
  with 5,000 kept models they are half of either loop's time);
* **serving, client threads** — ``threads`` Python threads calling ``server.predict`` for random
  models, against the plain loop ``ms[n](x)`` one request at a time;
* **serving, a burst** — ``requests`` requests submitted at once, then all answers awaited, against
  the batched compute alone: gather + ``baddbmm`` over the stacked weights at batch 256 (the note
  beside it: the same requests through one ``submit_many`` call);
* **proxy scoring** — the linear proxy over a successive-halving schedule of ``proxy_models``
  candidates × ``proxy_items`` items with 512-wide features (ResNet-18's; synthetic, 10 classes),
  the survivors of each rung scored together; the goal is absolute (seconds); one candidate at a
  time is shown as the reference;
* **Ray Serve** (when ``ray[serve]`` is installed; see ``bench.rayserve``) — requests over HTTP to
  our endpoint and to a Ray Serve deployment with ``@serve.batch`` of the same models.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_OUT = Path("bench_results") / "limits"
#: the parts a run may be limited to (``only``): saves (Baseline, Update, one small), list(ms),
#: serving in-process (threads, burst), proxy scoring, Ray Serve over HTTP
SECTIONS = ("save", "list", "serving", "proxy", "ray")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Goal:
    """What a path is judged by: ``ratio`` (path/limit) ``<=``/``>=`` ``threshold``, or seconds."""

    path: str
    limit: str
    comparison: str
    threshold: float
    unit: str  # "x": a ratio of times or rates, "s": absolute seconds of the path


GOALS = [
    Goal("Baseline save", "flat write + fsync", "<=", 1.3, "x"),
    Goal("Update save (one step)", "Baseline save of the step", "<=", 1.0, "x"),
    Goal("one small save: fixed cost", "write + fsync of its bytes", "<=", 0.005, "s"),
    Goal("list(ms)", "construct + load_state_dict", "<=", 0.3, "x"),
    Goal("serving: client threads predict", "plain loop ms[n](x)", ">=", 3.0, "x"),
    Goal("serving: burst submitted at once", "gather + baddbmm, batch 256", ">=", 0.25, "x"),
    Goal("proxy scoring, rungs together", "(one candidate at a time)", "<=", 1.0, "s"),
    Goal("HTTP: ours at Ray Serve's p99", "Ray Serve @serve.batch", ">=", 2.0, "x"),
]


@dataclass
class LimitsResult:
    rows: list[dict[str, Any]]
    config: dict[str, Any]
    load: dict[str, Any]
    seconds: float
    files: list[str] = field(default_factory=list)


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def _sync_then(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn``, started with no garbage and no dirty pages pending (its fsyncs are its own)."""
    gc.collect()
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_models(models: Sequence[Any], update_rate: float, seed: int = 0) -> list[Any]:
    """A U3-like step: ``update_rate`` of the models changed (first half every tensor, second half the
    last layer only), the others the same module objects."""
    import torch

    from .modelsets import choose_updates

    full, partial = choose_updates(len(models), update_rate, 1, seed)
    out = list(models)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in full + partial:
            m = copy.deepcopy(models[i])
            params = list(m.parameters()) if i in full else list(m[-1].parameters())
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            out[i] = m
    return out


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def run_limits(models: int = 5000, rounds: int = 3, update_rate: float = 0.05, threads: int = 8,
               requests: int = 4000, plain_requests: int = 1000, proxy_models: int = 35, proxy_items: int = 2000,
               small_saves: int = 20, ray_serve: bool = True, seed: int = 0,
               out: str | os.PathLike[str] | None = DEFAULT_OUT, only: Sequence[str] | None = None,
               progress: Progress = lambda m: None) -> LimitsResult:
    """Measure every path and its limit ``rounds`` times, interleaved; see the module docstring.
    ``only``: a subset of ``SECTIONS`` to measure (default: all)."""
    parts = set(SECTIONS if only is None else only)
    if not parts or parts - set(SECTIONS):
        raise ValueError(f"only: choose from {', '.join(SECTIONS)}, not {sorted(parts - set(SECTIONS)) or 'nothing'}")
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from ..store.files import fsync_path
    from ..store.store import Store
    from ..usecases.models import ffnn
    from ..usecases.training import initial_models
    from .modelsets import _flat_bytes

    t_start = time.perf_counter()
    load_before = _load()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="mm_bench_limits_"))
    times: dict[str, list[float]] = {}

    def note(key: str, value: float) -> None:
        times.setdefault(key, []).append(value)

    froze = False
    try:
        progress(f"building {models} FFNN-48 models and one update step ({update_rate:.0%} changed)")
        base = initial_models(models, seed=seed)
        step = step_models(base, update_rate, seed) if "save" in parts else base
        flat = _flat_bytes(base if "save" in parts else base[:1])
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, models, max(requests, plain_requests, 4000)).tolist()
        xs = torch.from_numpy(rng.standard_normal((len(ids), 5)).astype(np.float32))
        proxy_work = _proxy_workload(proxy_models, proxy_items, seed) if "proxy" in parts else []
        # the workload (10,000 modules of the set and its step) lives for the whole run: frozen out of the
        # collector's full passes, which would otherwise rescan it inside every timed path and its limit
        froze = gc.get_freeze_count() == 0
        if froze:
            gc.collect()
            gc.freeze()
        for r in range(rounds):
            progress(f"round {r + 1}/{rounds} (load average {_load()[0]:.1f})")
            # -- saving --------------------------------------------------------------------------
            store = Store(root / f"r{r}-baseline")
            if "save" in parts:
                note("save", _sync_then(lambda: store.save_set(base, "cells", approach="baseline")))
                flat_path = root / f"r{r}-flat.safetensors"

                def write_flat() -> None:
                    save_file({"params": flat}, str(flat_path))
                    fsync_path(flat_path)

                note("save limit", _sync_then(write_flat))
                flat_path.unlink()
                upd = Store(root / f"r{r}-update")
                upd.save_set(base, "cells", approach="update")
                note("update", _sync_then(lambda: upd.save_set(step, "cells", approach="update")))
                upd.close()
                other = Store(root / f"r{r}-step-baseline")
                note("update limit", _sync_then(lambda: other.save_set(step, "cells", approach="baseline")))
                other.close()
                small, bytes_only = _small_save(root / f"r{r}-small", small_saves)
                note("small fixed", small - bytes_only)
                note("small bytes", bytes_only)
            elif parts & {"list", "serving"}:
                store.save_set(base, "cells", approach="baseline")
            # -- every model as a module -------------------------------------------------------------
            if "list" in parts:
                ms = store.recover_set("cells").load()
                with torch.no_grad():
                    t0 = time.perf_counter()
                    recovered = list(ms)
                    note("list", time.perf_counter() - t0)
                    del recovered
                    t0 = time.perf_counter()
                    constructed = [_constructed(ffnn, ms.state_dict(i)) for i in range(len(ms))]
                    note("list limit", time.perf_counter() - t0)
                    del constructed
                ms.close()
            if "serving" in parts:
                _serving_round(store, ids, xs, threads, requests, plain_requests, note)
            store.close()
            # -- proxy scoring ------------------------------------------------------------------------
            if "proxy" in parts:
                together, alone, same = _proxy_times(proxy_work)
                note("proxy", together)
                note("proxy alone", alone)
                note("proxy scores differ", float(not same))
            for name in (f"r{r}-baseline", f"r{r}-update", f"r{r}-step-baseline"):
                shutil.rmtree(root / name, ignore_errors=True)
        ray_row = None
        if ray_serve and "ray" in parts:
            from .rayserve import available, compare

            if available():
                progress("Ray Serve beside our HTTP endpoint (same models, same client)")
                store = Store(root / "serve")
                store.save_set(base, "cells", approach="baseline")
                store.close()
                ray_row = compare(root / "serve", "cells", ids, xs, progress=progress)
            else:
                progress("Ray Serve is not installed (pip install 'ray[serve]'): its row is skipped")
    finally:
        if froze:
            gc.unfreeze()
        torch.set_num_threads(threads_before)
        shutil.rmtree(root, ignore_errors=True)
    rows = _rows(times, ray_row)
    config = {"sections": sorted(parts), "models": models, "rounds": rounds, "update_rate": update_rate,
              "threads": threads, "requests": requests, "plain_requests": plain_requests, "proxy_models": proxy_models,
              "proxy_items": proxy_items, "small_saves": small_saves, "torch_threads": 1, "seed": seed}
    load = {"before": load_before, "after": _load(), "cpus": os.cpu_count(), "machine": machine()}
    result = LimitsResult(rows, config, load, time.perf_counter() - t_start)
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps({"experiment": "limits", "rows": rows, "config": config,
                                                       "load": load, "seconds": result.seconds}, indent=1))
        result.files = [str(path / "results.json")]
    return result


def _serving_round(store: Any, ids: list[int], xs: Any, threads: int, requests: int, plain_requests: int,
                   note: Callable[[str, float], None]) -> None:
    """One round of the serving rows: the plain loop, client threads, a burst, its limit."""
    import torch

    from ..serving.server import serve

    ms = store.recover_set("cells").load()
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        for j in range(plain_requests):
            ms[ids[j]](xs[j : j + 1])
        note("plain rps", _rate(plain_requests, time.perf_counter() - t0))
        note("plain cpu", (time.process_time() - c0) / plain_requests)
    ms.close()
    server = serve(store, "cells", cache_size=0, watch_s=None)
    try:
        server.warm()
        for j in range(200):
            server.predict(ids[j], xs[j])
        c0, b0 = time.process_time(), server.metrics()["batches"]
        note("threads rps", _client_threads(server, ids, xs, threads, requests))
        note("threads cpu", (time.process_time() - c0) / requests)  # every thread of the process
        note("threads batch", requests / max(1, server.metrics()["batches"] - b0))
        t0, c0 = time.perf_counter(), time.process_time()
        futures = [server.submit(ids[j], xs[j]) for j in range(requests)]
        for f in futures:
            f.result(120)
        note("burst rps", _rate(requests, time.perf_counter() - t0))
        note("burst cpu", (time.process_time() - c0) / requests)
        t0, c0 = time.perf_counter(), time.process_time()
        for f in server.submit_many(ids[:requests], xs[:requests]):
            f.result(120)
        note("burst many rps", _rate(requests, time.perf_counter() - t0))
        note("burst many cpu", (time.process_time() - c0) / requests)
        c0 = time.process_time()
        note("compute rps", _batched_compute(server, ids, xs, requests))
        note("compute cpu", (time.process_time() - c0) / requests)
    finally:
        server.close()


def _client_threads(server: Any, ids: list[int], xs: Any, threads: int, requests: int) -> float:
    """Answers per second of ``threads`` threads each calling ``predict`` for its share of requests."""
    start = threading.Barrier(threads + 1)

    def client(k: int) -> None:
        start.wait()
        for j in range(k, requests, threads):
            server.predict(ids[j], xs[j])

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    return _rate(requests, time.perf_counter() - t0)


def _batched_compute(server: Any, ids: list[int], xs: Any, requests: int, batch: int = 256) -> float:
    """Rows per second of the multi-model batched call alone (gather + baddbmm), batches of ``batch``."""
    import torch

    runner = server._runner
    idx, x = torch.tensor(ids[:requests], dtype=torch.int64), xs[:requests]
    t0 = time.perf_counter()
    for s in range(0, requests, batch):
        runner.run_multi(idx[s : s + batch], x[s : s + batch])
    return _rate(requests, time.perf_counter() - t0)


def _proxy_workload(models: int, items: int, seed: int, width: int = 512, classes: int = 10,
                    test_fraction: float = 0.2) -> list[tuple[list[tuple[Any, Any]], Any, Any]]:
    """Per rung of successive halving: (the survivors' (train, test) features, train labels, test labels),
    synthetic features whose informativeness differs by candidate."""
    import torch

    from ..modelsearch.api import MIN_RUNG_ITEMS
    from ..modelsearch.halving import schedule

    gen = torch.Generator().manual_seed(seed)
    n_test = int(round(items * test_fraction))
    n_train = items - n_test
    y = torch.randint(0, classes, (items,), generator=gen)
    means = torch.randn(classes, width, generator=gen)
    feats = [means[y] * (0.05 + 0.5 * c / models) + torch.randn(items, width, generator=gen) for c in range(models)]
    work = []
    survivors = list(range(models))
    for rung in schedule(models, 1, n_train, 2, True):
        rows = max(rung.items, min(n_train, MIN_RUNG_ITEMS))
        work.append(([(feats[c][:rows], feats[c][n_train:]) for c in survivors], y[:rows], y[n_train:]))
        survivors = survivors[len(survivors) - rung.keep :]  # the most informative survive
    return work


def _proxy_times(work: list[tuple[list[tuple[Any, Any]], Any, Any]]) -> tuple[float, float, bool]:
    """Seconds of scoring every rung's survivors together and one candidate at a time, and whether
    both gave the same scores."""
    from ..modelsearch.proxies import linear_proxy, score_many

    t0 = time.perf_counter()
    together = [score_many("linear", pairs, ty, vy) for pairs, ty, vy in work]
    t_together = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [[linear_proxy(tx, ty, vx, vy) for tx, vx in pairs] for pairs, ty, vy in work]
    t_alone = time.perf_counter() - t0
    return t_together, t_alone, together == alone


def _constructed(build: Callable[[], "nn.Module"], state: dict[str, "torch.Tensor"]) -> "nn.Module":
    """A model built by its constructor and ``load_state_dict`` (the limit of materialising one)."""
    model = build()
    model.load_state_dict(state)
    return model


def _small_save(root: Path, n: int) -> tuple[float, float]:
    """Median seconds of one small model's Baseline save and of writing + fsyncing its bytes alone."""
    from safetensors.torch import save_file
    from torch import nn

    from ..store.files import fsync_path
    from ..store.store import Store

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    store = Store(root)
    store.save_set([model], "warm", approach="baseline")
    saves, writes = [], []
    for i in range(n):
        flat = root / f"flat{i}.safetensors"

        def save(name: str = f"m{i}") -> None:
            store.save_set([model], name, approach="baseline")

        def write(flat: Path = flat) -> None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(flat))
            fsync_path(flat)

        saves.append(_sync_then(save))
        writes.append(_sync_then(write))
    store.close()
    shutil.rmtree(root, ignore_errors=True)
    return statistics.median(saves), statistics.median(writes)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _rows(times: dict[str, list[float]], ray_row: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per goal: the path's and the limit's median (min–max), the ratio, PASS/FAIL."""
    pairs = {  # goal path -> (path key, limit key, unit of the numbers, ratio of rates?)
        "Baseline save": ("save", "save limit", "s", False),
        "Update save (one step)": ("update", "update limit", "s", False),
        "one small save: fixed cost": ("small fixed", "small bytes", "s", False),
        "list(ms)": ("list", "list limit", "s", False),
        "serving: client threads predict": ("threads rps", "plain rps", "req/s", True),
        "serving: burst submitted at once": ("burst rps", "compute rps", "req/s", True),
        "proxy scoring, rungs together": ("proxy", "proxy alone", "s", False),
    }
    rows = []
    for goal in GOALS:
        if goal.path in pairs:
            key, limit_key, unit, _ = pairs[goal.path]
            if key not in times:
                continue
            path, limit = _stats(times[key]), _stats(times[limit_key])
            ratio = path["median"] / limit["median"] if limit["median"] else None
        elif ray_row is not None:
            path, limit, unit = ray_row["ours"], ray_row["ray"], "req/s"
            ratio = ray_row["ratio"]
        else:
            continue
        measured = path["median"] if goal.unit == "s" else ratio
        passed = None if measured is None else (measured <= goal.threshold if goal.comparison == "<="
                                                else measured >= goal.threshold)
        if goal.path.startswith("proxy") and any(times.get("proxy scores differ", [])):
            passed = False  # faster but different scores is never a pass
        note = ""
        if goal.path.startswith("serving: burst") and ratio:  # what a request costs beyond its arithmetic
            # judged: one submit() per request (as independent callers send them); beside it the same
            # requests through one submit_many call, and CPU per request, which load does not tilt
            beyond = 1e6 / path["median"] - 1e6 / limit["median"]
            note = f"judged on one submit() per request: {beyond:.0f} µs per request beyond the batched compute"
            if "burst many rps" in times:  # the same requests through one submit_many call
                many = _stats(times["burst many rps"])["median"]
                verdict = "would PASS" if many / limit["median"] >= goal.threshold else "would FAIL"
                note += (f"; one submit_many of the same requests: {many:,.0f} req/s = {many / limit['median']:.2f}x "
                         f"({verdict}), {1e6 / many - 1e6 / limit['median']:.0f} µs")
            if "burst cpu" in times:
                one, many_cpu, row = (_stats(times[k])["median"] * 1e6 for k in ("burst cpu", "burst many cpu",
                                                                                  "compute cpu"))
                note += (f"; CPU per request: submit {one:.1f} µs, submit_many {many_cpu:.1f} µs, the batched "
                         f"compute {row:.1f} µs per row (= {row / one:.2f}x, {row / many_cpu:.2f}x)")
        elif goal.path.startswith("serving: client threads") and "threads cpu" in times:
            # CPU time per answer (all threads) is the comparison machine load does not tilt: a loaded
            # machine slows the one-thread plain loop more than the server's many threads
            cpu, plain_cpu = _stats(times["threads cpu"])["median"], _stats(times["plain cpu"])["median"]
            note = (f"CPU per answer {cpu * 1e6:.0f} µs (all threads) vs {plain_cpu * 1e6:.0f} µs plain "
                    f"= {plain_cpu / cpu:.2f}x; {_stats(times['threads batch'])['median']:.1f} requests per batch")
        elif goal.path.startswith("HTTP") and ray_row is not None:
            note = (f"at p99 <= {ray_row['p99_bound_ms']:.1f} ms (Ray Serve's p99 at its best throughput, "
                    f"batch wait {ray_row['ray_wait_ms']:g} ms)")
        rows.append({"path": goal.path, "note": note, "limit_name": goal.limit, "unit": unit, "path_stats": path,
                     "limit_stats": limit, "ratio": ratio, "goal": f"{goal.comparison} {goal.threshold:g}"
                     f"{'x' if goal.unit == 'x' else ' s'}", "status": {True: "PASS", False: "FAIL",
                                                                       None: "SKIP"}[passed]})
    return rows


def machine() -> str:
    """The CPU model and core count, for the table's heading."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def format_number(stats: dict[str, float], unit: str) -> str:
    def fmt(v: float) -> str:
        return f"{v:,.0f}" if unit == "req/s" else f"{v:.3f}"

    return f"{fmt(stats['median'])} ({fmt(stats['min'])}–{fmt(stats['max'])}) {unit}"


def format_limits(result: LimitsResult) -> str:
    """The roofline table as Markdown (also printed by the command)."""
    lines = ["| path | measured: median (min–max) | limit | limit: median (min–max) | ratio | goal | |",
             "|---|---|---|---|---|---|---|"]
    for row in result.rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        lines.append(f"| {row['path']} | {format_number(row['path_stats'], row['unit'])} | {row['limit_name']} | "
                     f"{format_number(row['limit_stats'], row['unit'])} | {ratio} | {row['goal']} | "
                     f"{row['status']} |")
    notes = [f"* {row['path']}: {row['note']}" for row in result.rows if row.get("note")]
    return "\n".join(lines + ([""] + notes if notes else []))
