"""Serving a stored set in-process: batched answers equal single-model answers, the cache, back-pressure,
following ``name@latest`` under load, clear errors, metrics and shutdown."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch
from serve_models import held

import mm_jupyter as mm
from mm_jupyter.serving import BadInputError, QueueFullError, ServerClosedError, UnknownModelError
from mm_jupyter.serving.runner import ATOL, RTOL
from mm_jupyter.usecases.models import cnn, ffnn, seeded_models

N = 48


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.fixture
def cells(store):
    """A store with 'cells' v1: 48 seeded FFNN-48 models, baseline."""
    store.save_set(seeded_models(ffnn, N, hidden=48), "cells")
    return store


def _retrained(store, name: str = "cells") -> list[torch.nn.Module]:
    """The latest version's models with every last-layer bias moved by +1 (outputs change by +1)."""
    ms = store.recover_set(name)
    models = [ms[i] for i in range(len(ms))]
    with torch.no_grad():
        for m in models:
            m[-1].bias.add_(1.0)
    return models


def test_import_stays_light_and_serve_is_a_plain_function():
    code = ("import sys, inspect, types, mm_jupyter as mm; import mm_jupyter.serving.errors as e; "
            "assert isinstance(mm.serve, types.FunctionType) and isinstance(mm.search, types.FunctionType); "
            "assert {'max_batch', 'max_wait_ms', 'cache_size'} <= set(inspect.signature(mm.serve).parameters); "
            "assert {'k', 'approach', 'cache_budget', 'executor'} <= set(inspect.signature(mm.search).parameters); "
            "assert 'Args:' in mm.serve.__doc__ and 'Example:' in mm.search.__doc__; "
            "assert issubclass(e.QueueFullError, mm.ServeError); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("batching", ["multi", "model", "none"])
def test_batched_answers_equal_single_model_answers(cells, batching):
    ms = cells.recover_set("cells")
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(3 * N, 5, generator=gen)
    with mm.serve(cells, "cells@latest", batching=batching, max_wait_ms=200, max_batch=4 * N,
                  cache_size=0) as server:
        with held(server):  # the requests queue up while the worker is busy, then form batches
            futures = [server.submit(str(j % N), xs[j]) for j in range(3 * N)]
            futures.append(server.submit("5", xs[:7]))            # several rows for one model
        answers = [f.result(30) for f in futures]
        metrics = server.metrics()
    for j, a in enumerate(answers[:-1]):
        assert a.model == str(j % N) and str(a.version) == "cells@1" and not a.cached
        assert close(a.output, ms[j % N](xs[j : j + 1])[0]), j
    assert answers[-1].output.shape == (7, 1) and close(answers[-1].output, ms[5](xs[:7]))
    sizes = metrics["batch_sizes"]
    assert sum(k * v for k, v in sizes.items()) == 3 * N + 2  # (+1: the request the worker was held on)
    if batching == "multi":  # requests for different models shared one call
        assert max(sizes) > N
    elif batching == "model":  # one call per model: its requests together
        assert max(sizes) >= 3
    else:
        assert set(sizes) == {1}


def test_multi_model_paths_chain_vmap_and_fallback(store):
    """FFNN sets run as a baddbmm chain; other architectures through vmap; a model vmap cannot batch
    falls back to per-model calls. All three agree with ms[i](x)."""
    from serve_models import ItemNet

    store.save_set(seeded_models(cnn, 6, classes=3), "cnns")
    torch.manual_seed(0)
    store.save_set([ItemNet() for _ in range(4)], "items")
    gen = torch.Generator().manual_seed(2)
    for name, shape, n, path in (("cnns", (3, 8, 8), 6, "vmap"), ("items", None, 4, "fallback")):
        ms = store.recover_set(name)
        xs = torch.randn(2 * n, *(shape or (5,)), generator=gen)
        with mm.serve(store, name, input_shape=shape, max_wait_ms=200, max_batch=2 * n) as server:
            answers = [f.result(30) for f in [server.submit(j % n, xs[j]) for j in range(2 * n)]]
            runner = server._runner
            assert runner.layers is None
            assert (runner.multi_error is None) == (path == "vmap")
            assert server.metrics()["batching"] == ("multi" if path == "vmap" else "model (multi failed)")
        for j, a in enumerate(answers):
            assert close(a.output, ms[j % n](xs[j : j + 1])[0]), (name, j)
    with mm.serve(store, "cnns", input_shape=(3, 8, 8)) as server:
        assert server._runner.layers is None
    ffnn_store = store.save_set(seeded_models(ffnn, 2, hidden=8), "small")
    with mm.serve(store, ffnn_store) as server:
        assert server._runner.layers is not None and server.input_shape == (5,)


def test_the_batched_chain_equals_each_model_alone(store):
    """Every row through its own model in one batched call (nested Sequentials, bias-less layers, other
    activations, dropout in eval mode), repeated and unordered models, equals ``ms[i](x)``."""
    from torch import nn

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(),
                             nn.Sequential(nn.Linear(16, 16, bias=False), nn.GELU(), nn.Dropout(0.5)),
                             nn.Linear(16, 3), nn.Sigmoid()).eval()

    torch.manual_seed(0)
    store.save_set([net() for _ in range(7)], "chain")
    ms = store.recover_set("chain")
    with mm.serve(store, "chain", cache_size=0) as server:
        runner = server._runner
        assert runner.layers is not None and runner.multi_error is None, "runs as the baddbmm chain"
        gen = torch.Generator().manual_seed(4)
        idx = torch.tensor([6, 0, 3, 3, 1, 6, 2, 5, 4, 0, 0])
        x = torch.randn(len(idx), 5, generator=gen)
        batched = runner.run_multi(idx, x)
        alone = torch.cat([ms[int(i)](x[r : r + 1]) for r, i in enumerate(idx)])
        assert close(batched, alone), (batched - alone).abs().max()
        answers = [server.submit(int(i), x[r]) for r, i in enumerate(idx)]
        assert close(torch.stack([f.result(30).output for f in answers]), alone)


