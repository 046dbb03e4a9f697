"""The ``Answer`` slot ``predict`` waits on: set once, read any number of times, a timed-out wait."""
from __future__ import annotations

import threading
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
