"""The one event loop: the only place that blocks.

It moves bytes between the tun, the UDP sockets and the protocol core and
re-arms a single timer from `device.get_timer()`.  Signals arrive through
`signal.set_wakeup_fd`, so a handler never runs protocol code in the middle
of a batch.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from typing import Callable

from ..protocol.device import Device, Event
from .tun import TunDevice
from .udp import UdpTransport

log = logging.getLogger(__name__)

_TUN = "tun"  # selector tags; UDP sockets are tagged with themselves
_SIGNALS = "signals"
MAX_WAIT = 1.0  # wake at least this often, to refresh the wall clock and to notice stop requests


class EventLoop:
    def __init__(
        self,
        device: Device,
        tun: TunDevice,
        udp: UdpTransport,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.device = device
        self.tun = tun
        self.udp = udp
        self.on_event = on_event or (lambda event: None)
        self.stop_signal: int | None = None
        self._selector = selectors.DefaultSelector()
        self._signal_r, self._signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending_signals: list[int] = []
        self.signal_handlers: dict[int, Callable[[], None]] = {}

    # --- signals -------------------------------------------------------------

    def _install_signals(self) -> None:
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
                handler()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_signal = signum

    # --- running ---------------------------------------------------------------

    def run(self) -> None:
        """Run until SIGTERM or SIGINT."""
        device = self.device
        self._install_signals()
        selector = self._selector
        selector.register(self.tun.fileno(), selectors.EVENT_READ, _TUN)
        for sock in self.udp.sockets:
            selector.register(sock, selectors.EVENT_READ, sock)
        selector.register(self._signal_r, selectors.EVENT_READ, _SIGNALS)
        self._flush()
        while self.stop_signal is None:
            now = time.monotonic()
            device.set_wall_clock(time.time(), now)
            deadline = device.get_timer()
            timeout = MAX_WAIT if deadline is None else min(MAX_WAIT, max(0.0, deadline - now))
            for key, _ in selector.select(timeout):
                if key.data is _TUN:
                    self._on_tun()
                elif key.data is _SIGNALS:
                    self._handle_signals()
                else:
                    self._on_udp(key.data)
            device.handle_timer(time.monotonic())
            self._flush()

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

    def _flush(self) -> None:
        """Send what the core queued and hand its events on."""
        device = self.device
        datagrams = device.datagrams_to_send()
        if datagrams:
            self.udp.send(datagrams)
        event = device.next_event()
        while event is not None:
            self.on_event(event)
            event = device.next_event()

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self._selector.close()
        os.close(self._signal_r)
        os.close(self._signal_w)
