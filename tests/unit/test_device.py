"""The sans-I/O device end to end: handshakes, data both ways, staging, replay, roaming, events, counters."""

from __future__ import annotations

import struct

import pytest

from corepair import (
    A_ADDR,
    A_TUN4,
    A_TUN6,
    B_ADDR,
    B_TUN4,
    B_TUN6,
    WALL_EPOCH,
    CorePair,
    Datagram,
    a_to_b_v4,
    a_to_b_v6,
    b_to_a_v4,
    b_to_a_v6,
    established,
    ipv4_checksum_ok,
    ipv4_udp,
    ipv6_udp,
    private_key,
)
from tunvpn.protocol.device import Device, EndpointChanged, HandshakeCompleted
from tunvpn.protocol.messages import INITIATION_SIZE, RESPONSE_SIZE, TRANSPORT_MIN_SIZE, padded_length
from tunvpn.protocol.noise import State

PSK = bytes(range(100, 132))


def _completed(host) -> list[HandshakeCompleted]:
    return [e for e in host.events if isinstance(e, HandshakeCompleted)]


# --- handshakes and data ------------------------------------------------------------------------

@pytest.mark.parametrize("psk", [None, PSK], ids=["no-psk", "psk"])
@pytest.mark.parametrize("initiator", ["a", "b"])
def test_handshake_then_data_both_ways_ipv4_and_ipv6(initiator, psk):
    pair = CorePair(psk_a=psk, psk_b=psk, start=3.0)
    wire = pair.handshake(pair.hosts[initiator])
    responder = "b" if initiator == "a" else "a"
    assert pair.kinds(wire) == [(initiator, "initiation"), (responder, "response"), (initiator, "keepalive")]
    assert [len(d.data) for d in wire] == [INITIATION_SIZE, RESPONSE_SIZE, TRANSPORT_MIN_SIZE]
    assert _completed(pair.hosts[initiator]) == [HandshakeCompleted(pair.peer(pair.hosts[initiator]).public_key, True)]
    assert _completed(pair.hosts[responder]) == [HandshakeCompleted(pair.peer(pair.hosts[responder]).public_key, False)]
    for host in (pair.a, pair.b):
        assert pair.peer(host).last_handshake_wall == WALL_EPOCH + 3.0
        assert pair.peer(host).handshake.state is State.ZEROED

    to_b = [a_to_b_v4(b"x" * n) for n in (0, 1, 15, 16, 17, 500)] + [a_to_b_v6(b"y" * n) for n in (0, 3, 1000)]
    to_a = [b_to_a_v4(b"z" * n) for n in (0, 31, 1300)] + [b_to_a_v6(b"w" * n) for n in (2, 64)]
    wire = pair.send(pair.a, to_b)
    assert [d.kind for d in wire] == ["data"] * len(to_b)
    wire = pair.send(pair.b, to_a)
    assert [d.kind for d in wire] == ["data"] * len(to_a)
    assert pair.b.tun == to_b and pair.a.tun == to_a  # byte for byte, padding removed
    assert all(ipv4_checksum_ok(p) for p in pair.b.tun if p[0] >> 4 == 4)


def test_mismatched_psk_never_completes():
    pair = CorePair(psk_a=PSK, psk_b=bytes(32))
    wire = pair.send(pair.a, [a_to_b_v4()])
    assert pair.kinds(wire) == [("a", "initiation"), ("b", "response")]
    assert pair.a.device._state.dropped["handshake_rejected"] == 1
    assert pair.a_peer.keypairs.current is None and pair.b_peer.keypairs.current is None
    assert len(pair.a_peer.staged) == 1 and pair.b.tun == []
    assert not _completed(pair.a) and not _completed(pair.b)


def test_initiation_from_an_unknown_peer_is_dropped_and_counted():
    pair = CorePair()
    stranger = pair.add_host("c", private_key(77), ("192.0.2.3", 51820), seed=77)
    stranger.device.set_peer(pair.b.device.public_key, allowed_ips=["0.0.0.0/0"], endpoint=B_ADDR)
    stranger.device.initiate(pair.b.device.public_key, pair.now)
    wire = pair.flush()
    assert pair.kinds(wire) == [("c", "initiation")]
    assert pair.b.device._state.dropped["unknown_peer"] == 1
    assert len(pair.b.device._state.index_table) == 0 and pair.b_peer.handshake.state is State.ZEROED


