"""Hostile datagrams: every one is refused, counted exactly once, raises nothing, and leaves no
trace: no index, no rate-limiter entry, no handshake or keypair change, no timer, nothing sent
(except a cookie reply where the protocol demands one).

Each message type is attacked at a target that is waiting for exactly that message, and after
all the abuse the genuine message must still be accepted there: proof that nothing was consumed.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import Callable

import pytest

from corepair import LOW_ORDER_POINTS, CorePair, Datagram, Host, a_to_b_v4, established, private_key
from tunvpn.protocol.cookie import LABEL_MAC1, CookieReplyBudget
from tunvpn.protocol.device import DEFAULT_LOAD_THRESHOLD
from tunvpn.protocol.crypto import StaticKey, aead_encrypt, hash_, kdf1, kdf2, mac
from tunvpn.protocol.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_MAC1_OFFSET,
    INITIATION_SIZE,
    RESPONSE_MAC1_OFFSET,
    RESPONSE_SIZE,
    TRANSPORT_MIN_SIZE,
)
from tunvpn.protocol.noise import INITIAL_CHAIN_KEY, INITIAL_HASH

MALLORY = ("198.51.100.66", 6666)


# --- bookkeeping ----------------------------------------------------------------------------

def snapshot(host: Host) -> tuple:
    """Everything per-sender state could hide in."""
    return host.device.state_digest()


def drops(host: Host) -> dict[str, int]:
    """Device and per-peer drop counters together, by reason."""
    device = host.device
    total = device.drops()
    for key in device.peer_keys():
        for reason, count in device.peer_stats(key).dropped.items():
            total[reason] = total.get(reason, 0) + count
    return total


def assert_refused(pair: CorePair, target: Host, data: bytes, reason: str, source=MALLORY, replies: int = 0) -> None:
    before_state, before_drops = snapshot(target), drops(target)
    delivered = target.device.receive_datagrams([(data, source)], pair.now)
    out = target.device.datagrams_to_send()
    after_drops = drops(target)
    changed = {k: after_drops.get(k, 0) - before_drops.get(k, 0) for k in set(after_drops) | set(before_drops)}
    changed = {k: v for k, v in changed.items() if v}
    assert delivered == [], f"{reason}: delivered {delivered!r}"
    assert changed == {reason: 1}, f"expected {reason}, got {changed} for {data.hex()}"
    assert len(out) == replies and all(len(d) == COOKIE_REPLY_SIZE and dest == source for d, dest in out)
    assert snapshot(target) == before_state, f"{reason}: state changed for {data.hex()}"


def with_mac1(data: bytes, receiver_public: bytes) -> bytes:
    """Recompute mac1 (as an attacker who knows the public key can) so the message gets past it."""
    offset = len(data) - 32
    return data[:offset] + mac(hash_(LABEL_MAC1, receiver_public), data[:offset]) + data[offset + 16 :]


def flip(data: bytes, position: int, bit: int | None = None) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << (position % 8 if bit is None else bit)
    return bytes(out)


# --- one scenario per message type -----------------------------------------------------------

@dataclass
class Scenario:
    pair: CorePair
    target: Host
    genuine: Datagram
    accepted: Callable[[], bool]  # after delivering the genuine message


def initiation_scenario() -> Scenario:
    pair = CorePair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (genuine,) = pair.collect(pair.a)
    return Scenario(pair, pair.b, genuine, lambda: [d.kind for d in pair.collect(pair.b)] == ["response"])


def response_scenario() -> Scenario:
    pair = CorePair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(pair.a))
    (genuine,) = pair.collect(pair.b)
    return Scenario(pair, pair.a, genuine, lambda: [d.kind for d in pair.collect(pair.a)] == ["keepalive"])


def cookie_scenario() -> Scenario:
    pair = CorePair()
    pair.b.device._state.load.force = True
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(pair.a))
    (genuine,) = pair.collect(pair.b)
    return Scenario(pair, pair.a, genuine, lambda: pair.a_peer.cookies._cookie != b"")


def transport_scenario() -> Scenario:
    pair = established(CorePair())
    pair.a.device.send_packets([a_to_b_v4(b"genuine")], pair.now)
    (genuine,) = pair.collect(pair.a)
    return Scenario(pair, pair.b, genuine, lambda: pair.b.tun == [a_to_b_v4(b"genuine")])


SCENARIOS = {
    "initiation": initiation_scenario,
    "response": response_scenario,
    "cookie": cookie_scenario,
    "transport": transport_scenario,
}


def _mutations(kind: str, genuine: bytes, receiver_public: bytes, live_indices: list[int]) -> list[tuple[str, bytes, str]]:
    """(label, datagram, expected drop reason) for everything malformed about one message."""
    size = len(genuine)
    handshake = kind in ("initiation", "response")
    out: list[tuple[str, bytes, str]] = []
    for n in range(size):
        if n < 4:
            reason = "unknown_type"
        elif kind == "transport" and n >= TRANSPORT_MIN_SIZE:
            reason = "bad_transport_tag"
        else:
            reason = "bad_size"
        out.append((f"truncated to {n}", genuine[:n], reason))
    for extra in (1, 2, 15, 16, 17, 100, 1500):
        out.append((f"extended by {extra}", genuine + bytes(extra), "bad_transport_tag" if kind == "transport" else "bad_size"))
    for position in (1, 2, 3):
        for value in (1, 0x80, 0xFF):
            mutated = bytearray(genuine)
            mutated[position] = value
            out.append((f"reserved byte {position}={value}", bytes(mutated), "unknown_type"))
    for msg_type in (0, 5, 6, 0x7F, 0xFF):
        out.append((f"type {msg_type}", bytes([msg_type]) + genuine[1:], "unknown_type"))

    if handshake:
        mac1_offset = INITIATION_MAC1_OFFSET if kind == "initiation" else RESPONSE_MAC1_OFFSET
        for position in range(4, mac1_offset + 16):  # body or mac1 changed, mac1 not recomputed
            out.append((f"byte {position} flipped, stale mac1", flip(genuine, position), "bad_mac1"))
        for bit in range(8):
            for position in range(mac1_offset, mac1_offset + 16):
                out.append((f"mac1 bit {position}.{bit}", flip(genuine, position, bit), "bad_mac1"))
        authenticated = range(8, 116) if kind == "initiation" else range(12, 60)
        for position in authenticated:  # what Noise authenticates: ephemeral, static, timestamp / empty
            forged = with_mac1(flip(genuine, position), receiver_public)
            out.append((f"byte {position} flipped, mac1 valid", forged, "handshake_rejected"))
        for point in LOW_ORDER_POINTS:
            start = 8 if kind == "initiation" else 12
            forged = with_mac1(genuine[:start] + point + genuine[start + 32 :], receiver_public)
            out.append((f"low-order ephemeral {point[:4].hex()}", forged, "handshake_rejected"))
    if kind == "response":
        for receiver in [0, 1, 0xFFFFFFFF] + live_indices:
            forged = with_mac1(genuine[:8] + struct.pack("<I", receiver) + genuine[12:], receiver_public)
            out.append((f"receiver {receiver:#x}", forged, "unknown_receiver_index"))
    if kind == "cookie":
        for receiver in (0, 1, 0xFFFFFFFF):
            out.append((f"receiver {receiver:#x}", genuine[:4] + struct.pack("<I", receiver) + genuine[8:], "bad_cookie_reply"))
        for position in range(4, COOKIE_REPLY_SIZE):
            out.append((f"byte {position} flipped", flip(genuine, position), "bad_cookie_reply"))
    if kind == "transport":
        for receiver in (0, 1, 0xFFFFFFFF):
            out.append((f"receiver {receiver:#x}", genuine[:4] + struct.pack("<I", receiver) + genuine[8:], "unknown_receiver_index"))
        for position in range(4, 8):
            out.append((f"receiver byte {position} flipped", flip(genuine, position), "unknown_receiver_index"))
        for position in range(8, size):  # counter (the nonce), ciphertext, tag
            out.append((f"byte {position} flipped", flip(genuine, position), "bad_transport_tag"))
        for bit in range(8):
            for position in range(size - 16, size):
                out.append((f"tag bit {position}.{bit}", flip(genuine, position, bit), "bad_transport_tag"))
    return out


@pytest.mark.parametrize("kind", list(SCENARIOS))
def test_every_malformed_variant_is_refused_without_trace(kind):
    scenario = SCENARIOS[kind]()
    pair, target, genuine = scenario.pair, scenario.target, scenario.genuine
    live = [i for i, _ in target.device._state.index_table.items() if i != struct.unpack_from("<I", genuine.data, 8)[0]]
    mutations = _mutations(kind, genuine.data, target.device.public_key, live)
    assert len(mutations) > 100
    for label, data, reason in mutations:
        try:
            assert_refused(pair, target, data, reason)
        except AssertionError as exc:
            raise AssertionError(f"{kind}, {label}: {exc}") from None
    pair.deliver([genuine])
    assert scenario.accepted(), f"the genuine {kind} was refused after the abuse"


def test_what_mac1_alone_covers_is_accepted_as_the_protocol_says():
    """Not everything is authenticated by Noise: the sender index (covered only by mac1, which
    anyone knowing our public key can compute) and mac2 (checked only under load). A tampered
    message there is a new, valid message, as in wireguard-go; these tests pin that down."""
    scenario = initiation_scenario()
    forged = with_mac1(flip(scenario.genuine.data, 5), scenario.target.device.public_key)
    scenario.pair.deliver([Datagram(forged, scenario.genuine.source, scenario.genuine.destination, "a", 0.0)])
    assert scenario.accepted()

    scenario = initiation_scenario()
    forged = flip(scenario.genuine.data, INITIATION_SIZE - 1)  # mac2
    scenario.pair.deliver([Datagram(forged, scenario.genuine.source, scenario.genuine.destination, "a", 0.0)])
    assert scenario.accepted()


# --- forged initiations with a low-order static key -------------------------------------------------

def forge_initiation(responder_public: bytes, claimed_static: bytes, seed: int) -> bytes:
    """An attacker's message 1: a real ephemeral, any static it likes, a garbage timestamp."""
    rng = random.Random(seed)
    ephemeral = StaticKey(rng.randbytes(32))
    h = hash_(INITIAL_HASH, responder_public)
    c = kdf1(INITIAL_CHAIN_KEY, ephemeral.public)
    h = hash_(h, ephemeral.public)
    c, k = kdf2(c, ephemeral.dh(responder_public))
    static = aead_encrypt(k, 0, claimed_static, h)
    body = struct.pack("<II", 1, rng.getrandbits(32)) + ephemeral.public + static + rng.randbytes(28)
    return with_mac1(body + bytes(32), responder_public)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=range(len(LOW_ORDER_POINTS)))
