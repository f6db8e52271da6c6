"""Keys as users see them: base64 of 32 bytes, exactly as `wg genkey/pubkey/genpsk` print them."""

from __future__ import annotations

import base64
import binascii
import os

from .protocol.crypto import KEY_SIZE, clamp, public_key


class InvalidKey(ValueError):
    """Not a base64-encoded 32-byte key."""


def decode_key(text: str) -> bytes:
    text = text.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidKey("not valid base64") from exc
    if len(raw) != KEY_SIZE:
        raise InvalidKey(f"a key is {KEY_SIZE} bytes (44 base64 characters), this one is {len(raw)} bytes")
    if encode_key(raw) != text:
        # Stray low bits in the last character: `wg` refuses these, and one key must have one spelling.
        raise InvalidKey("not canonical base64 (the character before '=' has stray low bits)")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def generate_private_key() -> bytes:
    return clamp(os.urandom(KEY_SIZE))


def generate_preshared_key() -> bytes:
    return os.urandom(KEY_SIZE)


def derive_public_key(private: bytes) -> bytes:
    return public_key(private)
