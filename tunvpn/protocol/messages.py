"""WireGuard message layouts: types 1-4, little-endian, fixed sizes.

Handshake messages are parsed into small named tuples (slow path).  Transport
messages are never turned into objects: the data path reads their header
with `TRANSPORT_HEADER.unpack_from` directly.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .crypto import KEY_SIZE, MAC_SIZE, TAG_SIZE, XNONCE_SIZE
from .tai64n import TAI64N_SIZE

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

COOKIE_SIZE = 16

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # a keepalive: empty payload

# Bytes covered by mac1 and mac2 for each handshake message.
INITIATION_MAC1_OFFSET = INITIATION_SIZE - 2 * MAC_SIZE
RESPONSE_MAC1_OFFSET = RESPONSE_SIZE - 2 * MAC_SIZE

_INITIATION = struct.Struct(f"<I I {KEY_SIZE}s {KEY_SIZE + TAG_SIZE}s {TAI64N_SIZE + TAG_SIZE}s 16s 16s")
_RESPONSE = struct.Struct(f"<I I I {KEY_SIZE}s {TAG_SIZE}s 16s 16s")
_COOKIE_REPLY = struct.Struct(f"<I I {XNONCE_SIZE}s {COOKIE_SIZE + TAG_SIZE}s")
TRANSPORT_HEADER = struct.Struct("<I I Q")

assert _INITIATION.size == INITIATION_SIZE
assert _RESPONSE.size == RESPONSE_SIZE
assert _COOKIE_REPLY.size == COOKIE_REPLY_SIZE
assert TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE


# Sizes of the bytes fields, checked on pack: struct would silently zero-pad or cut a
# wrong-sized field, and the peer would only report a failed handshake, far from the cause.
_INITIATION_FIELDS = {
    "ephemeral": KEY_SIZE,
    "encrypted_static": KEY_SIZE + TAG_SIZE,
    "encrypted_timestamp": TAI64N_SIZE + TAG_SIZE,
    "mac1": MAC_SIZE,
    "mac2": MAC_SIZE,
}
_RESPONSE_FIELDS = {"ephemeral": KEY_SIZE, "encrypted_nothing": TAG_SIZE, "mac1": MAC_SIZE, "mac2": MAC_SIZE}
_COOKIE_REPLY_FIELDS = {"nonce": XNONCE_SIZE, "encrypted_cookie": COOKIE_SIZE + TAG_SIZE}


def _pack(layout: struct.Struct, msg_type: int, message: tuple, field_sizes: dict[str, int]) -> bytes:
    for name, size in field_sizes.items():
        value = getattr(message, name)
        if len(value) != size:
            raise ValueError(f"{type(message).__name__}.{name} must be {size} bytes, got {len(value)}")
    return layout.pack(msg_type, *message)


class Initiation(NamedTuple):
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)

    def pack(self) -> bytes:
        return _pack(_INITIATION, MESSAGE_INITIATION, self, _INITIATION_FIELDS)

    @classmethod
    def parse(cls, data: bytes) -> Initiation:
        if len(data) != INITIATION_SIZE:
            raise ValueError("an initiation is 148 bytes")
        msg_type, *fields = _INITIATION.unpack(data)
        if msg_type != MESSAGE_INITIATION:
            raise ValueError("not an initiation")
        return cls(*fields)


class Response(NamedTuple):
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = bytes(MAC_SIZE)
    mac2: bytes = bytes(MAC_SIZE)

    def pack(self) -> bytes:
        return _pack(_RESPONSE, MESSAGE_RESPONSE, self, _RESPONSE_FIELDS)

    @classmethod
    def parse(cls, data: bytes) -> Response:
        if len(data) != RESPONSE_SIZE:
            raise ValueError("a response is 92 bytes")
        msg_type, *fields = _RESPONSE.unpack(data)
        if msg_type != MESSAGE_RESPONSE:
            raise ValueError("not a response")
        return cls(*fields)


class CookieReply(NamedTuple):
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _pack(_COOKIE_REPLY, MESSAGE_COOKIE_REPLY, self, _COOKIE_REPLY_FIELDS)

    @classmethod
    def parse(cls, data: bytes) -> CookieReply:
        if len(data) != COOKIE_REPLY_SIZE:
            raise ValueError("a cookie reply is 64 bytes")
        msg_type, *fields = _COOKIE_REPLY.unpack(data)
        if msg_type != MESSAGE_COOKIE_REPLY:
            raise ValueError("not a cookie reply")
        return cls(*fields)


def pack_transport(receiver: int, counter: int, encrypted: bytes) -> bytes:
    return TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, receiver, counter) + encrypted


def parse_transport(data: bytes) -> tuple[int, int, bytes]:
    """(receiver, counter, encrypted payload); for tests and tools, not the data path."""
    if len(data) < TRANSPORT_MIN_SIZE:
        raise ValueError("a transport message is at least 32 bytes")
    msg_type, receiver, counter = TRANSPORT_HEADER.unpack_from(data)
    if msg_type != MESSAGE_TRANSPORT:
        raise ValueError("not a transport message")
    return receiver, counter, data[TRANSPORT_HEADER_SIZE:]


def padded_length(length: int, mtu: int) -> int:
    """Transport payloads are zero-padded to a multiple of 16, never beyond the MTU."""
    padded = (length + 15) & ~15
    if mtu and padded > mtu:
        return max(length, mtu)
    return padded
