"""The sans-I/O WireGuard device: datagrams and tun packets in, datagrams and packets out.

The I/O shell drives it the way aioquic's adapters drive a connection:

    packets = device.receive_datagrams(batch, now)   # -> write to the tun
    device.send_packets(tun_batch, now)              # tun reads -> queued datagrams
    for data, endpoint in device.datagrams_to_send(): ...
    deadline = device.get_timer(); ...; device.handle_timer(now)
    while (event := device.next_event()) is not None: ...

`now` is the caller's monotonic clock in seconds; the wall clock (needed
only for TAI64N timestamps and for reporting handshake times) is given with
`set_wall_clock`.  Endpoints are whatever the shell uses as socket
addresses ((host, port) tuples); the device only compares and returns them.

This module is the facade: the work is done by send.py, receive.py,
handshake.py and timerhandlers.py over one DeviceState, as wireguard-go's
device/ splits it.  Daemons use only what `Device` offers here: peers are
named by public key, and what the device knows about one comes out as a
frozen `PeerStats`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable

from . import extensions, handshake, receive, send, timerhandlers
from .allowedips import IPNetwork
from .crypto import KEY_SIZE
from .devicestate import DeviceState
from .events import (
    ControlReceived,
    CookieReceived,
    Endpoint,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeysExpired,
)
from .peer import Peer
from .policy import Policy

__all__ = [
    "DEFAULT_LOAD_THRESHOLD", "DEFAULT_MTU", "ControlReceived", "CookieReceived", "Device", "Endpoint",
    "EndpointChanged", "Event", "HandshakeCompleted", "HandshakeGaveUp", "KeysExpired", "PeerStats",
]

DEFAULT_MTU = 1420  # wireguard-go's: 1500 minus the largest overhead (IPv6, UDP, transport header)
DEFAULT_LOAD_THRESHOLD = 256  # handshake messages per second before cookies are demanded

_FORWARDING_HOOKS = {None: None, True: extensions.relay_between_peers, False: extensions.block_between_peers}


@dataclass(frozen=True, slots=True)
class PeerStats:
    """What the device knows about one peer at one moment (for status and statistics)."""

    public_key: bytes
    endpoint: Endpoint
    allowed_ips: tuple[IPNetwork, ...]
    rx_bytes: int  # every datagram exchanged, handshakes included (what `wg show` reports)
    tx_bytes: int
    rx_packets: int  # transport messages only, keepalives included
    tx_packets: int
    latest_handshake: float | None  # wall clock
    persistent_keepalive: int  # seconds, 0 for off
    dropped: Mapping[str, int]
    has_session: bool
    rate_limit: int | None = None  # bits a second each way, None for none
    access: tuple[IPNetwork, ...] | None = None  # where the peer may send to, None for anywhere
    restricted: str | None = None  # held to control messages, counting its data under this drop reason


def _drop_empty_policy(peer: Peer) -> None:
    """A peer without limits, rules or restriction carries no Policy: its packets skip the checks."""
    if peer.policy is not None and peer.policy.is_empty():
        peer.policy = None


class Device:
    def __init__(
        self,
        private_key: bytes,
        *,
        mtu: int = DEFAULT_MTU,
        load_threshold: int = DEFAULT_LOAD_THRESHOLD,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """A plain WireGuard device; `set_control_messages` and `set_forwarding` add tunvpn's extensions."""
        self._state = DeviceState(private_key, mtu, load_threshold, random_bytes)

    @property
    def public_key(self) -> bytes:
        return self._state.identity.public

    @property
    def mtu(self) -> int:
        return self._state.mtu

    def set_mtu(self, mtu: int) -> None:
        """The tun's MTU: sealed packets are padded up to a multiple of 16, never beyond it."""
        self._state.mtu = mtu

    def set_wall_clock(self, wall: float, now: float) -> None:
        """Tell the device what the wall clock reads at monotonic time `now`."""
        self._state.wall_offset = wall - now

    # --- tunvpn's extensions (extensions.py) -------------------------------------------

    def set_control_messages(self, enabled: bool) -> None:
        """Hand tunvpn control messages on as ControlReceived events (else they are `not_ip` drops)."""
        self._state.non_ip_hook = extensions.control_messages if enabled else None

    def set_forwarding(self, between_peers: bool | None) -> None:
        """None hands every packet to the tun, as WireGuard does; True seals a packet from one
        peer to another peer's address straight back out; False drops it (and counts it)."""
        self._state.deliver_hook = _FORWARDING_HOOKS[between_peers]

    # --- peers ---------------------------------------------------------------------------

    def set_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: Iterable[IPNetwork | str] = (),
        endpoint: Endpoint = None,
        persistent_keepalive: int = 0,
        now: float | None = None,
    ) -> None:
        """Add a peer, or update one in place: its sessions survive unless its PSK changed."""
        state = self._state
        if len(public_key) != KEY_SIZE or (preshared_key is not None and len(preshared_key) != KEY_SIZE):
            raise ValueError("keys are 32 bytes")
        if public_key == state.identity.public:
            raise ValueError("a peer cannot have this device's own public key")
        peer = state.peers.get(public_key)
        if peer is None:
            peer = state.peers[public_key] = Peer(
                state.identity, public_key, preshared_key, endpoint, persistent_keepalive
            )
        else:
            if (preshared_key or bytes(KEY_SIZE)) != peer.handshake.preshared_key:
                state.forget_sessions(peer)
                peer.handshake.preshared_key = preshared_key or bytes(KEY_SIZE)
            if endpoint is not None:
                peer.endpoint = endpoint
            peer.timers.persistent_keepalive_interval = persistent_keepalive
            if not persistent_keepalive:
                peer.timers.persistent_keepalive = None
        state.allowed_ips.remove_owner(peer)
        for network in allowed_ips:
            state.allowed_ips.insert(network, peer)
        if persistent_keepalive and now is not None:
            send.send_keepalive(state, peer, now)
            state.schedule(peer)

    def set_policy(self, public_key: bytes, rate_bits: int | None, access: Iterable[IPNetwork] | None,
                   exempt: Iterable[IPNetwork] = ()) -> None:
        """Limit a peer to `rate_bits` a second each way and to sending to `access` (plus `exempt`,
        the tunnel's own subnets); None for either lifts it.  An unchanged policy keeps its buckets,
        so a reload does not hand out a fresh burst."""
        peer = self._state.peers[public_key]
        old = peer.policy
        if old is None or not old.same_as(rate_bits, access):
            peer.policy = Policy(rate_bits, access, exempt)
            peer.policy.restriction = None if old is None else old.restriction
        _drop_empty_policy(peer)

    def restrict(self, public_key: bytes, reason: str | None) -> None:
        """Hold a peer to control messages (handshakes and keepalives go on): every IP packet to or
        from it is dropped and counted as `reason`; None lifts it.  It outlives every session."""
        peer = self._state.peers[public_key]
        if peer.policy is None:
            if reason is None:
                return
            peer.policy = Policy(None, None, ())
        peer.policy.restriction = reason
        _drop_empty_policy(peer)

    def remove_peer(self, public_key: bytes) -> None:
        state = self._state
        peer = state.peers.pop(public_key, None)
        if peer is None:
            return
        state.forget_sessions(peer)
        peer.timers.stop_all()
        state.allowed_ips.remove_owner(peer)
        peer.scheduled_at = float("inf")

    def has_peer(self, public_key: bytes) -> bool:
        return public_key in self._state.peers

    def peer_keys(self) -> list[bytes]:
        return list(self._state.peers)

    def endpoint_of(self, public_key: bytes) -> Endpoint:
        """Where the peer was last heard from (or configured): O(1), unlike `peer_stats`."""
        return self._state.peers[public_key].endpoint

    def set_endpoint(self, public_key: bytes, endpoint: Endpoint) -> None:
        self._state.peers[public_key].endpoint = endpoint

    def add_allowed_ip(self, public_key: bytes, network: IPNetwork | str) -> None:
        self._state.allowed_ips.insert(network, self._state.peers[public_key])

    def allowed_ips_of(self, public_key: bytes) -> list[IPNetwork]:
        """The peer's networks in cryptokey routing: O(its networks)."""
        return self._state.allowed_ips.networks_of(self._state.peers[public_key])

    def has_session(self, public_key: bytes) -> bool:
        """Whether the peer has a current keypair (which may have expired for sending)."""
        return self._state.peers[public_key].keypairs.current is not None

    def count_drop(self, public_key: bytes, reason: str) -> None:
        """Count a packet the daemon refused from this peer (e.g. a bad control message)."""
        self._state.peers[public_key].dropped[reason] += 1

    def peer_stats(self, public_key: bytes) -> PeerStats:
        peer = self._state.peers[public_key]
        return PeerStats(
            public_key=public_key,
            endpoint=peer.endpoint,
            allowed_ips=tuple(self.allowed_ips_of(public_key)),
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
            rx_packets=peer.rx_packets,
            tx_packets=peer.tx_packets,
            latest_handshake=peer.last_handshake_wall,
            persistent_keepalive=peer.persistent_keepalive,
            dropped=dict(peer.dropped),
            has_session=peer.keypairs.current is not None,
            rate_limit=None if peer.policy is None else peer.policy.rate_bits,
            access=None if peer.policy is None else peer.policy.access,
            restricted=None if peer.policy is None else peer.policy.restriction,
        )

    def drops(self) -> dict[str, int]:
        """What the device dropped that no peer can be blamed for, by reason."""
        return dict(self._state.dropped)

    # --- the control extension's calls ------------------------------------------------------

    def drop_sessions(self, public_key: bytes) -> None:
        """Forget a peer's keys now (it said goodbye); the next packet starts a handshake."""
        self._state.forget_sessions(self._state.peers[public_key])

    def send_to_peer(self, public_key: bytes, payloads: Iterable[bytes], now: float) -> None:
        """Seal payloads (e.g. control messages) for one peer, bypassing cryptokey routing."""
        send.send_to(self._state, self._state.peers[public_key], list(payloads), now)

    def initiate(self, public_key: bytes, now: float) -> None:
        """Start a handshake with a peer now (e.g. to a saved endpoint after a restart)."""
        state = self._state
        peer = state.peers[public_key]
        handshake.send_initiation(state, peer, now, retry=False)
        state.schedule(peer)

    # --- the data path -------------------------------------------------------------------------

    def send_packets(self, packets: Iterable[bytes], now: float) -> None:
        """Route IP packets read from the tun to their peers and encrypt them."""
        send.send_packets(self._state, packets, now)

    def receive_datagrams(self, datagrams: Iterable[tuple[bytes, Endpoint]], now: float) -> list[bytes]:
        """Process UDP payloads; returns the IP packets to write to the tun."""
        return receive.receive_datagrams(self._state, datagrams, now)

    # --- outputs -----------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        state = self._state
        out, state.outgoing = state.outgoing, []
        return out

    def next_event(self) -> Event | None:
        events = self._state.events
        return events.popleft() if events else None

    def get_timer(self) -> float | None:
        """The earliest timer deadline of any peer, or None."""
        return self._state.next_deadline()

    def handle_timer(self, now: float) -> None:
        timerhandlers.handle_due(self._state, now)

    # --- for tests ----------------------------------------------------------------------------------

    def state_digest(self) -> tuple:
        """Everything incoming data could change, drop counters and the cookie-reply budget aside
        (a capped table of rates), as one comparable value: the hostile-input tests prove a
        refused message left it as it was."""
        state = self._state
        return (
            dict(state.index_table.items()), len(state.rate_limiter),
            tuple(peer.digest() for peer in state.peers.values()),
            state.next_deadline(), len(state.events), len(state.outgoing),
        )
