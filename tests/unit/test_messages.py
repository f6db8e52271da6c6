"""Wire layouts of message types 1-4: exact sizes, offsets, reserved bytes, padding."""

from __future__ import annotations

import os
import struct

import pytest

from tunvpn.protocol.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_MAC1_OFFSET,
    INITIATION_SIZE,
    RESPONSE_MAC1_OFFSET,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_HEADER_SIZE,
    TRANSPORT_MIN_SIZE,
    CookieReply,
    Initiation,
    Response,
    pack_transport,
    padded_length,
    parse_transport,
)


def _initiation() -> Initiation:
    return Initiation(
        sender=0xA1B2C3D4,
        ephemeral=os.urandom(32),
        encrypted_static=os.urandom(48),
        encrypted_timestamp=os.urandom(28),
        mac1=os.urandom(16),
        mac2=os.urandom(16),
    )


def _response() -> Response:
    return Response(
        sender=0x01020304,
        receiver=0xFFFFFFFE,
        ephemeral=os.urandom(32),
        encrypted_nothing=os.urandom(16),
        mac1=os.urandom(16),
        mac2=os.urandom(16),
    )


def _cookie_reply() -> CookieReply:
    return CookieReply(receiver=0x7FFFFFFF, nonce=os.urandom(24), encrypted_cookie=os.urandom(32))


def test_sizes_and_mac_offsets() -> None:
    assert (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE) == (148, 92, 64)
    assert (TRANSPORT_HEADER_SIZE, TRANSPORT_MIN_SIZE) == (16, 32)
    assert (INITIATION_MAC1_OFFSET, RESPONSE_MAC1_OFFSET) == (116, 60)


def test_initiation_layout_and_round_trip() -> None:
    msg = _initiation()
    wire = msg.pack()
    assert len(wire) == 148
    assert wire[0:4] == b"\x01\x00\x00\x00"
    assert wire[4:8] == msg.sender.to_bytes(4, "little")
    assert wire[8:40] == msg.ephemeral
    assert wire[40:88] == msg.encrypted_static
    assert wire[88:116] == msg.encrypted_timestamp
    assert wire[116:132] == msg.mac1
    assert wire[132:148] == msg.mac2
    assert Initiation.parse(wire) == msg


def test_response_layout_and_round_trip() -> None:
    msg = _response()
    wire = msg.pack()
    assert len(wire) == 92
    assert wire[0:4] == b"\x02\x00\x00\x00"
    assert wire[4:8] == msg.sender.to_bytes(4, "little")
    assert wire[8:12] == msg.receiver.to_bytes(4, "little")
    assert wire[12:44] == msg.ephemeral
    assert wire[44:60] == msg.encrypted_nothing
    assert wire[60:76] == msg.mac1
    assert wire[76:92] == msg.mac2
    assert Response.parse(wire) == msg


def test_cookie_reply_layout_and_round_trip() -> None:
    msg = _cookie_reply()
    wire = msg.pack()
    assert len(wire) == 64
    assert wire[0:4] == b"\x03\x00\x00\x00"
    assert wire[4:8] == msg.receiver.to_bytes(4, "little")
    assert wire[8:32] == msg.nonce
    assert wire[32:64] == msg.encrypted_cookie
    assert CookieReply.parse(wire) == msg


def test_handshake_macs_default_to_zero() -> None:
    wire = Initiation(1, bytes(32), bytes(48), bytes(28)).pack()
    assert wire[116:] == bytes(32)
    wire = Response(1, 2, bytes(32), bytes(16)).pack()
    assert wire[60:] == bytes(32)


@pytest.mark.parametrize("payload_length", [0, 16, 1, 1420 + 16, 65535])
def test_transport_layout_and_round_trip(payload_length: int) -> None:
    encrypted = os.urandom(payload_length + 16)
    wire = pack_transport(0xDEADBEEF, 2**64 - 1, encrypted)
    assert len(wire) == 32 + payload_length
    assert wire[0:4] == b"\x04\x00\x00\x00"
    assert wire[4:8] == (0xDEADBEEF).to_bytes(4, "little")
    assert wire[8:16] == (2**64 - 1).to_bytes(8, "little")
    assert wire[16:] == encrypted
    assert parse_transport(wire) == (0xDEADBEEF, 2**64 - 1, encrypted)
    assert TRANSPORT_HEADER.unpack_from(wire) == (4, 0xDEADBEEF, 2**64 - 1)


def test_integer_fields_at_their_limits() -> None:
    for value in (0, 2**32 - 1):
        msg = Response(value, value, bytes(32), bytes(16))
        assert Response.parse(msg.pack()) == msg
    with pytest.raises(struct.error):
        Response(2**32, 0, bytes(32), bytes(16)).pack()
    with pytest.raises(struct.error):
        pack_transport(0, 2**64, bytes(16))


