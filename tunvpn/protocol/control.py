"""tunvpn's control extension, carried inside authenticated transport messages.

A control message starts with CONTROL_MARKER, whose high nibble (7) is
neither 4 nor 6, so a stock WireGuard peer drops it as "not an IP packet".

This module is the pure codec: `encode` turns a message object into bytes
(the WireGuard layer adds the zero padding), `decode` turns a decrypted
transport payload back into one.  `decode` returns None for what a receiver
must ignore (another version, an unknown message type) and raises
ControlError, never anything else, for malformed input.  The wire format and
the rules around it are in docs/control-protocol.md.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

CONTROL_MARKER = 0x7A
CONTROL_VERSION = 1

HEADER = struct.Struct("!BBBBHH")  # marker, version, type, flags, request id, body length
HEADER_SIZE = HEADER.size
MAX_MESSAGE_SIZE = 1024  # with padding and the 32-byte transport overhead it fits a 1280-byte IPv6 path
MAX_BODY_SIZE = MAX_MESSAGE_SIZE - HEADER_SIZE
MAX_REQUEST_ID = 0xFFFF

MAX_ADDRESSES = 4
MAX_ROUTES = 64
MAX_DNS_SERVERS = 8
MAX_SEARCH_DOMAINS = 8
MAX_REASON_BYTES = 200
MAX_SEARCH_DOMAIN_BYTES = 253  # the longest DNS name in text form
MAX_LABEL_BYTES = 63
MIN_MTU = 68  # the smallest MTU IPv4 allows (RFC 791); Linux refuses less
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFFFFFF
MAX_CODE_BYTES = 64

Interface = IPv4Interface | IPv6Interface
Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

_LABEL = re.compile(r"[\w-]+")  # letters and digits (any script), '-' and '_'
_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
KEY_BYTES = 32


class ControlError(ValueError):
    """A control message that is malformed or breaks a limit; the message is rejected whole."""


class MessageType(IntEnum):
    CONFIG_REQUEST = 1
    CONFIG_PUSH = 2
    GOODBYE = 3
    CONFIG_REFUSED = 4
    AUTH_STATUS = 5
    AUTH_CODE = 6
    ENROLL_REQUEST = 7
    ENROLL_ANSWER = 8


class AttributeType(IntEnum):
    ADDRESS = 1
    ROUTE = 2
    DNS = 3
    MTU = 4
    KEEPALIVE = 5
    REASON = 6
    SEARCH = 7
    AUTH_METHOD = 8
    AUTH_STATE = 9
    SECONDS = 10
    CODE = 11
    PUBLIC_KEY = 12
    PRESHARED_KEY = 13
    ENROLL_STATE = 14
    NAME = 15


class AuthMethod(IntEnum):
    """What a peer must present before its traffic may pass (more may come, e.g. invitations)."""

    TOTP = 1


class AuthState(IntEnum):
    AUTHORIZED = 0  # SECONDS: left until the authorization ends
    REQUIRED = 1  # traffic is held back until a code is accepted
    REFUSED = 2  # the code was wrong or already used
    RATE_LIMITED = 3  # too many guesses; SECONDS: until the next is taken
    NOT_REQUIRED = 4  # this peer needs nothing of the kind


class EnrollState(IntEnum):
    ACCEPTED = 0  # the key is a peer of the server now; NAME: what the server calls it
    REFUSED = 1  # REASON says why (the invite is used up or expired, the key is taken)
    RATE_LIMITED = 2  # too many enrollments; SECONDS: until the next is taken


@dataclass(frozen=True, slots=True)
class ConfigRequest:
    """Client -> server: "tell me my configuration"; retries reuse the request id.

    addresses: what the client holds from an earlier push, so a server that lost its leases
    (a damaged state file) can give each client its own address back, whoever asks first.
    """

    request_id: int
    addresses: list[Interface] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConfigPush:
    """Server -> client: the client's configuration, answering the request with this id.

    mtu and keepalive are None when the server does not set them; keepalive 0 means off.
    """

    request_id: int
    addresses: list[Interface] = field(default_factory=list)
    routes: list[Network] = field(default_factory=list)
    dns: list[Address] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    mtu: int | None = None
    keepalive: int | None = None


@dataclass(frozen=True, slots=True)
class ConfigRefused:
    """Server -> client: no configuration for you (e.g. the pool is exhausted)."""

    request_id: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either way: the sender is shutting down, so its sessions can be dropped now."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class AuthStatus:
    """Server -> client: where the client stands with `method`, answering the request with this id
    (a config request or an AuthCode), or 0 when the state changed on its own (a session ended)."""

    request_id: int
    method: int
    state: AuthState
    seconds: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AuthCode:
    """Client -> server: a code for `method` (for TOTP six digits); answered by an AuthStatus."""

    request_id: int
    method: int
    code: str


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """Client -> server, from an invite's key only: "make this key a peer"; answered by an
    EnrollAnswer.  The preshared key is the client's own, for the peer it becomes."""

    request_id: int
    public_key: bytes
    preshared_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EnrollAnswer:
    """Server -> client: the verdict on the EnrollRequest with this id."""

    request_id: int
    state: EnrollState
    name: str = ""
    seconds: int | None = None
    reason: str = ""


