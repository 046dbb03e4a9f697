"""A ``predict`` caller interrupted during the hand-over of its batch's answers (see ``Answer``): the
callers behind it in the chain still get their answers at once, the chain's end is still announced,
and the queue leaves its hand-over state, so later batches are not held for a hand-over that never
ends. The interruption is injected deterministically into one caller's thread, between its wake-up
and its passing of the baton (a KeyboardInterrupt, an asynchronous exception or an error there)."""
from __future__ import annotations

import ctypes
import threading
import time

import pytest
import torch
from serve_models import held

import mm_jupyter as mm
from mm_jupyter.serving.batching import Answer, hand_over
from mm_jupyter.usecases.models import ffnn, seeded_models

#: "did not hang": far above a hand-over's real time (well under a millisecond), far below the callers' timeout
PROMPT_S = 5.0
CALLER_TIMEOUT_S = 60.0


def _interrupt_once(monkeypatch, victim: list[threading.Thread], where: tuple[str, ...]) -> list[str]:
    """Make the victim thread raise KeyboardInterrupt once at the entry of each ``Answer`` method in
    ``where`` (``_take``: just after its wait ended, before it passed the baton; ``_give_up``: again,
    while it deals with the first one). Returns the methods that fired."""
    fired: list[str] = []
    for name in where:
        real = getattr(Answer, name)

        def interrupted(self, *args, _name=name, _real=real):
            if threading.current_thread() is victim[0] and _name not in fired:
                fired.append(_name)
                raise KeyboardInterrupt
            return _real(self, *args)

        monkeypatch.setattr(Answer, name, interrupted)
    return fired


def _callers(answers: list[Answer], timeout: float = CALLER_TIMEOUT_S,
             ) -> tuple[list[threading.Thread], dict[int, object]]:
    """One thread per answer, each waiting on it; returns (threads, outcome by position)."""
    got: dict[int, object] = {}

    def wait(j: int, a: Answer) -> None:
        try:
            got[j] = a.result(timeout)
        except BaseException as e:  # noqa: BLE001 - the outcome is what is checked
            got[j] = type(e).__name__

    threads = [threading.Thread(target=wait, args=(j, a), daemon=True) for j, a in enumerate(answers)]
    for t in threads:
        t.start()
    return threads, got


def _blocked(threads: list[threading.Thread]) -> None:
    time.sleep(0.05)  # (a hand-over before a caller blocks is fine too)


def _stuck(monkeypatch, n: int, at: int) -> tuple[list[Answer], list[threading.Thread], dict, list[str]]:
    """``n`` callers blocked on their answers, the one ``at`` to be interrupted twice once woken (in
    ``_take`` and in ``_give_up``: no code of its can pass the baton); (answers, threads, got, fired)."""
    answers = [Answer() for _ in range(n)]
    victim: list[threading.Thread] = []
    fired = _interrupt_once(monkeypatch, victim, ("_take", "_give_up"))
    threads, got = _callers(answers)
    victim.append(threads[at])
    _blocked(threads)
    return answers, threads, got, fired


@pytest.mark.parametrize("victim_at", [0, 2, 4])
def test_a_caller_interrupted_after_it_was_woken_still_passes_the_baton(monkeypatch, victim_at):
    answers = [Answer() for _ in range(5)]
    victim: list[threading.Thread] = []
    fired = _interrupt_once(monkeypatch, victim, ("_take",))
    threads, got = _callers(answers)
    victim.append(threads[victim_at])
    _blocked(threads)
    ended: list[int] = []
    hand_over(answers, [f"v{j}" for j in range(5)], lambda: ended.append(1))
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(0.0, PROMPT_S - (time.perf_counter() - t0)))
    assert fired == ["_take"], "the interruption was injected"
    assert not any(t.is_alive() for t in threads), "a caller behind the interrupted one was left waiting"
    want: dict[int, object] = {j: f"v{j}" for j in range(5)}
    want[victim_at] = "KeyboardInterrupt"
    assert got == want
    assert ended == [1], "the chain's end is announced exactly once"
    assert answers[victim_at].result(0) == f"v{victim_at}", "the interrupted caller can still read its answer"