def test_low_order_static_key_is_refused(point):
    pair = CorePair()
    data = forge_initiation(pair.b.device.public_key, point, seed=1)
    assert_refused(pair, pair.b, data, "unknown_peer")
    pair.b.device.set_peer(point, allowed_ips=["198.51.100.0/28"])  # even if configured as a peer
    assert_refused(pair, pair.b, forge_initiation(pair.b.device.public_key, point, seed=2), "handshake_rejected")
    pair.b.device.initiate(point, pair.now)  # and we never initiate to one either
    assert pair.b.device.datagrams_to_send() == []


def test_forged_static_of_a_real_peer_without_its_private_key_is_refused():
    pair = CorePair()
    data = forge_initiation(pair.b.device.public_key, pair.a.device.public_key, seed=3)
    assert_refused(pair, pair.b, data, "handshake_rejected")


# --- random garbage --------------------------------------------------------------------------------

def _random_datagrams(rng: random.Random, public_key: bytes, live_indices: list[int], count: int):
    sizes = [0, 1, 3, 4, 31, 32, 33, 63, 64, 65, 91, 92, 93, 147, 148, 149, 1500]
    for i in range(count):
        shape = i % 5
        if shape == 0:
            yield rng.randbytes(rng.randint(0, 200))
        elif shape == 1:  # a plausible header at a plausible size
            size = rng.choice(sizes)
            yield (bytes([rng.randint(1, 4), 0, 0, 0]) + rng.randbytes(max(size - 4, 0)))[:size]
        elif shape == 2:  # handshake-shaped with a valid mac1
            size = rng.choice((INITIATION_SIZE, RESPONSE_SIZE))
            yield with_mac1(bytes([1 if size == INITIATION_SIZE else 2, 0, 0, 0]) + rng.randbytes(size - 4), public_key)
        elif shape == 3:  # transport to a live index
            yield struct.pack("<IIQ", 4, rng.choice(live_indices), rng.getrandbits(64)) + rng.randbytes(rng.randint(16, 120))
        else:  # cookie reply to a live index
            yield struct.pack("<II", 3, rng.choice(live_indices)) + rng.randbytes(56)


