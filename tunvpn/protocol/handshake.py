"""Handshake handling: messages 1-3 in and out, cookies under load, and new sessions.

The slow path.  Nothing here runs per data packet, and nothing an unauthenticated sender
does allocates state: mac1 is checked before any Diffie-Hellman work, and under load mac2
and the rate limiter come before it too.
"""

from __future__ import annotations

from typing import Callable

from . import send
from .cookie import source_bytes
from .devicestate import DeviceState
from .events import CookieReceived, Endpoint, HandshakeCompleted
from .keypair import Keypair
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
    CookieReply,
    Initiation,
    Response,
)
from .noise import NoiseError, open_initiation
from .peer import Peer
from .timers import REKEY_TIMEOUT

_KNOWN_TYPES = (MESSAGE_INITIATION, MESSAGE_RESPONSE, MESSAGE_COOKIE_REPLY, MESSAGE_TRANSPORT)


# --- messages in -------------------------------------------------------------------------

def receive_handshake_message(state: DeviceState, data: bytes, source: Endpoint, now: float) -> None:
    """Types 1-3, and everything malformed: never raises, counts what it drops."""
    size = len(data)
    msg_type = int.from_bytes(data[:4], "little") if size >= 4 else -1
    if msg_type == MESSAGE_INITIATION and size == INITIATION_SIZE:
        _check_macs_then(state, data, source, now, INITIATION_MAC1_OFFSET, _consume_initiation)
    elif msg_type == MESSAGE_RESPONSE and size == RESPONSE_SIZE:
        _check_macs_then(state, data, source, now, RESPONSE_MAC1_OFFSET, _consume_response)
    elif msg_type == MESSAGE_COOKIE_REPLY and size == COOKIE_REPLY_SIZE:
        _consume_cookie_reply(state, CookieReply.parse(data), now)
    elif msg_type in _KNOWN_TYPES:
        state.dropped["bad_size"] += 1
    else:
        state.dropped["unknown_type"] += 1


def _check_macs_then(
    state: DeviceState,
    data: bytes,
    source: Endpoint,
    now: float,
    mac1_offset: int,
    consume: Callable[[DeviceState, bytes, Endpoint, float], None],
) -> None:
    """mac1, then under load mac2 (or a cookie reply, within its budget) and the rate limit,
    then `consume`: each step is cheaper than the next, and a flood stops at the cheapest."""
    checker = state.cookie_checker
    if not checker.mac1_valid(data, mac1_offset):
        state.dropped["bad_mac1"] += 1
        return
    state.load.record(now)
    if state.load.under_load(now):
        src = source_bytes(source)
        if not checker.mac2_valid(data, mac1_offset, src, now):
            if not state.cookie_budget.allow(src, now):
                state.dropped["cookie_reply_rate_limited"] += 1
                return
            sender_index = int.from_bytes(data[4:8], "little")
            reply = checker.create_reply(data, sender_index, mac1_offset, src, now)
            state.outgoing.append((reply, source))
            state.dropped["cookie_reply_sent"] += 1
            return
        if not state.rate_limiter.allow(src, now):
            state.dropped["handshake_rate_limited"] += 1
            return
    try:
        consume(state, data, source, now)
    except NoiseError:
        state.dropped["handshake_rejected"] += 1


def _consume_initiation(state: DeviceState, data: bytes, source: Endpoint, now: float) -> None:
    msg = Initiation.parse(data)
    opened = open_initiation(state.identity, msg)
    peer = state.peers.get(opened.remote_static)
    if peer is None:
        state.dropped["unknown_peer"] += 1
        return
    peer.handshake.consume_initiation(msg, opened, now)
    state.set_endpoint(peer, source)
    peer.rx_bytes += INITIATION_SIZE
    peer.timers.authenticated_packet_traversed(now)
    peer.timers.authenticated_packet_received()
    _send_response(state, peer, now)
    state.schedule(peer)


