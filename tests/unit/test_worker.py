"""The worker beside the loop: jobs off the loop thread, results back on it, bounded and coalesced."""

from __future__ import annotations

import selectors
import threading
import time

import pytest

from tunvpn.io.worker import InlineWorker, Worker


def wait_for_results(worker: Worker, count: int, seen: list, timeout: float = 5.0) -> None:
    """Drive the worker's side of the loop until `count` callbacks ran (bounded in time)."""
    with selectors.DefaultSelector() as selector:
        worker.register(selector)
        deadline = time.monotonic() + timeout
        while len(seen) < count:
            assert time.monotonic() < deadline, f"only {len(seen)} of {count} results"
            for key, mask in selector.select(0.1):
                assert worker.owns(key)
                worker.handle(key, mask)


def test_jobs_run_beside_the_loop_and_results_come_back_on_it():
    worker = Worker("test")
    seen = []
    loop_thread = threading.get_ident()
    try:
        for n in range(5):
            worker.submit(f"job {n}", lambda n=n: (n, threading.get_ident()),
                          lambda result, error: seen.append((result, error, threading.get_ident())))
        wait_for_results(worker, 5, seen)
    finally:
        worker.close()
    assert [result[0] for result, _, _ in seen] == [0, 1, 2, 3, 4]  # in order
    assert all(job_thread != loop_thread and done_thread == loop_thread for (_, job_thread), _, done_thread in seen)


def test_an_exception_is_handed_to_the_callback():
    worker = Worker("test")
    seen = []
    try:
        worker.submit("failing", lambda: 1 / 0, lambda result, error: seen.append(error))
        wait_for_results(worker, 1, seen)
    finally:
        worker.close()
    assert isinstance(seen[0], ZeroDivisionError)


def test_a_job_queued_under_a_key_replaces_the_one_not_yet_started():
    worker = Worker("test")
    gate = threading.Event()
    seen = []
    try:
        worker.submit("blocker", gate.wait, lambda result, error: seen.append("blocker"))
        time.sleep(0.05)  # the blocker is running now
        for n in range(10):
            worker.submit("save", lambda n=n: n, lambda result, error: seen.append(result), key="state")
        gate.set()
        wait_for_results(worker, 2, seen)
    finally:
        worker.close()
    assert seen == ["blocker", 9]  # ten saves, one write: the newest


def test_the_queue_is_bounded():
    worker = Worker("test", max_pending=3)
    gate = threading.Event()
    try:
        assert worker.submit("blocker", gate.wait)
        time.sleep(0.05)
        assert [worker.submit(f"job {n}", lambda: None) for n in range(4)] == [True, True, True, False]
        assert worker.submit("keyed", lambda: None, key="k") is False  # full, and k is not queued
    finally:
        gate.set()
        worker.close()


def test_close_finishes_what_is_queued_and_delivers_it():
    worker = Worker("test")
    seen = []
    for n in range(3):
        worker.submit(f"job {n}", lambda n=n: time.sleep(0.01) or n, lambda result, error: seen.append(result))
    worker.close()
    assert seen == [0, 1, 2]


def test_a_slow_job_is_reported_once(monkeypatch, caplog):
    monkeypatch.setattr("tunvpn.io.worker.SLOW_JOB_SECONDS", 0.05)
    worker = Worker("resolver")
    gate = threading.Event()
    try:
        worker.submit("resolving vpn.example.org", gate.wait)
        time.sleep(0.2)
        worker.expire(time.monotonic())
        worker.expire(time.monotonic())
    finally:
        gate.set()
        worker.close()
    assert caplog.text.count("resolving vpn.example.org has taken over") == 1


@pytest.mark.parametrize("fails", [False, True])
def test_the_inline_worker_runs_at_once(fails):
    seen = []
    InlineWorker().submit("now", (lambda: 1 / 0) if fails else (lambda: 42), lambda r, e: seen.append((r, type(e))))
    assert seen == [(None, ZeroDivisionError)] if fails else seen == [(42, type(None))]