@pytest.mark.parametrize("under_load", [False, True], ids=["normal", "under-load"])
def test_random_datagrams_are_all_refused_and_counted(under_load):
    pair = established(CorePair())
    pair.now += 10
    pair.a.device.initiate(pair.b.device.public_key, pair.now)  # a pending handshake at a, too
    pair.collect(pair.a)
    target = pair.a
    target.device._state.load.force = under_load
    live = [i for i, _ in target.device._state.index_table.items()]
    assert len(live) == 2
    rng = random.Random(20240601)
    count = 0
    for data in _random_datagrams(rng, target.device.public_key, live, 1500):
        before_state, before = snapshot(target), sum(drops(target).values())
        assert target.device.receive_datagrams([(data, MALLORY)], pair.now) == []
        out = target.device.datagrams_to_send()
        assert sum(drops(target).values()) == before + 1, data.hex()
        if out:  # only a handshake-shaped message with a valid mac1, under load, earns one
            assert target.device._state.load.under_load(pair.now)
            assert [(len(d), dest) for d, dest in out] == [(COOKIE_REPLY_SIZE, MALLORY)]
        assert snapshot(target) == before_state, data.hex()
        count += 1
    assert count == 1500
    # 300 of them carry a valid mac1: all are cookie-worthy when forced under load; otherwise the
    # flood itself puts the device under load once more than DEFAULT_LOAD_THRESHOLD arrive in 1 s.
    # One source at one instant gets its burst of cookie replies; the rest are dropped unanswered.
    worthy = 300 if under_load else 300 - DEFAULT_LOAD_THRESHOLD
    burst = int(CookieReplyBudget.PER_SOURCE_BURST)
    assert drops(target)["cookie_reply_sent"] == burst
    assert drops(target)["cookie_reply_rate_limited"] == worthy - burst
    assert len(target.device._state.rate_limiter) == 0