def test_initiator_sends_a_keepalive_only_when_it_has_nothing_staged():
    pair = CorePair()
    staged = [a_to_b_v4(b"first"), a_to_b_v6(b"second")]
    wire = pair.send(pair.a, staged)
    assert pair.kinds(wire) == [("a", "initiation"), ("b", "response"), ("a", "data"), ("a", "data")]
    assert pair.b.tun == staged
    assert _completed(pair.b)  # the data confirmed the session just as a keepalive would


def test_responder_waits_for_confirmation_then_sends_what_it_staged():
    pair = CorePair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(pair.a))
    response = pair.collect(pair.b)
    pair.b.device.send_packets([b_to_a_v4(b"early")], pair.now)
    assert pair.collect(pair.b) == []  # no session yet, and no initiation within 5 s of the response
    assert len(pair.b_peer.staged) == 1
    pair.deliver(response)
    (keepalive,) = pair.collect(pair.a)
    pair.deliver([keepalive])
    (data,) = pair.collect(pair.b)
    assert data.kind == "data"
    pair.deliver([data])
    assert pair.a.tun == [b_to_a_v4(b"early")]


def test_staged_queue_keeps_the_newest_128():
    pair = CorePair()
    pair.b.online = False
    pair.send(pair.a, [a_to_b_v4(i.to_bytes(2, "big")) for i in range(130)])
    assert len(pair.a_peer.staged) == 128 and pair.a_peer.dropped["staged_queue_full"] == 2
    pair.b.online = True
    pair.advance(6.0)
    assert pair.b.tun == [a_to_b_v4(i.to_bytes(2, "big")) for i in range(2, 130)]


def test_simultaneous_initiations_settle_on_one_session():
    pair = CorePair(seed=3)
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.b.device.initiate(pair.a.device.public_key, pair.now)
    pair.flush()
    assert pair.a.device._state.dropped["unknown_receiver_index"] == 1  # each response answers a replaced index
    pair.advance(6.0)
    pair.send(pair.a, [a_to_b_v4()])
    pair.send(pair.b, [b_to_a_v4()])
    assert pair.b.tun == [a_to_b_v4()] and pair.a.tun == [b_to_a_v4()]


def test_many_datagrams_in_one_batch():
    pair = established(CorePair())
    packets = [a_to_b_v4(i.to_bytes(2, "big")) for i in range(50)]
    pair.a.device.send_packets(packets, pair.now)
    batch = pair.collect(pair.a)
    assert len(batch) == 50
    pair.b.tun.extend(pair.b.device.receive_datagrams([(d.data, d.source) for d in batch], pair.now))
    assert pair.b.tun == packets


def test_padding_and_the_mtu():
    pair = established(CorePair())
    mtu = pair.a.device.mtu
    for size in (28, 29, 43, 44, 48, mtu - 17, mtu - 1, mtu):
        packet = ipv4_udp(A_TUN4, B_TUN4, bytes(size - 28))
        (datagram,) = pair.send(pair.a, [packet])
        assert len(datagram.data) == 32 + padded_length(size, mtu)
        assert len(datagram.data) - 32 <= max(size, mtu) and (len(datagram.data) - 32) % 16 in (0, mtu % 16)
        assert pair.b.tun[-1] == packet


# --- what the device refuses to send or deliver -----------------------------------------------------

def test_tun_packets_without_a_route_or_not_ip_are_counted():
    pair = established(CorePair())
    pair.a.device.send_packets(
        [b"", b"\x45" * 10, b"\x60" * 39, ipv4_udp(A_TUN4, "198.51.100.9"), ipv6_udp(A_TUN6, "2001:db8:50::9")],
        pair.now,
    )
    assert pair.collect(pair.a) == []
    assert pair.a.device._state.dropped["tun_not_ip"] == 3
    assert pair.a.device._state.dropped["no_peer_for_destination"] == 2


