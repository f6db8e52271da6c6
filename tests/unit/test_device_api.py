"""What the daemons may use of a Device: peer stats, sessions, drop counts, MTU, and the two
tunvpn extensions (control messages, relaying between peers) installed as hooks."""

from __future__ import annotations

import dataclasses

import pytest

from corepair import A_ADDR, A_TUN4, B_ADDR, B_TUN4, WALL_EPOCH, CorePair, a_to_b_v4, established, ipv4_udp, private_key
from tunvpn.protocol import control
from tunvpn.protocol.device import ControlReceived, PeerStats

C_ADDR, C_TUN4 = ("192.0.2.3", 51820), "203.0.113.3"


def test_peer_stats_is_a_frozen_snapshot():
    pair = established(CorePair(start=2.0))
    a, b_key = pair.a.device, pair.b.device.public_key
    pair.send(pair.a, [a_to_b_v4(b"hello")])
    stats = a.peer_stats(b_key)
    assert isinstance(stats, PeerStats)
    assert (stats.public_key, stats.endpoint, stats.has_session) == (b_key, B_ADDR, True)
    assert [str(n) for n in stats.allowed_ips] == [f"{B_TUN4}/32", "2001:db8:100::2/128"]
    assert stats.latest_handshake == WALL_EPOCH + 2.0
    assert (stats.tx_packets, stats.rx_packets) == (2, 0)  # the initiator's keepalive, then the data
    assert stats.tx_bytes > 0 and stats.rx_bytes > 0 and stats.persistent_keepalive == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.rx_bytes = 0
    pair.send(pair.a, [a_to_b_v4(b"again")])
    assert stats.tx_packets == 2 and a.peer_stats(b_key).tx_packets == 3


def test_sessions_peers_and_drop_counts_by_key():
    pair = CorePair()
    a, b_key = pair.a.device, pair.b.device.public_key
    assert a.peer_keys() == [b_key] and a.has_peer(b_key) and not a.has_peer(bytes(32))
    assert not a.has_session(b_key)
    established(pair)
    assert a.has_session(b_key)
    a.count_drop(b_key, "bad_control_message")
    a.count_drop(b_key, "bad_control_message")
    assert a.peer_stats(b_key).dropped == {"bad_control_message": 2}
    a.send_packets([b"\x00" * 20], pair.now)
    assert a.drops() == {"tun_not_ip": 1}
    a.drop_sessions(b_key)
    assert not a.has_session(b_key)
    a.remove_peer(b_key)
    assert a.peer_keys() == [] and not a.has_peer(b_key)


def test_set_mtu_bounds_the_padding():
    pair = established(CorePair())
    pair.a.device.set_mtu(1290)
    assert pair.a.device.mtu == 1290
    (datagram,) = pair.send(pair.a, [a_to_b_v4(bytes(1285 - 28))])  # 1285 bytes: padded to 1290, not 1296
    assert len(datagram.data) == 16 + 1290 + 16


def test_state_digest_moves_with_accepted_input_only():
    pair = established(CorePair())
    b = pair.b.device
    before = b.state_digest()
    genuine = pair.seal(pair.a, a_to_b_v4(b"hi"))
    forged = dataclasses.replace(genuine, data=genuine.data[:-1] + bytes([genuine.data[-1] ^ 1]))
    pair.deliver([forged])
    assert b.state_digest() == before
    pair.deliver([genuine])
    assert b.state_digest() != before


# --- control messages ------------------------------------------------------------------------

@pytest.mark.parametrize("enabled", [True, False])
def test_control_messages_are_events_only_with_the_extension(enabled):
    pair = established(CorePair())
    pair.b.device.set_control_messages(enabled)
    message = control.encode(control.ConfigRequest(7))
    pair.deliver([pair.seal(pair.a, message)])
    events = [e for e in pair.drain_events(pair.b) if isinstance(e, ControlReceived)]
    dropped = pair.b_peer.dropped["not_ip"]
    assert pair.b.tun == []
    if enabled:
        assert events == [ControlReceived(pair.a.device.public_key, message)] and dropped == 0
    else:
        assert events == [] and dropped == 1


def test_with_the_extension_other_non_ip_plaintext_is_still_dropped():
    pair = established(CorePair())
    pair.b.device.set_control_messages(True)
    pair.deliver([pair.seal(pair.a, b"\x00" * 32)])
    assert pair.b_peer.dropped["not_ip"] == 1 and pair.drain_events(pair.b) == []


# --- relaying between peers ------------------------------------------------------------------

def _server_with_two_clients(forwarding: bool | None) -> tuple[CorePair, object]:
    """a is the server; b and c are its clients, each with the server's subnet routed to it."""
    pair = CorePair()
    carol = pair.add_host("c", private_key(60), C_ADDR, seed=60)
    server = pair.a.device
    server.set_peer(carol.device.public_key, allowed_ips=[f"{C_TUN4}/32"], endpoint=C_ADDR)
    carol.device.set_peer(server.public_key, allowed_ips=["203.0.113.0/24"], endpoint=A_ADDR)
    pair.b.device.set_peer(server.public_key, allowed_ips=["203.0.113.0/24"], endpoint=A_ADDR)
    server.set_forwarding(forwarding)
    pair.handshake(pair.a)
    server.initiate(carol.device.public_key, pair.now)
    pair.flush()
    return pair, carol


@pytest.mark.parametrize("forwarding", [None, True, False])
def test_a_packet_from_one_client_to_another(forwarding):
    pair, carol = _server_with_two_clients(forwarding)
    packet = ipv4_udp(B_TUN4, C_TUN4, b"to carol")
    to_server = ipv4_udp(B_TUN4, A_TUN4, b"to the server")
    pair.send(pair.b, [packet, to_server])
    blocked = pair.peer(pair.a, pair.b).dropped["peer_to_peer_blocked"]
    if forwarding is None:  # plain WireGuard: everything goes to the server's tun
        assert pair.a.tun == [packet, to_server] and carol.tun == [] and blocked == 0
    elif forwarding:
        assert pair.a.tun == [to_server] and carol.tun == [packet] and blocked == 0
    else:
        assert pair.a.tun == [to_server] and carol.tun == [] and blocked == 1


def test_forwarding_can_change_at_run_time():
    pair, carol = _server_with_two_clients(False)
    packet = ipv4_udp(B_TUN4, C_TUN4, b"to carol")
    pair.send(pair.b, [packet])
    pair.a.device.set_forwarding(True)
    pair.send(pair.b, [packet])
    assert carol.tun == [packet]
