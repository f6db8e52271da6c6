"""Time-based one-time passwords (RFC 6238, over RFC 4226's HOTP), sans I/O: time is passed in.

What authenticator apps speak by default: HMAC-SHA1, 30-second steps counted from the Unix
epoch, 6 digits.  Secrets travel as unpadded base32, as in otpauth:// URIs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from urllib.parse import quote, urlencode

STEP_SECONDS = 30
DIGITS = 6
SECRET_BYTES = 20  # 160 bits: RFC 4226's recommended length (R6)
MIN_SECRET_BYTES = 16  # 128 bits: RFC 4226's minimum


def hotp(secret: bytes, counter: int, digits: int = DIGITS) -> str:
    """RFC 4226 section 5.3: HMAC-SHA1 of the 8-byte counter, dynamically truncated to `digits`."""
    mac = hmac.new(secret, counter.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = int.from_bytes(mac[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def time_step(unix_time: float) -> int:
    """RFC 6238's T: whole steps since the epoch (T0 = 0)."""
    return int(unix_time // STEP_SECONDS)


def totp(secret: bytes, unix_time: float, digits: int = DIGITS) -> str:
    return hotp(secret, time_step(unix_time), digits)


def generate_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def encode_secret(secret: bytes) -> str:
    """Base32 without padding, as authenticator apps take it."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def decode_secret(text: str) -> bytes:
    """The secret in base32 text (case, spaces and padding as people write them); ValueError if not."""
    compact = re.sub(r"[\s=]", "", text).upper()
    if not compact or not re.fullmatch(r"[A-Z2-7]+", compact):
        raise ValueError("does not hold a base32 secret (letters A-Z and digits 2-7)")
    try:
        secret = base64.b32decode(compact + "=" * (-len(compact) % 8))
    except binascii.Error:
        raise ValueError("does not hold a base32 secret (its length is wrong)") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"holds a secret of {len(secret) * 8} bits; at least {MIN_SECRET_BYTES * 8} are needed "
                         "(tunvpn totp-secret makes one of 160)")
    return secret


def otpauth_uri(secret: bytes, issuer: str, account: str) -> str:
    """The otpauth:// URI authenticator apps import (Google's Key Uri Format)."""
    label = quote(f"{issuer}:{account}", safe=":@")
    query = urlencode({"secret": encode_secret(secret), "issuer": issuer, "algorithm": "SHA1",
                       "digits": DIGITS, "period": STEP_SECONDS}, quote_via=quote)
    return f"otpauth://totp/{label}?{query}"
