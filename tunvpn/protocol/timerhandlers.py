"""What the device does when a peer's timer expires, and when a session needs fresh keys.

One handler per timer, named as wireguard-go names them (timers.go), and next to them the two
checks that start a handshake before a session grows old: on sending (send.py calls it after
each batch) and on receiving (receive.py, once per peer and batch).
"""

from __future__ import annotations

import heapq
from typing import Callable

from . import handshake, send
from .devicestate import DeviceState
from .events import HandshakeGaveUp, KeysExpired
from .keypair import REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, Keypair
from .peer import Peer
from .timers import KEEPALIVE_TIMEOUT, MAX_HANDSHAKE_ATTEMPTS, REKEY_TIMEOUT, ZERO_KEYS_AFTER, Timer

# An initiator whose session is this old when data arrives starts over, so that the keys are
# replaced before the peer's REJECT_AFTER_TIME while it still has time to answer.
KEEP_FRESH_RECEIVING_AFTER = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT


def handle_due(state: DeviceState, now: float) -> None:
    """Run the handlers of every timer due at `now`, peer by peer in deadline order."""
    heap = state.heap
    while heap and heap[0][0] <= now:
        deadline, _, peer = heapq.heappop(heap)
        if peer.scheduled_at != deadline:
            continue  # stale entry
        peer.scheduled_at = float("inf")
        for timer in peer.timers.pop_due(now):
            EXPIRED[timer](state, peer, now)
        state.schedule(peer)


def expired_retransmit_handshake(state: DeviceState, peer: Peer, now: float) -> None:
    """No response to our initiation: try again, or after REKEY_ATTEMPT_TIME give up."""
    timers = peer.timers
    if timers.handshake_attempts > MAX_HANDSHAKE_ATTEMPTS:
        timers.send_keepalive = None
        peer.dropped["handshake_gave_up"] += len(peer.staged)
        peer.staged.clear()
        if timers.zero_key_material is None:
            timers.zero_key_material = now + ZERO_KEYS_AFTER
        state.events.append(HandshakeGaveUp(peer.public_key))
    else:
        timers.handshake_attempts += 1
        handshake.send_initiation(state, peer, now, retry=True)


def expired_send_keepalive(state: DeviceState, peer: Peer, now: float) -> None:
    """We received data and sent nothing back for KEEPALIVE_TIMEOUT: say we are alive."""
    send.send_keepalive(state, peer, now)
    timers = peer.timers
    if timers.need_another_keepalive:
        timers.need_another_keepalive = False
        timers.send_keepalive = now + KEEPALIVE_TIMEOUT


def expired_new_handshake(state: DeviceState, peer: Peer, now: float) -> None:
    """We sent data and heard nothing for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT: new keys."""
    handshake.send_initiation(state, peer, now, retry=False)


def expired_zero_key_material(state: DeviceState, peer: Peer, now: float) -> None:
    """No new handshake for 3 x REJECT_AFTER_TIME: drop the keys."""
    state.forget_sessions(peer)
    state.events.append(KeysExpired(peer.public_key))


def expired_persistent_keepalive(state: DeviceState, peer: Peer, now: float) -> None:
    if peer.timers.persistent_keepalive_interval:
        send.send_keepalive(state, peer, now)


EXPIRED: dict[Timer, Callable[[DeviceState, Peer, float], None]] = {
    Timer.RETRANSMIT_HANDSHAKE: expired_retransmit_handshake,
    Timer.SEND_KEEPALIVE: expired_send_keepalive,
    Timer.NEW_HANDSHAKE: expired_new_handshake,
    Timer.ZERO_KEY_MATERIAL: expired_zero_key_material,
    Timer.PERSISTENT_KEEPALIVE: expired_persistent_keepalive,
}


def keep_key_fresh_sending(state: DeviceState, peer: Peer, keypair: Keypair, now: float) -> None:
    """After sending under `keypair`: rekey once it sealed too many messages, or, for the
    side that initiated it, once it is REKEY_AFTER_TIME old."""
    if keypair.send_counter > REKEY_AFTER_MESSAGES or (
        keypair.is_initiator and now - keypair.created > REKEY_AFTER_TIME
    ):
        handshake.send_initiation(state, peer, now, retry=False)


def keep_key_fresh_receiving(state: DeviceState, peer: Peer, now: float) -> None:
    """After receiving: an initiator whose session nears its end starts a handshake, once."""
    current = peer.keypairs.current
    timers = peer.timers
    if (
        current is not None
        and current.is_initiator
        and not timers.sent_last_minute_handshake
        and now - current.created > KEEP_FRESH_RECEIVING_AFTER
    ):
        timers.sent_last_minute_handshake = True
        handshake.send_initiation(state, peer, now, retry=False)