@pytest.mark.parametrize(
    "plaintext, reason",
    [
        (ipv4_udp("203.0.113.99", B_TUN4), "source_not_allowed"),
        (ipv6_udp("2001:db8:100::99", B_TUN6), "source_not_allowed"),
        (ipv4_udp(B_TUN4, B_TUN4), "source_not_allowed"),  # b's own address from a
        (b"\x00" * 32, "not_ip"),
        (b"\x45" + bytes(10), "not_ip"),
        (b"\x60" + bytes(30), "not_ip"),
        (ipv4_udp(A_TUN4, B_TUN4)[:2] + struct.pack("!H", 200) + ipv4_udp(A_TUN4, B_TUN4)[4:], "bad_ip_length"),
        (ipv4_udp(A_TUN4, B_TUN4)[:2] + struct.pack("!H", 19) + ipv4_udp(A_TUN4, B_TUN4)[4:], "bad_ip_length"),
        (ipv6_udp(A_TUN6, B_TUN6)[:4] + struct.pack("!H", 500) + ipv6_udp(A_TUN6, B_TUN6)[6:], "bad_ip_length"),
    ],
    ids=["v4-foreign", "v6-foreign", "v4-own", "zeros", "short-v4", "short-v6", "v4-long", "v4-tiny", "v6-long"],
)
def test_authenticated_but_unacceptable_inner_packets(plaintext, reason):
    pair = established(CorePair())
    pair.deliver([pair.seal(pair.a, plaintext)])
    assert pair.b.tun == [] and pair.b_peer.dropped[reason] == 1
    # still authenticated traffic, so the timers run: data was received, a keepalive is owed
    wire = pair.advance(pair.now + 11)
    assert pair.kinds(wire) == [("b", "keepalive")]


def test_confirmation_by_a_dropped_inner_packet_still_schedules_the_timers():
    """The first transport message confirms b's keypair and releases b's staged packet even if
    its own inner packet is dropped; the timers that moves must reach the device heap
    (CorePair.deliver checks that the device timer is never later than a peer deadline)."""
    pair = CorePair()
    pair.a.device.send_packets([ipv4_udp("203.0.113.99", B_TUN4)], pair.now)  # routed to b, bad source
    pair.deliver(pair.collect(pair.a))  # initiation
    response = pair.collect(pair.b)
    pair.b.device.send_packets([b_to_a_v4(b"waiting")], pair.now)
    pair.deliver(response)
    pair.deliver(pair.collect(pair.a))  # a's first transport: the bad packet (checks b's timer)
    assert pair.b_peer.dropped["source_not_allowed"] == 1 and pair.b_peer.keypairs.current is not None
    assert pair.kinds(pair.collect(pair.b)) == [("b", "data")]
    assert pair.b_peer.timers.send_keepalive is not None  # data arrived, even if dropped inside


def test_inner_packet_trimmed_to_its_header_length():
    pair = established(CorePair())
    packet = a_to_b_v4(b"abc")
    pair.deliver([pair.seal(pair.a, packet + b"trailing junk")])
    packet6 = a_to_b_v6(b"abc")
    pair.deliver([pair.seal(pair.a, packet6 + bytes(7))])
    assert pair.b.tun == [packet, packet6]


# --- replay -------------------------------------------------------------------------------------------

def test_replayed_transport_is_rejected_and_reordering_is_not():
    pair = established(CorePair())
    pair.a.device.send_packets([a_to_b_v4(bytes([i])) for i in range(3)], pair.now)
    first, second, third = pair.collect(pair.a)
    pair.deliver([third, first])
    pair.deliver([first, third])
    pair.deliver([second, second])
    assert pair.b.tun == [a_to_b_v4(b"\x02"), a_to_b_v4(b"\x00"), a_to_b_v4(b"\x01")]
    assert pair.b_peer.dropped["replayed"] == 3


def test_replayed_initiation_is_rejected_and_changes_nothing():
    pair = CorePair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (initiation,) = pair.collect(pair.a)
    pair.deliver([initiation])
    pair.flush()
    keypairs = list(pair.b_peer.keypairs)
    for when in (pair.now, pair.now + 1, pair.now + 100):
        pair.now = when
        pair.deliver([initiation])
        assert pair.collect(pair.b) == []
    assert pair.b.device._state.dropped["handshake_rejected"] == 3
    assert list(pair.b_peer.keypairs) == keypairs and len(pair.b.device._state.index_table) == 1


