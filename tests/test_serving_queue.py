"""The ``Answer`` slot ``predict`` waits on: set once, read any number of times, a timed-out wait."""
from __future__ import annotations

import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from mm_jupyter.serving import ServerClosedError
from mm_jupyter.serving.batching import Answer


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


def _waiters(answers, timeout=30.0):
    """One thread per answer, each waiting on it; returns (threads, results by position)."""
    got: dict[int, object] = {}

    def wait(j: int, a: Answer) -> None:
        try:
            got[j] = a.result(timeout)
        except FutureTimeout:
            got[j] = "timeout"

    threads = [threading.Thread(target=wait, args=(j, a)) for j, a in enumerate(answers)]
    for t in threads:
        t.start()
    return threads, got


def _wait_until_blocked(answers):
    """Give the waiter threads time to block in ``result`` (a hand-over before that is fine too)."""
    time.sleep(0.05)


def test_a_batch_is_handed_over_as_a_chain_every_caller_gets_its_own_answer():
    from mm_jupyter.serving.batching import hand_over

    answers = [Answer() for _ in range(6)]
    threads, got = _waiters(answers)
    _wait_until_blocked(answers)
    ended: list[int] = []
    hand_over(answers, [f"v{j}" for j in range(6)], lambda: ended.append(1))
    for t in threads:
        t.join(30)
    assert got == {j: f"v{j}" for j in range(6)}
    assert ended == [1], "the chain's end is announced exactly once"
    assert [a.result(0) for a in answers] == [f"v{j}" for j in range(6)], "an answer can be read again"
    with pytest.raises(RuntimeError):
        hand_over(answers[:1], ["again"], lambda: None)


def test_callers_that_gave_up_are_stepped_over_and_the_ones_behind_them_still_woken():
    from mm_jupyter.serving.batching import hand_over

    answers = [Answer() for _ in range(5)]
    for j in (1, 2, 4):  # these callers timed out before the hand-over (4: the last of the chain)
        with pytest.raises(FutureTimeout):
            answers[j].result(0)
    threads, got = _waiters([answers[0], answers[3]])
    _wait_until_blocked(answers)
    ended: list[int] = []
    hand_over(answers, list(range(5)), lambda: ended.append(1))
    for t in threads:
        t.join(30)
    assert got == {0: 0, 1: 3} and ended == [1]
    assert [answers[j].result(0) for j in (1, 2, 4)] == [1, 2, 4], "a caller that gave up can still read it"
    nobody = [Answer() for _ in range(3)]
    for a in nobody:
        with pytest.raises(FutureTimeout):
            a.result(0)
    hand_over(nobody, [7, 8, 9], lambda: ended.append(2))
    assert ended == [1, 2], "a chain of callers who all gave up still ends"


def test_a_wait_that_times_out_as_the_answer_arrives_passes_the_baton_on():
    """The race of ``result(timeout)`` with the hand-over: the caller gave up (``_give_up``) just after
    the chain woke it, so it takes its answer after all and must wake the next caller."""
    from mm_jupyter.serving.batching import hand_over

    first, second = Answer(), Answer()
    threads, got = _waiters([second])
    _wait_until_blocked([second])
    ended: list[int] = []
    hand_over([first, second], ["a", "b"], lambda: ended.append(1))
    assert first._give_up() is None, "woken: the answer is there, and the baton passed on"
    for t in threads:
        t.join(30)
    assert first.result(0) == "a" and got == {0: "b"} and ended == [1]


def test_a_caller_that_never_waits_still_passes_the_baton():
    from mm_jupyter.serving.batching import hand_over

    answers = [Answer() for _ in range(3)]
    threads, got = _waiters(answers[1:])
    _wait_until_blocked(answers)
    hand_over(answers, [0, 1, 2], lambda: None)
    assert answers[0].result(0) == 0  # (read after the hand-over: no wait at all)
    for t in threads:
        t.join(30)
    assert got == {0: 1, 1: 2}


def _queued(q, n=1):
    import numpy as np

    from mm_jupyter.serving.batching import Request

    for _ in range(n):
        q.put(Request("m", np.zeros((1, 5), np.float32), True, None, time.perf_counter()))


