"""WireGuard's timers under simulated time: retries, keepalives, rekeys, key erasure, flood limit.

Everything runs through the device's own get_timer/handle_timer (CorePair.advance), which
also checks after every step that the device timer is never later than a peer's deadline
and never in the past after handle_timer.
"""

from __future__ import annotations

import random

import pytest

from corepair import (
    A_ADDR,
    B_ADDR,
    WALL_EPOCH,
    CorePair,
    Datagram,
    SeededRandom,
    a_to_b_v4,
    b_to_a_v4,
    established,
    private_key,
)
from tunvpn.protocol.device import Device, HandshakeGaveUp, KeysExpired
from tunvpn.protocol.keypair import REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME
from tunvpn.protocol.timerhandlers import EXPIRED
from tunvpn.protocol.timers import (
    KEEPALIVE_TIMEOUT,
    MAX_HANDSHAKE_ATTEMPTS,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEYS_AFTER,
    Timer,
    Timers,
)

JITTER = REKEY_TIMEOUT_JITTER_MAX
KEEP_FRESH_RECEIVING = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT  # 165 s


def _times(datagrams: list[Datagram], sender: str, kind: str) -> list[float]:
    return [d.at for d in datagrams if d.sender == sender and d.kind == kind]


# --- the Timers object on its own ------------------------------------------------------------

def _no_draw() -> float:
    raise AssertionError("the jitter was drawn for a timer already running")


def test_timer_rules():
    timers = Timers(persistent_keepalive_interval=25)
    assert timers.next_deadline() is None and timers.pop_due(1e9) == []
    timers.data_sent(10.0, lambda: 0.2)
    timers.data_sent(12.0, _no_draw)  # already pending: not moved, and no jitter drawn for nothing
    assert timers.new_handshake == 10.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.2
    timers.data_received(11.0)
    assert timers.send_keepalive == 21.0 and not timers.need_another_keepalive
    timers.data_received(12.0)
    assert timers.send_keepalive == 21.0 and timers.need_another_keepalive
    timers.authenticated_packet_sent()
    assert timers.send_keepalive is None
    timers.authenticated_packet_received()
    assert timers.new_handshake is None
    timers.authenticated_packet_traversed(13.0)
    assert timers.persistent_keepalive == 38.0
    timers.handshake_initiated(14.0, 0.1)
    assert timers.retransmit_handshake == 14.0 + REKEY_TIMEOUT + 0.1
    timers.session_derived(15.0)
    assert timers.zero_key_material == 15.0 + 3 * REJECT_AFTER_TIME
    assert timers.next_deadline() == 19.1
    assert timers.pop_due(19.0) == []
    assert timers.pop_due(38.0) == [Timer.RETRANSMIT_HANDSHAKE, Timer.PERSISTENT_KEEPALIVE]
    assert timers.next_deadline() == 15.0 + 540.0
    timers.handshake_attempts, timers.sent_last_minute_handshake = 3, True
    timers.handshake_complete()
    assert (timers.retransmit_handshake, timers.handshake_attempts, timers.sent_last_minute_handshake) == (None, 0, False)
    timers.stop_all()
    assert timers.next_deadline() is None


def test_constants_are_wireguards():
    assert (REKEY_TIMEOUT, REKEY_ATTEMPT_TIME, KEEPALIVE_TIMEOUT) == (5.0, 90.0, 10.0)
    assert (REKEY_AFTER_TIME, REJECT_AFTER_TIME, ZERO_KEYS_AFTER) == (120.0, 180.0, 540.0)
    assert MAX_HANDSHAKE_ATTEMPTS == 18
    assert abs(JITTER - 1 / 3) < 1e-9


def test_every_timer_has_its_handler_named_as_in_wireguard_go():
    assert {timer: handler.__name__ for timer, handler in EXPIRED.items()} == {
        timer: f"expired_{timer.value}" for timer in Timer}


def test_jitter_stays_below_a_third_of_a_second():
    device = Device(private_key(1), random_bytes=SeededRandom(3))
    jitters = [device._state.jitter() for _ in range(5000)]
    assert min(jitters) == 0.0 and max(jitters) == pytest.approx(0.333)
    assert len(set(jitters)) == 334


# --- handshake retransmission ---------------------------------------------------------------

