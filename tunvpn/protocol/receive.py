"""The receive path: datagrams from the network, opened, checked, and handed to the tun.

Transport messages are handled in one loop over the batch without creating an object per
packet; everything else (handshakes, cookie replies, junk) goes to handshake.py.  Timer work
is done once per peer and batch, after the loop.
"""

from __future__ import annotations

from typing import Iterable

from . import handshake, timerhandlers
from .crypto import TagMismatch, transport_nonce
from .devicestate import DeviceState
from .events import Endpoint, EndpointChanged
from .keypair import REJECT_AFTER_MESSAGES, Keypair
from .messages import MESSAGE_TRANSPORT, TRANSPORT_HEADER, TRANSPORT_HEADER_SIZE, TRANSPORT_MIN_SIZE
from .peer import Peer


def receive_datagrams(state: DeviceState, datagrams: Iterable[tuple[bytes, Endpoint]], now: float) -> list[bytes]:
    """Process UDP payloads; returns the IP packets to write to the tun."""
    # The loop below runs once per datagram: what it uses is bound to locals first, and
    # branches go from the common case (a data packet for the tun) to the rare ones.
    packets: list[bytes] = []
    touched: dict[Peer, bool] = {}  # peer -> received data (not only keepalives)
    index_get = state.index_table.get
    unpack_header = TRANSPORT_HEADER.unpack_from
    nonce = transport_nonce
    lookup_v4 = state.allowed_ips.lookup_v4
    lookup_v6 = state.allowed_ips.lookup_v6
    dropped = state.dropped
    events = state.events
    non_ip_hook = state.non_ip_hook
    senders: list[Peer] | None = None if state.deliver_hook is None else []  # parallel to packets
    last_receiver = -1  # a train of datagrams is mostly one session's: its lookups are done once
    last_source, owner = b"", None  # the allowed-IPs answer for the last inner source address
    for data, source in datagrams:
        if source[1] == 0:
            # No reply can reach port 0; taken as an endpoint it would break the peer and
            # the state file.  A raw socket or an on-path replay can send from it.
            dropped["source_port_zero"] += 1
            continue
        size = len(data)
        if size < TRANSPORT_MIN_SIZE:
            handshake.receive_handshake_message(state, data, source, now)
            last_receiver = -1  # a handshake may retire keypairs
            continue
        msg_type, receiver, counter = unpack_header(data)
        if msg_type != MESSAGE_TRANSPORT:
            handshake.receive_handshake_message(state, data, source, now)
            last_receiver = -1
            continue
        if receiver != last_receiver:
            keypair = index_get(receiver)
            if keypair.__class__ is not Keypair:  # faster than isinstance, and no subclasses exist
                dropped["unknown_receiver_index"] += 1
                last_receiver = -1
                continue
            peer = keypair.peer
            if not keypair.can_receive(now):  # `now` is one for the batch: so is the answer
                peer.dropped["expired_keypair"] += 1
                last_receiver = -1
                continue
            decrypt = keypair.receiver.decrypt
            accept_counter = keypair.replay.accept
            last_receiver = receiver
        try:
            plaintext = decrypt(nonce(counter), data[TRANSPORT_HEADER_SIZE:], None)
        except TagMismatch:
            dropped["bad_transport_tag"] += 1
            continue
        # Only now, with the tag verified, may the counter move the replay window.
        if not accept_counter(counter, REJECT_AFTER_MESSAGES):
            peer.dropped["replayed"] += 1
            continue
        if keypair is not peer.keypairs.current:
            handshake.received_under(state, peer, keypair, now)
            last_receiver = -1
        if source != peer.endpoint:  # DeviceState.set_endpoint, inlined: this runs per packet
            peer.endpoint = source
            events.append(EndpointChanged(peer.public_key, source))
        peer.rx_packets += 1
        peer.rx_bytes += size
        if not plaintext:
            touched.setdefault(peer, False)  # a keepalive
            continue
        touched[peer] = True  # data for the timers even if the inner packet is dropped below
        version = plaintext[0] >> 4
        if version == 4 and len(plaintext) >= 20:
            length = plaintext[2] << 8 | plaintext[3]  # no slice, no call: this runs per packet
            inner_source = plaintext[12:16]
            if inner_source != last_source:  # a batch is mostly one flow's: one lookup for it
                owner, last_source = lookup_v4(inner_source), inner_source
        elif version == 6 and len(plaintext) >= 40:
            length = 40 + (plaintext[4] << 8 | plaintext[5])
            inner_source = plaintext[8:24]
            if inner_source != last_source:
                owner, last_source = lookup_v6(inner_source), inner_source
        else:
            if non_ip_hook is None or not non_ip_hook(state, peer, plaintext):
                peer.dropped["not_ip"] += 1
            continue
        if owner is not peer:
            peer.dropped["source_not_allowed"] += 1
            continue
        if length > len(plaintext) or length < 20:
            peer.dropped["bad_ip_length"] += 1
            continue
        packet = plaintext if length == len(plaintext) else plaintext[:length]  # cut the padding
        if peer.policy is not None:  # tunvpn's rate limit and access rules; None for plain WireGuard
            refusal = peer.policy.refuses_inbound(packet, now)
            if refusal is not None:
                peer.dropped[refusal] += 1
                continue
        packets.append(packet)
        if senders is not None:
            senders.append(peer)
    for peer, had_data in touched.items():
        _after_receive(state, peer, had_data, now)
    if senders is not None and packets:
        packets = state.deliver_hook(state, packets, senders, now)
    return packets


def _after_receive(state: DeviceState, peer: Peer, had_data: bool, now: float) -> None:
    """The timers of one peer after a batch: once, however many packets it sent."""
    timers = peer.timers
    timers.authenticated_packet_received()
    timers.authenticated_packet_traversed(now)
    if had_data:
        timers.data_received(now)
    timerhandlers.keep_key_fresh_receiving(state, peer, now)
    state.schedule(peer)
