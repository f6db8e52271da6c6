"""Cookies at the device level: under load, mac1 alone buys a cookie reply and nothing else;
the sender's retry carries mac2 and gets through; stale cookies are not used; rate limits per source."""

from __future__ import annotations

import struct

from corepair import A_ADDR, WALL_EPOCH, CorePair, Datagram, a_to_b_v4, private_key
from tunvpn.protocol.cookie import LABEL_COOKIE
from tunvpn.protocol.crypto import hash_, mac, xaead_decrypt
from tunvpn.protocol.messages import COOKIE_REPLY_SIZE, INITIATION_SIZE, RESPONSE_SIZE
from tunvpn.protocol.noise import State

ZERO_MAC = bytes(16)


def _mac2(datagram: Datagram) -> bytes:
    return datagram.data[-16:]


def _cookie_in(reply: Datagram, replier_public: bytes, triggering: Datagram) -> bytes:
    """Open a cookie reply the way its addressee does (independently of the device)."""
    nonce, sealed = reply.data[8:32], reply.data[32:64]
    mac1 = triggering.data[-32:-16]
    return xaead_decrypt(hash_(LABEL_COOKIE, replier_public), nonce, sealed, mac1)


def _loaded_pair(**kw) -> CorePair:
    pair = CorePair(**kw)
    pair.b.device._state.load.force = True
    return pair


def test_under_load_an_initiation_without_mac2_only_earns_a_cookie_reply():
    pair = _loaded_pair(b_knows_a_endpoint=False)
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (initiation,) = pair.collect(pair.a)
    assert _mac2(initiation) == ZERO_MAC
    pair.deliver([initiation])
    (reply,) = pair.collect(pair.b)
    assert len(reply.data) == COOKIE_REPLY_SIZE and reply.data[:4] == b"\x03\0\0\0"
    assert reply.destination == A_ADDR
    assert struct.unpack_from("<I", reply.data, 4)[0] == struct.unpack_from("<I", initiation.data, 4)[0]
    device, peer = pair.b.device, pair.b_peer
    assert device._state.dropped["cookie_reply_sent"] == 1
    assert len(device._state.index_table) == 0 and len(device._state.rate_limiter) == 0
    assert peer.handshake.state is State.ZEROED and peer.handshake.last_timestamp is None
    assert peer.endpoint is None and list(peer.keypairs) == [] and device.next_event() is None


def test_the_retry_carries_mac2_and_succeeds():
    pair = _loaded_pair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (initiation,) = pair.collect(pair.a)
    pair.deliver([initiation])
    (reply,) = pair.collect(pair.b)
    pair.deliver([reply])
    assert pair.a.device._state.dropped == {} and pair.collect(pair.a) == []  # stored quietly
    cookie = _cookie_in(reply, pair.b.device.public_key, initiation)

    wire = pair.advance(6.0)  # the retransmit timer
    retry = wire[0]
    assert retry.kind == "initiation" and 5.0 <= retry.at <= 5.34
    assert _mac2(retry) == mac(cookie, retry.data[:INITIATION_SIZE - 16])
    assert pair.kinds(wire)[:3] == [("a", "initiation"), ("b", "response"), ("a", "keepalive")]
    assert pair.b_peer.keypairs.current is not None and len(pair.b.device._state.rate_limiter) == 1
    pair.send(pair.a, [a_to_b_v4()])
    assert pair.b.tun == [a_to_b_v4()]


def test_a_stale_cookie_is_not_used_and_a_new_one_is_fetched():
    pair = _loaded_pair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.flush()  # initiation, cookie reply
    pair.advance(6.0)  # retry with mac2: session
    assert pair.a_peer.keypairs.current is not None

    pair.now = 60.0  # well within 120 s of the cookie: a new initiation still carries mac2
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (fresh,) = pair.collect(pair.a)
    assert _mac2(fresh) != ZERO_MAC
    pair.deliver([fresh])
    pair.flush()
    assert pair.b.device._state.dropped["cookie_reply_sent"] == 1

    pair.advance(121.0)  # the cookie (received at 0) is now stale
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    wire = pair.flush()
    stale = [d for d in wire if d.kind == "initiation"]
    assert len(stale) == 1 and _mac2(stale[0]) == ZERO_MAC
    assert ("b", "cookie") in pair.kinds(wire) and pair.b.device._state.dropped["cookie_reply_sent"] == 2
    wire = pair.advance(pair.now + 6)
    assert pair.kinds(wire)[:2] == [("a", "initiation"), ("b", "response")]
    assert _mac2(wire[0]) != ZERO_MAC
    assert pair.a_peer.keypairs.current.created == wire[0].at