def test_a_chain_whose_baton_is_lost_is_ended_by_the_idle_worker(monkeypatch):
    """Interrupted again while passing the baton on after the first interruption (no code can pass it
    then): the queue's worker ends the hand-over for it (its safety net) although nothing else comes."""
    from mm_jupyter.serving.batching import RESCUE_S, Request, RequestQueue

    q = RequestQueue(100, 8, max_wait_s=0.0)
    answers, threads, got, fired = _stuck(monkeypatch, 4, 1)
    taken: list[object] = []

    def work() -> None:  # the worker hands a batch over, then waits for requests (none come for now)
        q.hand_over(answers, ["a", "b", "c", "d"])
        taken.append(q.take())

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    t0 = time.perf_counter()
    for t in threads:
        t.join(max(0.0, PROMPT_S + RESCUE_S - (time.perf_counter() - t0)))
    assert fired == ["_take", "_give_up"]
    assert not any(t.is_alive() for t in threads), "the callers behind the lost baton were left waiting"
    assert got == {0: "a", 1: "KeyboardInterrupt", 2: "c", 3: "d"}
    with q._lock:
        assert not q._handing, "the hand-over ended: later batches are not held for it"
    import numpy as np

    q.put(Request("m", np.zeros((1, 5), np.float32), True, None, time.perf_counter()))
    worker.join(PROMPT_S)
    assert not worker.is_alive() and len(taken[0]) == 1  # type: ignore[arg-type]
    assert answers[1].result(0) == "b"


def test_a_lost_baton_is_picked_up_by_a_worker_that_keeps_taking_batches(monkeypatch):
    """A busy worker (requests keep coming, no hold: ``max_wait_s=0``) ends a stuck hand-over at its
    next ``take`` after the limit, and the queue is not held afterwards."""
    import numpy as np

    from mm_jupyter.serving.batching import RESCUE_S, Request, RequestQueue

    q = RequestQueue(100, 8, max_wait_s=0.0)
    answers, threads, got, _ = _stuck(monkeypatch, 3, 0)
    q.hand_over(answers, [0, 1, 2])
    deadline = time.perf_counter() + PROMPT_S + RESCUE_S
    while any(t.is_alive() for t in threads[1:]) and time.perf_counter() < deadline:
        q.put(Request("m", np.zeros((1, 5), np.float32), True, None, time.perf_counter()))
        assert q.take() is not None
        time.sleep(0.01)
    for t in threads:
        t.join(PROMPT_S)
    assert got == {0: "KeyboardInterrupt", 1: 1, 2: 2}
    with q._lock:
        assert not q._handing


def test_closing_ends_a_stuck_hand_over(monkeypatch):
    from mm_jupyter.serving.batching import RequestQueue

    q = RequestQueue(100, 8, max_wait_s=30.0)  # (a deadline far away: only the close can end it in time)
    answers, threads, got, _ = _stuck(monkeypatch, 3, 0)
    q.hand_over(answers, [0, 1, 2])
    time.sleep(0.05)
    q.close()
    assert q.take() is None, "the worker's last take"
    for t in threads:
        t.join(PROMPT_S)
    assert got == {0: "KeyboardInterrupt", 1: 1, 2: 2}


def test_a_timed_out_caller_whose_answer_was_set_gets_the_answer_not_a_timeout():
    """The chain had not reached it yet (here: its first caller never comes to take its answer) when
    its wait ran out: the answer is there, so it is returned; the chain steps over that caller later."""
    answers = [Answer() for _ in range(3)]
    ended: list[int] = []
    hand_over(answers, ["a", "b", "c"], lambda: ended.append(1))
    threads, got = _callers([answers[2]], timeout=0.2)
    for t in threads:
        t.join(PROMPT_S)
    assert got == {0: "c"}
    assert [a.result(0) for a in answers] == ["a", "b", "c"] and ended == [1]


N = 16


@pytest.fixture
def cells(store):
    store.save_set(seeded_models(ffnn, N, hidden=16), "cells")
    return store


def _async_raise(thread: threading.Thread, error: type[BaseException]) -> None:
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(error))
    assert done == 1