def test_replayed_response_is_rejected():
    pair = CorePair()
    wire = pair.handshake()
    response = wire[1]
    pair.deliver([response])
    assert pair.a.device._state.dropped["unknown_receiver_index"] == 1  # its index now names a keypair
    assert pair.collect(pair.a) == [] and len(_completed(pair.a)) == 1


# --- roaming ---------------------------------------------------------------------------------------------

def test_authenticated_packet_from_a_new_address_moves_the_endpoint():
    pair = established(CorePair())
    moved = ("192.0.2.11", 40001)
    pair.a.address = moved
    pair.send(pair.a, [a_to_b_v4()])
    assert pair.b_peer.endpoint == moved
    assert [e for e in pair.b.events if isinstance(e, EndpointChanged)] == [EndpointChanged(pair.b_peer.public_key, moved)]
    wire = pair.send(pair.b, [b_to_a_v4()])
    assert [d.destination for d in wire] == [moved] and pair.a.tun == [b_to_a_v4()]


def test_unauthenticated_or_replayed_packets_do_not_move_the_endpoint():
    pair = established(CorePair())
    pair.a.device.send_packets([a_to_b_v4()], pair.now)
    (genuine,) = pair.collect(pair.a)
    pair.deliver([genuine])
    spoofed = ("198.51.100.66", 666)
    forged = bytearray(genuine.data)
    forged[-1] ^= 1
    pair.deliver([Datagram(bytes(forged), spoofed, B_ADDR, "mallory", pair.now)])
    pair.deliver([Datagram(genuine.data, spoofed, B_ADDR, "mallory", pair.now)])
    assert pair.b_peer.endpoint == A_ADDR
    assert not [e for e in pair.b.events if isinstance(e, EndpointChanged)]
    assert pair.b.device._state.dropped["bad_transport_tag"] == 1 and pair.b_peer.dropped["replayed"] == 1


def test_handshake_from_a_new_address_moves_the_endpoint_and_server_learns_it():
    pair = CorePair(b_knows_a_endpoint=False)
    assert pair.b_peer.endpoint is None
    pair.handshake()
    assert pair.b_peer.endpoint == A_ADDR
    assert [e for e in pair.b.events if isinstance(e, EndpointChanged)] == [EndpointChanged(pair.b_peer.public_key, A_ADDR)]


def test_ipv6_underlay_endpoints():
    pair = CorePair()
    a6, b6 = ("2001:db8:1::1", 51820, 0, 0), ("2001:db8:1::2", 51820, 0, 0)
    pair.a.address, pair.b.address = a6, b6
    pair.a.device.set_peer(pair.b.device.public_key, allowed_ips=[f"{B_TUN4}/32", f"{B_TUN6}/128"], endpoint=b6)
    pair.send(pair.a, [a_to_b_v6()])
    pair.send(pair.b, [b_to_a_v4()])
    assert pair.b.tun == [a_to_b_v6()] and pair.a.tun == [b_to_a_v4()] and pair.b_peer.endpoint == a6


# --- counters -------------------------------------------------------------------------------------------

def test_counters_match_the_traffic():
    """rx/tx bytes count every datagram exchanged with the peer, handshakes included (as `wg show`);
    rx/tx packets count transport messages (keepalives included)."""
    pair = CorePair()
    pair.handshake()
    sizes_a = [20 + 8 + n for n in (0, 5, 100, 1000)]
    sizes_b = [40 + 8 + n for n in (1, 300)]
    pair.send(pair.a, [a_to_b_v4(bytes(s - 28)) for s in sizes_a])
    pair.send(pair.b, [b_to_a_v6(bytes(s - 48)) for s in sizes_b])
    mtu = pair.a.device.mtu
    a_data = sum(32 + padded_length(s, mtu) for s in sizes_a)
    b_data = sum(32 + padded_length(s, mtu) for s in sizes_b)
    a, b = pair.a_peer, pair.b_peer
    assert (a.tx_packets, a.tx_bytes) == (1 + 4, INITIATION_SIZE + 32 + a_data)
    assert (a.rx_packets, a.rx_bytes) == (2, RESPONSE_SIZE + b_data)
    assert (b.rx_packets, b.rx_bytes) == (1 + 4, INITIATION_SIZE + 32 + a_data)
    assert (b.tx_packets, b.tx_bytes) == (2, RESPONSE_SIZE + b_data)
    wire_a = sum(len(d.data) for d in pair.wire if d.sender == "a")
    wire_b = sum(len(d.data) for d in pair.wire if d.sender == "b")
    assert (a.tx_bytes, b.tx_bytes) == (wire_a, wire_b)


