"""Two sans-I/O devices wired together in memory, with simulated time.

Nothing here sleeps or reads a clock: `CorePair.now` is the only time there
is, and `advance` runs the devices' timers in deadline order, delivering
whatever they send.  Every datagram that crosses the wire is logged, so a
test can ask exactly what was sent, when, by whom and to where.

Also here: real IPv4/IPv6 UDP packet builders (correct lengths and
checksums) and a seeded random source, so a run can be reproduced.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from packets import internet_checksum
from tunvpn.protocol import messages
from tunvpn.protocol.crypto import clamp
from tunvpn.protocol.device import Device
from tunvpn.protocol.peer import Peer

Endpoint = Any

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("192.0.2.2", 51820)
A_TUN4, B_TUN4 = "203.0.113.1", "203.0.113.2"
A_TUN6, B_TUN6 = "2001:db8:100::1", "2001:db8:100::2"
WALL_EPOCH = 1_700_000_000.0  # what the wall clock reads at simulated time 0

_MAX_ROUNDS = 64  # datagram ping-pong rounds per flush; a protocol settles in a handful
_MAX_TIMER_STEPS = 100_000


# --- randomness and keys ------------------------------------------------------------

class SeededRandom:
    """A `random_bytes` for Device: reproducible (the timer jitter's generator is seeded from it)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def __call__(self, n: int) -> bytes:
        return self._rng.randbytes(n)


class ZeroJitter:
    """Stands in for the device's jitter generator, to pin retries exactly REKEY_TIMEOUT apart."""

    def randrange(self, stop: int) -> int:
        return 0


def private_key(seed: int) -> bytes:
    return clamp(random.Random(f"key-{seed}").randbytes(32))


# --- IP packets ---------------------------------------------------------------------


def _udp(src: bytes, dst: bytes, pseudo_tail: bytes, payload: bytes, sport: int, dport: int) -> bytes:
    length = 8 + len(payload)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    checksum = internet_checksum(src + dst + pseudo_tail + header + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, checksum) + payload


def ipv4_udp(src: str, dst: str, payload: bytes = b"", sport: int = 40000, dport: int = 5201) -> bytes:
    """A complete IPv4/UDP packet with valid header and UDP checksums."""
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp = _udp(s, d, struct.pack("!BBH", 0, 17, 8 + len(payload)), payload, sport, dport)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0x4000, 64, 17, 0, s, d)
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + udp


