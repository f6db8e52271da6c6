"""Merging TCP bursts into virtio-net GSO writes (tunvpn/io/coalesce.py).

The strongest check is a round trip: each merged write is split again the way the kernel's
GSO does (per-segment lengths, IPv4 IDs, sequence numbers, PSH on the last, full checksums),
and the result must be the input packets byte for byte, in order per flow.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from packets import internet_checksum

from tunvpn.io.coalesce import PLAIN_VNET_HEADER, VNET_HEADER_SIZE, coalesce

ACK, PSH, FIN, SYN, RST, URG, ECE, CWR = 0x10, 0x08, 0x01, 0x02, 0x04, 0x20, 0x40, 0x80
TIMESTAMPS = bytes([1, 1, 8, 10]) + (1000).to_bytes(4, "big") + (2000).to_bytes(4, "big")


def tcp_packet(payload: bytes, *, seq: int = 1000, ack: int = 5000, flags: int = ACK, window: int = 512,
               options: bytes = TIMESTAMPS, source: str = "203.0.113.2", destination: str = "203.0.113.1",
               ports: tuple[int, int] = (40000, 5201), ident: int = 1, ttl: int = 64, tos: int = 0,
               fragment: int = 0x4000) -> bytes:
    """An IPv4 or IPv6 TCP segment with correct checksums."""
    src, dst = ipaddress.ip_address(source).packed, ipaddress.ip_address(destination).packed
    offset = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", *ports, seq & 0xFFFFFFFF, ack, offset << 4, flags, window, 0, 0)
    segment = tcp + options + payload
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
    else:
        pseudo = src + dst + struct.pack("!I3xB", len(segment), 6)
    checksum = internet_checksum(pseudo + segment)
    segment = segment[:16] + checksum.to_bytes(2, "big") + segment[18:]
    if len(src) == 4:
        header = bytearray(struct.pack("!BBHHHBBH", 0x45, tos, 20 + len(segment), ident, fragment, ttl, 6, 0)
                           + src + dst)
        header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
        return bytes(header) + segment
    return struct.pack("!IHBB", (6 << 28) | (tos << 20), len(segment), 6, ttl) + src + dst + segment


def burst(count: int, size: int = 1368, *, seq: int = 1000, ident: int = 1, last_size: int | None = None,
          **fields) -> list[bytes]:
    """`count` consecutive full segments of one flow (the last `last_size` long if given)."""
    packets = []
    for index in range(count):
        length = last_size if last_size is not None and index == count - 1 else size
        packets.append(tcp_packet(bytes([index % 251]) * length, seq=seq, ident=ident + index, **fields))
        seq += length
    return packets


def kernel_split(vector: list) -> list[bytes]:
    """What the kernel makes of one write: a GSO packet split into segments, as tcp_gso_segment does."""
    vnet, data = bytes(vector[0]), b"".join(bytes(part) for part in vector[1:])
    assert len(vnet) == VNET_HEADER_SIZE
    flags, gso_type, header_len, gso_size, csum_start, csum_offset = struct.unpack("=BBHHHH", vnet)
    if gso_type == 0:
        assert vnet == PLAIN_VNET_HEADER
        return [data]
    assert flags == 1 and csum_offset == 16
    ip_len = 20 if gso_type == 1 else 40
    assert csum_start == ip_len and gso_type in (1, 4)
    header, payload = bytearray(data[:header_len]), data[header_len:]
    # The partial checksum must be the pseudo-header sum of the whole merged segment.
    tcp_length = len(data) - ip_len
    if ip_len == 20:
        pseudo = bytes(header[12:20]) + struct.pack("!BBH", 0, 6, tcp_length)
    else:
        pseudo = bytes(header[8:40]) + struct.pack("!I3xB", tcp_length, 6)
    partial = int.from_bytes(header[ip_len + 16:ip_len + 18], "big")
    assert (partial + internet_checksum(pseudo)) % 0xFFFF == 0, "the pseudo-header sum, not inverted"
    if ip_len == 20:
        assert internet_checksum(bytes(header[:20])) == 0, "IPv4 header checksum"
    segments = []
    seq = int.from_bytes(header[ip_len + 4:ip_len + 8], "big")
    ident = int.from_bytes(header[4:6], "big")
    pieces = [payload[start:start + gso_size] for start in range(0, len(payload), gso_size)]
    for index, piece in enumerate(pieces):
        segment = bytearray(header)
        struct.pack_into("!I", segment, ip_len + 4, (seq + index * gso_size) & 0xFFFFFFFF)
        if index != len(pieces) - 1:
            segment[ip_len + 13] &= ~(PSH | FIN) & 0xFF
        segment[ip_len + 16:ip_len + 18] = b"\0\0"
        tcp = bytes(segment[ip_len:]) + piece
        if ip_len == 20:
            struct.pack_into("!HH", segment, 2, 20 + len(tcp), (ident + index) & 0xFFFF)
            segment[10:12] = b"\0\0"
            segment[10:12] = internet_checksum(bytes(segment[:20])).to_bytes(2, "big")
            pseudo = bytes(segment[12:20]) + struct.pack("!BBH", 0, 6, len(tcp))
        else:
            struct.pack_into("!H", segment, 4, len(tcp))
            pseudo = bytes(segment[8:40]) + struct.pack("!I3xB", len(tcp), 6)
        segment[ip_len + 16:ip_len + 18] = internet_checksum(pseudo + tcp).to_bytes(2, "big")
        segments.append(bytes(segment) + piece)
    return segments


def round_trip(packets: list[bytes]) -> tuple[list[list], list[bytes]]:
    vectors = coalesce(packets)
    return vectors, [segment for vector in vectors for segment in kernel_split(vector)]


def merged_counts(vectors: list[list]) -> list[int]:
    """Segments per write: 1 for a packet written alone."""
    return [1 if len(vector) == 2 else len(vector) - 2 for vector in vectors]


@pytest.mark.parametrize("family", ["203.0.113.", "2001:db8::"])
def test_a_burst_of_full_segments_and_a_short_last_is_one_write_that_splits_back_into_the_input(family):
    packets = burst(10, last_size=700, source=family + "2", destination=family + "1")
    vectors, split = round_trip(packets)
    assert merged_counts(vectors) == [10]
    assert split == packets


def test_psh_ends_a_burst_and_is_carried_on_its_last_segment():
    packets = burst(3) + burst(3, seq=1000 + 3 * 1368, ident=4)
    packets[2] = tcp_packet(bytes([2]) * 1368, seq=1000 + 2 * 1368, flags=ACK | PSH, ident=3)
    vectors, split = round_trip(packets)
    assert merged_counts(vectors) == [3, 3]
    assert split == packets


def test_a_smaller_segment_ends_the_burst_and_a_larger_one_starts_another():
    small_then_full = burst(2, last_size=100) + burst(2, seq=1000 + 1368 + 100, ident=3)
    vectors, split = round_trip(small_then_full)
    assert merged_counts(vectors) == [2, 2] and split == small_then_full
    larger = burst(2, size=1000) + burst(2, size=1368, seq=3000, ident=3)
    vectors, split = round_trip(larger)
    assert merged_counts(vectors) == [2, 2] and split == larger


def test_out_of_order_and_retransmitted_segments_are_never_merged_out_of_order():
    packets = burst(4)
    reordered = [packets[0], packets[2], packets[1], packets[3]]
    vectors, split = round_trip(reordered)
    assert split == reordered
    assert sum(merged_counts(vectors)) == 4 and len(vectors) >= 3
    retransmitted = packets[:3] + [packets[1]]
    vectors, split = round_trip(retransmitted)
    assert merged_counts(vectors) == [3, 1] and split == retransmitted


@pytest.mark.parametrize("change", [
    {"ack": 6000}, {"window": 1024}, {"ttl": 63}, {"tos": 2},
    {"options": bytes([1, 1, 8, 10]) + (1001).to_bytes(4, "big") + (2000).to_bytes(4, "big")},
    {"options": b""}, {"fragment": 0},
])
def test_a_segment_that_differs_in_more_than_payload_and_sequence_starts_a_new_write(change):
    first = burst(2)
    different = tcp_packet(bytes([9]) * 1368, seq=1000 + 2 * 1368, ident=3, **change)
    packets = first + [different]
    vectors, split = round_trip(packets)
    assert merged_counts(vectors) == [2, 1]
    assert split == packets


@pytest.mark.parametrize("flags", [ACK | FIN, ACK | SYN, ACK | RST, ACK | URG, ACK | ECE, ACK | CWR, SYN])
def test_control_flags_are_written_alone_and_split_their_flow(flags):
    packets = burst(2) + [tcp_packet(b"x" * 1368, seq=1000 + 2 * 1368, flags=flags, ident=3)]
    packets += burst(2, seq=1000 + 3 * 1368, ident=4)
    vectors, split = round_trip(packets)
    assert merged_counts(vectors) == [2, 1, 2]
    assert split == packets


def test_interleaved_flows_merge_each_flow_in_its_order():
    flow_a = burst(4, ports=(40000, 5201))
    flow_b = burst(4, ports=(40001, 5201), seq=77, ident=50)
    interleaved = [packet for pair in zip(flow_a, flow_b) for packet in pair]
    vectors, split = round_trip(interleaved)
    assert merged_counts(vectors) == [4, 4]
    assert split == flow_a + flow_b


def test_other_traffic_passes_alone_and_the_tcp_flow_around_it_stays_in_order():
    udp = bytes.fromhex("4500001c0001000040110000cb007102cb007101303900350008") + bytes(2)
    icmp = bytes.fromhex("450000540001000040010000cb007102cb0071010800f7ff00000000") + bytes(56)
    pure_ack = tcp_packet(b"", seq=1000 + 2 * 1368, ident=3)
    with_ip_options = bytes([0x46]) + tcp_packet(b"y" * 100)[1:20] + bytes(4) + tcp_packet(b"y" * 100)[20:]
    packets = burst(2) + [udp, icmp, pure_ack, with_ip_options] + burst(2, seq=1000 + 2 * 1368, ident=4)
    vectors = coalesce(packets)
    assert merged_counts(vectors) == [2, 1, 1, 1, 1, 2]
    assert [bytes(vector[1]) for vector in vectors[1:5]] == [udp, icmp, pure_ack, with_ip_options]
    assert all(vector[0] == PLAIN_VNET_HEADER for vector in vectors[1:5])


def test_a_burst_stops_at_the_64_kib_an_ip_packet_can_hold():
    packets = burst(60, size=1368)
    vectors, split = round_trip(packets)
    counts = merged_counts(vectors)
    assert sum(counts) == 60 and len(counts) == 2
    for vector in vectors:
        assert sum(len(part) for part in vector[1:]) <= 65535
    assert split == packets


def test_sequence_numbers_wrap_around():
    packets = burst(3, seq=0xFFFFFFFF - 1000)
    vectors, split = round_trip(packets)
    assert merged_counts(vectors) == [3] and split == packets


def test_odd_and_truncated_packets_never_raise():
    odd = [b"", b"\x45", bytes([0x45]) + bytes(39), bytes([0x60]) + bytes(59), b"\x60" + bytes(10),
           tcp_packet(b"z" * 10)[:45], bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6]) + bytes(22) + bytes([0xF0]) + bytes(7)]
    vectors = coalesce(odd)
    assert [bytes(vector[1]) for vector in vectors] == odd
