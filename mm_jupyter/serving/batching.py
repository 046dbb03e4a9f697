"""The bounded request queue and dynamic batch formation.

``put`` never blocks: a full queue raises ``QueueFullError`` at once (back-pressure the caller can
see, instead of a silently dropped or endlessly waiting request). ``take`` hands the worker the next
batch, at most ``max_batch`` rows. An idle worker never waits: when it found the queue empty, the
request that wakes it is taken with whatever else is queued by then, so a lone request costs no
batching delay. Batches form while the worker computes: the requests that arrived meanwhile are
the next batch. Only such a forming batch may be held back for more requests (Triton's "max queue
delay"): at most until its oldest request has waited ``max_wait_s``, or until it is full. The
worker is not idle either while the answers of its last batch are still being handed to their
``predict`` callers one after another (see ``Answer``): a request then waits for the hand-over to
end (at most ``max(max_wait_s, HAND_OVER_S)``; no hold at all with ``max_wait_s=0``), because those
callers come back with requests of their own. Without
that, closed-loop callers drift into a worker taking batches of 1-4 while the callers still run,
and every one of its GIL releases becomes a fight between threads (CPU per answer 70 -> 200 µs).
"""
from __future__ import annotations

import _thread
import threading
import time
from collections import deque
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

import numpy as np

from .errors import QueueFullError, ServerClosedError

if TYPE_CHECKING:
    from .types import Prediction


#: the longest a batch waits for the hand-over of the last one to end (when holds are on at all):
#: a chain of 8 callers takes ~0.1 ms on an idle machine, 0.2-0.5 ms on a loaded one (measured)
HAND_OVER_S = 0.002
#: a hand-over not ended after ``max(max_wait_s, RESCUE_S)`` is ended by the worker (``rescue``): a
#: caller was interrupted while it held the baton. Hundreds of times a chain's real time, so a slow
#: chain is rarely cut (which would only wake its callers at once), short against a predict timeout
RESCUE_S = 0.1
#: where an ``Answer`` stands (``Answer._state``)
_WAITING, _WOKEN, _ABANDONED, _RELEASED, _TAKEN = range(5)
#: guards the hand-over of the baton along a batch's chain of answers (held for a few bytecodes)
_CHAIN = _thread.allocate_lock()


