"""Ray Serve beside our HTTP endpoint: the same models, the same client, p99 matched.

What users would pick instead of ``mm.serve``: a Ray Serve deployment whose method is wrapped in
``@serve.batch``. For a fair comparison both sides compute with the same code — the deployment holds
our ``Runner`` of the same stored set and answers each Ray batch with one ``run_multi`` call (gather +
``baddbmm`` over the stacked weights), exactly what our worker does — so the comparison is of the
serving machinery: HTTP, queueing, batching and hand-offs. Both run outside the client's process
(ours in a subprocess, Ray in its actors), both warm, one torch thread each, and the client is the
same: ``connections`` closed-loop keep-alive HTTP connections sending ``{"model", "x"}`` JSON bodies.

Equal p99: each side runs at several client concurrencies; the bound is Ray Serve's p99 at its
highest throughput, and each side's number is its highest throughput with p99 within that bound.
Each side batches with its own default hold (ours: one batch's measured cost, ``max_wait_ms=None``);
Ray Serve runs with ``batch_wait_timeout_s`` of ``wait_ms`` and of 0 (take what is queued), and its
better curve counts, so neither side's number rests on a hold chosen for the other.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Sequence

#: client concurrencies (closed-loop connections) of each curve
LEVELS = (2, 8, 32)


def available() -> bool:
    """Whether Ray Serve can be imported (``pip install 'mm_jupyter[rayserve]'``)."""
    return find_spec("ray") is not None and find_spec("ray.serve") is not None and find_spec("grpc") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_curve(host: str, port: int, path: str, headers: dict[str, str], ids: Sequence[int], xs: Any,
               connections: int, seconds: float) -> dict[str, Any]:
    """``connections`` threads, each a keep-alive connection sending one request after the other for
    ``seconds``: answers per second and latency percentiles (ms). Every answer is checked for a ``y``."""
    import numpy as np

    bodies = [json.dumps({"model": str(i), "x": [float(v) for v in xs[j]]}).encode() for j, i in enumerate(ids)]
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    start = threading.Barrier(connections + 1)
    stop = threading.Event()

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=60)
        start.wait()
        j = k
        while not stop.is_set():
            t0 = time.perf_counter()
            conn.request("POST", path, bodies[j % len(bodies)], {"Content-Type": "application/json", **headers})
            reply = conn.getresponse()
            data = reply.read()
            if reply.status != 200 or b'"y"' not in data:
                errors[k] += 1
            latencies[k].append(time.perf_counter() - t0)
            j += connections
        conn.close()

    workers = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(connections)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join(120)
    took = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies]) * 1e3
    return {"connections": connections, "rps": len(lat) / took, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "answered": int(len(lat)), "errors": int(sum(errors))}


def _curve(host: str, port: int, path: str, headers: dict[str, str], ids: Sequence[int], xs: Any,
           seconds: float, progress: Callable[[str], None], label: str) -> list[dict[str, Any]]:
    load_curve(host, port, path, headers, ids, xs, 2, min(1.0, seconds))  # warm-up, not measured
    out = []
    for level in LEVELS:
        step = load_curve(host, port, path, headers, ids, xs, level, seconds)
        progress(f"{label}, {level} connections: {step['rps']:,.0f} answers/s, p99 {step['p99_ms']:.1f} ms"
                 + (f", {step['errors']} errors" if step["errors"] else ""))
        out.append(step)
    return out


def _ours(store: Path, ref: str) -> tuple[subprocess.Popen[str], str, int, str]:
    """Our server with its HTTP endpoint, in its own process (like Ray's replica)."""
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "mm_jupyter.bench.rayserve", str(store), ref],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    info = json.loads(line)
    return proc, info["host"], int(info["port"]), info["token"]


def _serve_ours(store: str, ref: str) -> None:
    """The subprocess: serve, print where, run until stdin closes."""
    import torch

    from mm_jupyter.serving.server import serve

    torch.set_num_threads(1)
    server = serve(store, ref, cache_size=0, watch_s=None)
    server.warm()
    endpoint = server.http()
    print(json.dumps({"host": endpoint.host, "port": endpoint.port, "token": endpoint.token}), flush=True)
    sys.stdin.read()
    server.close()


def _ray_app(store: str, ref: str, max_batch: int, wait_s: float) -> Any:
    from ray import serve

    @serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 1})
    class Stacked:
        def __init__(self) -> None:
            import torch

            from mm_jupyter.serving.runner import Runner
            from mm_jupyter.store.store import Store

            torch.set_num_threads(1)
            self.runner = Runner(Store(store).recover_set(ref))
            self.runner.prepare_multi()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def predict(self, items: list[tuple[int, list[float]]]) -> list[list[float]]:
            import torch

            idx = torch.tensor([i for i, _ in items], dtype=torch.int64)
            x = torch.tensor([x for _, x in items], dtype=torch.float32)
            out: list[list[float]] = self.runner.run_multi(idx, x).tolist()
            return out

        async def __call__(self, request: Any) -> dict[str, Any]:
            body = await request.json()
            y = await self.predict((self.runner.index[str(body["model"])], body["x"]))
            return {"model": body["model"], "y": y}

    return Stacked.bind()  # type: ignore[attr-defined]


def compare(store: Path, ref: str, ids: Sequence[int], xs: Any, seconds: float = 3.0, max_batch: int = 256,
            wait_ms: float = 2.0, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Throughput of our endpoint and of Ray Serve at Ray Serve's p99 (see the module docstring)."""
    import ray
    from ray import serve

    proc, host, port, token = _ours(store, ref)
    try:
        ours = _curve(host, port, "/predict", {"Authorization": f"Bearer {token}"}, ids, xs, seconds, progress,
                      "ours")
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(60)
    ray_port = _free_port()
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    curves: dict[float, list[dict[str, Any]]] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
        for wait in dict.fromkeys((wait_ms, 0.0)):
            serve.run(_ray_app(str(store), ref, max_batch, wait / 1e3), route_prefix="/predict")
            curves[wait] = _curve("127.0.0.1", ray_port, "/predict", {}, ids, xs, seconds, progress,
                                  f"Ray Serve (batch wait {wait:g} ms)")
    finally:
        serve.shutdown()
        ray.shutdown()
    ray_wait, theirs = max(curves.items(), key=lambda kv: max(s["rps"] for s in kv[1]))
    best = max(theirs, key=lambda s: s["rps"])
    bound = best["p99_ms"]
    ours_rps = max((s["rps"] for s in ours if s["p99_ms"] <= bound and not s["errors"]), default=0.0)
    ray_rps = max(s["rps"] for s in theirs if s["p99_ms"] <= bound)
    return {"ours": {"median": ours_rps, "min": ours_rps, "max": ours_rps},
            "ray": {"median": ray_rps, "min": ray_rps, "max": ray_rps},
            "ratio": ours_rps / ray_rps if ray_rps else None, "p99_bound_ms": bound, "ray_wait_ms": ray_wait,
            "curves": {"ours": ours, **{f"ray, batch wait {w:g} ms": c for w, c in curves.items()}}}


if __name__ == "__main__":
    _serve_ours(sys.argv[1], sys.argv[2])
