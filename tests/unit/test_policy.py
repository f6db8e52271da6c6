"""Per-peer policy in the core: a token bucket each way and access rules, counted as drops."""

from __future__ import annotations

import ipaddress

import pytest

from corepair import A_TUN4, B_TUN4, CorePair, a_to_b_v4, b_to_a_v4, established, ipv4_udp
from tunvpn.config import ConfigError, parse_config
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.protocol.policy import BURST_SECONDS, MIN_BURST_BYTES, TokenBucket, bucket_for

TUNNEL = [ipaddress.ip_network("203.0.113.0/24")]
LAN_ALLOWED = ipaddress.ip_network("198.51.100.0/25")


def test_a_bucket_passes_its_burst_then_its_rate():
    bucket = TokenBucket(rate=1000.0, burst=3000.0)
    assert [bucket.take(1000, 0.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(1000, 0.5)  # 500 bytes back
    assert bucket.take(1000, 1.0)  # 1000 by now
    assert not bucket.take(4000, 100.0)  # never more than the burst at once
    assert bucket.take(3000, 100.0)


def test_time_going_back_gives_nothing():
    bucket = TokenBucket(rate=1000.0, burst=1000.0)
    assert bucket.take(1000, 10.0)
    assert not bucket.take(1, 5.0)


def test_the_burst_is_a_quarter_second_of_the_rate_with_a_floor():
    assert bucket_for(80_000_000).burst == pytest.approx(80_000_000 / 8 * BURST_SECONDS)
    assert bucket_for(8_000).burst == MIN_BURST_BYTES


def limited_pair(rate_bits=None, access=None) -> CorePair:
    pair = established(CorePair())
    pair.b.device.set_policy(pair.a.device.public_key, rate_bits, access, exempt=TUNNEL)
    return pair


def test_inbound_over_the_limit_is_dropped_and_counted():
    pair = limited_pair(rate_bits=8 * MIN_BURST_BYTES)  # a burst of MIN_BURST_BYTES, refilled in 1 s
    packets = [a_to_b_v4(bytes(1000)) for _ in range(200)]
    sent = [(d.data, d.source) for d in (pair.seal(pair.a, packet) for packet in packets)]
    delivered = pair.b.device.receive_datagrams(sent, pair.now)
    size = len(packets[0])
    assert len(delivered) == MIN_BURST_BYTES // size
    assert pair.b.device.peer_stats(pair.a.device.public_key).dropped["rate_limit"] == 200 - len(delivered)
    assert pair.b.device.peer_stats(pair.a.device.public_key).rate_limit == 8 * MIN_BURST_BYTES


def test_outbound_over_the_limit_is_dropped_before_sealing():
    pair = limited_pair(rate_bits=8 * MIN_BURST_BYTES)
    pair.b.device.datagrams_to_send()
    pair.b.device.send_packets([b_to_a_v4(bytes(1000)) for _ in range(200)], pair.now)
    sent = pair.b.device.datagrams_to_send()
    assert len(sent) == MIN_BURST_BYTES // len(b_to_a_v4(bytes(1000)))
    assert pair.b.device.peer_stats(pair.a.device.public_key).dropped["rate_limit"] == 200 - len(sent)


def test_access_rules_let_through_only_the_allowed_networks_and_the_tunnel():
    pair = limited_pair(access=[LAN_ALLOWED])
    allowed = ipv4_udp(A_TUN4, "198.51.100.7")
    denied = ipv4_udp(A_TUN4, "198.51.100.200")
    tunnel = a_to_b_v4(b"to the server itself")
    sent = [(d.data, d.source) for d in (pair.seal(pair.a, p) for p in (allowed, denied, tunnel))]
    assert pair.b.device.receive_datagrams(sent, pair.now) == [allowed, tunnel]
    stats = pair.b.device.peer_stats(pair.a.device.public_key)
    assert stats.dropped["access_denied"] == 1 and stats.access == (LAN_ALLOWED,)


def test_an_unchanged_policy_keeps_its_bucket_and_none_lifts_it():
    pair = limited_pair(rate_bits=8 * MIN_BURST_BYTES)
    key = pair.a.device.public_key
    sent = [(d.data, d.source) for d in (pair.seal(pair.a, a_to_b_v4(bytes(1000))) for _ in range(200))]
    pair.b.device.receive_datagrams(sent, pair.now)
    pair.b.device.set_policy(key, 8 * MIN_BURST_BYTES, None, exempt=TUNNEL)  # a reload: no fresh burst
    more = [(d.data, d.source) for d in (pair.seal(pair.a, a_to_b_v4(bytes(1000))) for _ in range(5))]
    assert pair.b.device.receive_datagrams(more, pair.now) == []
    pair.b.device.set_policy(key, None, None)
    again = [(d.data, d.source) for d in (pair.seal(pair.a, a_to_b_v4(bytes(1000))) for _ in range(5))]
    assert len(pair.b.device.receive_datagrams(again, pair.now)) == 5
    assert pair.b.device.peer_stats(key).rate_limit is None


# --- config -------------------------------------------------------------------------------------

def server(lines: str) -> str:
    peer = encode_key(derive_public_key(generate_private_key()))
    return (f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\nAddress = 203.0.113.1/24\n"
            f"{lines}\n[Peer]\nPublicKey = {peer}\n")


@pytest.mark.parametrize("text, bits", [("20mbit", 20_000_000), ("1.5Gbit", 1_500_000_000), ("64kbit", 64_000),
                                        ("off", 0)])
def test_rates_are_written_as_tc_writes_them(text, bits):
    config = parse_config(server(f"DefaultRateLimit = {text}"), "/etc/tunvpn/office.conf", "server", resolve=False)
    assert config.interface.default_rate_limit == bits


@pytest.mark.parametrize("text", ["20", "20mb", "fast", "1kbit", "-5mbit"])
def test_a_bad_rate_names_its_line(text):
    with pytest.raises(ConfigError) as caught:
        parse_config(server(f"DefaultRateLimit = {text}"), "/etc/tunvpn/office.conf", "server", resolve=False)
    assert (caught.value.line, caught.value.key) == (4, "DefaultRateLimit")


def test_policy_keys_are_the_servers():
    text = (f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\n\n[Peer]\n"
            f"PublicKey = {encode_key(derive_public_key(generate_private_key()))}\nEndpoint = 192.0.2.1:51820\n"
            "RateLimit = 10mbit\n")
    with pytest.raises(ConfigError, match="RateLimit: is a server setting"):
        parse_config(text, "/etc/tunvpn/office.conf", "client", resolve=False)
