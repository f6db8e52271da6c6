"""The state of one device, which the send, receive, handshake and timer modules share.

wireguard-go splits its device across files that are all methods on one Device struct; here
those files are modules of functions over one `DeviceState`, and `Device` (device.py) is the
facade the shell drives.  Only the core sees this object: the daemons see `Device`.
"""

from __future__ import annotations

import heapq
import os
import random
from collections import Counter, deque
from typing import Callable, Iterable

from .allowedips import AllowedIPs
from .cookie import CookieChecker, CookieReplyBudget, LoadMonitor, RateLimiter
from .crypto import KEY_SIZE, StaticKey
from .events import Endpoint, EndpointChanged, Event
from .indextable import IndexTable
from .keypair import Keypair
from .noise import Identity
from .peer import Peer
from .timers import REKEY_TIMEOUT_JITTER_MAX

# Hooks for tunvpn's own extensions (extensions.py), outside WireGuard's receive loop:
# plaintext that is not IP -> consumed?  And the batch about to go to the tun, with each
# packet's sender -> what really goes to the tun.
NonIPHook = Callable[["DeviceState", Peer, bytes], bool]
DeliverHook = Callable[["DeviceState", list[bytes], list[Peer], float], list[bytes]]

_JITTER_MS = int(REKEY_TIMEOUT_JITTER_MAX * 1000) + 1


class DeviceState:
    __slots__ = (
        "identity", "mtu", "random_bytes", "cookie_checker", "load", "rate_limiter", "cookie_budget", "index_table",
        "allowed_ips", "peers", "dropped", "wall_offset", "outgoing", "events", "heap", "heap_seq",
        "non_ip_hook", "deliver_hook", "jitter_source",
    )

    def __init__(self, private_key: bytes, mtu: int, load_threshold: int, random_bytes: Callable[[int], bytes]) -> None:
        self.identity = Identity(StaticKey(private_key))
        self.mtu = mtu
        self.random_bytes = random_bytes
        self.cookie_checker = CookieChecker(self.identity.public, random_bytes)
        self.load = LoadMonitor(load_threshold)
        self.rate_limiter = RateLimiter()
        self.cookie_budget = CookieReplyBudget()
        self.index_table: IndexTable[Peer | Keypair] = IndexTable(random_bytes)
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self.peers: dict[bytes, Peer] = {}
        self.dropped: Counter[str] = Counter()  # drops no peer can be blamed for
        self.wall_offset = 0.0  # wall clock minus monotonic clock
        self.outgoing: list[tuple[bytes, Endpoint]] = []
        self.events: deque[Event] = deque()
        # Every peer's earliest deadline in one heap: (deadline, tie-breaker, peer).  An entry
        # whose deadline is no longer its peer's `scheduled_at` is stale and skipped.
        self.heap: list[tuple[float, int, Peer]] = []
        self.heap_seq = 0
        self.non_ip_hook: NonIPHook | None = None
        self.deliver_hook: DeliverHook | None = None
        # Timer jitter only spreads retries apart, as wireguard-go's fastrandn does: it needs no
        # secrecy, so it comes from a seeded generator, not a system call per draw.
        self.jitter_source = random.Random(random_bytes(16))

    def schedule(self, peer: Peer) -> None:
        """Put the peer's next deadline in the heap, unless an earlier one is there already."""
        deadline = peer.timers.next_deadline()
        if deadline is not None and deadline < peer.scheduled_at and self.peers.get(peer.public_key) is peer:
            peer.scheduled_at = deadline
            self.heap_seq += 1
            heapq.heappush(self.heap, (deadline, self.heap_seq, peer))

    def next_deadline(self) -> float | None:
        heap = self.heap
        while heap and heap[0][2].scheduled_at != heap[0][0]:
            heapq.heappop(heap)  # stale: the peer was rescheduled earlier or removed
        return heap[0][0] if heap else None

    def new_ephemeral(self) -> StaticKey:
        """A handshake's ephemeral key: from OpenSSL's generator when the device uses the
        system's randomness (much cheaper on bookworm), from the given source otherwise, so
        that a device on a seeded source (the tests') stays reproducible."""
        if self.random_bytes is os.urandom:
            return StaticKey.generate()
        return StaticKey(self.random_bytes(KEY_SIZE))

    def jitter(self) -> float:
        """0 to REKEY_TIMEOUT_JITTER_MAX seconds, in whole milliseconds."""
        return self.jitter_source.randrange(_JITTER_MS) / 1000.0

    def set_endpoint(self, peer: Peer, source: Endpoint) -> None:
        """An authenticated message came from `source`: the peer roamed there."""
        if source != peer.endpoint:
            peer.endpoint = source
            self.events.append(EndpointChanged(peer.public_key, source))

    def release(self, keypairs: Iterable[Keypair]) -> None:
        for keypair in keypairs:
            self.index_table.release(keypair.local_index, keypair)

    def forget_sessions(self, peer: Peer) -> None:
        """Drop every keypair and the handshake in progress: Python cannot wipe, only let go."""
        self.release(peer.keypairs.clear())
        self.index_table.release(peer.handshake.local_index, peer)
        peer.handshake.clear()
        peer.staged.clear()
