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
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from . import timers as T
from .allowedips import AllowedIPs, IPNetwork
from .cookie import CookieChecker, LoadMonitor, RateLimiter, source_bytes
from .crypto import KEY_SIZE, StaticKey
from .indextable import IndexTable
from .keypair import REJECT_AFTER_MESSAGES, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, REJECT_AFTER_TIME, Keypair
from .messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_MAC1_OFFSET,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_MAC1_OFFSET,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
    CookieReply,
    Initiation,
    Response,
    padded_length,
)
from .control import CONTROL_MARKER
from .noise import Identity, NoiseError, open_initiation
from .peer import STAGED_PACKETS_MAX, Peer

Endpoint = Any
DEFAULT_MTU = 1420
DEFAULT_LOAD_THRESHOLD = 256  # handshake messages per second before cookies are demanded

_ZERO_NONCE_PREFIX = bytes(4)
_ZERO_PADDING = bytes(16)
_KEEP_FRESH_RECEIVING = REJECT_AFTER_TIME - T.KEEPALIVE_TIMEOUT - T.REKEY_TIMEOUT


# --- events (slow path only: never one per data packet) ------------------------

@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    public_key: bytes
    initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    public_key: bytes


@dataclass(frozen=True, slots=True)
class KeysExpired:
    public_key: bytes