@pytest.mark.parametrize(
    "start, zero_jitter",
    [(0.0, False), (7.0, False), (3.2, True), (1234.7, True), (0.1, True)],
)
def test_unanswered_handshake_is_retried_then_abandoned(start, zero_jitter):
    """20 initiations (1 + 19 retries, as wireguard-go's attempts > 18 rule), REKEY_TIMEOUT plus
    jitter apart; then HandshakeGaveUp, staged packets dropped and counted. The zero-jitter
    starts are the ones where `now - last < 5.0` used to round wrong and stall the retries."""
    pair = CorePair(start=start, zero_jitter=zero_jitter)
    pair.b.online = False
    gave_up_at = []

    def note_events(host):
        for event in pair.drain_events(host):
            if isinstance(event, HandshakeGaveUp):
                gave_up_at.append(pair.now)

    pair.send(pair.a, [a_to_b_v4(bytes([i])) for i in range(3)])
    assert len(pair.a_peer.staged) == 3
    wire = pair.advance(start + 200.0, on_timer=note_events)
    sent = [start] + _times(wire, "a", "initiation")
    assert len(sent) == 20
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert all(REKEY_TIMEOUT - 1e-9 <= gap <= REKEY_TIMEOUT + JITTER + 1e-9 for gap in gaps), gaps
    if zero_jitter:
        assert all(gap == pytest.approx(REKEY_TIMEOUT) for gap in gaps)
    assert len(gave_up_at) == 1
    assert REKEY_TIMEOUT - 1e-9 <= gave_up_at[0] - sent[-1] <= REKEY_TIMEOUT + JITTER + 1e-9
    assert gave_up_at[0] - start >= REKEY_ATTEMPT_TIME
    assert pair.a_peer.staged == type(pair.a_peer.staged)() and pair.a_peer.dropped["handshake_gave_up"] == 3
    assert len(pair.a.device._state.index_table) == 1  # the last handshake's index, until key erasure

    wire = pair.advance(gave_up_at[0] + 3 * REJECT_AFTER_TIME + 1)
    assert _times(wire, "a", "initiation") == []
    assert [type(e) for e in pair.a.events if isinstance(e, KeysExpired)] == [KeysExpired]
    assert len(pair.a.device._state.index_table) == 0 and pair.a.device.get_timer() is None


def test_answered_handshake_stops_retrying():
    pair = CorePair()
    pair.handshake()
    wire = pair.advance(100.0)
    assert _times(wire, "a", "initiation") == [] and _times(wire, "b", "initiation") == []
    assert pair.a_peer.timers.retransmit_handshake is None


def test_a_late_answer_still_completes_the_handshake():
    pair = CorePair()
    pair.b.online = False
    pair.send(pair.a, [a_to_b_v4(b"patient")])
    pair.advance(12.0)  # two retries lost
    pair.b.online = True
    wire = pair.advance(20.0)
    assert ("a", "initiation") in pair.kinds(wire) and ("b", "response") in pair.kinds(wire)
    assert pair.b.tun == [a_to_b_v4(b"patient")]
    assert pair.a_peer.timers.handshake_attempts == 0


def test_peer_without_endpoint_gives_up_like_a_lost_handshake():
    """wireguard-go still runs the retry timer when it cannot send; so staged packets do not linger."""
    pair = CorePair(a_knows_b_endpoint=False)
    pair.send(pair.a, [a_to_b_v4(b"nowhere")])
    pair.advance(200.0)
    assert [e for e in pair.a.events if isinstance(e, HandshakeGaveUp)]
    assert pair.a_peer.staged == type(pair.a_peer.staged)()
    assert pair.a_peer.dropped["handshake_gave_up"] == 1
    assert pair.a_peer.dropped["no_endpoint"] == 20
    assert [d for d in pair.wire if d.sender == "a"] == []


# --- keepalives --------------------------------------------------------------------------------

def test_passive_keepalive_ten_seconds_after_data_when_nothing_was_sent():
    pair = established(CorePair())
    pair.advance(1.0)
    pair.send(pair.b, [b_to_a_v4()])
    wire = pair.advance(30.0)
    assert _times(wire, "a", "keepalive") == [1.0 + KEEPALIVE_TIMEOUT]
    assert _times(wire, "b", "keepalive") == []  # a keepalive is not data: no keepalive back


