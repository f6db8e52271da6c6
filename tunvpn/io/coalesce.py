"""TCP segments of one flow merged into one virtio-net GSO packet for a tun with IFF_VNET_HDR.

Most of what a tun write costs is the receiving kernel's TCP stack, which runs once per
packet written.  A burst of in-order segments of one TCP flow, written as one large packet
with a GSO header, runs it once for the whole burst: the kernel's own GRO does the same for
a network card.  This module is pure (packets in, write vectors out) so the rules below are
tested without a tun.

A segment joins the open burst of its flow only if nothing but its payload and sequence
number could tell it apart from the burst's first segment: same addresses, ports, TOS/traffic
class, TTL/hop limit, DF, acknowledgement, window and TCP options (timestamps included), flags
exactly ACK (PSH allowed, and it ends the burst), the next sequence number, and a payload no
larger than the first one's (a smaller one ends the burst).  Anything else (other protocols,
IPv4 options, fragments, IPv6 extension headers, SYN/FIN/RST/URG/ECE/CWR, pure ACKs) is written
alone, after the bursts of its own flow that came before it, so no flow is reordered.

The inner TCP checksums are not verified, as the peer's AEAD tag already proved the packets
unchanged since it sealed them; the merged packet carries NEEDS_CSUM with the pseudo-header
sum, so wherever the kernel splits it again (forwarding) it computes each segment's checksum.
"""

from __future__ import annotations

import struct
from typing import Iterable, Union

Buffer = Union[bytes, bytearray, memoryview]

VNET_HEADER_SIZE = 10  # struct virtio_net_hdr, the tun's default header size
PLAIN_VNET_HEADER = bytes(VNET_HEADER_SIZE)  # no offload: the kernel checks the packet as it is
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset; legacy virtio is host-endian.
_VNET_HEADER = struct.Struct("=BBHHHH")
_NEEDS_CSUM = 1
_GSO_TCPV4 = 1
_GSO_TCPV6 = 4
_TCP_CHECKSUM_OFFSET = 16
_ACK, _PSH = 0x10, 0x08
_MAX_IP_PAYLOAD = 65535  # IPv4 total length and IPv6 payload length are 16 bits
_IPV4_HEADER_WORDS = struct.Struct("!10H")
_IPV4_ADDRESS_WORDS = struct.Struct("!4H")
_IPV6_ADDRESS_WORDS = struct.Struct("!16H")
_TCP_FIELDS = struct.Struct("!4xIIBBH")  # from the TCP header: seq, ack, data offset byte, flags, window
_IPV6_FIRST_WORD = struct.Struct("!I")  # version, traffic class, flow label