ControlMessage = ConfigRequest | ConfigPush | ConfigRefused | Goodbye | AuthStatus | AuthCode | EnrollRequest | EnrollAnswer

_MESSAGE_TYPES = frozenset(MessageType)

_ATTRIBUTE_LIMITS = {
    AttributeType.ADDRESS: MAX_ADDRESSES,
    AttributeType.ROUTE: MAX_ROUTES,
    AttributeType.DNS: MAX_DNS_SERVERS,
    AttributeType.SEARCH: MAX_SEARCH_DOMAINS,
    AttributeType.MTU: 1,
    AttributeType.KEEPALIVE: 1,
    AttributeType.REASON: 1,
    AttributeType.AUTH_METHOD: 1,
    AttributeType.AUTH_STATE: 1,
    AttributeType.SECONDS: 1,
    AttributeType.CODE: 1,
    AttributeType.PUBLIC_KEY: 1,
    AttributeType.PRESHARED_KEY: 1,
    AttributeType.ENROLL_STATE: 1,
    AttributeType.NAME: 1,
}
_LIMIT_NAMES = {
    AttributeType.ADDRESS: "addresses",
    AttributeType.ROUTE: "routes",
    AttributeType.DNS: "DNS servers",
    AttributeType.SEARCH: "search domains",
    AttributeType.MTU: "MTU attributes",
    AttributeType.KEEPALIVE: "KEEPALIVE attributes",
    AttributeType.REASON: "REASON attributes",
    AttributeType.AUTH_METHOD: "AUTH_METHOD attributes",
    AttributeType.AUTH_STATE: "AUTH_STATE attributes",
    AttributeType.SECONDS: "SECONDS attributes",
    AttributeType.CODE: "CODE attributes",
    AttributeType.PUBLIC_KEY: "PUBLIC_KEY attributes",
    AttributeType.PRESHARED_KEY: "PRESHARED_KEY attributes",
    AttributeType.ENROLL_STATE: "ENROLL_STATE attributes",
    AttributeType.NAME: "NAME attributes",
}


# ---------------------------------------------------------------- validation shared by both directions


def _check_count(kind: AttributeType, count: int) -> None:
    limit = _ATTRIBUTE_LIMITS[kind]
    if count > limit:
        raise ControlError(f"too many {_LIMIT_NAMES[kind]}: {count} > {limit}")


def _check_mtu(mtu: int) -> None:
    if not MIN_MTU <= mtu <= MAX_U16:
        raise ControlError(f"MTU {mtu} outside {MIN_MTU}..{MAX_U16}")