def test_no_passive_keepalive_when_we_answered_with_data():
    pair = established(CorePair())
    pair.advance(1.0)
    pair.send(pair.b, [b_to_a_v4()])
    pair.advance(5.0)
    pair.send(pair.a, [a_to_b_v4()])
    wire = pair.advance(30.0)
    assert _times(wire, "a", "keepalive") == []
    assert _times(wire, "b", "keepalive") == [5.0 + KEEPALIVE_TIMEOUT]


def test_data_during_a_pending_keepalive_earns_another_one():
    pair = established(CorePair())
    pair.advance(1.0)
    pair.send(pair.b, [b_to_a_v4()])
    pair.advance(6.0)
    pair.send(pair.b, [b_to_a_v4()])
    wire = pair.advance(40.0)
    assert _times(wire, "a", "keepalive") == [11.0, 21.0]


def test_keepalives_do_not_ping_pong():
    pair = established(CorePair())
    pair.send(pair.a, [a_to_b_v4()])
    wire = pair.advance(100.0)
    assert pair.kinds(wire) == [("b", "keepalive")]


def test_new_handshake_when_data_sent_but_nothing_received():
    pair = established(CorePair())
    pair.advance(2.0)
    pair.b.online = False
    pair.send(pair.a, [a_to_b_v4()])
    wire = pair.advance(40.0)
    first = _times(wire, "a", "initiation")[0]
    assert 2.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT <= first <= 2.0 + 15.0 + JITTER + 1e-9


@pytest.mark.parametrize("silent", ["a", "b"])
def test_either_side_starts_over_when_the_other_goes_silent(silent):
    pair = established(CorePair())
    talker = pair.b if silent == "a" else pair.a
    pair.advance(2.0)
    pair.hosts[silent].online = False
    pair.send(talker, [a_to_b_v4() if talker is pair.a else b_to_a_v4()])
    wire = pair.advance(18.0)
    assert len(_times(wire, talker.name, "initiation")) == 1


def test_an_answer_cancels_the_new_handshake_timer():
    pair = established(CorePair())
    pair.advance(2.0)
    pair.send(pair.a, [a_to_b_v4()])  # b's passive keepalive at 12 answers it
    wire = pair.advance(60.0)
    assert _times(wire, "a", "initiation") == []
    assert _times(wire, "b", "keepalive") == [12.0]


def test_persistent_keepalive_at_its_interval():
    pair = CorePair(persistent_keepalive=25)
    pair.handshake()
    wire = pair.advance(110.0)
    assert _times(wire, "a", "keepalive") == [25.0, 50.0, 75.0, 100.0]
    assert _times(wire, "b", "keepalive") == []


def test_traffic_postpones_the_persistent_keepalive():
    pair = CorePair(persistent_keepalive=25)
    pair.handshake()
    pair.advance(10.0)
    pair.send(pair.b, [b_to_a_v4()])  # received: traversal at 10 (and a passive keepalive at 20)
    wire = pair.advance(60.0)
    assert _times(wire, "a", "keepalive") == [20.0, 45.0]


def test_setting_persistent_keepalive_with_now_starts_a_handshake_and_zero_stops_it():
    pair = CorePair()
    pair.a.device.set_peer(pair.b.device.public_key, endpoint=B_ADDR, persistent_keepalive=15, now=pair.now)
    wire = pair.flush()
    assert pair.kinds(wire)[:3] == [("a", "initiation"), ("b", "response"), ("a", "keepalive")]
    wire = pair.advance(31.0)
    assert _times(wire, "a", "keepalive") == [15.0, 30.0]
    pair.a.device.set_peer(pair.b.device.public_key, endpoint=B_ADDR, persistent_keepalive=0)
    wire = pair.advance(100.0)
    assert _times(wire, "a", "keepalive") == []


# --- rekeying by time ----------------------------------------------------------------------------

def test_initiator_rekeys_on_send_after_rekey_after_time():
    pair = established(CorePair())
    pair.advance(REKEY_AFTER_TIME - 1)
    assert "initiation" not in [d.kind for d in pair.send(pair.a, [a_to_b_v4()])]
    pair.advance(REKEY_AFTER_TIME + 0.5)
    wire = pair.send(pair.a, [a_to_b_v4()])
    assert pair.kinds(wire)[:2] == [("a", "data"), ("a", "initiation")]
    assert pair.a_peer.keypairs.current.created == REKEY_AFTER_TIME + 0.5