def test_one_batch_of_garbage_and_genuine_traffic():
    """Hostile datagrams mixed into a batch do not disturb the genuine ones around them."""
    pair = established(CorePair())
    packets = [a_to_b_v4(bytes([i])) for i in range(5)]
    pair.a.device.send_packets(packets, pair.now)
    genuine = [(d.data, d.source) for d in pair.collect(pair.a)]
    rng = random.Random(7)
    junk = [(rng.randbytes(rng.randint(0, 200)), MALLORY) for _ in range(5)]
    mixed = [item for pair_ in zip(junk, genuine) for item in pair_]
    assert pair.b.device.receive_datagrams(mixed, pair.now) == packets
    assert pair.b_peer.endpoint == pair.a.address


@pytest.mark.parametrize("kind", sorted(SCENARIOS))
def test_a_genuine_message_from_source_port_zero_is_dropped_before_it_can_move_the_endpoint(kind):
    """Port 0 can be sent from (a raw socket, an on-path replay) but never answered: the datagram
    must not become the peer's endpoint, which would also break the server's state file."""
    scenario = SCENARIOS[kind]()
    host, port = scenario.genuine.source[:2]
    assert_refused(scenario.pair, scenario.target, scenario.genuine.data, "source_port_zero", source=(host, 0))
    assert_refused(scenario.pair, scenario.target, scenario.genuine.data, "source_port_zero",
                   source=("2001:db8::66", 0, 0, 0))
    scenario.pair.deliver([scenario.genuine])  # the same datagram from its real port still works
    assert scenario.accepted()