def test_the_chain_gathers_one_row_per_model_a_view_of_a_baseline_set_else_a_copy(store):
    """The chain reads each model's parameters as one row: a view of the stored buffer for a baseline
    set, a copy for an Update set whose models live in several objects; both equal ``ms[i](x)``,
    and the view never writes to the store."""
    models = seeded_models(ffnn, 9, hidden=8)
    store.save_set(models, "rows", approach="baseline")
    changed = [m if i % 3 else seeded_models(ffnn, 1, seed=100 + i, hidden=8)[0] for i, m in enumerate(models)]
    store.save_set(models, "upd", approach="update")
    store.save_set(changed, "upd", approach="update")
    gen = torch.Generator().manual_seed(5)
    idx = torch.tensor([8, 0, 3, 3, 1, 7, 2, 5, 4, 0, 6])
    x = torch.randn(len(idx), 5, generator=gen)
    for name, shared in (("rows", True), ("upd", False)):
        ms = store.recover_set(name)
        with mm.serve(store, name, cache_size=0) as server:
            runner = server._runner
            runner.prepare_multi()
            assert runner.layers is not None and runner.rows_shared is shared, name
            batched = runner.run_multi(idx, x)
            alone = torch.cat([ms[int(i)](x[r : r + 1]) for r, i in enumerate(idx)])
            assert close(batched, alone), (name, (batched - alone).abs().max())
            # the gather buffer is reused per thread: earlier answers must not change, at any batch size,
            # nor when threads gather at once
            kept = batched.clone()
            again = runner.run_multi(idx.flip(0), x.flip(0))
            bigger = runner.run_multi(torch.arange(9).repeat(3), torch.randn(27, 5, generator=gen))
            assert torch.equal(batched, kept) and close(again, alone.flip(0)) and bigger.shape == (27, 1)
            results: list[bool] = []

            def gather_often(runner=runner, alone=alone, results=results) -> None:
                results.append(all(close(runner.run_multi(idx, x), alone) for _ in range(50)))

            workers = [threading.Thread(target=gather_often) for _ in range(3)]
            for t in workers:
                t.start()
            for t in workers:
                t.join(60)
            assert results == [True, True, True]
            if shared:
                rows = runner._rows.untyped_storage().data_ptr()
                assert rows == runner.ms.stacked(0).untyped_storage().data_ptr(), "zero-copy"
    for i in (0, 4, 8):
        assert all(torch.equal(a, b) for a, b in zip(store.recover_set("rows")[i].parameters(),
                                                     models[i].parameters())), "nothing written to the store"


