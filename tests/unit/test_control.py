"""The control extension codec: wire layout, round trips, what is ignored, what is rejected, limits, fuzz.

Hostile-input tests build their bytes by hand (helpers below), independently of `encode`,
so a wrong encoder cannot hide a wrong decoder.
"""

from __future__ import annotations

import random
import re
import struct
import time
from ipaddress import ip_address, ip_interface, ip_network
from pathlib import Path

import pytest

from tunvpn.protocol.control import (
    CONTROL_MARKER,
    HEADER_SIZE,
    MAX_ADDRESSES,
    MAX_BODY_SIZE,
    MAX_DNS_SERVERS,
    MAX_MESSAGE_SIZE,
    MAX_REASON_BYTES,
    MAX_ROUTES,
    MAX_SEARCH_DOMAIN_BYTES,
    MAX_SEARCH_DOMAINS,
    AttributeType,
    AuthCode,
    AuthMethod,
    AuthState,
    AuthStatus,
    ConfigPush,
    ConfigRefused,
    ConfigRequest,
    ControlError,
    Goodbye,
    MessageType,
    decode,
    encode,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-protocol.md"
UNKNOWN_ATTRIBUTE = 200
FUZZ_SEED = 0x7A01
FUZZ_BUDGET_SECONDS = 20.0


def header(kind: int, body_length: int, request_id: int = 0, version: int = 1, flags: int = 0) -> bytes:
    return struct.pack("!BBBBHH", 0x7A, version, kind, flags, request_id, body_length)


def attr(kind: int, value: bytes) -> bytes:
    return bytes((kind, len(value))) + value


def message(kind: int, *attributes: bytes, request_id: int = 0, version: int = 1, flags: int = 0) -> bytes:
    body = b"".join(attributes)
    return header(kind, len(body), request_id, version, flags) + body


def v4(text: str, prefix: int) -> bytes:
    return ip_address(text).packed + bytes((prefix,))


def v6(text: str, prefix: int) -> bytes:
    return ip_address(text).packed + bytes((prefix,))


def push_v4() -> ConfigPush:
    return ConfigPush(
        request_id=0x1234,
        addresses=[ip_interface("203.0.113.7/24")],
        routes=[ip_network("198.51.100.0/25"), ip_network("198.51.100.128/25")],
        dns=[ip_address("198.51.100.53")],
        search=["office.example"],
        mtu=1420,
        keepalive=25,
    )


def push_v6() -> ConfigPush:
    return ConfigPush(
        request_id=0xFFFF,
        addresses=[ip_interface("2001:db8:100::7/64")],
        routes=[ip_network("2001:db8:50::/64"), ip_network("::/0")],
        dns=[ip_address("2001:db8:50::53")],
        search=["lan.office.example", "example"],
        mtu=1280,
        keepalive=0,
    )


def push_dual() -> ConfigPush:
    return ConfigPush(
        request_id=1,
        addresses=[ip_interface("203.0.113.7/24"), ip_interface("2001:db8:100::7/64")],
        routes=[ip_network("198.51.100.0/24"), ip_network("2001:db8:50::/64"), ip_network("0.0.0.0/0")],
        dns=[ip_address("2001:db8:50::53"), ip_address("198.51.100.53")],
        search=["office.example"],
    )


VALID_MESSAGES = [
    ConfigRequest(0),
    ConfigRequest(0xBEEF),
    push_v4(),
    push_v6(),
    push_dual(),
    ConfigPush(request_id=9),  # everything left to the client's own config
    ConfigRefused(request_id=77, reason="address pool 203.0.113.0/24 exhausted"),
    ConfigRefused(request_id=78),
    Goodbye(reason="server shutting down"),
    Goodbye(reason="au revoir, à bientôt"),
    Goodbye(),
    AuthStatus(5, AuthMethod.TOTP, AuthState.REQUIRED),
    AuthStatus(0, AuthMethod.TOTP, AuthState.AUTHORIZED, 43200, "code accepted"),
    AuthStatus(6, AuthMethod.TOTP, AuthState.RATE_LIMITED, 30),
    AuthCode(6, AuthMethod.TOTP, "287082"),
]


# ---------------------------------------------------------------- layout


def test_golden_push_bytes() -> None:
    wire = bytes.fromhex(
        "7a 01 02 00 0005 0025"  # marker, version 1, CONFIG_PUSH, flags, request id 5, body 37 bytes
        "01 05 cb007107 18"  # ADDRESS 203.0.113.7/24
        "02 05 c6336400 18"  # ROUTE 198.51.100.0/24
        "03 04 c6336435"  # DNS 198.51.100.53
        "07 07 6578616d706c65"  # SEARCH "example"
        "04 02 058c"  # MTU 1420
        "05 02 0019"  # KEEPALIVE 25
    )
    expected = ConfigPush(
        request_id=5,
        addresses=[ip_interface("203.0.113.7/24")],
        routes=[ip_network("198.51.100.0/24")],
        dns=[ip_address("198.51.100.53")],
        search=["example"],
        mtu=1420,
        keepalive=25,
    )
    assert decode(wire) == expected
    assert encode(expected) == wire


def test_golden_request_goodbye_refused_bytes() -> None:
    assert encode(ConfigRequest(0x0102)) == bytes.fromhex("7a01010001020000")
    assert encode(Goodbye("bye")) == bytes.fromhex("7a01030000000005" "0603627965")
    assert encode(ConfigRefused(3, "full")) == bytes.fromhex("7a01040000030006" "060466756c6c")


@pytest.mark.parametrize("msg", VALID_MESSAGES, ids=repr)
def test_round_trip(msg: object) -> None:
    wire = encode(msg)
    assert decode(wire) == msg
    assert len(wire) == HEADER_SIZE + struct.unpack_from("!H", wire, 6)[0]


@pytest.mark.parametrize("msg", VALID_MESSAGES, ids=repr)
def test_zero_padding_after_the_body_is_ignored(msg: object) -> None:
    wire = encode(msg)
    for padding in range(16):
        assert decode(wire + bytes(padding)) == msg
    padded = wire + bytes(-len(wire) % 16)
    assert len(padded) % 16 == 0 and decode(padded) == msg


@pytest.mark.parametrize("msg", VALID_MESSAGES, ids=repr)
def test_first_byte_is_never_ipv4_or_ipv6(msg: object) -> None:
    wire = encode(msg)
    assert wire[0] == CONTROL_MARKER
    assert wire[0] >> 4 not in (4, 6)


def test_goodbye_always_carries_request_id_zero_and_ignores_it_on_receipt() -> None:
    assert encode(Goodbye("x"))[4:6] == b"\x00\x00"
    assert decode(message(3, attr(6, b"x"), request_id=99)) == Goodbye("x")


def test_attribute_order_is_kept() -> None:
    routes = [ip_network("2001:db8:50::/64"), ip_network("198.51.100.0/24"), ip_network("203.0.113.0/24")]
    wire = message(2, *(attr(2, v4(str(r.network_address), r.prefixlen) if r.version == 4 else
                         v6(str(r.network_address), r.prefixlen)) for r in routes))
    assert decode(wire) == ConfigPush(request_id=0, routes=routes)


def test_flags_are_ignored() -> None:
    assert decode(message(1, request_id=4, flags=0xFF)) == ConfigRequest(4)


def test_address_keeps_host_bits_route_must_not_have_them() -> None:
    decoded = decode(message(2, attr(1, v4("203.0.113.9", 24)), attr(1, v6("2001:db8:100::9", 64))))
    assert isinstance(decoded, ConfigPush)
    assert decoded.addresses == [ip_interface("203.0.113.9/24"), ip_interface("2001:db8:100::9/64")]
    with pytest.raises(ControlError, match="host bits"):
        decode(message(2, attr(2, v4("203.0.113.9", 24))))
    with pytest.raises(ControlError, match="host bits"):
        decode(message(2, attr(2, v6("2001:db8:50::1", 64))))


def test_prefix_length_bounds() -> None:
    assert decode(message(2, attr(2, v4("0.0.0.0", 0)), attr(2, v6("::", 0)))) == ConfigPush(
        request_id=0, routes=[ip_network("0.0.0.0/0"), ip_network("::/0")]
    )
    assert decode(message(2, attr(1, v4("203.0.113.9", 32)), attr(1, v6("2001:db8::9", 128)))) is not None
    for value in (v4("203.0.113.9", 33), v6("2001:db8::9", 129), v4("203.0.113.9", 255)):
        for kind in (1, 2):
            with pytest.raises(ControlError, match="prefix length"):
                decode(message(2, attr(kind, value)))


# ---------------------------------------------------------------- what a receiver ignores


@pytest.mark.parametrize("kind", [1, 2, 3, 4])
def test_unknown_attributes_are_skipped(kind: int) -> None:
    unknown = [attr(UNKNOWN_ATTRIBUTE, b""), attr(UNKNOWN_ATTRIBUTE, bytes(255)), attr(0, b"\xff" * 3)]
    known = {
        1: [],
        2: [attr(1, v4("203.0.113.7", 24)), attr(4, b"\x05\x8c")],
        3: [attr(6, b"bye")],
        4: [attr(6, b"no")],
    }[kind]
    mixed = [unknown[0], *known[:1], unknown[1], *known[1:], unknown[2]]
    assert decode(message(kind, *mixed, request_id=8)) == decode(message(kind, *known, request_id=8))
    assert decode(message(kind, *mixed, request_id=8)) is not None


def test_a_request_carries_the_addresses_the_client_holds() -> None:
    held = [ip_interface("203.0.113.7/24"), ip_interface("2001:db8:100::7/64")]
    assert decode(message(1, attr(1, v4("203.0.113.7", 24)), request_id=3)) == ConfigRequest(3, held[:1])
    assert decode(encode(ConfigRequest(4, held))) == ConfigRequest(4, held)
    with pytest.raises(ControlError):
        encode(ConfigRequest(5, held * 3))  # more than MAX_ADDRESSES


def test_unknown_attributes_are_skipped_even_many_of_them() -> None:
    filler = attr(UNKNOWN_ATTRIBUTE, b"")
    assert decode(message(1, *[filler] * (MAX_BODY_SIZE // 2), request_id=2)) == ConfigRequest(2)


def test_attributes_foreign_to_the_type_are_ignored_but_still_validated() -> None:
    assert decode(message(1, attr(4, b"\x05\x8c"), request_id=3)) == ConfigRequest(3)
    assert decode(message(3, attr(4, b"\x05\x8c"), attr(6, b"bye"))) == Goodbye("bye")
    with pytest.raises(ControlError):
        decode(message(1, attr(1, v4("203.0.113.7", 40))))


@pytest.mark.parametrize("kind", [0, 9, 10, 0x7F, 0xFF])
def test_unknown_message_type_is_ignored(kind: int) -> None:
    assert decode(message(kind, attr(1, b"anything at all"), request_id=1)) is None


@pytest.mark.parametrize("version", [0, 2, 3, 0xFF])
def test_other_versions_are_ignored_whatever_follows(version: int) -> None:
    assert decode(message(2, attr(1, v4("203.0.113.7", 24)), version=version)) is None
    assert decode(bytes((0x7A, version))) is None  # a different version may have a different header
    assert decode(bytes((0x7A, version)) + b"\xff" * 2000) is None


def test_unknown_type_still_needs_a_sound_frame() -> None:
    with pytest.raises(ControlError, match="truncated body"):
        decode(header(9, 10))
    with pytest.raises(ControlError, match="body length"):
        decode(header(9, MAX_BODY_SIZE + 1) + bytes(MAX_BODY_SIZE + 1))


# ---------------------------------------------------------------- malformed input


def test_truncated_header() -> None:
    for length in range(HEADER_SIZE):
        with pytest.raises(ControlError, match="truncated header"):
            decode(header(1, 0)[:length])


def test_not_a_control_message() -> None:
    with pytest.raises(ControlError, match="marker"):
        decode(b"\x45" + bytes(19))  # an IPv4 header
    with pytest.raises(ControlError, match="marker"):
        decode(b"\x00" + header(1, 0)[1:])


def test_truncated_body_and_attributes() -> None:
    with pytest.raises(ControlError, match="truncated body"):
        decode(header(2, 5) + attr(3, b"\x01\x02"))
    with pytest.raises(ControlError, match="truncated attribute header"):
        decode(message(2, attr(3, ip_address("198.51.100.53").packed), b"\x03"))
    with pytest.raises(ControlError, match="overruns"):
        decode(message(2, b"\x03\x10" + bytes(4)))


def test_padding_does_not_count_as_body() -> None:
    """The body ends where the length field says, even if zero bytes follow that could parse."""
    wire = header(2, 2) + attr(1, b"") + bytes(30)
    with pytest.raises(ControlError, match="ADDRESS attribute of 0 bytes"):
        decode(wire)
    assert decode(header(1, 0) + b"\x01\x05" + bytes(10)) == ConfigRequest(0)


@pytest.mark.parametrize(
    ("kind", "sizes"),
    [(1, [0, 4, 6, 16, 18]), (2, [0, 4, 6, 16, 18]), (3, [0, 3, 5, 15, 17]), (4, [0, 1, 3]), (5, [0, 1, 3])],
)
def test_bad_attribute_lengths(kind: int, sizes: list[int]) -> None:
    for size in sizes:
        with pytest.raises(ControlError, match=f"of {size} bytes"):
            decode(message(2, attr(kind, bytes(size))))


@pytest.mark.parametrize("kind", [6, 7])
def test_bad_utf8(kind: int) -> None:
    for raw in (b"\xff", b"abc\xc3", b"\xed\xa0\x80", b"\xc0\xaf"):
        with pytest.raises(ControlError, match="UTF-8"):
            decode(message(4, attr(kind, raw)))


def test_text_must_be_printable_single_line() -> None:
    for reason in ("line one\nline two", "bell\x07", "tab\there", "del\x7f"):
        with pytest.raises(ControlError, match="control characters"):
            decode(message(3, attr(6, reason.encode())))
        with pytest.raises(ControlError, match="control characters"):
            encode(Goodbye(reason))


@pytest.mark.parametrize(
    "domain",
    ["", ".", "example..", ".example", "a..b", "has space.example", "evil.example\nnameserver 192.0.2.66",
     "semi;colon", "x" * 64 + ".example", "tab\t.example", "example.\n"],
)
def test_search_domain_must_be_a_dns_name(domain: str) -> None:
    with pytest.raises(ControlError, match="not a DNS name"):
        decode(message(2, attr(7, domain.encode())))
    with pytest.raises(ControlError, match="not a DNS name"):
        encode(ConfigPush(request_id=1, search=[domain]))


def test_search_domain_accepts_labels_hyphens_underscores_and_utf8() -> None:
    domains = ["a", "x" * 63 + ".example", "_sip._udp.example", "my-office.example", "office.example.",
               "bücher.example", "xn--bcher-kva.example"]
    assert decode(encode(ConfigPush(request_id=1, search=domains))) == ConfigPush(request_id=1, search=domains)


def test_mtu_must_be_usable() -> None:
    for mtu in (0, 1, 67):
        with pytest.raises(ControlError, match="MTU"):
            decode(message(2, attr(4, mtu.to_bytes(2, "big"))))
        with pytest.raises(ControlError, match="MTU"):
            encode(ConfigPush(request_id=1, mtu=mtu))
    for mtu in (68, 1280, 65535):
        assert decode(message(2, attr(4, mtu.to_bytes(2, "big")))) == ConfigPush(request_id=0, mtu=mtu)


def test_keepalive_range() -> None:
    for seconds in (0, 1, 65535):
        push = ConfigPush(request_id=1, keepalive=seconds)
        assert decode(encode(push)) == push
    for seconds in (-1, 65536):
        with pytest.raises(ControlError, match="keepalive"):
            encode(ConfigPush(request_id=1, keepalive=seconds))


@pytest.mark.parametrize(("kind", "value"), [(4, b"\x05\x8c"), (5, b"\x00\x19"), (6, b"why")])
def test_single_valued_attributes_may_not_repeat(kind: int, value: bytes) -> None:
    assert decode(message(2, attr(kind, value))) is not None
    with pytest.raises(ControlError, match="too many"):
        decode(message(2, attr(kind, value), attr(kind, value)))


def test_request_id_range_on_encode() -> None:
    assert decode(encode(ConfigRequest(0xFFFF))) == ConfigRequest(0xFFFF)
    for request_id in (-1, 0x10000):
        with pytest.raises(ControlError, match="request id"):
            encode(ConfigRequest(request_id))
        with pytest.raises(ControlError, match="request id"):
            encode(ConfigPush(request_id))


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(TypeError):
        encode(b"\x7a\x01")  # type: ignore[arg-type]


# ---------------------------------------------------------------- limits


def _many_routes(count: int) -> list:
    """Distinct IPv4 /30 networks: 64 fit in 198.51.100.0/24, the rest go to 203.0.113.0/24."""
    return [ip_network(f"198.51.100.{i * 4}/30") if i < 64 else ip_network(f"203.0.113.{(i - 64) * 4}/30")
            for i in range(count)]


# ConfigPush field: (attribute type, limit, value objects for n attributes, their attribute value bytes)
LIMIT_CASES = {
    "addresses": (1, MAX_ADDRESSES, lambda n: [ip_interface(f"203.0.113.{i + 1}/24") for i in range(n)],
                  lambda o: o.ip.packed + bytes((o.network.prefixlen,))),
    "routes": (2, MAX_ROUTES, _many_routes, lambda o: o.network_address.packed + bytes((o.prefixlen,))),
    "dns": (3, MAX_DNS_SERVERS, lambda n: [ip_address(f"198.51.100.{i + 1}") for i in range(n)], lambda o: o.packed),
    "search": (7, MAX_SEARCH_DOMAINS, lambda n: [f"s{i}.example" for i in range(n)], lambda o: o.encode()),
}


@pytest.mark.parametrize(("field_name", "spec_limit"), [("addresses", 4), ("routes", 64), ("dns", 8), ("search", 8)])
def test_count_limits(field_name: str, spec_limit: int) -> None:
    kind, limit, objects, value_of = LIMIT_CASES[field_name]
    assert limit == spec_limit
    at_limit = ConfigPush(request_id=1, **{field_name: objects(limit)})
    assert decode(encode(at_limit)) == at_limit
    with pytest.raises(ControlError, match="too many"):
        encode(ConfigPush(request_id=1, **{field_name: objects(limit + 1)}))
    # Decoder side, built by hand: one attribute more than the limit.
    hostile = message(2, *(attr(kind, value_of(o)) for o in objects(limit + 1)))
    assert len(hostile) <= MAX_MESSAGE_SIZE  # the count, not the size, is what breaks
    with pytest.raises(ControlError, match=f"too many .*: {limit + 1} > {limit}"):
        decode(hostile)


def test_count_limits_hold_with_unknown_attributes_in_between() -> None:
    dns = [attr(3, ip_address(f"198.51.100.{i + 1}").packed) + attr(UNKNOWN_ATTRIBUTE, b"") for i in range(9)]
    with pytest.raises(ControlError, match="too many DNS servers: 9 > 8"):
        decode(message(2, *dns))


def test_reason_length_limit() -> None:
    assert MAX_REASON_BYTES == 200
    at_limit = "é" * 100  # 200 bytes of UTF-8
    assert decode(encode(ConfigRefused(1, at_limit))) == ConfigRefused(1, at_limit)
    assert decode(message(3, attr(6, b"r" * 200))) == Goodbye("r" * 200)
    with pytest.raises(ControlError, match="201 bytes > 200"):
        encode(Goodbye("é" * 100 + "!"))
    with pytest.raises(ControlError, match="201 bytes > 200"):
        decode(message(4, attr(6, b"r" * 201), request_id=1))


def test_search_domain_length_limit() -> None:
    assert MAX_SEARCH_DOMAIN_BYTES == 253
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    assert decode(encode(ConfigPush(request_id=1, search=[longest]))) == ConfigPush(request_id=1, search=[longest])
    too_long = longest + "d"
    with pytest.raises(ControlError, match="254 bytes > 253"):
        encode(ConfigPush(request_id=1, search=[too_long]))
    with pytest.raises(ControlError, match="254 bytes > 253"):
        decode(message(2, attr(7, too_long.encode())))


def _body_of_exactly(size: int) -> bytes:
    """Unknown attributes adding up to exactly `size` bytes."""
    chunks = []
    while size > 0:
        value = min(size - 2, 255)
        if size - (value + 2) == 1:  # never leave a single byte: it cannot be an attribute
            value -= 1
        chunks.append(attr(UNKNOWN_ATTRIBUTE, bytes(value)))
        size -= value + 2
    return b"".join(chunks)


def test_body_length_limit() -> None:
    assert (MAX_MESSAGE_SIZE, MAX_BODY_SIZE) == (1024, 1016)
    body = _body_of_exactly(MAX_BODY_SIZE)
    assert len(body) == 1016
    assert decode(header(1, len(body), request_id=6) + body) == ConfigRequest(6)
    bigger = _body_of_exactly(MAX_BODY_SIZE + 1)
    with pytest.raises(ControlError, match="body length 1017 > 1016"):
        decode(header(1, len(bigger)) + bigger)
    with pytest.raises(ControlError, match="body length 65535 > 1016"):
        decode(header(1, 0xFFFF) + bytes(0xFFFF))


def test_largest_push_that_fits_all_count_limits() -> None:
    """Every count limit reached at once, with IPv4 routes and IPv6 everything else, still fits."""
    push = ConfigPush(
        request_id=0xFFFF,
        addresses=[ip_interface(f"2001:db8:100::{i + 1}/64") for i in range(MAX_ADDRESSES)],
        routes=_many_routes(MAX_ROUTES),
        dns=[ip_address(f"2001:db8:50::{i + 1}") for i in range(MAX_DNS_SERVERS)],
        search=[f"s{i}.example" for i in range(MAX_SEARCH_DOMAINS - 1)] + ["x" * 63 + "." + "y" * 62],
        mtu=1420,
        keepalive=25,
    )
    wire = encode(push)
    assert len(wire) <= MAX_MESSAGE_SIZE
    assert len(wire) + (-len(wire) % 16) <= MAX_MESSAGE_SIZE  # padded, too
    assert decode(wire) == push


def test_count_limits_together_can_exceed_the_size_limit_and_encode_says_so() -> None:
    """64 IPv6 routes take 64 * 19 = 1216 bytes: the count limit allows what the size limit forbids."""
    routes = [ip_network(f"2001:db8:{i:x}::/48") for i in range(MAX_ROUTES)]
    with pytest.raises(ControlError, match="body is 1216 bytes > 1016"):
        encode(ConfigPush(request_id=1, routes=routes))


def test_size_envelope_stated_in_the_document() -> None:
    """With 4 IPv6 addresses, 8 IPv6 DNS servers, MTU and keepalive, 41 IPv6 routes fit and 42 do not."""
    def push(route_count: int) -> ConfigPush:
        return ConfigPush(
            request_id=1,
            addresses=[ip_interface(f"2001:db8:100::{i + 1}/64") for i in range(MAX_ADDRESSES)],
            routes=[ip_network(f"2001:db8:{i:x}::/48") for i in range(route_count)],
            dns=[ip_address(f"2001:db8:50::{i + 1}") for i in range(MAX_DNS_SERVERS)],
            mtu=1420,
            keepalive=25,
        )

    assert len(encode(push(41))) == HEADER_SIZE + 4 * 19 + 41 * 19 + 8 * 18 + 2 * 4 <= MAX_MESSAGE_SIZE
    with pytest.raises(ControlError, match="body is"):
        encode(push(42))


def test_random_pushes_fit_or_are_refused_by_encode() -> None:
    rng = random.Random(FUZZ_SEED)
    for _ in range(300):
        push = ConfigPush(
            request_id=rng.randrange(0x10000),
            addresses=[ip_interface(f"2001:db8:100::{i + 1}/64") for i in range(rng.randint(0, MAX_ADDRESSES))],
            routes=[ip_network(f"2001:db8:{i:x}::/48") if rng.random() < 0.5 else ip_network(f"198.51.100.{i}/32")
                    for i in range(rng.randint(0, MAX_ROUTES))],
            dns=[ip_address(f"198.51.100.{i + 1}") for i in range(rng.randint(0, MAX_DNS_SERVERS))],
            search=["z" * rng.randint(1, 63) for _ in range(rng.randint(0, MAX_SEARCH_DOMAINS))],
            mtu=rng.choice([None, 1420]),
            keepalive=rng.choice([None, 0, 25]),
        )
        body_size = (
            sum(2 + len(a.ip.packed) + 1 for a in push.addresses)
            + sum(2 + len(r.network_address.packed) + 1 for r in push.routes)
            + sum(2 + len(d.packed) for d in push.dns)
            + sum(2 + len(s) for s in push.search)
            + (4 if push.mtu is not None else 0)
            + (4 if push.keepalive is not None else 0)
        )
        if body_size <= MAX_BODY_SIZE:
            wire = encode(push)
            assert len(wire) == HEADER_SIZE + body_size <= MAX_MESSAGE_SIZE
            assert decode(wire) == push
        else:
            with pytest.raises(ControlError, match="body is"):
                encode(push)


# ---------------------------------------------------------------- fuzz


def _check_decode_contract(data: bytes) -> None:
    """decode returns a message or None, or raises ControlError; a decoded message re-encodes."""
    try:
        decoded = decode(data)
    except ControlError as error:
        assert "\n" not in str(error) and str(error)
        return
    if decoded is None:
        return
    again = decode(encode(decoded))
    assert again == decoded


def test_every_truncation_of_valid_messages_is_rejected() -> None:
    for msg in VALID_MESSAGES:
        wire = encode(msg)
        for length in range(len(wire)):
            with pytest.raises(ControlError):
                decode(wire[:length])


def _random_attribute(rng: random.Random) -> bytes:
    kind = rng.choice([1, 2, 3, 4, 5, 6, 7, 0, UNKNOWN_ATTRIBUTE])
    length = rng.choice([0, 1, 2, 4, 5, 16, 17, rng.randrange(256)])
    value = bytes(rng.randrange(256) for _ in range(length))
    if kind in (1, 2) and length in (5, 17) and rng.random() < 0.7:
        value = value[:-1] + bytes((rng.randrange(0, 8 * (length - 1) + 2),))
    if kind in (6, 7) and rng.random() < 0.5:
        value = rng.choice([b"example", b"a.b", "ü.example".encode(), b"x" * length])[:255]
    return attr(kind, value)


def test_fuzz_decode_never_raises_anything_but_control_error() -> None:
    rng = random.Random(FUZZ_SEED)
    deadline = time.monotonic() + FUZZ_BUDGET_SECONDS
    corpus = [encode(msg) for msg in VALID_MESSAGES]
    outcomes = {"message": 0, "ignored": 0, "rejected": 0}
    for round_number in range(6000):
        assert time.monotonic() < deadline, f"fuzzing too slow: {round_number} rounds in {FUZZ_BUDGET_SECONDS} s"
        style = round_number % 3
        if style == 0:  # raw noise, sometimes behind a valid marker/version
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
            if rng.random() < 0.5:
                data = b"\x7a\x01" + data
        elif style == 1:  # mutated valid messages
            data = bytearray(rng.choice(corpus) + bytes(rng.randrange(16)))
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        else:  # well-framed bodies of random attributes
            body = b"".join(_random_attribute(rng) for _ in range(rng.randint(0, 12)))[:MAX_BODY_SIZE]
            data = header(rng.randint(1, 5), len(body), rng.randrange(0x10000)) + body
        try:
            result = decode(data)
        except ControlError:
            outcomes["rejected"] += 1
        else:
            outcomes["ignored" if result is None else "message"] += 1
        _check_decode_contract(data)
    # The fuzzer must reach every outcome, or it is not exploring the decoder.
    assert all(count > 100 for count in outcomes.values()), outcomes


# ---------------------------------------------------------------- the second factor's messages


def test_golden_auth_bytes() -> None:
    assert encode(AuthCode(3, AuthMethod.TOTP, "287082")) == message(
        6, attr(8, b"\x01"), attr(11, b"287082"), request_id=3)
    assert encode(AuthStatus(3, AuthMethod.TOTP, AuthState.AUTHORIZED, 43200)) == message(
        5, attr(8, b"\x01"), attr(9, b"\x00"), attr(10, (43200).to_bytes(4, "big")), request_id=3)


@pytest.mark.parametrize("body", [
    [attr(9, b"\x01")],  # no method
    [attr(8, b"\x01")],  # no state
    [attr(8, b"\x01"), attr(9, b"\x05")],  # a state version 1 does not have
    [attr(8, b"\x01\x00"), attr(9, b"\x01")],
    [attr(8, b"\x01"), attr(9, b"\x01"), attr(10, b"\x00\x01")],
    [attr(8, b"\x01"), attr(9, b"\x01"), attr(9, b"\x01")],
])
def test_a_bad_auth_status_is_rejected(body: list[bytes]) -> None:
    with pytest.raises(ControlError):
        decode(message(5, *body, request_id=1))


@pytest.mark.parametrize("code", [b"", b"12 34", b"12\n34", "123é".encode(), b"1" * 65, b"\xff"])
def test_a_code_must_be_short_printable_ascii(code: bytes) -> None:
    with pytest.raises(ControlError):
        decode(message(6, attr(8, b"\x01"), attr(11, code), request_id=1))


def test_a_code_needs_a_method_and_a_code() -> None:
    for body in ([attr(11, b"123456")], [attr(8, b"\x01")]):
        with pytest.raises(ControlError):
            decode(message(6, *body, request_id=1))
    with pytest.raises(ControlError):
        encode(AuthCode(1, AuthMethod.TOTP, "12 34"))


def test_an_unknown_method_is_the_receivers_business() -> None:
    assert decode(encode(AuthCode(1, 77, "token"))) == AuthCode(1, 77, "token")


# ---------------------------------------------------------------- the document matches the code


def test_document_tables_match_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*`?([A-Z_]+)`?\s*\|", text, flags=re.MULTILINE)
    documented = {(int(number), name) for number, name in rows}
    assert {(t.value, t.name) for t in MessageType} <= documented
    assert {(t.value, t.name) for t in AttributeType} <= documented
    for constant in ("0x7A", "1024", "1016", "64", "200", "253"):
        assert constant in text