@dataclass(frozen=True, slots=True)
class CookieReceived:
    """The peer is under load: our next handshake message to it carries mac2."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """A tunvpn control message from an authenticated peer (see control.py)."""

    public_key: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    public_key: bytes
    endpoint: Endpoint


Event = HandshakeCompleted | HandshakeGaveUp | KeysExpired | CookieReceived | ControlReceived | EndpointChanged


class Device:
    def __init__(
        self,
        private_key: bytes,
        *,
        mtu: int = DEFAULT_MTU,
        load_threshold: int = DEFAULT_LOAD_THRESHOLD,
        forward_between_peers: bool | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        """`forward_between_peers`: None hands every packet to the tun, as WireGuard does;
        True seals a packet from one peer to another peer's address straight back out;
        False drops it (and counts it) instead."""
        self.forward_between_peers = forward_between_peers
        self.identity = Identity(StaticKey(private_key))
        self.mtu = mtu
        self._random_bytes = random_bytes
        self.cookie_checker = CookieChecker(self.identity.public, random_bytes)
        self.load = LoadMonitor(load_threshold)
        self.rate_limiter = RateLimiter()
        self.index_table: IndexTable[Peer | Keypair] = IndexTable(random_bytes)
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self.peers: dict[bytes, Peer] = {}
        self.dropped: Counter[str] = Counter()
        self._wall_offset = 0.0
        self._outgoing: list[tuple[bytes, Endpoint]] = []
        self._events: deque[Event] = deque()
        self._heap: list[tuple[float, int, Peer]] = []
        self._heap_seq = 0

    @property
    def public_key(self) -> bytes:
        return self.identity.public

    def set_wall_clock(self, wall: float, now: float) -> None:
        """Tell the device what the wall clock reads at monotonic time `now`."""
        self._wall_offset = wall - now

    # --- peers ---------------------------------------------------------------

    def set_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: Iterable[IPNetwork | str] = (),
        endpoint: Endpoint = None,
        persistent_keepalive: int = 0,
        now: float | None = None,
    ) -> Peer:
        """Add a peer, or update one in place: its sessions survive unless its PSK changed."""
        if len(public_key) != KEY_SIZE or (preshared_key is not None and len(preshared_key) != KEY_SIZE):
            raise ValueError("keys are 32 bytes")
        if public_key == self.identity.public:
            raise ValueError("a peer cannot have this device's own public key")
        peer = self.peers.get(public_key)
        if peer is None:
            peer = self.peers[public_key] = Peer(
                self.identity, public_key, preshared_key, endpoint, persistent_keepalive
            )
        else:
            if (preshared_key or bytes(KEY_SIZE)) != peer.handshake.preshared_key:
                self._forget_sessions(peer)
                peer.handshake.preshared_key = preshared_key or bytes(KEY_SIZE)
            if endpoint is not None:
                peer.endpoint = endpoint
            peer.timers.persistent_keepalive_interval = persistent_keepalive
            if not persistent_keepalive:
                peer.timers.persistent_keepalive = None
        self.allowed_ips.remove_owner(peer)
        for network in allowed_ips:
            self.allowed_ips.insert(network, peer)
        if persistent_keepalive and now is not None:
            self._send_keepalive(peer, now)
            self._schedule(peer)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        self._forget_sessions(peer)
        peer.timers.stop_all()
        self.allowed_ips.remove_owner(peer)
        peer.scheduled_at = float("inf")

    def set_endpoint(self, public_key: bytes, endpoint: Endpoint) -> None:
        self.peers[public_key].endpoint = endpoint

    def add_allowed_ip(self, public_key: bytes, network: IPNetwork | str) -> None:
        self.allowed_ips.insert(network, self.peers[public_key])

    def drop_sessions(self, public_key: bytes) -> None:
        """Forget a peer's keys now (it said goodbye); the next packet starts a handshake."""
        self._forget_sessions(self.peers[public_key])

    def send_to_peer(self, public_key: bytes, payloads: Iterable[bytes], now: float) -> None:
        """Seal payloads (e.g. control messages) for one peer, bypassing cryptokey routing."""
        peer = self.peers[public_key]
        self._stage(peer, list(payloads))
        self._send_staged(peer, now)
        self._schedule(peer)

    def allowed_ips_of(self, public_key: bytes) -> list[IPNetwork]:
        return self.allowed_ips.networks_of(self.peers[public_key])

    def initiate(self, public_key: bytes, now: float) -> None:
        """Start a handshake with a peer now (e.g. to a saved endpoint after a restart)."""
        peer = self.peers[public_key]
        self._send_initiation(peer, now, retry=False)
        self._schedule(peer)

    # --- outputs ---------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Endpoint]]:
        out, self._outgoing = self._outgoing, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].scheduled_at != heap[0][0]:
            heapq.heappop(heap)  # stale: the peer was rescheduled earlier or removed
        return heap[0][0] if heap else None

    def handle_timer(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, peer = heapq.heappop(heap)
            if peer.scheduled_at != deadline:
                continue
            peer.scheduled_at = float("inf")
            for name in peer.timers.pop_due(now):
                self._timer_fired(peer, name, now)
            self._schedule(peer)

    def _schedule(self, peer: Peer) -> None:
        deadline = peer.timers.next_deadline()
        if deadline is not None and deadline < peer.scheduled_at and self.peers.get(peer.public_key) is peer:
            peer.scheduled_at = deadline
            self._heap_seq += 1
            heapq.heappush(self._heap, (deadline, self._heap_seq, peer))

    def _jitter(self) -> float:
        """0 to REKEY_TIMEOUT_JITTER_MAX seconds, in whole milliseconds."""
        return int.from_bytes(self._random_bytes(2), "little") % (int(T.REKEY_TIMEOUT_JITTER_MAX * 1000) + 1) / 1000.0

    # --- tun side: plaintext packets in -----------------------------------------

    def send_packets(self, packets: Iterable[bytes], now: float) -> None:
        """Route IP packets read from the tun to their peers and encrypt them."""
        lookup_v4 = self.allowed_ips.lookup_v4
        lookup_v6 = self.allowed_ips.lookup_v6
        by_peer: dict[Peer, list[bytes]] = {}
        for packet in packets:
            version = packet[0] >> 4 if packet else 0
            if version == 4 and len(packet) >= 20:
                peer = lookup_v4(packet[16:20])
            elif version == 6 and len(packet) >= 40:
                peer = lookup_v6(packet[24:40])
            else:
                self.dropped["tun_not_ip"] += 1
                continue
            if peer is None:
                self.dropped["no_peer_for_destination"] += 1
                continue
            batch = by_peer.get(peer)
            if batch is None:
                by_peer[peer] = [packet]
            else:
                batch.append(packet)
        for peer, batch in by_peer.items():
            self._stage(peer, batch)
            self._send_staged(peer, now)
            self._schedule(peer)

    def _stage(self, peer: Peer, packets: list[bytes]) -> None:
        staged = peer.staged
        staged.extend(packets)
        overflow = len(staged) - STAGED_PACKETS_MAX
        if overflow > 0:
            for _ in range(overflow):
                staged.popleft()
            peer.dropped["staged_queue_full"] += overflow

    def _send_staged(self, peer: Peer, now: float) -> None:
        keypair = peer.keypairs.current
        if keypair is None or not keypair.can_send(now):
            self._send_initiation(peer, now, retry=False)
            return
        if peer.endpoint is None:
            peer.dropped["no_endpoint"] += len(peer.staged)
            peer.staged.clear()
            return
        staged, peer.staged = peer.staged, deque()
        self._seal(peer, keypair, staged, now)
        if keypair.send_counter > REKEY_AFTER_MESSAGES or (
            keypair.is_initiator and now - keypair.created > REKEY_AFTER_TIME
        ):
            self._send_initiation(peer, now, retry=False)

    def _seal(self, peer: Peer, keypair: Keypair, packets: Iterable[bytes], now: float) -> None:
        """Encrypt packets under one keypair; the hot loop of the send path."""
        seal = keypair.sender.seal
        pack_header = TRANSPORT_HEADER.pack
        remote_index = keypair.remote_index
        endpoint = peer.endpoint
        mtu = self.mtu
        out = self._outgoing
        counter = keypair.send_counter
        sent_bytes = 0
        has_data = False
        for packet in packets:
            if counter >= REJECT_AFTER_MESSAGES:
                peer.staged.append(packet)
                continue
            length = len(packet)
            if length:
                has_data = True
                padding = padded_length(length, mtu) - length
                if padding:
                    packet = packet + _ZERO_PADDING[:padding]
            datagram = pack_header(MESSAGE_TRANSPORT, remote_index, counter) + seal(counter, packet)
            counter += 1
            sent_bytes += len(datagram)
            out.append((datagram, endpoint))
        sent = counter - keypair.send_counter
        keypair.send_counter = counter
        if sent:
            peer.tx_packets += sent
            peer.tx_bytes += sent_bytes
            timers = peer.timers
            timers.authenticated_packet_traversed(now)
            timers.authenticated_packet_sent()
            if has_data:
                timers.data_sent(now, self._jitter())

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    # --- network side: datagrams in ---------------------------------------------

    def receive_datagrams(self, datagrams: Iterable[tuple[bytes, Endpoint]], now: float) -> list[bytes]:
        """Process UDP payloads; returns the IP packets to write to the tun."""
        packets: list[bytes] = []
        touched: dict[Peer, bool] = {}  # peer -> received data (not only keepalives)
        index_get = self.index_table.get
        unpack_header = TRANSPORT_HEADER.unpack_from
        lookup_v4 = self.allowed_ips.lookup_v4
        lookup_v6 = self.allowed_ips.lookup_v6
        dropped = self.dropped
        forward = self.forward_between_peers
        relay: list[bytes] | None = None if forward is None else []
        for data, source in datagrams:
            if source[1] == 0:
                # No reply can reach port 0; taken as an endpoint it would break the peer and
                # the state file.  A raw socket or an on-path replay can send from it.
                dropped["source_port_zero"] += 1
                continue
            size = len(data)
            if size < TRANSPORT_MIN_SIZE:
                self._receive_control(data, source, now)
                continue
            msg_type, receiver, counter = unpack_header(data)
            if msg_type != MESSAGE_TRANSPORT:
                self._receive_control(data, source, now)
                continue
            keypair = index_get(receiver)
            if keypair.__class__ is not Keypair:
                dropped["unknown_receiver_index"] += 1
                continue
            peer = keypair.peer
            if not keypair.can_receive(now):
                peer.dropped["expired_keypair"] += 1
                continue
            plaintext = keypair.receiver.open(_ZERO_NONCE_PREFIX + data[8:16], data[TRANSPORT_HEADER_SIZE:])
            if plaintext is None:
                dropped["bad_transport_tag"] += 1
                continue
            if not keypair.replay.accept(counter, REJECT_AFTER_MESSAGES):
                peer.dropped["replayed"] += 1
                continue
            if keypair is not peer.keypairs.current:
                self._received_with(peer, keypair, now)
            if source != peer.endpoint:
                peer.endpoint = source
                self._events.append(EndpointChanged(peer.public_key, source))
            peer.rx_packets += 1
            peer.rx_bytes += size
            if not plaintext:
                touched.setdefault(peer, False)
                continue
            touched[peer] = True  # data for the timers even if the inner packet is dropped below
            version = plaintext[0] >> 4
            if version == 4 and len(plaintext) >= 20:
                length = int.from_bytes(plaintext[2:4], "big")
                owner = lookup_v4(plaintext[12:16])
            elif version == 6 and len(plaintext) >= 40:
                length = 40 + int.from_bytes(plaintext[4:6], "big")
                owner = lookup_v6(plaintext[8:24])
            elif plaintext[0] == CONTROL_MARKER:
                self._events.append(ControlReceived(peer.public_key, plaintext))
                continue
            else:
                peer.dropped["not_ip"] += 1
                continue
            if owner is not peer:
                peer.dropped["source_not_allowed"] += 1
                continue
            if length > len(plaintext) or length < 20:
                peer.dropped["bad_ip_length"] += 1
                continue
            packet = plaintext if length == len(plaintext) else plaintext[:length]
            if relay is None:
                packets.append(packet)
                continue
            target = lookup_v4(packet[16:20]) if version == 4 else lookup_v6(packet[24:40])
            if target is None:
                packets.append(packet)
            elif forward:
                relay.append(packet)
            else:
                peer.dropped["peer_to_peer_blocked"] += 1
        for peer, had_data in touched.items():
            self._after_receive(peer, had_data, now)
        if relay:
            self.send_packets(relay, now)
        return packets

    def _received_with(self, peer: Peer, keypair: Keypair, now: float) -> None:
        """A transport message under a keypair that is not current: maybe it confirms `next`."""
        if keypair is not peer.keypairs.next:
            return
        self._release(peer.keypairs.confirm(keypair))
        peer.timers.handshake_complete()
        peer.last_handshake_wall = now + self._wall_offset
        self._events.append(HandshakeCompleted(peer.public_key, initiator=False))
        if peer.staged:
            self._send_staged(peer, now)

    def _after_receive(self, peer: Peer, had_data: bool, now: float) -> None:
        timers = peer.timers
        timers.authenticated_packet_received()
        timers.authenticated_packet_traversed(now)
        if had_data:
            timers.data_received(now)
        current = peer.keypairs.current
        if (
            current is not None
            and current.is_initiator
            and not timers.sent_last_minute_handshake
            and now - current.created > _KEEP_FRESH_RECEIVING
        ):
            timers.sent_last_minute_handshake = True
            self._send_initiation(peer, now, retry=False)
        self._schedule(peer)

    # --- handshake messages (slow path) --------------------------------------------

    def _receive_control(self, data: bytes, source: Endpoint, now: float) -> None:
        """Types 1-3, and everything malformed: never raises, counts what it drops."""
        size = len(data)
        msg_type = int.from_bytes(data[:4], "little") if size >= 4 else -1
        if msg_type == MESSAGE_INITIATION and size == INITIATION_SIZE:
            self._receive_handshake(data, source, now, INITIATION_MAC1_OFFSET, self._consume_initiation)
        elif msg_type == MESSAGE_RESPONSE and size == RESPONSE_SIZE:
            self._receive_handshake(data, source, now, RESPONSE_MAC1_OFFSET, self._consume_response)
        elif msg_type == MESSAGE_COOKIE_REPLY and size == COOKIE_REPLY_SIZE:
            self._consume_cookie_reply(CookieReply.parse(data), now)
        elif msg_type in (MESSAGE_INITIATION, MESSAGE_RESPONSE, MESSAGE_COOKIE_REPLY, MESSAGE_TRANSPORT):
            self.dropped["bad_size"] += 1
        else:
            self.dropped["unknown_type"] += 1

    def _receive_handshake(
        self,
        data: bytes,
        source: Endpoint,
        now: float,
        mac1_offset: int,
        consume: Callable[[bytes, Endpoint, float], None],
    ) -> None:
        if not self.cookie_checker.mac1_valid(data, mac1_offset):
            self.dropped["bad_mac1"] += 1
            return
        self.load.record(now)
        if self.load.under_load(now):
            src = source_bytes(source)
            if not self.cookie_checker.mac2_valid(data, mac1_offset, src, now):
                sender_index = int.from_bytes(data[4:8], "little")
                reply = self.cookie_checker.create_reply(data, sender_index, mac1_offset, src, now)
                self._outgoing.append((reply, source))
                self.dropped["cookie_reply_sent"] += 1
                return
            if not self.rate_limiter.allow(src, now):
                self.dropped["handshake_rate_limited"] += 1
                return
        try:
            consume(data, source, now)
        except NoiseError:
            self.dropped["handshake_rejected"] += 1

    def _consume_initiation(self, data: bytes, source: Endpoint, now: float) -> None:
        msg = Initiation.parse(data)
        opened = open_initiation(self.identity, msg)
        peer = self.peers.get(opened.remote_static)
        if peer is None:
            self.dropped["unknown_peer"] += 1
            return
        peer.handshake.consume_initiation(msg, opened, now)
        self._set_endpoint(peer, source)
        peer.rx_bytes += INITIATION_SIZE
        peer.timers.authenticated_packet_traversed(now)
        peer.timers.authenticated_packet_received()
        self._send_response(peer, now)
        self._schedule(peer)

    def _consume_response(self, data: bytes, source: Endpoint, now: float) -> None:
        msg = Response.parse(data)
        peer = self.index_table.get(msg.receiver)
        if peer.__class__ is not Peer:
            self.dropped["unknown_receiver_index"] += 1
            return
        peer.handshake.consume_response(msg)
        self._set_endpoint(peer, source)
        peer.rx_bytes += RESPONSE_SIZE
        timers = peer.timers
        timers.authenticated_packet_traversed(now)
        timers.authenticated_packet_received()
        self._begin_session(peer, now)
        timers.handshake_complete()
        self._events.append(HandshakeCompleted(peer.public_key, initiator=True))
        self._send_keepalive(peer, now)
        self._schedule(peer)

    def _consume_cookie_reply(self, reply: CookieReply, now: float) -> None:
        owner = self.index_table.get(reply.receiver)
        peer = owner.peer if owner.__class__ is Keypair else owner
        if peer is None or not peer.cookies.consume_reply(reply, now):
            self.dropped["bad_cookie_reply"] += 1
        else:
            self._events.append(CookieReceived(peer.public_key))

    def _set_endpoint(self, peer: Peer, source: Endpoint) -> None:
        if source != peer.endpoint:
            peer.endpoint = source
            self._events.append(EndpointChanged(peer.public_key, source))

    def _begin_session(self, peer: Peer, now: float) -> None:
        keys = peer.handshake.derive_session()
        keypair = Keypair(keys, now, peer)
        self.index_table.replace(keys.local_index, keypair)
        self._release(peer.keypairs.install(keypair))
        peer.timers.session_derived(now)
        if keys.is_initiator:
            peer.last_handshake_wall = now + self._wall_offset

    # --- handshake messages we send ------------------------------------------------

    def _new_handshake_index(self, peer: Peer) -> int:
        self.index_table.release(peer.handshake.local_index, peer)
        return self.index_table.allocate(peer)

    def _send_initiation(self, peer: Peer, now: float, retry: bool) -> None:
        if not retry:
            peer.timers.handshake_attempts = 0
        # Compared as `last + REKEY_TIMEOUT`, the very sum the retransmit deadline starts from:
        # `now - last` can round below REKEY_TIMEOUT when the timer fires exactly on time.
        if peer.last_sent_handshake is not None and now < peer.last_sent_handshake + T.REKEY_TIMEOUT:
            return
        if peer.endpoint is None:
            # Sent into the void: keep retrying, then give up and flush, as if it were lost.
            peer.dropped["no_endpoint"] += 1
            peer.last_sent_handshake = now
            peer.timers.handshake_initiated(now, self._jitter())
            return
        try:
            msg = peer.handshake.create_initiation(
                self._new_handshake_index(peer), StaticKey(self._random_bytes(KEY_SIZE)), now + self._wall_offset
            )
        except NoiseError:
            peer.dropped["low_order_peer_key"] += 1
            return
        peer.last_sent_handshake = now
        self._outgoing.append((peer.cookies.add_macs(msg.pack(), now), peer.endpoint))
        peer.tx_bytes += INITIATION_SIZE
        timers = peer.timers
        timers.authenticated_packet_traversed(now)
        timers.authenticated_packet_sent()
        timers.handshake_initiated(now, self._jitter())

    def _send_response(self, peer: Peer, now: float) -> None:
        msg = peer.handshake.create_response(self._new_handshake_index(peer), StaticKey(self._random_bytes(KEY_SIZE)))
        peer.last_sent_handshake = now
        self._begin_session(peer, now)
        self._outgoing.append((peer.cookies.add_macs(msg.pack(), now), peer.endpoint))
        peer.tx_bytes += RESPONSE_SIZE
        peer.timers.authenticated_packet_traversed(now)
        peer.timers.authenticated_packet_sent()

    # --- timers ----------------------------------------------------------------------

    def _timer_fired(self, peer: Peer, name: str, now: float) -> None:
        timers = peer.timers
        if name == T.RETRANSMIT_HANDSHAKE:
            if timers.handshake_attempts > T.MAX_HANDSHAKE_ATTEMPTS:
                timers.send_keepalive = None
                peer.dropped["handshake_gave_up"] += len(peer.staged)
                peer.staged.clear()
                if timers.zero_key_material is None:
                    timers.zero_key_material = now + T.ZERO_KEYS_AFTER
                self._events.append(HandshakeGaveUp(peer.public_key))
            else:
                timers.handshake_attempts += 1
                self._send_initiation(peer, now, retry=True)
        elif name == T.SEND_KEEPALIVE:
            self._send_keepalive(peer, now)
            if timers.need_another_keepalive:
                timers.need_another_keepalive = False
                timers.send_keepalive = now + T.KEEPALIVE_TIMEOUT
        elif name == T.NEW_HANDSHAKE:
            self._send_initiation(peer, now, retry=False)
        elif name == T.ZERO_KEY_MATERIAL:
            self._forget_sessions(peer)
            self._events.append(KeysExpired(peer.public_key))
        elif name == T.PERSISTENT_KEEPALIVE and timers.persistent_keepalive_interval:
            self._send_keepalive(peer, now)

    # --- key material ------------------------------------------------------------

    def _release(self, keypairs: Iterable[Keypair]) -> None:
        for keypair in keypairs:
            self.index_table.release(keypair.local_index, keypair)

    def _forget_sessions(self, peer: Peer) -> None:
        """Drop every keypair and the handshake in progress: Python cannot wipe, only let go."""
        self._release(peer.keypairs.clear())
        self.index_table.release(peer.handshake.local_index, peer)
        peer.handshake.clear()
        peer.staged.clear()