class Answer:
    """Where the answer of one ``predict`` goes: a one-shot slot the caller blocks on. It holds one C
    lock, taken at creation and released to answer, so handing an answer to a waiting thread is one
    lock release (a ``Future`` is a Condition: a lock per waiter, a second lock to re-take, callbacks;
    about twice the hand-off time). Setting it twice raises, as a Future does.

    The answers of one batch are handed over as a chain (``hand_over``): the worker wakes the first
    caller only, and each caller, once woken, wakes the next. Waking every caller at once makes them
    all fight for the GIL the moment they wake: each loser sleeps again, and every such round trip is a
    context switch (4.6 per answer with 8 callers, measured; 1.9 with the chain). A caller that
    gives up waiting (timeout, interrupt) is stepped over, so the callers behind it are still woken;
    one interrupted after it was woken passes the baton in its handler. Where even that is cut short
    (a second interrupt; one before its wait began), the worker ends the chain once
    ``max(max_wait_s, RESCUE_S)`` passed (in or at its next ``take``: ``rescue``), so no caller waits
    for a baton that never comes, nor the queue for a hand-over that never ends."""

    __slots__ = ("_lock", "_value", "_error", "_done", "_state", "_next", "_then")

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._lock.acquire()
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = False
        self._state = _WAITING
        self._next: Answer | None = None  # the caller to wake after this one (a chain of one batch)
        self._then: Callable[[], None] | None = None  # what the chain's last caller calls once woken

    def done(self) -> bool:
        return self._done

    def _refuse_second(self) -> None:
        if self._done:
            raise RuntimeError("this answer was already set")

    def set_result(self, value: Any) -> None:
        self._refuse_second()
        self._value = value
        self._done = True
        self._lock.release()

    def set_exception(self, error: BaseException) -> None:
        self._refuse_second()
        self._error = error
        self._done = True
        self._lock.release()

    def result(self, timeout: float | None = None) -> Any:
        """The answer, waiting at most ``timeout`` seconds (None: for ever); the error, raised. An
        answer set while the wait ran out is returned, not a timeout."""
        if self._state != _TAKEN:
            try:
                got = self._lock.acquire(True, -1 if timeout is None else max(timeout, 0.0))
                then = self._take() if got else self._give_up()
            except BaseException:
                # interrupted (KeyboardInterrupt, an asynchronous exception), possibly after the chain
                # woke this caller: the baton still moves on, or the callers behind it wait for nothing
                then = self._give_up()
                if then is not None:
                    then()
                raise
            if then is not None:
                then()
            if not got and not self._done:
                raise FutureTimeout(f"no answer within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def _take(self) -> Callable[[], None] | None:
        """The lock was acquired: the answer is this caller's; pass the baton when it was woken along
        a chain. Returns the chain's ``then`` when the chain ended here (called outside ``_CHAIN``)."""
        with _CHAIN:
            woken = self._state == _WOKEN
            self._state = _TAKEN
            return self._hand_on() if woken else None

    def _give_up(self) -> Callable[[], None] | None:
        """Stop waiting (timeout, interrupt). A caller the chain has not reached is stepped over later;
        one it woke meanwhile has its answer, and passes the baton now. Returns as ``_take``."""
        with _CHAIN:
            if self._state == _WAITING:
                self._state = _ABANDONED
            elif self._state == _WOKEN:
                self._state = _TAKEN
                return self._hand_on()
            return None

    def _hand_on(self) -> Callable[[], None] | None:
        """(``_CHAIN`` held, by the caller holding the baton) Wake the next caller; the chain's ``then``
        when it ends here. Clearing the links first makes a second call a no-op."""
        after, then = self._next, self._then
        self._next = self._then = None
        return _wake(after, then)


def _wake(answer: Answer | None, then: Callable[[], None] | None) -> Callable[[], None] | None:
    """(``_CHAIN`` held) Release the first caller from ``answer`` on that still waits, with the baton;
    those that gave up are released without it (a later ``result()`` of theirs still returns the
    answer). Returns ``then`` (what to call once the lock is let go) when all did and the chain ended;
    None when it stops at an answer ``rescue`` released (the chain was ended for it)."""
    while answer is not None:
        state = answer._state
        if state == _WAITING:
            answer._state = _WOKEN
            answer._lock.release()
            return None
        if state != _ABANDONED:
            return None
        answer._state = _RELEASED
        answer._lock.release()
        then = answer._then
        answer = answer._next
    return then


def hand_over(answers: Sequence[Answer], values: Sequence[Any], then: Callable[[], None]) -> None:
    """Set ``answers[j]`` to ``values[j]`` and wake their callers as a chain (see ``Answer``); the last
    caller woken (or the waker stepping past it) calls ``then``."""
    for a in answers:
        a._refuse_second()
    for j, a in enumerate(answers):
        a._value, a._done = values[j], True
        a._next = answers[j + 1] if j + 1 < len(answers) else None
    if answers:
        answers[-1]._then = then
        with _CHAIN:
            ended = _wake(answers[0], None)
        if ended is not None:
            ended()
    else:
        then()


def rescue(answers: Sequence[Answer]) -> None:
    """End a chain whose baton may be lost (a caller interrupted between its wake-up and passing the
    baton on, even inside its handler): every caller not yet answered is released at once, and a
    late baton holder finds no link to follow. Its ``then`` is not called: the rescuer does its part.
    Safe at any point of the chain (all under ``_CHAIN``); releasing a lock a caller already took
    again is harmless, its answer is set. An answer not set (a hand-over that failed before setting
    it) is left alone: released, its caller would read None as its answer."""
    with _CHAIN:
        for a in answers:
            if a._state != _TAKEN and a._done:
                a._state = _RELEASED
                if a._lock.locked():
                    a._lock.release()
            a._next = a._then = None


#: a request's answer: a Future for ``submit`` (callers may wait, poll or chain), an Answer for ``predict``
Reply = Union["Future[Prediction]", Answer]


class Request:
    """One request: a model (name, and its index in the version ``ref_id`` it was checked against),
    its input as ``(rows, *input_shape)`` and where the answer goes. A plain slotted class: one is
    made per request, so its construction cost counts."""

    __slots__ = ("model", "index", "ref_id", "x", "rows", "single", "digest", "t_submit", "t_arrival", "future")

    def __init__(self, model: str, x: np.ndarray, single: bool, digest: bytes | None, t_submit: float,
                 t_arrival: float | None = None, index: int = -1, ref_id: int | None = None,
                 reply: Reply | None = None) -> None:
        self.model, self.index, self.ref_id = model, index, ref_id
        self.x = x
        self.rows = len(x)          # (read several times per request: kept, not a property)
        self.single = single        # the caller sent one item (answer without the row dimension)
        self.digest = digest        # input digest for the cache (None: cache disabled)
        self.t_submit = t_submit
        #: when the request arrived (latency runs from here): its submission, or a load generator's schedule
        self.t_arrival = t_arrival
        self.future: Reply = Future() if reply is None else reply


class RequestQueue:
    """FIFO of at most ``max_size`` requests; batches hold at most ``max_batch`` rows (a single
    request larger than that is a batch of its own)."""

    def __init__(self, max_size: int, max_batch: int, max_wait_s: float,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if max_size < 1 or max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_size and max_batch must be >= 1 and max_wait_s >= 0")
        self.max_size, self.max_batch, self.max_wait_s = max_size, max_batch, max_wait_s
        self._clock = clock
        self._items: deque[Request] = deque()
        self._rows = 0
        self._closed = False
        self.peak = 0  # the most requests ever waiting
        #: the answers of batches being handed to their callers, and when each hand-over is ended for it
        #: (see ``hand_over``; two lists, not an object per batch: the collector's passes count allocations)
        self._handing: list[Sequence[Answer]] = []
        self._deadlines: list[float] = []
        self._started = False  # the worker took a batch before: until then nothing queued up while it was busy
        #: till when the idle worker would hold a first request anyway, while a hand-over runs (see ``put``)
        self._quiet_until = 0.0
        # The queue's lock and the worker's wake-up are C locks, not a ``threading.Condition``: callers are
        # often a notebook's main thread, where Ctrl-C can land anywhere in Python code; ``with`` on a C
        # lock and a release are single C calls, while ``Condition.__enter__`` (Python) could be interrupted
        # holding the lock (every later caller hung) and ``notify`` could leave a stale waiter behind.
        self._lock = threading.RLock()
        #: held while no wake-up is pending: ``_notify`` releases it, the waiting worker takes it (``_wait``)
        self._wake = _thread.allocate_lock()
        self._wake.acquire()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, request: Request) -> None:
        """Enqueue ``request``. Raises QueueFullError or ServerClosedError instead of blocking."""
        with self._lock:
            items = self._items
            if self._closed:
                raise ServerClosedError("the server is closed; start a new one with mm.serve(...)")
            if len(items) >= self.max_size:
                raise QueueFullError(f"request queue full ({self.max_size} waiting): retry later, "
                                     "or serve with a larger max_queue")
            items.append(request)
            rows = self._rows = self._rows + request.rows
            depth = len(items)
            if depth > self.peak:
                self.peak = depth
            # wake the worker only when it can act: at a first request, or as a batch fills up (not at
            # every request after: each wake-up it cannot act on costs it a pass through its loop).
            # A first request while a hand-over runs would only make the worker hold it: the hand-over's
            # end wakes the worker (``_handed``), and so does its hold's limit (the wait's timeout in ``take``)
            if depth == 1 and self._announced() or self.max_batch <= rows < self.max_batch + request.rows:
                self._notify()

    def put_many(self, requests: list[Request]) -> None:
        """Enqueue all of ``requests`` under one lock, or none of them (QueueFullError, ServerClosedError)."""
        with self._lock:
            items = self._items
            if self._closed:
                raise ServerClosedError("the server is closed; start a new one with mm.serve(...)")
            if len(items) + len(requests) > self.max_size:
                raise QueueFullError(f"request queue full ({len(items)} of {self.max_size} waiting, "
                                     f"{len(requests)} more sent): retry later, or serve with a larger max_queue")
            was_empty, before = not items, self._rows
            items.extend(requests)
            self._rows += sum(r.rows for r in requests)
            self.peak = max(self.peak, len(items))
            if requests and (was_empty and self._announced() or before < self.max_batch <= self._rows):
                self._notify()

    def _notify(self) -> None:
        """(the lock held) Wake the worker: one C call (a wake-up already pending is kept, not doubled)."""
        try:
            self._wake.release()
        except RuntimeError:  # (released already: a wake-up is pending)
            pass

    def _wait(self, timeout: float | None) -> None:
        """(the worker, holding the lock once) Let the lock go until a wake-up or ``timeout`` seconds,
        then take it again. A wake-up posted since the worker last waited ends the wait at once: none is
        lost between its check of the queue and its wait (the caller re-checks in a loop)."""
        self._lock.release()
        try:
            self._wake.acquire(True, -1 if timeout is None else max(timeout, 0.0))
        finally:
            self._lock.acquire()

    def _announced(self) -> bool:
        """(the lock held) Whether a first request wakes the waiting worker: not while a hand-over runs
        and the worker would hold the request anyway (until ``_quiet_until``, see ``take``)."""
        return not (self._handing and self._clock() < self._quiet_until)

    def take(self, batching: bool = True) -> list[Request] | None:
        """The next batch (one request when ``batching`` is False); None once closed and empty. The
        worker calling it also ends the hand-overs that ran past their limit (see ``rescue``)."""
        with self._lock:
            # queued up while the worker was busy (not while it was starting): this batch may be held to fill
            piled = bool(self._items) and self._started
            until = self._clock() + max(self.max_wait_s, HAND_OVER_S)
            if self._handing:  # (a busy worker that never waits ends a stuck hand-over here)
                self._rescue()
            hold = batching and self.max_wait_s > 0
            while True:
                while not self._items:
                    if self._closed:  # the worker's last take: nobody would end a stuck hand-over later
                        self._rescue(every=True)
                        return None
                    timeout, left = self._rescue(), until - self._clock()
                    if hold and timeout is not None and left > 0:  # a first request is not announced till ``until``
                        self._quiet_until = until
                        timeout = min(timeout, left)
                    self._wait(timeout)
                    self._quiet_until = 0.0
                if hold:
                    self._hold(piled, until)
                if self._items:  # (a close without draining may have emptied the queue meanwhile)
                    break
            batch = [self._items.popleft()]
            rows = batch[0].rows
            if batching:
                while self._items and rows + self._items[0].rows <= self.max_batch:
                    item = self._items.popleft()
                    rows += item.rows
                    batch.append(item)
            self._rows -= rows
            self._started = True
            return batch

    def _hold(self, piled: bool, until: float) -> None:
        """Let the batch fill (the lock held): while the last batch's answers are still being handed
        to their callers (until ``until`` at most: those callers come back with more requests), and,
        for a batch that piled up, until its oldest request has waited ``max_wait_s``."""
        while self._items and self._rows < self.max_batch and not self._closed:
            rescue_in = self._rescue()
            now = self._clock()
            if rescue_in is not None and now < until:
                remaining = min(until - now, rescue_in)
            elif piled and now < self._items[0].t_submit + self.max_wait_s:
                remaining = self._items[0].t_submit + self.max_wait_s - now
            else:
                return
            self._wait(remaining)

    def hand_over(self, answers: Sequence[Answer], values: Sequence[Any]) -> None:
        """Hand a batch's answers to their waiting callers (``hand_over``); a batch held for the callers'
        return may go once the last took its answer, or once ``rescue`` ended a hand-over that did not.
        Called by the worker, whose next ``take`` watches the limit (a waiting ``take`` is not told)."""
        with self._lock:
            self._handing.append(answers)
            self._deadlines.append(self._clock() + max(self.max_wait_s, RESCUE_S))
        hand_over(answers, values, self._handed)

    def _handed(self) -> None:
        """A hand-over ended: forget every one that did (its last caller was answered or stepped over;
        that state is set before the chain's end is announced, and never left)."""
        with self._lock:
            handing = self._handing
            for j in range(len(handing) - 1, -1, -1):
                if not handing[j] or handing[j][-1]._state in (_RELEASED, _TAKEN):
                    del handing[j], self._deadlines[j]
            self._notify()

    def _rescue(self, every: bool = False) -> float | None:
        """(the lock held) End the hand-overs past their deadline (all with ``every``); the seconds
        until the next deadline, None when no hand-over is left. Runs per batch: allocates nothing."""
        deadlines = self._deadlines
        if not deadlines:
            return None
        now = self._clock()
        soonest = None
        for j in range(len(deadlines) - 1, -1, -1):
            if every or deadlines[j] <= now:
                rescue(self._handing[j])
                del self._handing[j], deadlines[j]
            elif soonest is None or deadlines[j] < soonest:
                soonest = deadlines[j]
        return None if soonest is None else soonest - now

    def close(self) -> None:
        """Refuse new requests; the worker still answers those waiting (see ``drain``)."""
        with self._lock:
            self._closed = True
            self._notify()

    def drain(self) -> list[Request]:
        """Remove and return every waiting request (to fail them when closing without answering)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._rows = 0
            self._notify()
        return items
