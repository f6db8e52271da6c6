"""Packet helpers shared by unit and namespace tests."""

from __future__ import annotations

import struct


def internet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, for IPv4 headers, ICMP and UDP."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