def test_responder_does_not_rekey_by_time():
    pair = established(CorePair())
    pair.advance(REKEY_AFTER_TIME + 1)
    pair.b.device.send_packets([b_to_a_v4()], pair.now)
    assert [d.kind for d in pair.collect(pair.b)] == ["data"]
    pair.advance(REJECT_AFTER_TIME - 2)
    pair.b.device.send_packets([b_to_a_v4()], pair.now)
    assert "initiation" not in [d.kind for d in pair.collect(pair.b)]


def test_initiator_rekeys_on_receive_near_reject_after_time():
    pair = established(CorePair())
    assert KEEP_FRESH_RECEIVING == 165.0
    pair.advance(KEEP_FRESH_RECEIVING - 1)
    pair.b.device.send_packets([b_to_a_v4()], pair.now)
    pair.deliver(pair.collect(pair.b))
    assert [d.kind for d in pair.collect(pair.a)] == []
    pair.now = KEEP_FRESH_RECEIVING + 1  # straight there: no timer in between gets a say
    pair.b.device.send_packets([b_to_a_v4()], pair.now)
    pair.deliver(pair.collect(pair.b))
    assert [d.kind for d in pair.collect(pair.a)] == ["initiation"]
    assert pair.a_peer.timers.sent_last_minute_handshake
    pair.now += 6
    pair.b.device.send_packets([b_to_a_v4()], pair.now)
    pair.deliver(pair.collect(pair.b))
    assert [d.kind for d in pair.collect(pair.a)] == []  # once per keypair, however much arrives


def test_responder_does_not_rekey_on_receive():
    pair = established(CorePair())
    pair.now = KEEP_FRESH_RECEIVING + 1
    pair.a.device.send_packets([a_to_b_v4()], pair.now)
    data = [d for d in pair.collect(pair.a) if d.kind == "data"]
    pair.deliver(data)
    assert pair.b.tun == [a_to_b_v4()]
    assert pair.collect(pair.b) == []


@pytest.mark.parametrize("sender", ["a", "b"])
def test_either_side_rekeys_on_send_past_rekey_after_messages(sender):
    pair = established(CorePair())
    pair.advance(6.0)  # past the 5 s between handshake messages
    host = pair.hosts[sender]
    make = a_to_b_v4 if sender == "a" else b_to_a_v4
    keypair = pair.peer(host).keypairs.current
    keypair.send_counter = REKEY_AFTER_MESSAGES - 1
    # wireguard-go compares the next nonce: rekey once it exceeds 2**60
    host.device.send_packets([make()], pair.now)  # counter 2**60 - 1; next is 2**60: not yet
    assert [d.kind for d in pair.collect(host)] == ["data"]
    host.device.send_packets([make()], pair.now)  # counter 2**60; next is 2**60 + 1
    assert [d.kind for d in pair.collect(host)] == ["data", "initiation"]
    assert keypair.send_counter == REKEY_AFTER_MESSAGES + 1


# --- key erasure ---------------------------------------------------------------------------------

def test_keys_erased_after_three_reject_after_times_without_a_handshake():
    pair = established(CorePair())
    pair.advance(3 * REJECT_AFTER_TIME - 0.5)
    assert pair.a_peer.keypairs.current is not None
    pair.advance(3 * REJECT_AFTER_TIME + 0.5)
    for host in (pair.a, pair.b):
        assert [e for e in host.events if isinstance(e, KeysExpired)] == [KeysExpired(pair.peer(host).public_key)]
        assert list(pair.peer(host).keypairs) == []
        assert len(host.device._state.index_table) == 0
        assert host.device.get_timer() is None
    pair.send(pair.a, [a_to_b_v4(b"again")])  # and a new session starts on demand
    assert pair.b.tun == [a_to_b_v4(b"again")]


def test_each_handshake_pushes_key_erasure_back():
    pair = established(CorePair())
    for t in (130.0, 260.0, 390.0, 520.0):
        pair.advance(t)
        pair.send(pair.a, [a_to_b_v4()])
    pair.advance(700.0)
    assert not [e for e in pair.a.events if isinstance(e, KeysExpired)]
    assert pair.a_peer.timers.zero_key_material == pytest.approx(520.0 + 540.0)


# --- responder flood limit ------------------------------------------------------------------------