@pytest.mark.parametrize("how", ["error", "twice", "async"])
def test_a_predict_caller_interrupted_during_the_hand_over_leaves_the_server_serving(cells, monkeypatch, how):
    """Six ``predict`` callers in one batch (queued while the worker was held); the first one woken is
    interrupted: by an error just after its wait ended (``error``), by a second one while handling the
    first (``twice``: only the worker's safety net can end that chain), or by an asynchronous
    KeyboardInterrupt delivered while it waits (``async``). Every other caller gets its own answer, the
    queue leaves its hand-over state, and later predicts are answered."""
    outcomes: dict[int, object] = {}
    victim: list[threading.Thread] = []
    fired = _interrupt_once(monkeypatch, victim, {"error": ("_take",), "twice": ("_take", "_give_up"),
                                                  "async": ()}[how])
    with mm.serve(cells, "cells", cache_size=0, watch_s=None) as server:
        xs = [torch.randn(5, generator=torch.Generator().manual_seed(k)) for k in range(6)]

        def call(k: int) -> None:
            try:
                outcomes[k] = server.predict(k, xs[k], timeout=CALLER_TIMEOUT_S).output
            except BaseException as e:  # noqa: BLE001 - the outcome is what is checked
                outcomes[k] = type(e).__name__

        threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(6)]
        victim.append(threads[0])
        with held(server):
            for k, t in enumerate(threads):  # queued in this order: the victim is the chain's first
                t.start()
                deadline = time.perf_counter() + PROMPT_S
                while len(server.queue) <= k and time.perf_counter() < deadline:
                    time.sleep(0.001)
            assert len(server.queue) == 6
            time.sleep(0.05)  # (each caller blocked in its wait)
            if how == "async":
                _async_raise(threads[0], KeyboardInterrupt)  # raised once its wait ends
        t0 = time.perf_counter()
        for t in threads:
            t.join(max(0.0, PROMPT_S - (time.perf_counter() - t0)))
        assert not any(t.is_alive() for t in threads), "a predict caller was left waiting"
        assert outcomes[0] == "KeyboardInterrupt" and fired == list(
            {"error": ("_take",), "twice": ("_take", "_give_up"), "async": ()}[how])
        ms = cells.recover_set("cells")
        with torch.no_grad():
            for k in range(1, 6):
                assert torch.allclose(outcomes[k], ms[k](xs[k][None])[0], atol=1e-5), f"caller {k}'s own answer"
        deadline = time.perf_counter() + PROMPT_S
        while server.queue._handing and time.perf_counter() < deadline:
            time.sleep(0.01)
        assert not server.queue._handing, "the queue left its hand-over state"
        again = server.predict(3, xs[3], timeout=PROMPT_S)
        assert torch.allclose(again.output, outcomes[3])


def _interrupt_at(k: int, count: list[int], files: tuple[str, ...] = ()):
    """A trace function raising KeyboardInterrupt at the ``k``-th point in ``batching`` (or in
    ``files``) where the interpreter can deliver an asynchronous exception or a signal's
    KeyboardInterrupt: a function's entry, just after a call returned, a loop's backward jump (in the
    thread that sets it; a raising trace function is unset, so it fires once). Counts the points
    passed in ``count``."""
    import dis

    from mm_jupyter.serving import batching

    files = files or (batching.__file__,)
    last: dict[int, str] = {}  # the instruction each frame ran last

    def point() -> None:
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt

    def opcodes(frame, event, arg):
        if event == "opcode":
            if last[id(frame)].startswith(("CALL", "JUMP_BACKWARD")):
                point()
            last[id(frame)] = dis.opname[frame.f_code.co_code[frame.f_lasti]]
        return opcodes

    def calls(frame, event, arg):
        if frame.f_code.co_filename not in files:
            return None
        frame.f_trace_opcodes = True
        last[id(frame)] = ""
        point()
        return opcodes

    return calls


@pytest.mark.parametrize("victim_at", [0, 3])
def test_an_interrupt_at_any_point_of_a_caller_s_hand_over_leaves_nobody_waiting(victim_at):
    """Every point where a woken caller can be interrupted in ``batching`` (its wait, taking its answer,
    passing the baton, the chain's end) is interrupted in turn: the other callers get their answers, the interrupted one
    its answer or the interrupt, and the queue's hand-over ends (by the chain, else by the worker)."""
    import sys

    import numpy as np

    from mm_jupyter.serving.batching import Request, RequestQueue

    def run(k: int) -> tuple[dict[int, object], int]:
        q = RequestQueue(100, 8, max_wait_s=0.0)
        answers = [Answer() for _ in range(4)]
        got: dict[int, object] = {}
        lines = [0]

        def wait(j: int) -> None:
            try:
                if j == victim_at:
                    sys.settrace(_interrupt_at(k, lines))
                try:
                    got[j] = answers[j].result(CALLER_TIMEOUT_S)
                finally:
                    sys.settrace(None)
            except BaseException as e:  # noqa: BLE001 - the outcome is what is checked
                got[j] = type(e).__name__

        threads = [threading.Thread(target=wait, args=(j,), daemon=True) for j in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.02)
        worker_errors: list[BaseException] = []

        def work() -> None:
            try:
                q.hand_over(answers, [0, 1, 2, 3])
                q.take()
            except BaseException as e:  # noqa: BLE001 - reported below
                worker_errors.append(e)

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        for t in threads:
            t.join(PROMPT_S)
        assert not any(t.is_alive() for t in threads), f"interrupted at point {k}: a caller was left waiting"
        deadline = time.perf_counter() + PROMPT_S
        while q._handing and time.perf_counter() < deadline:
            time.sleep(0.005)
        assert not q._handing, f"interrupted at point {k}: the hand-over never ended"
        q.put(Request("m", np.zeros((1, 5), np.float32), True, None, time.perf_counter()))
        worker.join(PROMPT_S)
        assert not worker.is_alive() and not worker_errors
        return got, lines[0]

    plain, total = run(0)  # (k=0: never fires; counts the points)
    assert plain == {0: 0, 1: 1, 2: 2, 3: 3} and total > 10
    for k in range(1, total + 1):
        got, _ = run(k)
        others = {j: v for j, v in got.items() if j != victim_at}
        assert others == {j: j for j in range(4) if j != victim_at}, f"interrupted at point {k}"
        assert got[victim_at] in (victim_at, "KeyboardInterrupt"), f"interrupted at point {k}"