def ipv6_udp(src: str, dst: str, payload: bytes = b"", sport: int = 40000, dport: int = 5201) -> bytes:
    """A complete IPv6/UDP packet with a valid UDP checksum."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    udp = _udp(s, d, struct.pack("!I3xB", 8 + len(payload), 17), payload, sport, dport)
    return struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 64, s, d) + udp


def ipv4_checksum_ok(packet: bytes) -> bool:
    return internet_checksum(packet[:20]) == 0


# --- the wire -----------------------------------------------------------------------

@dataclass(frozen=True)
class Datagram:
    data: bytes
    source: Endpoint
    destination: Endpoint
    sender: str
    at: float

    @property
    def kind(self) -> str:
        """initiation / response / cookie / keepalive / data / other, from type and size."""
        size = len(self.data)
        msg_type = self.data[0] if size else -1
        if msg_type == messages.MESSAGE_INITIATION and size == messages.INITIATION_SIZE:
            return "initiation"
        if msg_type == messages.MESSAGE_RESPONSE and size == messages.RESPONSE_SIZE:
            return "response"
        if msg_type == messages.MESSAGE_COOKIE_REPLY and size == messages.COOKIE_REPLY_SIZE:
            return "cookie"
        if msg_type == messages.MESSAGE_TRANSPORT:
            return "keepalive" if size == messages.TRANSPORT_MIN_SIZE else "data"
        return "other"


@dataclass
class Host:
    name: str
    device: Device
    address: Endpoint
    tun: list[bytes] = field(default_factory=list)  # packets the device wrote to its tun
    events: list[Any] = field(default_factory=list)
    online: bool = True  # False: datagrams sent to it are lost


class CorePair:
    """Hosts `a` and `b`, each configured with the other as a peer (unless told otherwise)."""

    def __init__(
        self,
        *,
        seed: int = 1,
        psk_a: bytes | None = None,
        psk_b: bytes | None = None,
        a_knows_b_endpoint: bool = True,
        b_knows_a_endpoint: bool = True,
        persistent_keepalive: int = 0,
        start: float = 0.0,
        zero_jitter: bool = False,
        load_threshold: int | None = None,
    ) -> None:
        self.now = start
        self.wire: list[Datagram] = []
        self.lost: list[Datagram] = []
        self.hosts: dict[str, Host] = {}
        self.a = self.add_host("a", private_key(seed), A_ADDR, seed, zero_jitter, load_threshold)
        self.b = self.add_host("b", private_key(seed + 1000), B_ADDR, seed + 1, zero_jitter, load_threshold)
        self.a.device.set_peer(
            self.b.device.public_key,
            preshared_key=psk_a,
            allowed_ips=[f"{B_TUN4}/32", f"{B_TUN6}/128"],
            endpoint=B_ADDR if a_knows_b_endpoint else None,
            persistent_keepalive=persistent_keepalive,
        )
        self.b.device.set_peer(
            self.a.device.public_key,
            preshared_key=psk_b,
            allowed_ips=[f"{A_TUN4}/32", f"{A_TUN6}/128"],
            endpoint=A_ADDR if b_knows_a_endpoint else None,
        )

    # --- set-up -----------------------------------------------------------------

    def add_host(
        self,
        name: str,
        key: bytes,
        address: Endpoint,
        seed: int,
        zero_jitter: bool = False,
        load_threshold: int | None = None,
    ) -> Host:
        extra = {} if load_threshold is None else {"load_threshold": load_threshold}
        device = Device(key, random_bytes=SeededRandom(seed), **extra)
        if zero_jitter:
            device._state.jitter_source = ZeroJitter()
        device.set_wall_clock(WALL_EPOCH + self.now, self.now)
        host = Host(name, device, address)
        self.hosts[name] = host
        return host

    def peer(self, host: Host, other: Host | None = None) -> Peer:
        """What `host` knows about `other` (by default, the other of a and b)."""
        other = other or (self.b if host is self.a else self.a)
        return host.device._state.peers[other.device.public_key]

    @property
    def a_peer(self) -> Peer:
        return self.peer(self.a)

    @property
    def b_peer(self) -> Peer:
        return self.peer(self.b)

    def host_at(self, address: Endpoint) -> Host | None:
        for host in self.hosts.values():
            if host.address == address and host.online:
                return host
        return None

    # --- moving datagrams -----------------------------------------------------------

    def collect(self, host: Host) -> list[Datagram]:
        """Take what `host` wants to send, without delivering it (to inspect, hold or forge)."""
        return [Datagram(data, host.address, dest, host.name, self.now) for data, dest in host.device.datagrams_to_send()]

    def deliver(self, datagrams: Iterable[Datagram], to: Host | None = None) -> None:
        """Hand datagrams to their destination host (or to `to`) now, as one batch per host."""
        batches: dict[str, list[tuple[bytes, Endpoint]]] = {}
        for dgram in datagrams:
            self.wire.append(dgram)
            target = to or self.host_at(dgram.destination)
            if target is None:
                self.lost.append(dgram)
                continue
            batches.setdefault(target.name, []).append((dgram.data, dgram.source))
        for name, batch in batches.items():
            host = self.hosts[name]
            host.tun.extend(host.device.receive_datagrams(batch, self.now))
            self.check_timer_invariants(host)

    def flush(self) -> list[Datagram]:
        """Deliver everything every host wants to send until nobody sends; returns those datagrams."""
        start = len(self.wire)
        for _ in range(_MAX_ROUNDS):
            outgoing = [d for host in self.hosts.values() for d in self.collect(host)]
            if not outgoing:
                break
            self.deliver(outgoing)
        else:
            raise AssertionError(f"no quiet after {_MAX_ROUNDS} rounds: a datagram storm")
        for host in self.hosts.values():
            self.drain_events(host)
        return self.wire[start:]

    def drain_events(self, host: Host) -> list[Any]:
        new = []
        while (event := host.device.next_event()) is not None:
            new.append(event)
        host.events.extend(new)
        return new

    # --- traffic and time --------------------------------------------------------------

    def send(self, host: Host, packets: Iterable[bytes]) -> list[Datagram]:
        """The tun of `host` hands it packets now; everything that follows is delivered."""
        host.device.send_packets(list(packets), self.now)
        self.check_timer_invariants(host)
        return self.flush()

    def handshake(self, initiator: Host | None = None) -> list[Datagram]:
        initiator = initiator or self.a
        other = self.b if initiator is self.a else self.a
        initiator.device.initiate(other.device.public_key, self.now)
        return self.flush()

    def advance(self, to: float, on_timer: Callable[[Host], None] | None = None) -> list[Datagram]:
        """Run every timer due up to `to` in deadline order (flushing after each); then now = to."""
        start = len(self.wire)
        for _ in range(_MAX_TIMER_STEPS):
            due = [(d, host.name) for host in self.hosts.values() if (d := host.device.get_timer()) is not None]
            due = [item for item in due if item[0] <= to]
            if not due:
                break
            deadline, name = min(due)
            host = self.hosts[name]
            self.now = max(self.now, deadline)
            host.device.handle_timer(self.now)
            self.check_timer_invariants(host, after_handle=True)
            if on_timer is not None:
                on_timer(host)
            self.flush()
        else:
            raise AssertionError("timers keep firing: a busy loop")
        self.now = max(self.now, to)
        return self.wire[start:]

    def step(self, dt: float) -> list[Datagram]:
        return self.advance(self.now + dt)

    # --- invariants -----------------------------------------------------------------------

    def check_timer_invariants(self, host: Host, after_handle: bool = False) -> None:
        """The device's one timer is never later than any peer's own deadline (no missed timer),
        and never in the past once handle_timer ran (no busy loop)."""
        device = host.device
        deadline = device.get_timer()
        for peer in device._state.peers.values():
            own = peer.timers.next_deadline()
            assert own is None or (deadline is not None and deadline <= own), (
                f"{host.name}: peer deadline {own} but device timer {deadline}"
            )
        if after_handle:
            assert deadline is None or deadline > self.now, f"{host.name}: timer {deadline} not after {self.now}"

    def seal(self, host: Host, plaintext: bytes, source: Endpoint | None = None) -> Datagram:
        """A transport message `host` could have sent under its current keypair, with any
        plaintext (not necessarily IP): for packets a well-behaved device would never send."""
        keypair = self.peer(host).keypairs.current
        counter = keypair.send_counter
        keypair.send_counter += 1
        data = messages.pack_transport(keypair.remote_index, counter, keypair.sender.seal(counter, plaintext))
        other = self.b if host is self.a else self.a
        return Datagram(data, source or host.address, other.address, host.name, self.now)

    # --- queries ------------------------------------------------------------------------------

    @staticmethod
    def kinds(datagrams: Iterable[Datagram]) -> list[tuple[str, str]]:
        return [(d.sender, d.kind) for d in datagrams]


def a_to_b_v4(payload: bytes = b"ping", **kw: Any) -> bytes:
    return ipv4_udp(A_TUN4, B_TUN4, payload, **kw)


def b_to_a_v4(payload: bytes = b"pong", **kw: Any) -> bytes:
    return ipv4_udp(B_TUN4, A_TUN4, payload, **kw)


def a_to_b_v6(payload: bytes = b"ping6", **kw: Any) -> bytes:
    return ipv6_udp(A_TUN6, B_TUN6, payload, **kw)


def b_to_a_v6(payload: bytes = b"pong6", **kw: Any) -> bytes:
    return ipv6_udp(B_TUN6, A_TUN6, payload, **kw)


def established(pair: CorePair, initiator: str = "a") -> CorePair:
    """A pair that already completed one handshake (initiated by `initiator`)."""
    pair.handshake(pair.hosts[initiator])
    assert pair.a_peer.keypairs.current is not None and pair.b_peer.keypairs.current is not None
    return pair


# Points of small order on Curve25519 (and non-canonical encodings of them): X25519 with any
# scalar gives zero for these, so a handshake must refuse them.
LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
    (2**255 - 19 + 1).to_bytes(32, "little"),
]
