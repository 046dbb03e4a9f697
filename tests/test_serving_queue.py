"""The request queue's hand-offs: the ``Answer`` slot ``predict`` waits on, and how a worker woken
from idle lets callers that are about to submit join its batch (without a timed wait)."""
from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import pytest

from mm_jupyter.serving import ServerClosedError, batching
from mm_jupyter.serving.batching import Answer, Request, RequestQueue


def _request(k: int = 0, rows: int = 1) -> Request:
    return Request(str(k), np.zeros((rows, 5), np.float32), rows == 1, None, 0.0, index=k)


def _take_when_woken(q: RequestQueue, first: Request, batching: bool = True) -> list[Request] | None:
    """``q.take()`` by a worker that found the queue empty and is woken by ``first``."""
    out: list[list[Request] | None] = []
    worker = threading.Thread(target=lambda: out.append(q.take(batching)))
    worker.start()
    while not q._cond._waiters:  # type: ignore[attr-defined]  # (until the worker waits)
        threading.Event().wait(0.001)
    q.put(first)
    worker.join(30)
    assert not worker.is_alive()
    return out[0]


def test_an_answer_is_set_once_and_read_any_number_of_times():
    a = Answer()
    assert not a.done()
    with pytest.raises(FutureTimeout):
        a.result(0.01)
    a.set_result("yes")
    assert a.done() and a.result(0) == "yes" and a.result() == "yes"
    with pytest.raises(RuntimeError):
        a.set_result("again")
    with pytest.raises(RuntimeError):
        a.set_exception(ValueError("late"))
    assert a.result() == "yes", "a refused second answer leaves the first"
    b = Answer()
    b.set_exception(ServerClosedError("closed"))
    for _ in range(2):
        with pytest.raises(ServerClosedError):
            b.result(1)


def test_an_answer_wakes_a_waiting_thread_and_a_timed_out_wait_can_still_be_answered():
    a = Answer()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(a.result(30)))
    waiter.start()
    a.set_result(7)
    waiter.join(30)
    assert got == [7]
    late = Answer()
    with pytest.raises(FutureTimeout):
        late.result(0)
    late.set_result(1)  # the worker answering after the caller gave up is not an error
    assert late.result(0) == 1


def test_a_worker_woken_from_idle_takes_what_callers_hand_in_while_it_yields(monkeypatch):
    """Each ``sleep(0)`` of the woken worker is a moment other threads may queue requests; it yields
    again while a moment brought more, and stops at the first that brought none (never a timed wait)."""
    q = RequestQueue(100, 256, 0.0)
    arrivals = [[_request(1), _request(2)], [_request(3)], [], [_request(9)]]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        assert not q._cond._is_owned(), "the lock is free while yielding"  # type: ignore[attr-defined]
        for r in arrivals.pop(0):
            q.put(r)

    monkeypatch.setattr(batching.time, "sleep", sleep)
    batch = _take_when_woken(q, _request(0))
    assert batch is not None and [r.model for r in batch] == ["0", "1", "2", "3"] and sleeps == [0, 0, 0]
    assert len(q) == 0 and q._rows == 0
    # a lone request pays one yield; without batching (``none``) there is none
    arrivals[:] = [[]]
    sleeps.clear()
    assert [r.model for r in _take_when_woken(q, _request(5)) or []] == ["5"] and sleeps == [0]
    sleeps.clear()
    assert [r.model for r in _take_when_woken(q, _request(6), False) or []] == ["6"] and sleeps == []
    # a worker that comes back to a queue that filled while it was busy does not yield
    q.put(_request(7))
    assert [r.model for r in q.take() or []] == ["7"] and sleeps == []


def test_the_idle_yield_stops_at_a_full_batch_and_at_a_close(monkeypatch):
    q = RequestQueue(100, 3, 0.0)
    fill = [[_request(1), _request(2), _request(3)], [_request(4)]]
    monkeypatch.setattr(batching.time, "sleep", lambda s: [q.put(r) for r in fill.pop(0)])
    full = _take_when_woken(q, _request(0)) or []
    assert [r.model for r in full] == ["0", "1", "2"], "a full batch goes without another yield"
    assert len(fill) == 1 and [r.model for r in q.take() or []] == ["3"]
    # a close without draining while the worker yields: the emptied queue returns None, nothing is lost
    q2 = RequestQueue(100, 256, 0.0)
    drained: list[Request] = []
    monkeypatch.setattr(batching.time, "sleep", lambda s: (q2.close(), drained.extend(q2.drain())))
    assert _take_when_woken(q2, _request(0)) is None and [r.model for r in drained] == ["0"]
