"""The loop survives a handler that raises: counted, logged once with its traceback, next event handled.

The event loop's hand-off points (core events, signal handlers) are driven directly: no tun,
socket or root is needed for what happens when daemon code raises.
"""

from __future__ import annotations

import logging
import os
import signal
import types

import pytest

from corepair import CorePair
from tunvpn.io.loop import EventLoop, Faults
from tunvpn.io.tun import TunDeleted
from tunvpn.protocol.device import EndpointChanged


def make_loop(device, on_event) -> EventLoop:
    udp = types.SimpleNamespace(send=lambda datagrams: None)
    return EventLoop(device, tun=None, udp=udp, on_event=on_event)  # type: ignore[arg-type]


def _tear_down(loop: EventLoop, *fds: int) -> None:
    """After `run`: close the loop, give the signals back their defaults, close the fake tun."""
    loop.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in fds:
        os.close(fd)


def test_an_event_handler_that_raises_does_not_stop_the_next_events(caplog):
    pair = CorePair()
    device = pair.b.device
    for port in (40001, 40002, 40003):  # three initiations from three ports: three endpoint changes
        pair.now += 10.0
        pair.a.device.initiate(device.public_key, pair.now)
        (initiation,) = pair.a.device.datagrams_to_send()
        device.receive_datagrams([(initiation[0], ("192.0.2.1", port))], pair.now)
    seen = []

    def handler(event):
        seen.append(event)
        if isinstance(event, EndpointChanged):
            raise ValueError("port 0 is not 1-65535")

    loop = make_loop(device, handler)
    try:
        with caplog.at_level(logging.ERROR):
            loop.flush()
    finally:
        loop.close()
    assert [event.endpoint[1] for event in seen if isinstance(event, EndpointChanged)] == [40001, 40002, 40003]
    assert loop.faults.counts == {"the EndpointChanged handler: ValueError": 3}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "port 0 is not 1-65535" in caplog.text


def test_a_signal_handler_that_raises_is_counted_and_the_loop_keeps_its_stop_signal():
    pair = CorePair()
    loop = make_loop(pair.a.device, lambda event: None)
    loop.signal_handlers[signal.SIGHUP] = lambda: 1 / 0
    try:
        loop._pending_signals = [signal.SIGHUP, signal.SIGTERM]
        loop._handle_signals()
    finally:
        loop.close()
    assert loop.faults.counts == {"the SIGHUP handler: ZeroDivisionError": 1}
    assert loop.stop_signal == signal.SIGTERM


def test_repeats_are_logged_at_powers_of_two_only(caplog):
    faults = Faults()
    with caplog.at_level(logging.ERROR):
        for _ in range(100):
            faults.record("somewhere", KeyError("x"))
    assert faults.counts["somewhere: KeyError"] == 100
    assert len(caplog.records) == 7  # 1, 2, 4, 8, 16, 32, 64


def test_a_deleted_tun_ends_the_loop_instead_of_failing_every_turn():
    """Every later read fails too: counting it as one bad event would spin the loop forever."""
    readable, writer = os.pipe()
    os.write(writer, b"x")  # the selector reports the "tun" readable at once

    def deleted(max_packets: int = 64):
        raise TunDeleted("cannot read from tun device 'tv0': the device was deleted")

    tun = types.SimpleNamespace(fileno=lambda: readable, read_batch=deleted)
    loop = EventLoop(CorePair().a.device, tun=tun, udp=types.SimpleNamespace(sockets=[], send=lambda d: None))
    try:
        with pytest.raises(TunDeleted):
            loop.run()
    finally:
        _tear_down(loop, readable, writer)
    assert not loop.faults.counts


def test_a_tick_that_keeps_failing_is_retried_once_a_second_not_in_a_spin():
    ticks = []

    def failing_tick(now: float):
        ticks.append(now)
        if len(ticks) >= 3:
            loop.stop_signal = signal.SIGTERM  # bounded: the third try ends the test
        raise RuntimeError("a daemon bug")

    udp = types.SimpleNamespace(sockets=[], send=lambda datagrams: None)
    readable, writer = os.pipe()  # stands in for a tun that never has a packet
    tun = types.SimpleNamespace(fileno=lambda: readable)
    loop = EventLoop(CorePair().a.device, tun=tun, udp=udp, on_tick=failing_tick)  # type: ignore[arg-type]
    try:
        loop.run()
    finally:
        _tear_down(loop, readable, writer)
    assert len(ticks) == 3
    assert ticks[2] - ticks[0] >= 1.5  # a spin would have made these three tries within microseconds
    assert loop.faults.counts == {"the daemon's timers: RuntimeError": 3}