def test_initiator_under_load_answers_a_response_with_a_cookie():
    pair = CorePair()
    pair.a.device._state.load.force = True
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(pair.a))
    (response,) = pair.collect(pair.b)
    assert _mac2(response) == ZERO_MAC
    pair.deliver([response])
    (reply,) = pair.collect(pair.a)
    assert reply.kind == "cookie" and reply.destination == pair.b.address
    assert struct.unpack_from("<I", reply.data, 4)[0] == struct.unpack_from("<I", response.data, 4)[0]
    assert pair.a_peer.keypairs.current is None and pair.a.device._state.dropped["cookie_reply_sent"] == 1
    pair.deliver([reply])
    assert pair.b.device._state.dropped == {}  # the responder stored it: its reply index names its keypair
    cookie = _cookie_in(reply, pair.a.device.public_key, response)

    wire = pair.advance(6.0)
    assert pair.kinds(wire)[:3] == [("a", "initiation"), ("b", "response"), ("a", "keepalive")]
    assert _mac2(wire[1]) == mac(cookie, wire[1].data[:RESPONSE_SIZE - 16])
    assert pair.a_peer.keypairs.current is not None and pair.b_peer.keypairs.current is not None


def test_valid_mac2_is_still_rate_limited_per_source_address():
    pair = _loaded_pair()
    # A second device with a's key at another address: the same peer, another source.
    twin = pair.add_host("a2", private_key(1), ("192.0.2.12", 51820), seed=99)
    twin.device.set_wall_clock(WALL_EPOCH + 50.0, 0.0)  # a clock ahead of a's
    twin.device.set_peer(pair.b.device.public_key, endpoint=pair.b.address)
    for host in (pair.a, twin):
        host.device.initiate(pair.b.device.public_key, pair.now)
    pair.flush()  # both get cookies for their own address
    pair.now = 5.5
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (with_mac2,) = pair.collect(pair.a)
    assert _mac2(with_mac2) != ZERO_MAC

    pair.deliver([with_mac2] * 10)  # one batch, one instant
    dropped = pair.b.device._state.dropped
    assert [d.kind for d in pair.collect(pair.b)] == ["response"]
    assert dropped["handshake_rejected"] == 4  # passed the limiter (burst 5), then refused as replays
    assert dropped["handshake_rate_limited"] == 5

    twin.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(twin))  # same instant, other address: its own bucket
    assert dropped["handshake_rate_limited"] == 5 and len(pair.b.device._state.rate_limiter) == 2

    pair.now += 1.0  # the bucket refills (20 per second)
    pair.deliver([with_mac2])
    assert dropped["handshake_rate_limited"] == 5 and dropped["handshake_rejected"] == 6


def test_load_is_measured_from_the_handshake_rate():
    pair = CorePair(load_threshold=2)
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (initiation,) = pair.collect(pair.a)
    for expected in ("response", None, "cookie"):  # the third within a second tips it over
        pair.deliver([initiation])
        assert [d.kind for d in pair.collect(pair.b)] == ([expected] if expected else [])
    assert pair.b.device._state.load.under_load(pair.now)
    pair.now += 2.5  # load holds for a second after the last burst
    assert not pair.b.device._state.load.under_load(pair.now)
    twin = pair.add_host("a2", private_key(1), ("192.0.2.12", 51820), seed=98)
    twin.device.set_wall_clock(WALL_EPOCH + 50.0, 0.0)  # a clock ahead of a's
    twin.device.set_peer(pair.b.device.public_key, endpoint=pair.b.address)
    twin.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(twin))
    assert [d.kind for d in pair.collect(pair.b)] == ["response"]


def test_cookie_replies_cost_no_state_for_unknown_senders():
    """Under load even a stranger (who only knows our public key) gets a cookie, but nothing more."""
    pair = _loaded_pair()
    stranger = pair.add_host("c", private_key(5), ("198.51.100.5", 4000), seed=5)
    stranger.device.set_peer(pair.b.device.public_key, endpoint=pair.b.address)
    for _ in range(3):
        stranger.device.initiate(pair.b.device.public_key, pair.now)
        pair.flush()
        pair.now += 5.1
    assert pair.b.device._state.dropped["cookie_reply_sent"] == 1
    assert pair.b.device._state.dropped["unknown_peer"] == 2
    assert len(pair.b.device._state.index_table) == 0 and len(pair.b.device._state.rate_limiter) == 1
