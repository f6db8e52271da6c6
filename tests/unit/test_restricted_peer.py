"""A peer restricted to control messages in the core: no IP packet either way, control messages,
handshakes and keepalives still pass, and neither a rekey nor a policy change lifts it."""

from __future__ import annotations

import ipaddress

from corepair import CorePair, a_to_b_v4, b_to_a_v4, established
from tunvpn.protocol import control
from tunvpn.protocol.device import ControlReceived
from tunvpn.protocol.keypair import REKEY_AFTER_TIME

REASON = "second_factor_required"
TUNNEL = [ipaddress.ip_network("203.0.113.0/24")]


def restricted_pair() -> CorePair:
    pair = established(CorePair())
    for host in (pair.a, pair.b):
        host.device.set_control_messages(True)
    pair.b.device.restrict(pair.a.device.public_key, REASON)
    return pair


def stats(pair: CorePair):
    return pair.b.device.peer_stats(pair.a.device.public_key)


def test_no_ip_packet_passes_either_way_and_each_is_counted():
    pair = restricted_pair()
    pair.send(pair.a, [a_to_b_v4(b"in")] * 3)
    pair.send(pair.b, [b_to_a_v4(b"out")] * 2)
    assert pair.b.tun == [] and pair.a.tun == []
    assert stats(pair).dropped[REASON] == 5 and stats(pair).restricted == REASON


def test_control_messages_pass_both_ways():
    pair = restricted_pair()
    key_a, key_b = pair.a.device.public_key, pair.b.device.public_key
    pair.a.device.send_to_peer(key_b, [control.encode(control.ConfigRequest(1))], pair.now)
    pair.flush()
    assert received(pair.b, key_a) == [control.ConfigRequest(1)]
    pair.b.device.send_to_peer(key_a, [control.encode(control.ConfigRefused(1, "no"))], pair.now)
    pair.flush()
    assert received(pair.a, key_b) == [control.ConfigRefused(1, "no")]
    assert stats(pair).dropped == {}


def received(host, sender: bytes) -> list:
    return [control.decode(e.payload) for e in host.events if isinstance(e, ControlReceived) and e.public_key == sender]


def test_a_rekey_keeps_the_restriction_and_lifting_it_lets_packets_through():
    pair = restricted_pair()
    first = pair.b_peer.keypairs.current
    pair.step(REKEY_AFTER_TIME + 1)
    pair.send(pair.a, [a_to_b_v4(b"after rekey")])
    assert pair.b_peer.keypairs.current is not first  # a new session
    assert pair.b.tun == [] and stats(pair).restricted == REASON
    pair.b.device.restrict(pair.a.device.public_key, None)
    pair.send(pair.a, [a_to_b_v4(b"now")])
    assert pair.b.tun == [a_to_b_v4(b"now")] and stats(pair).restricted is None


def test_a_policy_change_keeps_the_restriction_and_the_restriction_keeps_the_policy():
    pair = restricted_pair()
    key = pair.a.device.public_key
    pair.b.device.set_policy(key, 1_000_000, None, exempt=TUNNEL)
    assert stats(pair).restricted == REASON and stats(pair).rate_limit == 1_000_000
    pair.b.device.set_policy(key, None, None)
    assert stats(pair).restricted == REASON
    pair.b.device.set_policy(key, 2_000_000, None, exempt=TUNNEL)
    pair.b.device.restrict(key, None)
    assert stats(pair).rate_limit == 2_000_000 and stats(pair).restricted is None


def test_an_unrestricted_peer_without_policy_carries_none():
    pair = restricted_pair()
    pair.b.device.restrict(pair.a.device.public_key, None)
    assert pair.b_peer.policy is None
