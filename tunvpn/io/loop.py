"""The one event loop: the only place that blocks.

It moves bytes between the tun, the UDP sockets and the protocol core and
re-arms a single timer from `device.get_timer()`.  Signals arrive through
`signal.set_wakeup_fd`, so a handler never runs protocol code in the middle
of a batch.

The loop waits on a bare epoll whose every descriptor maps straight to its handler: the tun,
each UDP socket, the signal pipe, and the services' own selector (an epoll itself, nested),
so a turn that only moves packets pays nothing for the selectors module's bookkeeping.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import signal
import time
from collections import Counter
from functools import partial
from typing import Callable, Protocol, TypeVar

from ..protocol.device import Device, Event
from .tun import TunDeleted, TunDevice
from .udp import UdpTransport

log = logging.getLogger(__name__)

T = TypeVar("T")
_MAX_EVENTS = 64  # per epoll wait: a handful of data descriptors and one for the services
MAX_WAIT = 1.0  # wake at least this often, to refresh the wall clock and to notice stop requests
# The daemon's tick and the services' expire() run at least this often, and not on every turn:
# a turn that only moves packets would otherwise pay for them (tens of us each, per wakeup).
HOUSEKEEPING_INTERVAL = 1.0


class Service(Protocol):
    """Something else the loop watches (the control socket): it registers its own fds."""

    def register(self, selector: selectors.BaseSelector) -> None: ...

    def owns(self, key: selectors.SelectorKey) -> bool: ...

    def handle(self, key: selectors.SelectorKey, mask: int) -> None: ...

    def expire(self, now: float) -> None: ...


class Faults:
    """Exceptions that escaped a handler: counted by place, and the loop goes on.

    One bad event (a peer's odd endpoint, a refused system call nobody foresaw) must not cut
    every client's tunnel.  The first traceback of each place is logged in full; repeats are
    logged at 2, 4, 8, ... so a fault that fires per packet cannot flood the journal.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record(self, place: str, exc: Exception) -> None:
        key = f"{place}: {type(exc).__name__}"
        self.counts[key] += 1
        count = self.counts[key]
        if count == 1:
            log.error("unexpected error in %s; carrying on (counted in `tunvpn show`)", place, exc_info=exc)
        elif count & (count - 1) == 0:
            log.error("unexpected error in %s again (%d times so far): %s", place, count, exc)


class EventLoop:
    def __init__(
        self,
        device: Device,
        tun: TunDevice,
        udp: UdpTransport,
        on_event: Callable[[Event], None] | None = None,
        on_tick: Callable[[float], float | None] | None = None,
        services: tuple[Service, ...] = (),
        faults: Faults | None = None,
    ) -> None:
        """`on_tick(now)` returns the daemon's own next deadline; it runs then, after a turn that
        did more than move packets (events, signals, services), and at least once a second."""
        self.device = device
        self.tun = tun
        self.udp = udp
        self.on_event = on_event or (lambda event: None)
        self.on_tick = on_tick or (lambda now: None)
        self.services = services
        self.stop_signal: int | None = None
        self._epoll = select.epoll()
        self._selector = selectors.DefaultSelector()  # the services' descriptors, nested in the epoll
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending_signals: list[int] = []
        self._signals_installed = False
        self.signal_handlers: dict[int, Callable[[], None]] = {}
        self.faults = faults or Faults()

    # --- signals -------------------------------------------------------------

    def install_signals(self) -> None:
        """Catch the signals now; they are handled once `run` is looping (idempotent)."""
        if self._signals_installed:
            return
        self._signals_installed = True
        signal.set_wakeup_fd(self._signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, *self.signal_handlers):
            signal.signal(signum, self._note_signal)

    def _note_signal(self, signum: int, frame: object) -> None:
        self._pending_signals.append(signum)

    def _handle_signals(self) -> None:
        try:
            os.read(self._signal_r, 512)
        except BlockingIOError:
            pass
        pending, self._pending_signals = self._pending_signals, []
        for signum in pending:
            handler = self.signal_handlers.get(signum)
            if handler is not None:
                self._guarded(f"the {signal.Signals(signum).name} handler", handler)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_signal = signum

    # --- running ---------------------------------------------------------------

    def _handlers(self) -> dict[int, tuple[Callable[[], bool | None], str]]:
        """Each watched descriptor's handler, and the place its faults are counted under. A
        handler returns True when the daemon's tick should follow (not for moving packets)."""
        handlers: dict[int, tuple[Callable[[], bool | None], str]] = {
            self.tun.fileno(): (self._on_tun, "the tun receive path")}
        for sock in self.udp.sockets:
            handlers[sock.fileno()] = (partial(self._on_udp, sock), "the UDP receive path")
        handlers[self._signal_r] = (self._on_signals, "signal handling")
        handlers[self._selector.fileno()] = (self._on_services, "a control socket client")
        return handlers

    def run(self) -> None:
        """Run until SIGTERM or SIGINT."""
        device = self.device
        self.install_signals()
        for service in self.services:
            service.register(self._selector)
        handlers = self._handlers()
        for fd in handlers:
            self._epoll.register(fd, select.EPOLLIN)
        poll = self._epoll.poll
        tick_due = self.flush()
        tick_at = 0.0
        expire_at = 0.0
        while self.stop_signal is None:
            now = time.monotonic()
            device.set_wall_clock(time.time(), now)
            if tick_due or now >= tick_at:
                # After the last turn's events, which may set its deadlines.
                tick_at, tick_due = self._tick(now), False
                self._send()  # what the tick queued goes now, not after the wait
            wake_at = min(now + MAX_WAIT, tick_at)
            protocol_deadline = device.get_timer()
            if protocol_deadline is not None and protocol_deadline < wake_at:
                wake_at = protocol_deadline
            for fd, _mask in poll(max(0.0, wake_at - now), _MAX_EVENTS):
                handler, place = handlers[fd]
                # try costs nothing until something raises (Python >= 3.11), so one per wakeup.
                try:
                    if handler():
                        tick_due = True
                except TunDeleted:
                    raise  # not one bad event: the tunnel is gone, so the daemon ends (and is restarted)
                except Exception as exc:
                    self.faults.record(place, exc)
            now = time.monotonic()
            if protocol_deadline is not None and protocol_deadline <= now:
                self._guarded("the protocol timers", device.handle_timer, now)
            if now >= expire_at:
                expire_at = now + HOUSEKEEPING_INTERVAL
                for service in self.services:
                    self._guarded("a control socket client", service.expire, now)
            if self.flush():
                tick_due = True

    def _tick(self, now: float) -> float:
        """The daemon's timers; when they are due next. A failing tick is tried again within a
        second, or after the next event: at once, it would spin the loop."""
        retry_at = now + HOUSEKEEPING_INTERVAL
        try:
            deadline = self.on_tick(now)
        except Exception as exc:
            self.faults.record("the daemon's timers", exc)
            return retry_at
        return retry_at if deadline is None else min(deadline, retry_at)

    def _guarded(self, place: str, handler: Callable[..., T], *args: object) -> T | None:
        try:
            return handler(*args)
        except Exception as exc:
            self.faults.record(place, exc)
            return None

    def _on_signals(self) -> bool:
        self._handle_signals()
        return True  # a signal is the daemon's business: its tick follows

    def _on_services(self) -> bool:
        """A control request or a helper's result: each ready descriptor to its service."""
        for key, mask in self._selector.select(0):
            for service in self.services:
                if service.owns(key):
                    self._guarded("a control socket client", service.handle, key, mask)
                    break
        return True

    def _on_tun(self) -> None:
        packets = self.tun.read_batch()
        if packets:
            self.device.send_packets(packets, time.monotonic())

    def _on_udp(self, sock) -> None:
        datagrams = self.udp.receive_batch(sock)
        if datagrams:
            packets = self.device.receive_datagrams(datagrams, time.monotonic())
            if packets:
                self.tun.write_batch(packets)
                # What the kernel answered while taking them (TCP acknowledgements, a ping's
                # echo) is usually queued already: send it in this turn, not after another wait.
                self._on_tun()
            # Now, not after the other ready sockets' batches: on a server under a flood from
            # many sources every receive queue may hold a full batch.
            self._send()

    def flush(self) -> bool:
        """Hand the core's events on (their handlers may queue more), then send what it queued;
        whether there were any."""
        device = self.device
        event = device.next_event()
        handled = event is not None
        while event is not None:
            self._guarded(f"the {type(event).__name__} handler", self.on_event, event)
            event = device.next_event()
        self._send()
        return handled

    def _send(self) -> None:
        datagrams = self.device.datagrams_to_send()
        if datagrams:
            self.udp.send(datagrams)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._selector.close()
        self._epoll.close()
        os.close(self._signal_r)
        os.close(self._signal_w)