def test_a_valid_mac1_flood_earns_few_cookies_while_a_new_client_connects_and_a_session_flows():
    """The flood that starved the server of time: random initiations with a valid mac1 from
    4096 ports of one host.  It gets its cookie-reply budget and nothing else, an established
    session keeps carrying data, and a new client gets its cookie and connects on its retry."""
    pair = established(CorePair())
    server = pair.b
    newcomer = pair.add_host("c", private_key(7), ("198.51.100.7", 51820), seed=7)
    newcomer.device.set_peer(server.device.public_key, endpoint=server.address)
    server.device.set_peer(newcomer.device.public_key, allowed_ips=["203.0.113.7/32"])
    rng = random.Random(12)
    flood_sent = 0

    def flood(count: int) -> list[bytes]:
        nonlocal flood_sent
        batch = [(with_mac1(b"\x01\0\0\0" + rng.randbytes(INITIATION_SIZE - 4), server.device.public_key),
                  ("192.0.2.66", 1024 + (flood_sent + i) % 4096)) for i in range(count)]
        flood_sent += count
        server.device.receive_datagrams(batch, pair.now)
        return [data for data, destination in server.device.datagrams_to_send() if destination[0] == "192.0.2.66"]

    answers = flood(2000)  # 2000 in one instant: well over the load threshold
    assert server.device._state.load.under_load(pair.now)
    newcomer.device.initiate(server.device.public_key, pair.now)
    pair.flush()  # its initiation, a cookie reply for its own address
    assert [d.kind for d in pair.wire[-2:]] == ["initiation", "cookie"]
    for _ in range(60):  # 6 s of flood, 10 batches a second, data from the established session
        pair.now += 0.1
        answers += flood(500)
        pair.send(pair.a, [a_to_b_v4()])
        pair.advance(pair.now)  # the newcomer's retransmit, with mac2, when it is due
    assert server.tun.count(a_to_b_v4()) == 60  # not one packet of the session lost
    assert pair.peer(newcomer, server).keypairs.current is not None
    assert pair.peer(server, newcomer).keypairs.current is not None
    dropped = server.device.drops()
    burst, rate = CookieReplyBudget.PER_SOURCE_BURST, CookieReplyBudget.PER_SOURCE_RATE
    assert len(answers) <= burst + rate * 6.0 + 1  # the flooder's cookie replies: its budget
    assert all(len(data) == COOKIE_REPLY_SIZE for data in answers)
    assert dropped["cookie_reply_sent"] == len(answers) + 1  # and the newcomer's one
    refused = dropped["cookie_reply_rate_limited"] + dropped["handshake_rejected"]
    assert refused + len(answers) == flood_sent  # the first ones cost a DH before the load began
    assert dropped["handshake_rejected"] <= DEFAULT_LOAD_THRESHOLD
    assert len(server.device._state.index_table) == 2  # the two sessions: the flood took no index