def test_cache_hits_return_the_same_answer_and_are_invalidated_on_a_new_version(cells):
    x = torch.randn(5)
    with mm.serve(cells, "cells@latest", watch_s=None) as server:
        first = server.predict("7", x)
        again = server.predict("7", x)
        assert not first.cached and again.cached and again.version == first.version
        assert torch.equal(again.output, first.output)
        again.output.add_(100.0)                     # a caller changing its answer does not change the cache
        assert torch.equal(server.predict("7", x).output, first.output)
        assert server.predict("7", x + 1e-3).cached is False        # another input is another key
        assert server.metrics()["cache_hit_rate"] == pytest.approx(2 / 4)
        v2 = cells.save_set(_retrained(cells), "cells")
        assert server.version.version == 1          # not watching: nothing switches by itself
        assert server.refresh() == v2 and server.version == v2 and len(server.cache) == 0
        after = server.predict("7", x)
        assert not after.cached and after.version == v2
        assert close(after.output, first.output + 1.0)
        assert server.predict("7", x).cached
        assert [str(ref) for ref, _ in server.history] == ["cells@1", "cells@2"]


def test_a_pinned_version_stays(cells):
    with mm.serve(cells, "cells@1") as server:
        cells.save_set(_retrained(cells), "cells")
        assert server.refresh().version == 1 and server.predict(0, torch.zeros(5)).version.version == 1
    with mm.serve(cells, cells.recover_set("cells@1").ref) as server:
        assert not server.follow and server.version.version == 1


def test_a_full_queue_rejects_and_the_queued_requests_are_still_answered(cells):
    with mm.serve(cells, "cells", max_queue=3, max_batch=64, max_wait_ms=400, cache_size=0) as server:
        with held(server):
            queued = [server.submit(i, torch.randn(5)) for i in range(3)]  # the worker is busy: they wait
            with pytest.raises(QueueFullError, match="queue full"):
                server.submit(3, torch.randn(5))
        assert all(f.result(10).version.version == 1 for f in queued)
        m = server.metrics()
        assert m["rejected"] == 1 and m["answered"] == 4 and m["queue_peak"] == 3
        assert server.submit(3, torch.randn(5)).result(10).model == "3"   # room again


def test_an_idle_worker_answers_at_once_and_a_forming_batch_waits_to_fill(cells):
    """max_wait_ms holds back only a batch that formed while the worker was busy (Triton's max queue
    delay); a request that finds the worker idle is taken at once, however long max_wait_ms is."""
    with mm.serve(cells, "cells", max_wait_ms=120_000, max_batch=4, cache_size=0) as server:
        for i in range(3):  # each would wait two minutes if an idle worker waited for a batch to fill
            assert server.predict(i, torch.zeros(5), timeout=20).model == str(i)
        with held(server):
            forming = [server.submit(i, torch.zeros(5)) for i in range(3)]
        time.sleep(0.2)  # the worker is back and holds the three for a fuller batch (not a wait for an outcome)
        assert not any(f.done() for f in forming), "a forming batch of 3 < max_batch rows waits for more"
        forming.append(server.submit(3, torch.zeros(5)))  # the batch is full: it goes at once
        assert [f.result(20).model for f in forming] == ["0", "1", "2", "3"]
        sizes = server.metrics()["batch_sizes"]
    assert sizes == {1: 4, 4: 1}, sizes
    with mm.serve(cells, "cells", max_wait_ms=0, cache_size=0) as server:  # 0: what queued up while busy
        with held(server):
            queued = [server.submit(i, torch.zeros(5)) for i in range(5)]
        assert all(f.result(20) for f in queued) and server.metrics()["batch_sizes"] == {1: 1, 5: 1}


