"""What the device knows about one peer: keys, sessions, timers, endpoint, counters."""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from .cookie import CookieJar
from .keypair import Keypairs
from .noise import Handshake, Identity
from .policy import Policy
from .timers import Timers

STAGED_PACKETS_MAX = 128  # packets waiting for a session; the oldest go first when full


class Peer:
    __slots__ = (
        "public_key",
        "handshake",
        "cookies",
        "keypairs",
        "timers",
        "endpoint",
        "staged",
        "last_sent_handshake",
        "last_handshake_wall",
        "rx_bytes",
        "tx_bytes",
        "rx_packets",
        "tx_packets",
        "dropped",
        "scheduled_at",
        "policy",
    )

    def __init__(
        self,
        identity: Identity,
        public_key: bytes,
        preshared_key: bytes | None,
        endpoint: Any,
        persistent_keepalive: int,
    ) -> None:
        self.public_key = public_key
        self.handshake = Handshake(identity, public_key, preshared_key)
        self.cookies = CookieJar(public_key)
        self.keypairs = Keypairs()
        self.timers = Timers(persistent_keepalive)
        self.endpoint = endpoint
        self.staged: deque[bytes] = deque()
        self.last_sent_handshake: float | None = None
        self.last_handshake_wall: float | None = None
        # bytes: every datagram exchanged with the peer, handshakes included (what `wg show` reports);
        # packets: transport messages only, keepalives included
        self.rx_bytes = self.tx_bytes = self.rx_packets = self.tx_packets = 0
        self.dropped: Counter[str] = Counter()
        self.scheduled_at = float("inf")  # earliest deadline this peer has in the device's heap
        self.policy: Policy | None = None  # rate limit and access rules, when the daemon set any

    @property
    def persistent_keepalive(self) -> int:
        return self.timers.persistent_keepalive_interval

    def digest(self) -> tuple:
        """Every per-peer state a message could change, drop counters aside (for Device.state_digest)."""
        keypairs = self.keypairs
        return (
            self.handshake.digest(), self.cookies.digest(), self.timers.digest(),
            tuple(k.digest() if k else None for k in (keypairs.previous, keypairs.current, keypairs.next)),
            len(self.staged), self.endpoint, self.last_sent_handshake, self.last_handshake_wall,
            self.rx_bytes, self.rx_packets, self.tx_bytes, self.tx_packets,
        )

    def __repr__(self) -> str:
        return f"<Peer {self.public_key.hex()[:12]} endpoint={self.endpoint}>"