def _check_keepalive(keepalive: int) -> None:
    if not 0 <= keepalive <= MAX_U16:
        raise ControlError(f"keepalive {keepalive} outside 0..{MAX_U16}")


def _check_reason(reason: str) -> bytes:
    """Reasons end up in log lines, so they must be one line of printable text."""
    if not reason.isprintable():
        raise ControlError("reason contains control characters")
    encoded = reason.encode()
    if len(encoded) > MAX_REASON_BYTES:
        raise ControlError(f"reason is {len(encoded)} bytes > {MAX_REASON_BYTES}")
    return encoded


def _check_search_domain(domain: str) -> bytes:
    """Search domains end up in resolv.conf, so nothing but DNS labels may pass."""
    encoded = domain.encode()
    if len(encoded) > MAX_SEARCH_DOMAIN_BYTES:
        raise ControlError(f"search domain is {len(encoded)} bytes > {MAX_SEARCH_DOMAIN_BYTES}")
    name = domain[:-1] if domain.endswith(".") else domain  # "example." is the same name as "example"
    for label in name.split("."):
        if not _LABEL.fullmatch(label) or len(label.encode()) > MAX_LABEL_BYTES:
            raise ControlError(f"search domain {domain!r} is not a DNS name")
    return encoded


def _check_code(code: str) -> bytes:
    """Codes may reach a log line when refused: printable ASCII without spaces only."""
    if not code or not code.isascii() or not code.isprintable() or " " in code:
        raise ControlError("code is not 1 or more printable ASCII characters without spaces")
    encoded = code.encode("ascii")
    if len(encoded) > MAX_CODE_BYTES:
        raise ControlError(f"code is {len(encoded)} bytes > {MAX_CODE_BYTES}")
    return encoded


def _check_key(key: bytes, what: str) -> bytes:
    if len(key) != KEY_BYTES:
        raise ControlError(f"{what} of {len(key)} bytes (must be {KEY_BYTES})")
    return key


def _check_name(name: str) -> bytes:
    """Peer names end up in file names and log lines: a config name's characters only."""
    if not _PEER_NAME.fullmatch(name):
        raise ControlError("name is not 1-64 letters, digits and . _ @ + -, starting with a letter or digit")
    return name.encode("ascii")


def _check_u8(value: int, what: str) -> None:
    if not 0 <= value <= 0xFF:
        raise ControlError(f"{what} {value} outside 0..255")


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ControlError(f"{what} is not valid UTF-8") from None


# ---------------------------------------------------------------- encoding


def _attribute(kind: AttributeType, value: bytes) -> bytes:
    return bytes((kind, len(value))) + value


def _prefixed(kind: AttributeType, address: Interface | Network) -> bytes:
    """ADDRESS and ROUTE: the packed address followed by the prefix length."""
    if isinstance(address, (IPv4Interface, IPv6Interface)):
        packed, prefix = address.ip.packed, address.network.prefixlen
    else:
        packed, prefix = address.network_address.packed, address.prefixlen
    return _attribute(kind, packed + bytes((prefix,)))


def _push_body(push: ConfigPush) -> list[bytes]:
    _check_count(AttributeType.ADDRESS, len(push.addresses))
    _check_count(AttributeType.ROUTE, len(push.routes))
    _check_count(AttributeType.DNS, len(push.dns))
    _check_count(AttributeType.SEARCH, len(push.search))
    parts = [_prefixed(AttributeType.ADDRESS, address) for address in push.addresses]
    parts += [_prefixed(AttributeType.ROUTE, route) for route in push.routes]
    parts += [_attribute(AttributeType.DNS, server.packed) for server in push.dns]
    parts += [_attribute(AttributeType.SEARCH, _check_search_domain(domain)) for domain in push.search]
    if push.mtu is not None:
        _check_mtu(push.mtu)
        parts.append(_attribute(AttributeType.MTU, push.mtu.to_bytes(2, "big")))
    if push.keepalive is not None:
        _check_keepalive(push.keepalive)
        parts.append(_attribute(AttributeType.KEEPALIVE, push.keepalive.to_bytes(2, "big")))
    return parts


