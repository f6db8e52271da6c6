"""Per-peer timers as deadlines on the caller's monotonic clock.

These mirror the WireGuard timer rules: each method is one protocol event
(data sent, handshake initiated, ...) and only moves deadlines; `pop_due`
tells the device which timers fired, and timerhandlers.py acts on them.
Nothing here reads a clock or sends anything.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable

from .keypair import REJECT_AFTER_TIME

REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 1 / 3
REKEY_ATTEMPT_TIME = 90.0
KEEPALIVE_TIMEOUT = 10.0
# Give up once more than this many retries went unanswered: 1 + 19 initiations, as wireguard-go.
MAX_HANDSHAKE_ATTEMPTS = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)
ZERO_KEYS_AFTER = 3 * REJECT_AFTER_TIME


class Timer(Enum):
    """WireGuard's five per-peer timers, in the order they fire when due together.

    Each value names the `Timers` slot holding that timer's deadline; the handlers, named as
    wireguard-go names them, are in timerhandlers.py."""

    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


_SLOTS = tuple(timer.value for timer in Timer)
_TIMER_SLOTS = tuple((timer, timer.value) for timer in Timer)  # an Enum's members and values cost a lookup each


class Timers:
    __slots__ = _SLOTS + (
        "persistent_keepalive_interval",
        "handshake_attempts",
        "need_another_keepalive",
        "sent_last_minute_handshake",
    )

    def __init__(self, persistent_keepalive_interval: int = 0) -> None:
        self.stop_all()
        self.persistent_keepalive_interval = persistent_keepalive_interval
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False

    def next_deadline(self) -> float | None:
        """Runs after every batch: the five slots are read by name, not through getattr."""
        earliest = None
        for deadline in (self.retransmit_handshake, self.send_keepalive, self.new_handshake,
                         self.zero_key_material, self.persistent_keepalive):
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        return earliest

    def pop_due(self, now: float) -> list[Timer]:
        """The timers due at `now`, disarmed: the caller runs their handlers."""
        due = []
        for timer, slot in _TIMER_SLOTS:
            deadline = getattr(self, slot)
            if deadline is not None and deadline <= now:
                setattr(self, slot, None)
                due.append(timer)
        return due

    def stop_all(self) -> None:
        for slot in _SLOTS:
            setattr(self, slot, None)

    def digest(self) -> tuple:
        return (*(getattr(self, slot) for slot in _SLOTS), self.persistent_keepalive_interval,
                self.handshake_attempts, self.need_another_keepalive, self.sent_last_minute_handshake)

    # --- protocol events -----------------------------------------------------

    def data_sent(self, now: float, jitter: Callable[[], float]) -> None:
        """We sent data and expect an answer; without one, start over with a new handshake.

        The jitter is drawn only when the timer starts: most batches find it running already."""
        if self.new_handshake is None:
            self.new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + jitter()

    def data_received(self, now: float) -> None:
        """Owe the peer a keepalive unless we send something first."""
        if self.send_keepalive is None:
            self.send_keepalive = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def authenticated_packet_sent(self) -> None:
        self.send_keepalive = None

    def authenticated_packet_received(self) -> None:
        self.new_handshake = None

    def authenticated_packet_traversed(self, now: float) -> None:
        if self.persistent_keepalive_interval:
            self.persistent_keepalive = now + self.persistent_keepalive_interval

    def handshake_initiated(self, now: float, jitter: float) -> None:
        self.retransmit_handshake = now + REKEY_TIMEOUT + jitter

    def handshake_complete(self) -> None:
        self.retransmit_handshake = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self.zero_key_material = now + ZERO_KEYS_AFTER