def test_a_batch_waits_for_the_last_batch_s_hand_over_to_end_and_no_longer_than_max_wait():
    from mm_jupyter.serving.batching import RequestQueue

    q = RequestQueue(100, 8, max_wait_s=30.0)
    taken: list[int] = []

    def take() -> None:
        taken.append(len(q.take()))

    idle = threading.Thread(target=take)
    idle.start()  # the worker waits for work (nothing piled up while it was busy)
    time.sleep(0.05)
    _queued(q)
    idle.join(10)
    assert taken == [1], "an idle worker takes a lone request at once"
    last = Answer()
    q.hand_over([last], ["v"])  # the last batch's answers are being handed to their callers
    worker = threading.Thread(target=take)
    worker.start()
    time.sleep(0.05)
    _queued(q)
    time.sleep(0.2)
    assert taken == [1], "held while the callers of the last batch are still being woken"
    _queued(q, 2)  # they come back with requests of their own
    assert last.result(0) == "v"  # (the chain's last caller took its answer: the hand-over ended)
    worker.join(30)
    assert taken == [1, 3]
    short = RequestQueue(100, 8, max_wait_s=0.05)
    short.hand_over([Answer()], [0])  # a hand-over that does not end (a caller never got the GIL): max_wait at most
    _queued(short)
    t0 = time.perf_counter()
    assert len(short.take()) == 1 and time.perf_counter() - t0 < 10
    full = RequestQueue(100, 4, max_wait_s=30.0)
    full.hand_over([Answer()], [0])
    _queued(full, 4)
    assert len(full.take()) == 4, "a full batch goes at once"


def test_a_held_batch_is_woken_once_it_fills_and_a_burst_notifies_only_at_the_crossing():
    from mm_jupyter.serving.batching import RequestQueue

    q = RequestQueue(100, 4, max_wait_s=30.0)
    _queued(q)
    assert len(q.take()) == 1  # the worker's first batch (it then computes: busy)
    _queued(q)  # piled up while the worker was busy: held up to 30 s unless it fills
    taken: list[int] = []
    worker = threading.Thread(target=lambda: taken.append(len(q.take())))
    worker.start()
    time.sleep(0.1)
    assert not taken
    t0 = time.perf_counter()
    _queued(q, 3)  # the batch is full now: the worker must have been notified
    worker.join(20)
    assert taken == [4] and time.perf_counter() - t0 < 20
    notified: list[int] = []
    real = q._notify
    q._notify = lambda: (notified.append(len(q)), real())[1]  # type: ignore[method-assign]
    _queued(q, 10)
    assert notified == [1, 4], "at the first request and as the first batch filled, not after"


def test_requests_queued_before_the_worker_first_takes_are_not_held():
    """A worker that is still starting (a server under load) was never busy: what queued up meanwhile
    goes at once, whatever max_wait is (held, the first predict of a new server waited max_wait)."""
    from mm_jupyter.serving.batching import RequestQueue

    q = RequestQueue(100, 8, max_wait_s=120.0)
    _queued(q, 3)
    t0 = time.perf_counter()
    assert len(q.take()) == 3 and time.perf_counter() - t0 < 60
    _queued(q, 2)  # from now on a batch that piles up while the worker computes may be held to fill
    taken: list[int] = []
    worker = threading.Thread(target=lambda: taken.append(len(q.take())), daemon=True)
    worker.start()
    worker.join(0.3)
    assert not taken, "a batch that formed while the worker was busy waits to fill"
    _queued(q, 6)
    worker.join(30)
    assert taken == [8]


@pytest.mark.parametrize("max_wait_s", [0.3, 0.0])
def test_a_first_request_during_a_hand_over_wakes_the_worker_only_when_it_would_act(monkeypatch, max_wait_s):
    """While the last batch's answers are handed over, an idle worker that holds batches would only
    hold a first request (its callers come back with more): ``put`` does not wake it for that (a wasted
    context switch per batch), and the worker still takes the request once its hold ends, not at the
    far later rescue of a hand-over that never ends. Without holds (``max_wait_s=0``) it is woken."""
    from mm_jupyter.serving import batching

    monkeypatch.setattr(batching, "RESCUE_S", 600.0)  # only the hold's own limit may end the wait in time
    q = batching.RequestQueue(100, 8, max_wait_s=max_wait_s)
    _queued(q)
    assert len(q.take()) == 1  # (the worker has started: from now on it may hold)
    q.hand_over([Answer()], ["v"])  # a hand-over that does not end while the test runs
    taken: list[float] = []
    worker = threading.Thread(target=lambda: (q.take(), taken.append(time.perf_counter())), daemon=True)
    worker.start()
    time.sleep(0.05)  # the worker waits for requests
    notified: list[int] = []
    real = q._notify
    q._notify = lambda: (notified.append(len(q)), real())[1]  # type: ignore[method-assign]
    t0 = time.perf_counter()
    _queued(q)
    worker.join(60)
    assert taken, "the request was taken"
    if max_wait_s:
        assert notified == [], "a request the worker would only hold does not wake it"
        assert taken[0] - t0 < 60, "taken once the hold ended, not at the hand-over's rescue"
    else:
        assert notified == [1], "without holds a first request wakes the worker at once"
