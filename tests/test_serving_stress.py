"""Serving under concurrency: many threads, random models and row counts, mixed ``submit`` and
``predict``; every request answered exactly once with its own model's answer; a close in the middle
leaves nothing pending. Also the request fast paths (tensor inputs are private copies) and the
automatic batch hold."""
from __future__ import annotations

import random
import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from serve_models import held

import mm_jupyter as mm
from mm_jupyter.serving import ServerClosedError
from mm_jupyter.serving.runner import ATOL, RTOL
from mm_jupyter.usecases.models import ffnn, seeded_models

N = 40


@pytest.fixture
def cells(store):
    store.save_set(seeded_models(ffnn, N, hidden=16), "cells")
    return store


def _expected(store, sent):
    ms = store.recover_set("cells")
    with torch.no_grad():
        return [ms[i](x if x.dim() == 2 else x[None]) for i, x, _ in sent]


@pytest.mark.parametrize("max_batch", [7, 256])
def test_many_threads_random_models_each_answered_once_with_its_own_answer(cells, max_batch):
    threads, per_thread = 12, 60
    sent: list[list[tuple[int, torch.Tensor, object]]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    with mm.serve(cells, "cells", cache_size=0, max_batch=max_batch, watch_s=None) as server:
        def client(k: int) -> None:
            rng = random.Random(k)
            gen = torch.Generator().manual_seed(k)
            start.wait()
            try:
                for _ in range(per_thread):
                    i = rng.randrange(N)
                    rows = rng.choice([0, 0, 0, 1, 3])  # 0: one item, else a batch of rows
                    x = torch.randn(5, generator=gen) if rows == 0 else torch.randn(rows, 5, generator=gen)
                    if rng.random() < 0.5:
                        sent[k].append((i, x, server.predict(i, x)))
                    else:
                        sent[k].append((i, x, server.submit(str(i), x)))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not errors and not any(w.is_alive() for w in workers)
        flat = [(i, x, a.result(60) if isinstance(a, Future) else a) for part in sent for i, x, a in part]
        metrics = server.metrics()
    assert len(flat) == threads * per_thread
    assert metrics["answered"] == len(flat) and metrics["failed"] == 0, "each request answered exactly once"
    assert sum(k * v for k, v in metrics["batch_sizes"].items()) == len(flat)
    assert max(metrics["batch_sizes"]) <= max_batch, "a batch holds at most max_batch rows"
    for (i, x, answer), want in zip(flat, _expected(cells, flat)):
        assert answer.model == str(i) and not answer.cached
        got = answer.output if x.dim() == 2 else answer.output[None]
        assert got.shape == want.shape and torch.allclose(got, want, rtol=RTOL, atol=ATOL)


def test_closing_under_load_leaves_nothing_pending(cells):
    server = mm.serve(cells, "cells", cache_size=0, watch_s=None)
    futures: list[Future] = []
    stop = threading.Event()
    refused = []

    def client(k: int) -> None:
        gen = torch.Generator().manual_seed(k)
        while not stop.is_set():
            try:
                futures.append(server.submit(k % N, torch.randn(5, generator=gen)))
            except ServerClosedError:
                refused.append(k)
                return

    workers = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for w in workers:
        w.start()
    while len(futures) < 300:
        threading.Event().wait(0.005)
    server.close(drain=False)
    stop.set()
    for w in workers:
        w.join(30)
    outcomes = {"answered": 0, "closed": 0}
    for f in futures:
        try:
            f.result(30)
            outcomes["answered"] += 1
        except ServerClosedError:
            outcomes["closed"] += 1
    assert outcomes["answered"] + outcomes["closed"] == len(futures), "every future resolved"
    assert outcomes["answered"] > 0 and not server._worker.is_alive()
    assert refused, "submitting after close raises ServerClosedError"


def test_tensor_inputs_are_private_copies_and_every_kind_gives_the_same_answer(cells):
    ms = cells.recover_set("cells")
    x = torch.randn(5)
    with torch.no_grad():
        want = ms[3](x[None])[0]
    with mm.serve(cells, "cells", cache_size=0) as server:
        kinds = [x, x.double(), x.clone().requires_grad_(), x.numpy(), x.tolist(), torch.stack([x, x])[1]]
        for kind in kinds:
            assert torch.allclose(server.predict(3, kind).output, want, rtol=RTOL, atol=ATOL), type(kind)
        with held(server):
            mine = x.clone()
            queued = server.submit(3, mine)
            mine.fill_(1e6)  # the caller reuses its tensor while the request waits
        assert torch.allclose(queued.result(30).output, want, rtol=RTOL, atol=ATOL)
        ints = torch.arange(5)
        with torch.no_grad():
            assert torch.allclose(server.predict(3, ints).output, ms[3](ints[None].float())[0], rtol=RTOL, atol=ATOL)


def test_the_automatic_hold_is_one_batch_cost_and_follows_the_version(cells):
    with mm.serve(cells, "cells@latest", cache_size=0, watch_s=None) as server:
        first = server.max_wait_ms
        assert server.auto_wait and 0 < first <= 2.0
        assert server.queue.max_wait_s == pytest.approx(first / 1e3)
        m = server.metrics()
        assert m["max_wait_auto"] is True and m["max_wait_ms"] == first
        ms = cells.recover_set("cells")
        cells.save_set([ms[i] for i in range(N)], "cells")
        server.refresh()
        assert server.version.version == 2 and server.queue.max_wait_s == pytest.approx(server.max_wait_ms / 1e3)
        assert server.predict(0, np.zeros(5, np.float32)).version.version == 2
    with mm.serve(cells, "cells", max_wait_ms=5) as fixed:
        assert not fixed.auto_wait and fixed.max_wait_ms == 5.0 and fixed.queue.max_wait_s == 0.005


def test_submit_many_answers_like_submit_all_or_nothing(cells):
    ms = cells.recover_set("cells")
    gen = torch.Generator().manual_seed(7)
    models = [5, "0", 39, 5, 17, "3"]
    xs = torch.randn(len(models), 5, generator=gen)
    with mm.serve(cells, "cells", max_queue=8, cache_size=100) as server:
        answers = [f.result(30) for f in server.submit_many(models, xs)]
        with torch.no_grad():
            for m, x, a in zip(models, xs, answers):
                assert a.model == str(m) and a.output.shape == (1,) and not a.cached
                assert torch.allclose(a.output, ms[int(m)](x[None])[0], rtol=RTOL, atol=ATOL)
                assert torch.equal(a.output, server.submit(m, x).result(30).output)  # (a cache hit of it)
        again = [f.result(30) for f in server.submit_many(models, xs.numpy())]
        assert all(a.cached for a in again) and [a.model for a in again] == [str(m) for m in models]
        assert server.submit_many([], torch.zeros(0, 5)) == []
        before = server.metrics()["answered"]
        with pytest.raises(mm.ServeError, match="no model named"):
            server.submit_many([1, "nope"], torch.zeros(2, 5))
        with pytest.raises(mm.ServeError, match="2 models but 3 inputs"):
            server.submit_many([1, 2], torch.zeros(3, 5))
        with pytest.raises(mm.ServeError, match="shape"):
            server.submit_many([1, 2], torch.zeros(2, 4))
        with held(server):
            with pytest.raises(mm.ServeError, match="queue full"):
                server.submit_many(list(range(9)), torch.randn(9, 5, generator=gen))
            assert len(server.queue) == 0, "all or nothing: none of the nine was queued"
            room = server.submit_many(list(range(8)), torch.randn(8, 5, generator=gen))
        assert [f.result(30).model for f in room] == [str(i) for i in range(8)]
        m = server.metrics()
    assert m["answered"] == before + 1 + 8 and m["rejected"] == 9
    with mm.serve(cells, "cells", cache_size=0) as server:  # no cache: the path without lookups
        plain = [f.result(30) for f in server.submit_many(models, xs)]
        assert [a.model for a in plain] == [str(m) for m in models] and not any(a.cached for a in plain)
        assert all(torch.allclose(a.output, b.output, rtol=RTOL, atol=ATOL) for a, b in zip(plain, answers))


def test_predict_callers_blocked_at_a_close_each_get_an_answer_or_the_closed_error(cells):
    """``predict`` waits on an ``Answer`` slot, not a Future: a close without draining still ends every
    blocked caller, with its answer or ServerClosedError, and none hangs."""
    server = mm.serve(cells, "cells", cache_size=0, watch_s=None)
    outcomes: dict[str, list[int]] = {"answered": [], "closed": []}
    other: list[BaseException] = []
    running = threading.Barrier(9)

    def client(k: int) -> None:
        gen = torch.Generator().manual_seed(k)
        running.wait()
        while True:
            try:
                server.predict(k % N, torch.randn(5, generator=gen), timeout=60)
                outcomes["answered"].append(k)
            except ServerClosedError:
                outcomes["closed"].append(k)
                return
            except BaseException as e:  # noqa: BLE001 - reported below
                other.append(e)
                return

    workers = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for w in workers:
        w.start()
    running.wait()
    while len(outcomes["answered"]) < 200:
        threading.Event().wait(0.005)
    server.close(drain=False)
    for w in workers:
        w.join(30)
    assert not other and not any(w.is_alive() for w in workers), "every blocked predict ended"
    assert sorted(outcomes["closed"]) == list(range(8)), "each caller saw the close once"
    assert not server._worker.is_alive()


def test_predict_errors_reach_their_own_caller_under_concurrency(cells):
    """Callers sending NaN get BadInputError in their own thread; the others' answers in the same
    batches are right."""
    from mm_jupyter.serving import BadInputError

    threads, per_thread = 8, 40
    got: list[list[tuple[int, torch.Tensor, object]]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads)
    with mm.serve(cells, "cells", cache_size=0, watch_s=None) as server:
        def client(k: int) -> None:
            rng = random.Random(k)
            gen = torch.Generator().manual_seed(k)
            start.wait()
            for _ in range(per_thread):
                i, x = rng.randrange(N), torch.randn(5, generator=gen)
                if rng.random() < 0.25:
                    x[rng.randrange(5)] = float("nan")
                try:
                    got[k].append((i, x, server.predict(i, x)))
                except BadInputError as e:
                    got[k].append((i, x, e))

        workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers)
    flat = [entry for part in got for entry in part]
    assert len(flat) == threads * per_thread
    ms = cells.recover_set("cells")
    errors = 0
    with torch.no_grad():
        for i, x, answer in flat:
            if torch.isnan(x).any():
                assert isinstance(answer, BadInputError), "a NaN input fails, in its own caller"
                errors += 1
            else:
                assert not isinstance(answer, BaseException)
                assert answer.model == str(i)
                assert torch.allclose(answer.output, ms[i](x[None])[0], rtol=RTOL, atol=ATOL)
    assert 0 < errors < len(flat)