def _reason_body(reason: str) -> list[bytes]:
    encoded = _check_reason(reason)
    return [_attribute(AttributeType.REASON, encoded)] if encoded else []


def _auth_status_body(status: AuthStatus) -> list[bytes]:
    _check_u8(status.method, "auth method")
    parts = [_attribute(AttributeType.AUTH_METHOD, bytes((status.method,))),
             _attribute(AttributeType.AUTH_STATE, bytes((AuthState(status.state),)))]
    if status.seconds is not None:
        if not 0 <= status.seconds <= MAX_U32:
            raise ControlError(f"seconds {status.seconds} outside 0..{MAX_U32}")
        parts.append(_attribute(AttributeType.SECONDS, status.seconds.to_bytes(4, "big")))
    return parts + _reason_body(status.reason)


def _auth_code_body(code: AuthCode) -> list[bytes]:
    _check_u8(code.method, "auth method")
    return [_attribute(AttributeType.AUTH_METHOD, bytes((code.method,))),
            _attribute(AttributeType.CODE, _check_code(code.code))]


def _enroll_request_body(request: EnrollRequest) -> list[bytes]:
    return [_attribute(AttributeType.PUBLIC_KEY, _check_key(request.public_key, "public key")),
            _attribute(AttributeType.PRESHARED_KEY, _check_key(request.preshared_key, "preshared key"))]


def _enroll_answer_body(answer: EnrollAnswer) -> list[bytes]:
    parts = [_attribute(AttributeType.ENROLL_STATE, bytes((EnrollState(answer.state),)))]
    if answer.name:
        parts.append(_attribute(AttributeType.NAME, _check_name(answer.name)))
    if answer.seconds is not None:
        if not 0 <= answer.seconds <= MAX_U32:
            raise ControlError(f"seconds {answer.seconds} outside 0..{MAX_U32}")
        parts.append(_attribute(AttributeType.SECONDS, answer.seconds.to_bytes(4, "big")))
    return parts + _reason_body(answer.reason)


def encode(message: ControlMessage) -> bytes:
    """The message's bytes, unpadded; ControlError if it breaks a limit (decode would reject it)."""
    if isinstance(message, ConfigRequest):
        _check_count(AttributeType.ADDRESS, len(message.addresses))
        parts = [_prefixed(AttributeType.ADDRESS, address) for address in message.addresses]
        kind, request_id = MessageType.CONFIG_REQUEST, message.request_id
    elif isinstance(message, ConfigPush):
        kind, request_id, parts = MessageType.CONFIG_PUSH, message.request_id, _push_body(message)
    elif isinstance(message, ConfigRefused):
        kind, request_id, parts = MessageType.CONFIG_REFUSED, message.request_id, _reason_body(message.reason)
    elif isinstance(message, Goodbye):
        kind, request_id, parts = MessageType.GOODBYE, 0, _reason_body(message.reason)
    elif isinstance(message, AuthStatus):
        kind, request_id, parts = MessageType.AUTH_STATUS, message.request_id, _auth_status_body(message)
    elif isinstance(message, AuthCode):
        kind, request_id, parts = MessageType.AUTH_CODE, message.request_id, _auth_code_body(message)
    elif isinstance(message, EnrollRequest):
        kind, request_id, parts = MessageType.ENROLL_REQUEST, message.request_id, _enroll_request_body(message)
    elif isinstance(message, EnrollAnswer):
        kind, request_id, parts = MessageType.ENROLL_ANSWER, message.request_id, _enroll_answer_body(message)
    else:
        raise TypeError(f"not a control message: {message!r}")
    if not 0 <= request_id <= MAX_REQUEST_ID:
        raise ControlError(f"request id {request_id} outside 0..{MAX_REQUEST_ID}")
    body = b"".join(parts)
    if len(body) > MAX_BODY_SIZE:
        raise ControlError(f"body is {len(body)} bytes > {MAX_BODY_SIZE}")
    return HEADER.pack(CONTROL_MARKER, CONTROL_VERSION, kind, 0, request_id, len(body)) + body


