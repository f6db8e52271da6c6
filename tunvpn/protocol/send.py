"""The send path: IP packets from the tun, routed to their peers, sealed into transport messages.

Packets wait in the peer's staging queue until a session can carry them; the hot loop is
`seal`, which runs once per batch and per peer, never once per packet with a call inside.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

from . import handshake, timerhandlers
from .crypto import transport_nonce
from .devicestate import DeviceState
from .keypair import REJECT_AFTER_MESSAGES, Keypair
from .messages import MESSAGE_TRANSPORT, TRANSPORT_HEADER
from .peer import STAGED_PACKETS_MAX, Peer

_ZERO_PADDING = bytes(16)


def send_packets(state: DeviceState, packets: Iterable[bytes], now: float) -> None:
    """Route IP packets read from the tun to their peers and encrypt them, one group per peer."""
    lookup_v4 = state.allowed_ips.lookup_v4
    lookup_v6 = state.allowed_ips.lookup_v6
    dropped = state.dropped
    by_peer: dict[Peer, list[bytes]] = {}
    last_destination, peer = b"", None  # a batch is mostly one flow's: one lookup for it
    for packet in packets:
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            destination = packet[16:20]
            if destination != last_destination:
                peer, last_destination = lookup_v4(destination), destination
        elif version == 6 and len(packet) >= 40:
            destination = packet[24:40]
            if destination != last_destination:
                peer, last_destination = lookup_v6(destination), destination
        else:
            dropped["tun_not_ip"] += 1
            continue
        if peer is None:
            dropped["no_peer_for_destination"] += 1
            continue
        batch = by_peer.get(peer)
        if batch is None:
            by_peer[peer] = [packet]
        else:
            batch.append(packet)
    for peer, batch in by_peer.items():
        if peer.policy is not None:
            batch = peer.policy.admit_outbound(batch, now, peer.dropped)
            if not batch:
                continue
        send_to(state, peer, batch, now)


def send_to(state: DeviceState, peer: Peer, packets: list[bytes], now: float) -> None:
    """Stage packets for one peer and send what a session can carry."""
    stage(peer, packets)
    send_staged(state, peer, now)
    state.schedule(peer)


def stage(peer: Peer, packets: list[bytes]) -> None:
    staged = peer.staged
    staged.extend(packets)
    overflow = len(staged) - STAGED_PACKETS_MAX
    if overflow > 0:
        for _ in range(overflow):
            staged.popleft()
        peer.dropped["staged_queue_full"] += overflow


def send_staged(state: DeviceState, peer: Peer, now: float) -> None:
    """Seal everything staged under the current keypair, or start a handshake for it."""
    keypair = peer.keypairs.current
    if keypair is None or not keypair.can_send(now):
        handshake.send_initiation(state, peer, now, retry=False)
        return
    if peer.endpoint is None:
        peer.dropped["no_endpoint"] += len(peer.staged)
        peer.staged.clear()
        return
    staged, peer.staged = peer.staged, deque()
    seal(state, peer, keypair, staged, now)
    timerhandlers.keep_key_fresh_sending(state, peer, keypair, now)


def send_keepalive(state: DeviceState, peer: Peer, now: float) -> None:
    """An empty transport message, unless data is staged that can serve as one."""
    if not peer.staged:
        peer.staged.append(b"")
    send_staged(state, peer, now)


def seal(state: DeviceState, peer: Peer, keypair: Keypair, packets: Iterable[bytes], now: float) -> None:
    """Encrypt packets under one keypair; the hot loop of the send path.

    Everything the loop touches is a local (attribute and global lookups cost more than the
    arithmetic), the counter is written back once, and the timers move once per batch."""
    encrypt = keypair.sender.encrypt
    nonce = transport_nonce
    pack_header = TRANSPORT_HEADER.pack
    remote_index = keypair.remote_index
    endpoint = peer.endpoint
    mtu = state.mtu
    out = state.outgoing
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
            padding = -length & 15  # messages.padded_length, inlined
            if padding and mtu and length + padding > mtu:
                padding = max(0, mtu - length)
            if padding:
                packet = packet + _ZERO_PADDING[:padding]
        datagram = pack_header(MESSAGE_TRANSPORT, remote_index, counter) + encrypt(nonce(counter), packet, None)
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
            timers.data_sent(now, state.jitter)