def test_version_switch_under_load_drops_and_mixes_nothing(cells):
    gen = torch.Generator().manual_seed(3)
    xs = torch.randn(64, 5, generator=gen)
    sent: list = []
    stop = threading.Event()

    def client() -> None:  # one client, so submission order is well defined
        j = 0
        while not stop.is_set():
            sent.append((j % N, j % 64, server.submit(j % N, xs[j % 64])))
            j += 1
            if j % 4 == 0:
                time.sleep(0.002)

    with mm.serve(cells, "cells@latest", watch_s=0.02, max_wait_ms=1) as server:
        thread = threading.Thread(target=client)
        thread.start()
        time.sleep(0.1)
        cells.save_set(_retrained(cells), "cells")
        deadline = time.monotonic() + 30
        while server.version.version == 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        stop.set()
        thread.join(30)
        answers = [(i, k, f.result(30)) for i, k, f in sent]
        failed = server.metrics()["failed"]
    assert not thread.is_alive() and failed == 0
    versions = [a.version.version for _, _, a in answers]
    assert set(versions) == {1, 2}, "the load spans the switch"
    computed = [a.version.version for _, _, a in answers if not a.cached]
    assert computed == sorted(computed), "once version 2 computed a request, no later request was computed by 1"
    # a cache hit is answered at its submission, by the version it was submitted under: a request queued before
    # it may still be answered after the switch (queued requests go to the new version), so over all answers
    # the order that must not mix versions is the order in which they were given
    by_time = [a.version.version for _, _, a in sorted(answers, key=lambda t: t[2].answered_at)]
    assert by_time == sorted(by_time), "once version 2 answered, no later answer came from version 1"
    refs = {}
    for v in (1, 2):
        ms = cells.recover_set(f"cells@{v}")
        refs[v] = [ms[i](xs) for i in range(N)]
    for i, k, a in answers:
        assert close(a.output, refs[a.version.version][i][k]), (i, a.version)


def test_bad_requests_get_one_clear_error_and_the_server_keeps_serving(cells):
    with mm.serve(cells, "cells") as server:
        with pytest.raises(UnknownModelError, match="no model named 'nope'"):
            server.submit("nope", torch.zeros(5))
        with pytest.raises(UnknownModelError, match="out of range"):
            server.submit(N, torch.zeros(5))
        with pytest.raises(BadInputError, match=r"shape \[3\]"):
            server.submit(0, torch.zeros(3))
        with pytest.raises(BadInputError, match=r"shape \[2, 2, 5\]"):
            server.submit(0, torch.zeros(2, 2, 5))
        with pytest.raises(BadInputError, match="numbers"):
            server.submit(0, ["a", "b", "c", "d", "e"])
        with pytest.raises(BadInputError, match="numeric"):
            server.submit(0, [1, 2, [3], 4, 5])
        with pytest.raises(BadInputError, match="real numbers"):
            server.submit(0, torch.zeros(5, dtype=torch.bool))
        with pytest.raises(BadInputError, match="rows"):
            server.submit(0, torch.zeros(5000, 5))
        with pytest.raises(BadInputError, match="NaN or infinity"):
            server.predict(0, [0.0, float("nan"), 0.0, 0.0, 0.0])
        ok = server.predict(0, [0.1, 0.2, 0.3, 0.4, 0.5])            # lists and ints are numbers too
        assert ok.output.shape == (1,) and server.predict(0, [[1, 2, 3, 4, 5]]).output.shape == (1, 1)
        assert server.metrics()["failed"] == 1
    with pytest.raises(mm.RefError, match="no set 'other'"):
        mm.serve(cells, "other@latest")
    with pytest.raises(mm.RefError, match="no model store"):
        mm.serve(cells.root / "missing", "cells")
    assert not (cells.root / "missing").exists()
    for bad in ({"batching": "fast"}, {"max_batch": 0}, {"cache_size": -1}, {"max_wait_ms": -1}, {"watch_s": 0}):
        with pytest.raises(mm.ServeError):
            mm.serve(cells, "cells", **bad)
    with pytest.raises(mm.ServeError, match="input_shape"):
        cells.save_set(seeded_models(cnn, 2), "convs")
        mm.serve(cells, "convs")