def _consume_response(state: DeviceState, data: bytes, source: Endpoint, now: float) -> None:
    msg = Response.parse(data)
    peer = state.index_table.get(msg.receiver)
    if peer.__class__ is not Peer:
        state.dropped["unknown_receiver_index"] += 1
        return
    peer.handshake.consume_response(msg)
    state.set_endpoint(peer, source)
    peer.rx_bytes += RESPONSE_SIZE
    timers = peer.timers
    timers.authenticated_packet_traversed(now)
    timers.authenticated_packet_received()
    _begin_session(state, peer, now)
    timers.handshake_complete()
    state.events.append(HandshakeCompleted(peer.public_key, initiator=True))
    send.send_keepalive(state, peer, now)
    state.schedule(peer)


def _consume_cookie_reply(state: DeviceState, reply: CookieReply, now: float) -> None:
    owner = state.index_table.get(reply.receiver)
    peer = owner.peer if owner.__class__ is Keypair else owner
    if peer is None or not peer.cookies.consume_reply(reply, now):
        state.dropped["bad_cookie_reply"] += 1
    else:
        state.events.append(CookieReceived(peer.public_key))


def received_under(state: DeviceState, peer: Peer, keypair: Keypair, now: float) -> None:
    """A transport message under a keypair that is not current: if it is `next`, the
    initiator has proved it holds the keys, and the responder's handshake is complete."""
    if keypair is not peer.keypairs.next:
        return
    state.release(peer.keypairs.confirm(keypair))
    peer.timers.handshake_complete()
    peer.last_handshake_wall = now + state.wall_offset
    state.events.append(HandshakeCompleted(peer.public_key, initiator=False))
    if peer.staged:
        send.send_staged(state, peer, now)


def _begin_session(state: DeviceState, peer: Peer, now: float) -> None:
    keys = peer.handshake.derive_session()
    keypair = Keypair(keys, now, peer)
    state.index_table.replace(keys.local_index, keypair)
    state.release(peer.keypairs.install(keypair))
    peer.timers.session_derived(now)
    if keys.is_initiator:
        peer.last_handshake_wall = now + state.wall_offset


# --- messages out ------------------------------------------------------------------------

def _new_handshake_index(state: DeviceState, peer: Peer) -> int:
    state.index_table.release(peer.handshake.local_index, peer)
    return state.index_table.allocate(peer)


def send_initiation(state: DeviceState, peer: Peer, now: float, retry: bool) -> None:
    """Start a handshake, at most one per REKEY_TIMEOUT; `retry` keeps counting the attempts."""
    if not retry:
        peer.timers.handshake_attempts = 0
    # Compared as `last + REKEY_TIMEOUT`, the very sum the retransmit deadline starts from:
    # `now - last` can round below REKEY_TIMEOUT when the timer fires exactly on time.
    if peer.last_sent_handshake is not None and now < peer.last_sent_handshake + REKEY_TIMEOUT:
        return
    if peer.endpoint is None:
        # Sent into the void: keep retrying, then give up and flush, as if it were lost.
        peer.dropped["no_endpoint"] += 1
        peer.last_sent_handshake = now
        peer.timers.handshake_initiated(now, state.jitter())
        return
    try:
        msg = peer.handshake.create_initiation(
            _new_handshake_index(state, peer), state.new_ephemeral(), now + state.wall_offset
        )
    except NoiseError:
        peer.dropped["low_order_peer_key"] += 1
        return
    peer.last_sent_handshake = now
    state.outgoing.append((peer.cookies.add_macs(msg.pack(), now), peer.endpoint))
    peer.tx_bytes += INITIATION_SIZE
    timers = peer.timers
    timers.authenticated_packet_traversed(now)
    timers.authenticated_packet_sent()
    timers.handshake_initiated(now, state.jitter())


def _send_response(state: DeviceState, peer: Peer, now: float) -> None:
    msg = peer.handshake.create_response(_new_handshake_index(state, peer), state.new_ephemeral())
    peer.last_sent_handshake = now
    _begin_session(state, peer, now)
    state.outgoing.append((peer.cookies.add_macs(msg.pack(), now), peer.endpoint))
    peer.tx_bytes += RESPONSE_SIZE
    peer.timers.authenticated_packet_traversed(now)
    peer.timers.authenticated_packet_sent()
