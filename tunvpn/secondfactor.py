"""The server's second factor: which peers must present a TOTP code, and until when each is authorized.

Pure logic, both clocks passed in: `wall` (Unix seconds) for codes and deadlines, which must
survive a restart, and `now` (monotonic) for the guess limit, which need not.  An authorization
belongs to a public key and a deadline, never to a session: WireGuard rekeys every two minutes
and asking again then would be OpenVPN's reneg-sec trap.  The records live in the state file
(state.py), so a restart keeps them; a key taken out of the config, or out of TOTP, loses its own.

A code is accepted for the current 30-second step or one either side (clocks drift), once: the
step it belongs to is remembered, and no code of that step or an earlier one is taken again.
Guesses are limited per peer (GUESS_BURST at once, then one per GUESS_INTERVAL) and compared in
constant time.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from .protocol.control import AuthState
from .totp import DIGITS, hotp, time_step

HOLD_REASON = "second_factor_required"  # the gate's hold, and the drop reason of held packets
WINDOW_STEPS = 1  # steps accepted either side of the current one
GUESS_BURST = 5
GUESS_INTERVAL = 30.0  # seconds per guess once the burst is spent: 2880 a day, about 1 chance in 115 a day to hit


@dataclass(frozen=True)
class Authorization:
    """What the state file keeps per peer: `until` (Unix seconds, 0 once over) and the last spent step."""

    until: int
    step: int


class Verdict(NamedTuple):
    state: AuthState
    seconds: int | None = None  # AUTHORIZED: left of the session; RATE_LIMITED: until the next guess


class TotpPeer(NamedTuple):
    public_key: bytes
    secret: bytes
    session: int  # seconds an accepted code authorizes


class _Guesses:
    """A token bucket of whole guesses."""

    def __init__(self) -> None:
        self.tokens = float(GUESS_BURST)
        self.stamp: float | None = None

    def take(self, now: float) -> float | None:
        """None if a guess is allowed now, else the seconds until one is."""
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(GUESS_BURST, self.tokens + (now - self.stamp) / GUESS_INTERVAL)
        self.stamp = now if self.stamp is None else max(now, self.stamp)
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) * GUESS_INTERVAL


class SecondFactor:
    def __init__(self, records: dict[bytes, Authorization]) -> None:
        self.records = records  # the state's own dict: changes here are what the server saves
        self._peers: dict[bytes, TotpPeer] = {}
        self._guesses: dict[bytes, _Guesses] = {}

    def configure(self, peers: Iterable[TotpPeer]) -> bool:
        """The peers that need a code from now on; True if records of others were dropped."""
        self._peers = {peer.public_key: peer for peer in peers}
        self._guesses = {key: guesses for key, guesses in self._guesses.items() if key in self._peers}
        stale = [key for key in self.records if key not in self._peers]
        for key in stale:
            del self.records[key]
        return bool(stale)

    def required(self, public_key: bytes) -> bool:
        return public_key in self._peers

    def authorized_until(self, public_key: bytes, wall: float) -> int | None:
        """The deadline of the peer's authorization, or None if it has none now."""
        record = self.records.get(public_key)
        return record.until if record is not None and record.until > wall else None

    def check(self, public_key: bytes, code: str, wall: float, now: float) -> Verdict:
        """Judge one code a peer presented; an accepted one authorizes it for its session."""
        peer = self._peers.get(public_key)
        if peer is None:
            return Verdict(AuthState.NOT_REQUIRED)
        wait = self._guesses.setdefault(public_key, _Guesses()).take(now)
        if wait is not None:
            return Verdict(AuthState.RATE_LIMITED, math.ceil(wait))
        step = _matching_step(peer.secret, code, wall)
        record = self.records.get(public_key)
        if step is None or (record is not None and step <= record.step):
            return Verdict(AuthState.REFUSED)
        until = int(wall) + peer.session
        self.records[public_key] = Authorization(until, step)
        return Verdict(AuthState.AUTHORIZED, peer.session)

    def expire(self, wall: float) -> list[bytes]:
        """The peers whose authorization ran out by `wall`; their spent step is kept."""
        ended = [key for key, record in self.records.items() if 0 < record.until <= wall]
        for key in ended:
            self.records[key] = Authorization(0, self.records[key].step)
        return ended

    def next_expiry(self) -> int | None:
        return min((record.until for record in self.records.values() if record.until), default=None)


def _matching_step(secret: bytes, code: str, wall: float) -> int | None:
    """The step within the window whose code this is, comparing against every one in constant time."""
    presented = code.encode("utf-8", "replace")
    current = time_step(wall)
    match = None
    for step in range(current - WINDOW_STEPS, current + WINDOW_STEPS + 1):
        if hmac.compare_digest(presented, hotp(secret, step, DIGITS).encode("ascii")):
            match = step
    return match
