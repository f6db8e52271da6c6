"""Per-peer policy beyond WireGuard: a rate limit each way, where a peer may send to, and a
restriction to control messages.

A peer carries a `Policy` only when one is set, so a device without policies pays one
attribute check per packet.  Time comes in as an argument, as everywhere in the core.

A restricted peer keeps its handshakes, keepalives and control messages (those never pass
through here) but no IP packet goes to or comes from it: what a daemon needs while a peer has
still to prove something over the control extension (a second factor, an enrollment).  The
restriction belongs to the peer, not to a session, so rekeying never lifts it.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from .allowedips import AllowedIPs, IPNetwork

# A policer, unlike a shaper, drops what exceeds the bucket: the bucket must hold what TCP
# sends in a round trip or two, and what a busy machine lets pile up while the daemon waits for
# a core, or TCP never reaches the rate.  A quarter of a second of the rate does (19.7 of
# 20 Mbit/s measured, also with a CPU hog beside; with 100 ms a loaded run fell to 17.8), with a
# floor of 64 full-size packets for slow limits.
BURST_SECONDS = 0.25
MIN_BURST_BYTES = 64 * 1500


class TokenBucket:
    """`rate` bytes a second, up to `burst` bytes at once; a packet passes whole or not at all."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp: float | None = None

    def take(self, size: int, now: float) -> bool:
        stamp = self.stamp
        if stamp is not None and now > stamp:
            self.tokens = min(self.burst, self.tokens + (now - stamp) * self.rate)
        self.stamp = now
        if self.tokens >= size:
            self.tokens -= size
            return True
        return False


def bucket_for(rate_bits: int) -> TokenBucket:
    rate = rate_bits / 8
    return TokenBucket(rate, max(rate * BURST_SECONDS, MIN_BURST_BYTES))


class Policy:
    """What one peer may do: `rate_bits` a second each way (None: no limit), and send only to
    `access` (None: anywhere) or to `exempt` networks (the tunnel's own subnets).  With a
    `restriction` (a drop reason) it may exchange control messages only."""

    __slots__ = ("rate_bits", "inbound", "outbound", "access", "_destinations", "restriction")

    def __init__(self, rate_bits: int | None, access: Iterable[IPNetwork] | None, exempt: Iterable[IPNetwork]) -> None:
        self.restriction: str | None = None
        self.rate_bits = rate_bits
        self.inbound = None if rate_bits is None else bucket_for(rate_bits)
        self.outbound = None if rate_bits is None else bucket_for(rate_bits)
        self.access = None if access is None else tuple(access)
        self._destinations: AllowedIPs[bool] | None = None
        if self.access is not None:
            self._destinations = AllowedIPs()
            for network in (*self.access, *exempt):
                self._destinations.insert(network, True)

    def refuses_inbound(self, packet: bytes, now: float) -> str | None:
        """Why a packet from the peer must not go on (a drop reason), or None."""
        if self.restriction is not None:
            return self.restriction
        destinations = self._destinations
        if destinations is not None:
            allowed = (destinations.lookup_v4(packet[16:20]) if packet[0] >> 4 == 4
                       else destinations.lookup_v6(packet[24:40]))
            if allowed is None:
                return "access_denied"
        if self.inbound is not None and not self.inbound.take(len(packet), now):
            return "rate_limit"
        return None

    def admit_outbound(self, packets: list[bytes], now: float, dropped: Counter[str]) -> list[bytes]:
        """The packets for the peer that fit its rate; the rest are counted as `rate_limit`."""
        if self.restriction is not None:
            dropped[self.restriction] += len(packets)
            return []
        bucket = self.outbound
        if bucket is None:
            return packets
        kept = [packet for packet in packets if bucket.take(len(packet), now)]
        if len(kept) != len(packets):
            dropped["rate_limit"] += len(packets) - len(kept)
        return kept

    def is_empty(self) -> bool:
        return self.rate_bits is None and self.access is None and self.restriction is None

    def same_as(self, rate_bits: int | None, access: Iterable[IPNetwork] | None) -> bool:
        return rate_bits == self.rate_bits and (None if access is None else tuple(access)) == self.access