# ---------------------------------------------------------------- decoding


@dataclass(slots=True)
class _Attributes:
    """Every known attribute of one body, validated, in arrival order."""

    addresses: list[Interface] = field(default_factory=list)
    routes: list[Network] = field(default_factory=list)
    dns: list[Address] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    mtu: int | None = None
    keepalive: int | None = None
    reason: str = ""
    method: int | None = None
    state: AuthState | None = None
    seconds: int | None = None
    code: str | None = None
    public_key: bytes | None = None
    preshared_key: bytes | None = None
    enroll_state: EnrollState | None = None
    name: str = ""


def _split_prefixed(value: bytes, what: str) -> tuple[Address, int]:
    if len(value) == 5:
        address: Address = IPv4Address(value[:4])
    elif len(value) == 17:
        address = IPv6Address(value[:16])
    else:
        raise ControlError(f"{what} attribute of {len(value)} bytes (must be 5 or 17)")
    prefix = value[-1]
    if prefix > address.max_prefixlen:
        raise ControlError(f"{what} prefix length {prefix} > {address.max_prefixlen}")
    return address, prefix


def _parse_route(value: bytes) -> Network:
    address, prefix = _split_prefixed(value, "ROUTE")
    network = IPv4Network if address.version == 4 else IPv6Network
    try:
        return network((address, prefix))
    except ValueError:
        raise ControlError(f"ROUTE {address}/{prefix} has host bits set") from None


def _store(found: _Attributes, kind: int, value: bytes) -> None:
    if kind == AttributeType.ADDRESS:
        address, prefix = _split_prefixed(value, "ADDRESS")
        interface = IPv4Interface if address.version == 4 else IPv6Interface
        found.addresses.append(interface((address, prefix)))
    elif kind == AttributeType.ROUTE:
        found.routes.append(_parse_route(value))
    elif kind == AttributeType.DNS:
        if len(value) not in (4, 16):
            raise ControlError(f"DNS attribute of {len(value)} bytes (must be 4 or 16)")
        found.dns.append(IPv4Address(value) if len(value) == 4 else IPv6Address(value))
    elif kind == AttributeType.SEARCH:
        domain = _utf8(value, "search domain")
        _check_search_domain(domain)
        found.search.append(domain)
    elif kind == AttributeType.MTU:
        found.mtu = _parse_fixed(value, 2, "MTU")
        _check_mtu(found.mtu)
    elif kind == AttributeType.KEEPALIVE:
        found.keepalive = _parse_fixed(value, 2, "KEEPALIVE")
    elif kind == AttributeType.REASON:
        found.reason = _utf8(value, "reason")
        _check_reason(found.reason)
    elif kind == AttributeType.AUTH_METHOD:
        found.method = _parse_fixed(value, 1, "AUTH_METHOD")
    elif kind == AttributeType.AUTH_STATE:
        state = _parse_fixed(value, 1, "AUTH_STATE")
        if state not in _AUTH_STATES:
            raise ControlError(f"unknown AUTH_STATE {state}")
        found.state = AuthState(state)
    elif kind == AttributeType.SECONDS:
        found.seconds = _parse_fixed(value, 4, "SECONDS")
    elif kind == AttributeType.CODE:
        try:
            found.code = value.decode("ascii")
        except UnicodeDecodeError:
            raise ControlError("code is not ASCII") from None
        _check_code(found.code)
    elif kind == AttributeType.PUBLIC_KEY:
        found.public_key = _check_key(value, "PUBLIC_KEY")
    elif kind == AttributeType.PRESHARED_KEY:
        found.preshared_key = _check_key(value, "PRESHARED_KEY")
    elif kind == AttributeType.ENROLL_STATE:
        state = _parse_fixed(value, 1, "ENROLL_STATE")
        if state not in _ENROLL_STATES:
            raise ControlError(f"unknown ENROLL_STATE {state}")
        found.enroll_state = EnrollState(state)
    elif kind == AttributeType.NAME:
        try:
            found.name = value.decode("ascii")
        except UnicodeDecodeError:
            raise ControlError("name is not ASCII") from None
        _check_name(found.name)


