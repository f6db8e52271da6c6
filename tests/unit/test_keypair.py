"""Keypairs: previous/current/next rotation, expiry by age and count, and how the device uses them."""

from __future__ import annotations

import pytest

from corepair import CorePair, a_to_b_v4, b_to_a_v4, established
from tunvpn.protocol.keypair import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, Keypair, Keypairs
from tunvpn.protocol.messages import TRANSPORT_HEADER
from tunvpn.protocol.noise import SessionKeys

_index = iter(range(1, 1_000_000))


def _keypair(initiator: bool, created: float = 0.0) -> Keypair:
    i = next(_index)
    return Keypair(SessionKeys(bytes([i % 256]) * 32, bytes([(i + 1) % 256]) * 32, initiator, i, i + 10_000), created, None)


# --- the rotation rules (wireguard-go's BeginSymmetricSession / ReceivedWithKeypair) ---------------

def test_initiator_keypair_becomes_current_at_once():
    pairs = Keypairs()
    first = _keypair(True)
    assert pairs.install(first) == []
    assert (pairs.previous, pairs.current, pairs.next) == (None, first, None)
    second = _keypair(True)
    assert pairs.install(second) == []
    assert (pairs.previous, pairs.current, pairs.next) == (first, second, None)
    third = _keypair(True)
    assert pairs.install(third) == [first]
    assert (pairs.previous, pairs.current, pairs.next) == (second, third, None)


def test_responder_keypair_waits_in_next_and_drops_previous():
    pairs = Keypairs()
    old, current = _keypair(True), _keypair(True)
    pairs.install(old)
    pairs.install(current)
    fresh = _keypair(False)
    assert pairs.install(fresh) == [old]
    assert (pairs.previous, pairs.current, pairs.next) == (None, current, fresh)
    newer = _keypair(False)  # another initiation before confirmation replaces next
    assert pairs.install(newer) == [fresh]
    assert (pairs.previous, pairs.current, pairs.next) == (None, current, newer)


def test_confirm_promotes_next_only():
    pairs = Keypairs()
    current = _keypair(True)
    pairs.install(current)
    fresh = _keypair(False)
    pairs.install(fresh)
    assert pairs.confirm(current) == []  # not next: nothing moves
    assert pairs.confirm(fresh) == []
    assert (pairs.previous, pairs.current, pairs.next) == (current, fresh, None)
    newer = _keypair(False)
    pairs.install(newer)
    assert pairs.confirm(newer) == []  # previous was dropped by install already
    assert (pairs.previous, pairs.current, pairs.next) == (fresh, newer, None)


def test_initiator_install_over_an_unconfirmed_next():
    """Our own handshake finished while the peer's was unconfirmed: next becomes previous."""
    pairs = Keypairs()
    current = _keypair(True)
    pairs.install(current)
    pending = _keypair(False)
    pairs.install(pending)
    mine = _keypair(True)
    assert pairs.install(mine) == [current]
    assert (pairs.previous, pairs.current, pairs.next) == (pending, mine, None)


def test_clear_and_iteration():
    """The rules never hold all three at once: a responder install drops previous."""
    pairs = Keypairs()
    a, b, c = _keypair(True), _keypair(True), _keypair(False)
    pairs.install(a)
    pairs.install(b)
    assert list(pairs) == [a, b]
    pairs.install(c)
    assert list(pairs) == [b, c]
    assert pairs.clear() == [b, c]
    assert list(pairs) == [] and pairs.clear() == []


def test_send_and_receive_limits():
    keypair = _keypair(True, created=100.0)
    assert keypair.can_send(100.0) and keypair.can_receive(100.0)
    assert keypair.can_send(100.0 + REJECT_AFTER_TIME - 0.001)
    assert not keypair.can_send(100.0 + REJECT_AFTER_TIME)
    assert not keypair.can_receive(100.0 + REJECT_AFTER_TIME)
    keypair.send_counter = REJECT_AFTER_MESSAGES - 1
    assert keypair.can_send(101.0)
    keypair.send_counter = REJECT_AFTER_MESSAGES
    assert not keypair.can_send(101.0) and keypair.can_receive(101.0)


def test_session_keys_cross():
    keys = SessionKeys(bytes(range(32)), bytes(range(32, 64)), True, 1, 2)
    mine = Keypair(keys, 0.0, None)
    theirs = Keypair(SessionKeys(keys.receive, keys.send, False, 2, 1), 0.0, None)
    sealed = mine.sender.seal(7, b"hello")
    assert theirs.receiver.open(7, sealed) == b"hello"
    assert theirs.receiver.open(8, sealed) is None
    assert mine.receiver.open(7, sealed) is None


# --- in a device -------------------------------------------------------------------------------------

def test_responder_keypair_is_confirmed_by_the_first_transport_message():
    pair = CorePair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(pair.a))  # initiation -> b
    b_keys = pair.b_peer.keypairs
    assert b_keys.current is None and b_keys.previous is None and b_keys.next is not None
    pending = b_keys.next
    assert not pending.is_initiator
    pair.deliver(pair.collect(pair.b))  # response -> a
    a_keys = pair.a_peer.keypairs
    assert a_keys.current is not None and a_keys.current.is_initiator and a_keys.next is None
    assert b_keys.next is pending  # still unconfirmed: a's keepalive is not delivered yet
    pair.deliver(pair.collect(pair.a))  # keepalive -> b
    assert (b_keys.previous, b_keys.current, b_keys.next) == (None, pending, None)
    assert pending.local_index == a_keys.current.remote_index
    assert pending.remote_index == a_keys.current.local_index