def test_the_safety_net_never_releases_an_answer_that_was_not_set():
    """A hand-over that failed before setting its answers (here: one of them was set already, so
    ``hand_over`` refuses the batch) leaves them alone: ended by the safety net, a caller would read
    None as its answer; it gets the worker's error or its timeout instead."""
    from mm_jupyter.serving.batching import RequestQueue

    q = RequestQueue(100, 8, max_wait_s=0.0)
    fresh, answered = Answer(), Answer()
    answered.set_result("already")
    with pytest.raises(RuntimeError):
        q.hand_over([fresh, answered], ["x", "y"])
    with q._lock:
        q._rescue(every=True)
        assert not q._handing
    with pytest.raises(TimeoutError):
        fresh.result(0.05)
    fresh.set_exception(ValueError("the worker's error"))
    with pytest.raises(ValueError):
        fresh.result(1)


@pytest.mark.parametrize("how", ["put", "put_many", "close"])
def test_an_interrupt_anywhere_in_a_caller_s_queue_call_leaves_the_queue_working(how):
    """A ``predict`` caller is the notebook's main thread: Ctrl-C can land anywhere in its ``put``,
    including inside the locking it calls. At every such point in turn: the queue's lock is free
    afterwards and the worker still takes the next request at once (before: an interrupt inside
    ``Condition.__enter__`` left the lock held, and every later caller hung on it; one inside
    ``notify`` left a stale waiter that a later notify tripped over)."""
    import sys

    import numpy as np

    from mm_jupyter.serving import batching
    from mm_jupyter.serving.batching import Request, RequestQueue

    files = (batching.__file__, threading.__file__)

    def request() -> Request:
        return Request("m", np.zeros((1, 5), np.float32), True, None, time.perf_counter())

    def run(k: int) -> int:
        q = RequestQueue(100, 8, max_wait_s=0.0)
        taken: list[object] = []
        worker = threading.Thread(target=lambda: taken.extend([q.take(), q.take()]), daemon=True)
        worker.start()
        time.sleep(0.01)  # the worker waits for requests
        lines = [0]

        def caller() -> None:
            sys.settrace(_interrupt_at(k, lines, files))
            try:
                if how == "put":
                    q.put(request())
                elif how == "put_many":
                    q.put_many([request(), request()])
                else:
                    q.close()
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)

        t = threading.Thread(target=caller, daemon=True)
        t.start()
        t.join(PROMPT_S)
        assert not t.is_alive(), f"interrupted at point {k}: the caller hung"
        done = [False]

        def again() -> None:  # a later caller, uninterrupted
            try:
                q.put(request())
            except Exception:  # noqa: BLE001 - closed is an answer too
                pass
            done[0] = True

        later = threading.Thread(target=again, daemon=True)
        later.start()
        later.join(PROMPT_S)
        assert done[0], f"interrupted at point {k}: the queue's lock was left held"
        closer = threading.Thread(target=q.close, daemon=True)  # (another thread: a reused id could re-enter)
        closer.start()
        closer.join(PROMPT_S)
        assert not closer.is_alive(), f"interrupted at point {k}: the queue's lock was left held"
        worker.join(PROMPT_S)
        assert not worker.is_alive(), f"interrupted at point {k}: the worker was never woken"
        return lines[0]

    total = run(0)  # (k=0: never fires; counts the points)
    assert total >= 3
    for k in range(1, total + 1):
        run(k)