_ENROLL_STATES = frozenset(EnrollState)
_AUTH_STATES = frozenset(AuthState)


def _parse_fixed(value: bytes, size: int, what: str) -> int:
    if len(value) != size:
        raise ControlError(f"{what} attribute of {len(value)} bytes (must be {size})")
    return int.from_bytes(value, "big")


def _parse_attributes(body: bytes) -> _Attributes:
    found = _Attributes()
    counts = dict.fromkeys(_ATTRIBUTE_LIMITS, 0)
    offset = 0
    while offset < len(body):
        if offset + 2 > len(body):
            raise ControlError("truncated attribute header")
        kind, length = body[offset], body[offset + 1]
        value = body[offset + 2 : offset + 2 + length]
        if len(value) != length:
            raise ControlError(f"attribute {kind} of {length} bytes overruns the body")
        offset += 2 + length
        if kind not in counts:
            continue  # unknown attribute: skipped, as the versioning rule promises
        counts[kind] += 1
        _check_count(AttributeType(kind), counts[kind])
        _store(found, kind, value)
    return found


def decode(payload: bytes) -> ControlMessage | None:
    """The message in a decrypted transport payload (zero padding may follow it).

    None: a message this receiver must ignore (other version, unknown type).
    ControlError: a malformed message, to be dropped and counted.
    """
    if len(payload) < 2:
        raise ControlError("truncated header")
    if payload[0] != CONTROL_MARKER:
        raise ControlError(f"first byte {payload[0]:#04x} is not the control marker")
    if payload[1] != CONTROL_VERSION:
        return None
    if len(payload) < HEADER_SIZE:
        raise ControlError("truncated header")
    _, _, kind, _, request_id, length = HEADER.unpack_from(payload)
    if length > MAX_BODY_SIZE:
        raise ControlError(f"body length {length} > {MAX_BODY_SIZE}")
    body = payload[HEADER_SIZE : HEADER_SIZE + length]
    if len(body) != length:
        raise ControlError(f"truncated body: {len(body)} of {length} bytes")
    if kind not in _MESSAGE_TYPES:
        return None
    found = _parse_attributes(body)
    if kind == MessageType.CONFIG_REQUEST:
        return ConfigRequest(request_id, found.addresses)
    if kind == MessageType.CONFIG_PUSH:
        return ConfigPush(
            request_id, found.addresses, found.routes, found.dns, found.search, found.mtu, found.keepalive
        )
    if kind == MessageType.CONFIG_REFUSED:
        return ConfigRefused(request_id, found.reason)
    if kind == MessageType.AUTH_STATUS:
        if found.method is None or found.state is None:
            raise ControlError("AUTH_STATUS without AUTH_METHOD and AUTH_STATE")
        return AuthStatus(request_id, found.method, found.state, found.seconds, found.reason)
    if kind == MessageType.AUTH_CODE:
        if found.method is None or found.code is None:
            raise ControlError("AUTH_CODE without AUTH_METHOD and CODE")
        return AuthCode(request_id, found.method, found.code)
    if kind == MessageType.ENROLL_REQUEST:
        if found.public_key is None or found.preshared_key is None:
            raise ControlError("ENROLL_REQUEST without PUBLIC_KEY and PRESHARED_KEY")
        return EnrollRequest(request_id, found.public_key, found.preshared_key)
    if kind == MessageType.ENROLL_ANSWER:
        if found.enroll_state is None:
            raise ControlError("ENROLL_ANSWER without ENROLL_STATE")
        return EnrollAnswer(request_id, found.enroll_state, found.name, found.seconds, found.reason)
    return Goodbye(found.reason)
