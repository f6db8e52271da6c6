"""Blocking work beside the event loop: name resolution, DNS helpers, state writes.

getaddrinfo can wait for a slow resolver for seconds, resolvconf is a subprocess, and a state
save fsyncs twice: none of that may stop packets.  A `Worker` runs such jobs one at a time on a
thread of its own and hands each result back to the loop through a pipe the loop's selector
watches (as signals already arrive), so every callback runs on the loop thread and daemon state
is never touched from two threads.

The queue is bounded, and a job submitted under a `key` replaces one with the same key that has
not started yet: ten SIGHUPs in a row reload once more, a burst of endpoint changes saves once.
Before the loop runs (start-up, unit tests) an `InlineWorker` runs jobs at once instead.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

MAX_PENDING = 64
SLOW_JOB_SECONDS = 10.0  # a job running longer is logged once: later jobs of this worker wait for it
STOP_TIMEOUT = 15.0

Done = Callable[[Any, BaseException | None], None]


@dataclass
class _Job:
    what: str
    run: Callable[[], Any]
    done: Done | None


class InlineWorker:
    """Runs each job at once, on the caller's thread: before the loop exists, and in tests."""

    def submit(self, what: str, run: Callable[[], Any], done: Done | None = None, key: str | None = None) -> bool:
        try:
            result, error = run(), None
        except Exception as exc:
            result, error = None, exc
        if done is not None:
            done(result, error)
        elif error is not None:
            log.error("%s failed: %s", what, error)
        return True


class Worker:
    """One background thread, a bounded queue of jobs, results delivered on the loop thread."""

    def __init__(self, name: str, max_pending: int = MAX_PENDING) -> None:
        self.name = name
        self.max_pending = max_pending
        self._pending: OrderedDict[object, _Job] = OrderedDict()
        self._finished: deque[tuple[_Job, Any, BaseException | None]] = deque()
        self._lock = threading.Condition()
        self._running: tuple[str, float] | None = None  # (what, since) of the job on the thread
        self._warned_slow = False
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._work, name=f"tunvpn-{name}", daemon=True)
        self._thread.start()

    def submit(self, what: str, run: Callable[[], Any], done: Done | None = None, key: str | None = None) -> bool:
        """Queue `run`; `done(result, error)` runs on the loop thread. False when the queue is full."""
        with self._lock:
            slot: object = key if key is not None else object()
            if slot not in self._pending and len(self._pending) >= self.max_pending:
                log.warning("%s: %d jobs waiting; dropped %s", self.name, len(self._pending), what)
                return False
            self._pending.pop(slot, None)
            self._pending[slot] = _Job(what, run, done)
            self._lock.notify()
        return True

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stopping:
                    self._lock.wait()
                if not self._pending:
                    return
                _, job = self._pending.popitem(last=False)
                self._running = (job.what, time.monotonic())
            try:
                result, error = job.run(), None
            except Exception as exc:
                result, error = None, exc
            with self._lock:
                self._running = None
                self._finished.append((job, result, error))
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # the loop has a wake-up pending already

    # --- the loop's side (a Service of io.loop) --------------------------------------------

    def register(self, selector: selectors.BaseSelector) -> None:
        selector.register(self._wake_r, selectors.EVENT_READ, self)

    def owns(self, key: selectors.SelectorKey) -> bool:
        return key.data is self

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        self.deliver()

    def deliver(self) -> None:
        """Run the callbacks of finished jobs (on the calling thread: the loop's)."""
        while True:
            with self._lock:
                if not self._finished:
                    return
                job, result, error = self._finished.popleft()
            if job.done is not None:
                job.done(result, error)
            elif error is not None:
                log.error("%s failed: %s", job.what, error)

    def expire(self, now: float) -> None:
        with self._lock:
            running = self._running
        if running is None:
            self._warned_slow = False
        elif not self._warned_slow and time.monotonic() - running[1] > SLOW_JOB_SECONDS:
            self._warned_slow = True
            log.warning("%s: %s has taken over %.0f s; later jobs wait for it", self.name, running[0],
                        SLOW_JOB_SECONDS)

    def close(self, timeout: float = STOP_TIMEOUT) -> None:
        """Finish what is queued (bounded by `timeout`), deliver the results, stop the thread."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)
        self.deliver()
        if self._thread.is_alive():
            # Its pipe stays open: a thread still inside a job must not write to a reused fd.
            log.warning("%s: gave up waiting for %s after %.0f s", self.name,
                        self._running[0] if self._running else "queued jobs", timeout)
            return
        os.close(self._wake_r)
        os.close(self._wake_w)