class _Burst:
    """Segments of one flow waiting to be written as one packet, and what a next one must match."""

    __slots__ = ("first", "ip_len", "header_len", "mss", "next_seq", "length", "payloads", "open", "push",
                 "ack", "offset", "window", "marks", "options")

    def __init__(self, packet: bytes, ip_len: int, header_len: int, fields: tuple[int, int, int, int, int],
                 marks: int) -> None:
        seq, self.ack, self.offset, flags, self.window = fields
        self.first = packet
        self.ip_len = ip_len  # 20 for IPv4 (no options), 40 for IPv6 (no extension headers)
        self.header_len = header_len  # IP and TCP headers
        self.marks = marks  # the IP fields that must match, packed into one int (see coalesce)
        self.options = packet[ip_len + 20:header_len]  # TCP options, timestamps included
        self.mss = len(packet) - header_len
        self.next_seq = (seq + self.mss) & 0xFFFFFFFF
        self.length = len(packet) - (ip_len if ip_len == 40 else 0)  # what the IP length field counts
        self.payloads: list[memoryview] = []
        self.push = bool(flags & _PSH)
        self.open = not self.push

    def append(self, packet: bytes, header_len: int, payload: int, flags: int) -> None:
        self.payloads.append(memoryview(packet)[header_len:])
        self.next_seq = (self.next_seq + payload) & 0xFFFFFFFF
        self.length += payload
        if flags & _PSH:
            self.push = True
            self.open = False
        elif payload < self.mss:
            self.open = False

    def vector(self) -> list[Buffer]:
        """The writev vector: the virtio header, the first segment's headers rewritten, payloads."""
        first = self.first
        if not self.payloads:
            return [PLAIN_VNET_HEADER, first]
        ip_len, header_len = self.ip_len, self.header_len
        header = bytearray(first[:header_len])
        if self.push:
            header[ip_len + 13] |= _PSH
        if ip_len == 20:
            struct.pack_into("!H", header, 2, self.length)
            struct.pack_into("!H", header, 10, 0)
            struct.pack_into("!H", header, 10, 0xFFFF - _fold(sum(_IPV4_HEADER_WORDS.unpack_from(header))))
            pseudo = sum(_IPV4_ADDRESS_WORDS.unpack_from(header, 12)) + 6 + self.length - 20
            gso_type = _GSO_TCPV4
        else:
            struct.pack_into("!H", header, 4, self.length)
            pseudo = sum(_IPV6_ADDRESS_WORDS.unpack_from(header, 8)) + 6 + self.length
            gso_type = _GSO_TCPV6
        struct.pack_into("!H", header, ip_len + _TCP_CHECKSUM_OFFSET, _fold(pseudo))
        vnet = _VNET_HEADER.pack(_NEEDS_CSUM, gso_type, header_len, self.mss, ip_len, _TCP_CHECKSUM_OFFSET)
        return [vnet, header, memoryview(first)[header_len:], *self.payloads]


def _fold(total: int) -> int:
    """Ones' complement sum of 16-bit words, folded into 16 bits."""
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def coalesce(packets: Iterable[bytes]) -> list[list[Buffer]]:
    """The writev vectors for a batch of IP packets (each exactly its IP length), bursts merged.

    This runs once per packet received: the TCP header is read with one struct call, and a
    segment is tested against its flow's open burst by comparing integers the burst keeps."""
    out: list[_Burst | bytes] = []
    bursts: dict[bytes, _Burst] = {}  # flow (addresses and ports) -> its open burst
    unpack_tcp = _TCP_FIELDS.unpack_from
    for packet in packets:
        first_byte = packet[0] if packet else 0
        if first_byte == 0x45 and len(packet) >= 40 and packet[9] == 6 and not packet[6] & 0x3F and not packet[7]:
            ip_len, flow = 20, packet[12:24]  # IPv4 without options, not a fragment
            marks = packet[1] << 16 | packet[6] << 8 | packet[8]  # TOS, DF, TTL
        elif first_byte >> 4 == 6 and len(packet) >= 60 and packet[6] == 6:
            ip_len, flow = 40, packet[8:44]  # IPv6, TCP right after the fixed header
            marks = _IPV6_FIRST_WORD.unpack_from(packet)[0] << 8 | packet[7]  # class, flow label, hop limit
        else:
            out.append(packet)
            continue
        fields = unpack_tcp(packet, ip_len)
        seq, ack, offset, flags, window = fields
        header_len = ip_len + (offset >> 4 << 2)
        payload = len(packet) - header_len
        burst = bursts.get(flow)
        if burst is not None:
            # The next segment, alike in all but payload and sequence number (module docstring).
            if (burst.open and seq == burst.next_seq and flags & ~_PSH == _ACK and 0 < payload <= burst.mss
                    and offset == burst.offset and ack == burst.ack and window == burst.window
                    and marks == burst.marks and burst.length + payload <= _MAX_IP_PAYLOAD
                    and packet[ip_len + 20:header_len] == burst.options):
                burst.append(packet, header_len, payload, flags)
                continue
            del bursts[flow]  # the flow's later segments must not be written before this packet
        if flags & ~_PSH == _ACK and header_len >= ip_len + 20 and payload > 0:
            burst = bursts[flow] = _Burst(packet, ip_len, header_len, fields, marks)
            out.append(burst)
        else:
            out.append(packet)
    return [item.vector() if item.__class__ is _Burst else [PLAIN_VNET_HEADER, item] for item in out]
