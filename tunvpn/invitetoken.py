"""The invite token: one line a server admin hands to a new client (`tunvpn join TOKEN`).

    tunvpn://join/<base64url of the body, no padding>

The body is binary: format version, its own length, the server's public key, the invite's private
key and preshared key, when the invite expires, the server's config name and its endpoints, then
a BLAKE2s-128 checksum of everything before it.  The checksum is no signature (whoever holds the
token can make another one); it turns a mangled copy-paste into a clear error instead of a
handshake that silently never completes.  Its stated length tells truncation from damage.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass, field

SCHEME = "tunvpn://join/"
TOKEN_VERSION = 1
KEY_SIZE = 32
CHECKSUM_SIZE = 16
MAX_ENDPOINTS = 8
MAX_TEXT_BYTES = 255
_HEAD = struct.Struct("!BH")  # version, length of the whole body, checksum included
_FIXED = struct.Struct(f"!{KEY_SIZE}s{KEY_SIZE}s{KEY_SIZE}sQ")  # server key, invite key, PSK, expires
_PERSON = b"tvinvite"  # BLAKE2s personalization: at most 8 bytes
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


class InvalidToken(ValueError):
    """Not a usable invite token; the message says what is wrong in words for the user."""


@dataclass(frozen=True)
class InviteToken:
    server_public_key: bytes
    invite_private_key: bytes = field(repr=False)
    preshared_key: bytes = field(repr=False)
    expires: int  # wall clock, seconds since the epoch
    server_name: str  # the server's config name: the default name of the client's config
    endpoints: tuple[str, ...]  # "host:port" or "[v6]:port", as written in a client's Endpoint


def _checksum(data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=CHECKSUM_SIZE, person=_PERSON).digest()


def _text(value: str, what: str) -> bytes:
    encoded = value.encode()
    if not encoded or len(encoded) > MAX_TEXT_BYTES:
        raise ValueError(f"{what} must be 1 to {MAX_TEXT_BYTES} bytes")
    return bytes((len(encoded),)) + encoded


def encode_token(token: InviteToken) -> str:
    if not _NAME.fullmatch(token.server_name):
        raise ValueError(f"server name {token.server_name!r} is not a config name")
    if not 1 <= len(token.endpoints) <= MAX_ENDPOINTS:
        raise ValueError(f"an invite carries 1 to {MAX_ENDPOINTS} endpoints")
    keys = (token.server_public_key, token.invite_private_key, token.preshared_key)
    if any(len(key) != KEY_SIZE for key in keys):
        raise ValueError("keys are 32 bytes")
    rest = _FIXED.pack(*keys, token.expires) + _text(token.server_name, "server name")
    rest += bytes((len(token.endpoints),)) + b"".join(_text(e, "endpoint") for e in token.endpoints)
    head = _HEAD.pack(TOKEN_VERSION, _HEAD.size + len(rest) + CHECKSUM_SIZE)
    body = head + rest
    return SCHEME + base64.urlsafe_b64encode(body + _checksum(body)).decode("ascii").rstrip("=")


def _unwrap(text: str) -> bytes:
    text = "".join(text.split())  # a token wrapped by a mail program or a terminal still works
    if not text.startswith(SCHEME):
        raise InvalidToken(f"not an invite: a token starts with {SCHEME}")
    encoded = text[len(SCHEME):]
    if not _BASE64URL.fullmatch(encoded):
        raise InvalidToken("damaged: characters that are not in a token (copy it again)")
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise InvalidToken("truncated or damaged: not whole base64 (copy the whole line again)") from None


def decode_token(text: str) -> InviteToken:
    """The token's contents; InvalidToken naming what is wrong (never a traceback)."""
    data = _unwrap(text)
    if len(data) < _HEAD.size:
        raise InvalidToken("truncated: the token is cut short (copy the whole line again)")
    version, length = _HEAD.unpack_from(data)
    if version != TOKEN_VERSION:
        raise InvalidToken(f"format version {version}; this tunvpn reads version {TOKEN_VERSION} (a newer tunvpn?)")
    if len(data) < length:
        raise InvalidToken(f"truncated: {len(data)} of {length} bytes (copy the whole line again)")
    if len(data) > length:
        raise InvalidToken(f"damaged: {len(data) - length} byte(s) more than the token says it has")
    body, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
    if length < _HEAD.size + _FIXED.size + CHECKSUM_SIZE or _checksum(body) != checksum:
        raise InvalidToken("damaged: the integrity check fails (copy it again, or ask for a new invite)")
    try:
        return _parse_body(body)
    except (IndexError, UnicodeDecodeError, struct.error, ValueError):
        # Only a token made with the checksum by something that is not tunvpn gets here.
        raise InvalidToken("malformed: the checksum holds but the contents make no sense") from None


def _parse_body(body: bytes) -> InviteToken:
    server, invite, psk, expires = _FIXED.unpack_from(body, _HEAD.size)
    offset = _HEAD.size + _FIXED.size
    name, offset = _read_text(body, offset)
    count = body[offset]
    offset += 1
    endpoints = []
    for _ in range(count):
        endpoint, offset = _read_text(body, offset)
        endpoints.append(endpoint)
    if offset != len(body) or not endpoints or not _NAME.fullmatch(name):
        raise ValueError("inconsistent body")
    return InviteToken(server, invite, psk, expires, name, tuple(endpoints))


def _read_text(body: bytes, offset: int) -> tuple[str, int]:
    length = body[offset]
    value = body[offset + 1 : offset + 1 + length]
    if len(value) != length or not length:
        raise ValueError("text overruns the body")
    text = value.decode("utf-8")
    if not text.isprintable():
        raise ValueError("control characters")
    return text, offset + 1 + length