PARSERS = [
    (Initiation.parse, _initiation),
    (Response.parse, _response),
    (CookieReply.parse, _cookie_reply),
    (parse_transport, lambda: pack_transport(9, 9, bytes(16))),
]


def _wire(make) -> bytes:
    made = make()
    return made if isinstance(made, bytes) else made.pack()


@pytest.mark.parametrize(("parse", "make"), PARSERS)
@pytest.mark.parametrize("reserved_position", [1, 2, 3])
def test_nonzero_reserved_bytes_are_rejected(parse, make, reserved_position: int) -> None:
    wire = bytearray(_wire(make))
    parse(bytes(wire))  # the untouched message parses
    for value in (0x01, 0x80, 0xFF):
        wire[reserved_position] = value
        with pytest.raises(ValueError):
            parse(bytes(wire))


@pytest.mark.parametrize(("parse", "make"), PARSERS)
def test_every_other_type_is_rejected(parse, make) -> None:
    wire = bytearray(_wire(make))
    own_type = wire[0]
    for other in (0, 1, 2, 3, 4, 5, 0xFF):
        if other != own_type:
            wire[0] = other
            with pytest.raises(ValueError):
                parse(bytes(wire))


@pytest.mark.parametrize(("parse", "make"), PARSERS[:3])
def test_handshake_messages_of_the_wrong_size_are_rejected(parse, make) -> None:
    wire = _wire(make)
    for length in (0, 4, len(wire) - 1, len(wire) + 1, len(wire) + 16):
        with pytest.raises(ValueError):
            parse((wire + bytes(16))[:length])


def test_transport_shorter_than_a_keepalive_is_rejected() -> None:
    wire = pack_transport(1, 2, bytes(16))
    for length in range(32):
        with pytest.raises(ValueError):
            parse_transport(wire[:length])


@pytest.mark.parametrize(
    ("message", "field", "size"),
    [
        (Initiation(1, bytes(32), bytes(48), bytes(28)), "ephemeral", 32),
        (Initiation(1, bytes(32), bytes(48), bytes(28)), "encrypted_static", 48),
        (Initiation(1, bytes(32), bytes(48), bytes(28)), "encrypted_timestamp", 28),
        (Initiation(1, bytes(32), bytes(48), bytes(28)), "mac1", 16),
        (Initiation(1, bytes(32), bytes(48), bytes(28)), "mac2", 16),
        (Response(1, 2, bytes(32), bytes(16)), "ephemeral", 32),
        (Response(1, 2, bytes(32), bytes(16)), "encrypted_nothing", 16),
        (Response(1, 2, bytes(32), bytes(16)), "mac1", 16),
        (Response(1, 2, bytes(32), bytes(16)), "mac2", 16),
        (CookieReply(1, bytes(24), bytes(32)), "nonce", 24),
        (CookieReply(1, bytes(24), bytes(32)), "encrypted_cookie", 32),
    ],
)
def test_pack_refuses_a_wrong_sized_field(message, field: str, size: int) -> None:
    """struct would zero-pad or cut it silently; pack must say so instead."""
    for wrong in (0, size - 1, size + 1):
        with pytest.raises(ValueError, match=field):
            message._replace(**{field: bytes(wrong)}).pack()


# --- padding -----------------------------------------------------------------------------


def _expected_padded_length(length: int, mtu: int) -> int:
    """Round up to a multiple of 16, capped at the MTU (wireguard-go's calculatePaddingSize);
    a packet already beyond the MTU is left as it is.  MTU 0 means no cap."""
    rounded = -(-length // 16) * 16
    if mtu == 0:
        return rounded
    if length > mtu:
        return length
    return min(rounded, mtu)


@pytest.mark.parametrize("mtu", [1280, 1420, 1500, 1423, 576])
def test_padded_length_exhaustively_up_to_mtu_plus_20(mtu: int) -> None:
    for length in range(0, mtu + 21):
        padded = padded_length(length, mtu)
        assert padded == _expected_padded_length(length, mtu), (length, mtu)
        assert padded >= length
        if length <= mtu:
            assert padded <= mtu
            assert padded % 16 == 0 or padded == mtu
            assert padded - length < 16


def test_padded_length_without_mtu_is_the_next_multiple_of_16() -> None:
    for length in range(0, 2000):
        padded = padded_length(length, 0)
        assert padded % 16 == 0 and 0 <= padded - length < 16


def test_keepalive_stays_empty() -> None:
    assert padded_length(0, 1420) == 0