def test_dropped_packets_are_not_counted_as_received():
    pair = established(CorePair())
    before = (pair.b_peer.rx_packets, pair.b_peer.rx_bytes)
    pair.a.device.send_packets([a_to_b_v4()], pair.now)
    (datagram,) = pair.collect(pair.a)
    forged = datagram.data[:-1] + bytes([datagram.data[-1] ^ 1])
    pair.deliver([Datagram(forged, A_ADDR, B_ADDR, "a", pair.now)])
    assert (pair.b_peer.rx_packets, pair.b_peer.rx_bytes) == before
    pair.deliver([datagram, datagram])
    assert (pair.b_peer.rx_packets, pair.b_peer.rx_bytes) == (before[0] + 1, before[1] + len(datagram.data))


# --- configuration ------------------------------------------------------------------------------------------

def test_set_peer_validates_keys():
    device = Device(private_key(1))
    with pytest.raises(ValueError):
        device.set_peer(b"short")
    with pytest.raises(ValueError):
        device.set_peer(bytes(32), preshared_key=b"short")
    with pytest.raises(ValueError):
        device.set_peer(device.public_key)


def test_updating_a_peer_keeps_its_session_unless_the_psk_changes():
    pair = established(CorePair())
    session = pair.a_peer.keypairs.current
    pair.a.device.set_peer(pair.b.device.public_key, allowed_ips=[f"{B_TUN4}/32", "198.51.100.0/24"])
    assert pair.a_peer.keypairs.current is session and pair.a_peer.endpoint == B_ADDR
    assert {str(n) for n in pair.a.device.allowed_ips_of(pair.b.device.public_key)} == {f"{B_TUN4}/32", "198.51.100.0/24"}
    routed = ipv4_udp(A_TUN4, "198.51.100.7")
    pair.send(pair.a, [routed])  # the new prefix routes to b; b checks only the inner source
    assert pair.b.tun == [routed]
    pair.a.device.set_peer(pair.b.device.public_key, preshared_key=PSK, allowed_ips=[f"{B_TUN4}/32"])
    assert list(pair.a_peer.keypairs) == [] and len(pair.a.device._state.index_table) == 0


def test_removed_peer_traffic_is_dropped():
    pair = established(CorePair())
    pair.a.device.send_packets([a_to_b_v4()], pair.now)
    in_flight = pair.collect(pair.a)
    pair.b.device.remove_peer(pair.a.device.public_key)
    assert len(pair.b.device._state.index_table) == 0
    pair.deliver(in_flight)
    assert pair.b.tun == [] and pair.b.device._state.dropped["unknown_receiver_index"] == 1
    pair.b.device.send_packets([b_to_a_v4()], pair.now)
    assert pair.b.device._state.dropped["no_peer_for_destination"] == 1
    pair.b.device.remove_peer(pair.a.device.public_key)  # twice is harmless


def test_routing_to_several_peers_by_longest_prefix():
    pair = established(CorePair())
    carol = pair.add_host("c", private_key(50), ("192.0.2.3", 51820), seed=50)
    carol.device.set_peer(pair.a.device.public_key, allowed_ips=[f"{A_TUN4}/32"], endpoint=A_ADDR)
    pair.a.device.set_peer(carol.device.public_key, allowed_ips=["198.51.100.0/24"], endpoint=carol.address)
    pair.a.device.set_peer(pair.b.device.public_key, allowed_ips=[f"{B_TUN4}/32", "198.51.100.128/25"])
    low, high = ipv4_udp(A_TUN4, "198.51.100.5"), ipv4_udp(A_TUN4, "198.51.100.200")
    pair.send(pair.a, [low, high])
    assert carol.tun == [low] and pair.b.tun == [high]