def test_metrics_describe_the_traffic(cells):
    with mm.serve(cells, "cells", max_wait_ms=50) as server:
        xs = torch.randn(40, 5)
        for f in [server.submit(j % N, xs[j]) for j in range(40)]:
            f.result(10)
        server.predict(0, xs[0])                                   # a cache hit
        m = server.metrics()
    assert m["answered"] == 41 and m["cached"] == 1 and m["rejected"] == 0
    assert m["throughput_rps"] > 0 and m["version"] == "cells@1" and m["set"] == "cells@latest"
    lat = m["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"]
    assert sum(k * v for k, v in m["batch_sizes"].items()) == 40 and m["batches"] == sum(m["batch_sizes"].values())
    assert m["cache_hit_rate"] == pytest.approx(1 / 41) and m["queue_depth"] == 0


def test_close_answers_or_fails_what_is_queued(cells):
    server = mm.serve(cells, "cells", max_wait_ms=10_000, max_batch=100, cache_size=0)
    with held(server) as running:
        pending = [server.submit(i, torch.zeros(5)) for i in range(3)]
        closer = threading.Thread(target=server.close, kwargs={"drain": False})
        closer.start()
        for f in pending:
            with pytest.raises(ServerClosedError):
                f.result(10)
    closer.join(30)
    assert not closer.is_alive() and running.result(10).model == "0", "the running batch finishes"
    with pytest.raises(ServerClosedError):
        server.submit(0, torch.zeros(5))
    server.close()                                                 # closing twice is fine
    with mm.serve(cells, "cells", max_wait_ms=10_000, max_batch=100) as drained:
        pending = [drained.submit(i, torch.zeros(5)) for i in range(3)]
    assert all(f.result(10).model == str(i) for i, f in enumerate(pending)), "a drained close answers"
    assert "closed" in repr(drained)


def test_model_modules_are_kept_up_to_max_modules(cells):
    with mm.serve(cells, "cells", batching="none", max_modules=4) as server:
        server.warm()
        assert len(server._runner._modules) == 4
        for i in range(6):
            server.predict(i, torch.zeros(5))
        assert list(server._runner._modules) == [2, 3, 4, 5]
    with mm.serve(cells, "cells", batching="none", max_modules=0) as server:  # ms[i] for every request
        server.predict(0, torch.zeros(5))
        assert not server._runner._modules


def test_load_generator_measures_open_loop_latency(cells):
    from mm_jupyter.serving.load import capacity, make_workload, open_loop

    work = make_workload(N, 300, 16, spread="zipf", repeat=0.5, seed=0)
    assert ((work.models >= 0) & (work.models < N)).all() and work.rows.max() < 16
    pairs = list(zip(work.models.tolist(), work.rows.tolist()))
    assert len(set(pairs)) < 0.7 * len(pairs), "repeats copy earlier (model, input) pairs"
    uniform = make_workload(N, 3000, 16, spread="uniform", seed=0)
    zipf = make_workload(N, 3000, 16, spread="zipf", seed=0)
    hottest = [int(torch.bincount(torch.from_numpy(w.models)).max()) for w in (zipf, uniform)]
    assert hottest[0] > 2 * hottest[1]
    pool = list(torch.randn(16, 5))
    with mm.serve(cells, "cells") as server:
        result = open_loop(server, work, pool, rate=2000)
        assert capacity(server, work, pool, seconds=0.05) > 0
    assert result.answered == 300 and result.rejected == 0 and result.failed == 0
    assert result.cached > 0 and result.p50_ms <= result.p99_ms <= result.max_ms
    with pytest.raises(ValueError):
        make_workload(N, 10, 16, spread="pareto")