def test_rekey_rotation_on_both_sides_and_index_table_stays_small():
    pair = established(CorePair())
    for round_ in range(1, 6):
        a_old, b_old = pair.a_peer.keypairs.current, pair.b_peer.keypairs.current
        pair.advance(pair.now + 121)
        pair.send(pair.a, [a_to_b_v4()])  # a is the initiator: rekeys on send
        a_keys, b_keys = pair.a_peer.keypairs, pair.b_peer.keypairs
        assert a_keys.previous is a_old and a_keys.current is not a_old
        assert b_keys.previous is b_old and b_keys.current is not b_old and b_keys.next is None
        # only previous and current are registered, per side: no leaked indices
        assert len(pair.a.device._state.index_table) == 2 and len(pair.b.device._state.index_table) == 2
        for device, keys in ((pair.a.device, a_keys), (pair.b.device, b_keys)):
            for keypair in keys:
                assert device._state.index_table.get(keypair.local_index) is keypair
        assert round_ == len([e for e in pair.a.events if type(e).__name__ == "HandshakeCompleted"]) - 1


def test_previous_keypair_still_opens_packets_in_flight():
    pair = established(CorePair())
    pair.advance(121.0)
    pair.a.device.send_packets([a_to_b_v4(b"late-a")], pair.now)
    a_first = pair.collect(pair.a)  # data under the old keypair, plus the rekey initiation
    assert [d.kind for d in a_first] == ["data", "initiation"]
    pair.b.device.send_packets([b_to_a_v4(b"late-b")], pair.now)
    (b_late,) = pair.collect(pair.b)
    pair.deliver([a_first[1]])  # rekey completes; the data packets are still "in flight"
    pair.flush()
    old_b = pair.b_peer.keypairs.previous
    assert old_b is not None and pair.b_peer.keypairs.current is not old_b
    assert pair.a_peer.keypairs.previous is not None
    pair.deliver([a_first[0]])
    pair.deliver([b_late])
    assert pair.b.tun[-1] == a_to_b_v4(b"late-a")
    assert pair.a.tun[-1] == b_to_a_v4(b"late-b")


def test_keypair_older_than_reject_after_time_neither_sends_nor_receives():
    pair = established(CorePair())
    pair.a.device.send_packets([a_to_b_v4(b"early")], pair.now)
    (early,) = pair.collect(pair.a)
    pair.b.online = False  # nobody answers the rekeys from now on
    pair.advance(REJECT_AFTER_TIME)
    before = list(pair.a_peer.keypairs)
    sent = pair.send(pair.a, [a_to_b_v4(b"too old")])
    assert [d.kind for d in sent] == ["initiation"]  # no data under the expired keypair
    assert list(pair.a_peer.keypairs) == before and len(pair.a_peer.staged) == 1
    pair.b.online = True
    pair.deliver([early])
    assert pair.b_peer.dropped["expired_keypair"] == 1
    assert pair.b.tun == []


def test_keypair_just_younger_than_reject_after_time_still_works():
    pair = established(CorePair())
    pair.a.device.send_packets([a_to_b_v4(b"early")], pair.now)
    (early,) = pair.collect(pair.a)
    pair.b.online = False
    pair.advance(REJECT_AFTER_TIME - 0.5)
    pair.b.online = True
    pair.deliver([early])
    assert pair.b.tun == [a_to_b_v4(b"early")]


def test_counter_at_reject_after_messages_is_refused_by_the_receiver():
    pair = established(CorePair())
    keypair = pair.a_peer.keypairs.current
    for counter, accepted in ((REJECT_AFTER_MESSAGES, False), (REJECT_AFTER_MESSAGES - 1, True)):
        datagram = TRANSPORT_HEADER.pack(4, keypair.remote_index, counter) + keypair.sender.seal(counter, a_to_b_v4())
        before = len(pair.b.tun)
        pair.b.tun.extend(pair.b.device.receive_datagrams([(datagram, pair.a.address)], pair.now))
        assert (len(pair.b.tun) == before + 1) is accepted
    assert pair.b_peer.dropped["replayed"] == 1


@pytest.mark.parametrize("sender", ["a", "b"])
def test_send_counter_exhaustion_restages_and_rekeys(sender):
    """At REJECT_AFTER_MESSAGES a keypair stops; the rest waits for the new session (either side)."""
    pair = established(CorePair())
    host = pair.hosts[sender]
    peer = pair.peer(host)
    pair.advance(6.0)  # past the 5 s between handshake messages
    peer.keypairs.current.send_counter = REJECT_AFTER_MESSAGES - 1
    packet = a_to_b_v4 if sender == "a" else b_to_a_v4
    sent = pair.send(host, [packet(b"last"), packet(b"after")])
    kinds = [(d.sender, d.kind) for d in sent]
    assert kinds[:2] == [(sender, "data"), (sender, "initiation")]
    other = pair.b if sender == "a" else pair.a
    assert other.tun == [packet(b"last"), packet(b"after")]
    assert peer.keypairs.current.send_counter <= 2  # the new keypair carried "after"
    assert peer.keypairs.previous.send_counter == REJECT_AFTER_MESSAGES