def _initiation_from_a_clone(pair: CorePair, wall_offset: float, seed: int) -> Datagram:
    """A second device holding a's private key: the same peer, as after a restart."""
    clone = Device(private_key(1), random_bytes=SeededRandom(seed))
    clone.set_wall_clock(WALL_EPOCH + wall_offset, pair.now)
    clone.set_peer(pair.b.device.public_key, endpoint=B_ADDR)
    clone.initiate(pair.b.device.public_key, pair.now)
    ((data, _),) = clone.datagrams_to_send()
    return Datagram(data, A_ADDR, B_ADDR, "a", pair.now)


def test_responder_accepts_one_initiation_per_peer_per_20_ms():
    pair = CorePair(start=100.0)
    pair.deliver([_initiation_from_a_clone(pair, 1.0, 50)])
    assert [d.kind for d in pair.collect(pair.b)] == ["response"]
    pending = pair.b_peer.keypairs.next
    for offset, wall in ((0.010, 2.0), (0.0199, 3.0)):
        pair.now = 100.0 + offset
        pair.deliver([_initiation_from_a_clone(pair, wall, 50 + int(wall))])
        assert pair.collect(pair.b) == []
        assert pair.b_peer.keypairs.next is pending
    assert pair.b.device._state.dropped["handshake_rejected"] == 2
    pair.now = 100.021
    pair.deliver([_initiation_from_a_clone(pair, 4.0, 60)])
    assert [d.kind for d in pair.collect(pair.b)] == ["response"]
    assert pair.b_peer.keypairs.next is not pending


def test_restarted_peer_with_an_older_clock_is_refused():
    pair = CorePair(start=10.0)
    pair.deliver([_initiation_from_a_clone(pair, 100.0, 70)])
    assert [d.kind for d in pair.collect(pair.b)] == ["response"]
    pair.now = 20.0
    pair.deliver([_initiation_from_a_clone(pair, 50.0, 71)])
    assert pair.collect(pair.b) == [] and pair.b.device._state.dropped["handshake_rejected"] == 1


# --- the device timer itself ----------------------------------------------------------------------

def test_handle_timer_before_the_deadline_does_nothing():
    pair = CorePair()
    pair.send(pair.a, [a_to_b_v4()])
    pair.b.online = False
    deadline = pair.a.device.get_timer()
    pair.a.device.handle_timer(deadline - 0.001)
    assert pair.a.device.datagrams_to_send() == [] and pair.a.device.get_timer() == deadline


def test_removed_peer_leaves_no_timer():
    pair = CorePair()
    pair.b.online = False
    pair.send(pair.a, [a_to_b_v4()])
    assert pair.a.device.get_timer() is not None
    pair.a.device.remove_peer(pair.b.device.public_key)
    assert pair.a.device.get_timer() is None
    pair.a.device.handle_timer(1000.0)
    assert pair.a.device.datagrams_to_send() == []


def test_long_busy_run_keeps_the_timer_heap_small():
    """Ten simulated minutes of random two-way traffic, loss and rekeys: the heap stays bounded,
    the timer never points into the past after handle_timer, and data keeps flowing."""
    rng = random.Random(42)
    pair = established(CorePair(persistent_keepalive=7))
    biggest_heap = 0
    sent = {"a": 0, "b": 0}

    def watch(host):
        nonlocal biggest_heap
        biggest_heap = max(biggest_heap, len(host.device._state.heap))

    while pair.now < 600.0:
        pair.advance(pair.now + rng.uniform(0.05, 2.0), on_timer=watch)
        for host, make in ((pair.a, a_to_b_v4), (pair.b, b_to_a_v4)):
            if rng.random() < 0.7:
                count = rng.randint(1, 12)
                sent[host.name] += count
                pair.send(host, [make(rng.randbytes(rng.randint(0, 200))) for _ in range(count)])
            watch(host)
        pair.b.online = rng.random() > 0.05  # a little loss now and then
    pair.b.online = True
    assert biggest_heap <= 8, biggest_heap
    assert len(pair.b.tun) > 0.9 * sent["a"] and len(pair.a.tun) > 0.9 * sent["b"]
    completed = [e for e in pair.a.events if type(e).__name__ == "HandshakeCompleted"]
    assert len(completed) >= 5  # rekeyed every ~2 minutes
    for host in (pair.a, pair.b):
        assert len(host.device._state.index_table) <= 3
