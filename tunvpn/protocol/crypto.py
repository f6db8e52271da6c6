"""The only place tunvpn touches cryptographic primitives.

Everything here is a thin layer over the `cryptography` package and
`hashlib.blake2s`; no primitive is implemented by hand.

Speed notes (measured with cryptography 50 on this project's test machine,
1424-byte packets): ``encrypt``/``decrypt`` cost ~1.9 us; the newer
``encrypt_into``/``decrypt_into`` into a preallocated buffer cost ~2.1 us,
because slicing the buffer costs more than the copy it saves, and neither
trixie's cryptography 43 nor bookworm's 38 has them.  So the data path uses
the plain calls everywhere.  HMAC is RFC 2104's construction over hashlib's
BLAKE2s (see `hmac_`).
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_SIZE = 32
TAG_SIZE = 16
MAC_SIZE = 16
XNONCE_SIZE = 24

_ZERO_KEY = bytes(KEY_SIZE)
_NONCE_PREFIX = bytes(4)
_CHACHA_CONSTANTS = struct.unpack("<4I", b"expand 32-byte k")


class CryptoError(Exception):
    """A primitive refused its input: bad tag, low-order point, wrong length."""


# --- hashing -----------------------------------------------------------------

def hash_(*parts: bytes) -> bytes:
    """HASH(a || b || ...): BLAKE2s-256 over the concatenation."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte digest (mac1, mac2, cookies)."""
    return hashlib.blake2s(data, digest_size=MAC_SIZE, key=key).digest()


class KeyedMac:
    """MAC under one key used for many messages (mac1 of every initiation, mac2 per source).

    Keyed BLAKE2s compresses the key as a block of its own; copying a state that has done so
    is cheaper than starting over, and under a flood every datagram pays for it."""

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        self._keyed = hashlib.blake2s(digest_size=MAC_SIZE, key=key)

    def __call__(self, data: bytes) -> bytes:
        state = self._keyed.copy()
        state.update(data)
        return state.digest()


_BLAKE2S_BLOCK = 64
_INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))  # RFC 2104's ipad and opad, as translate tables
_OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


def hmac_(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over hashlib's BLAKE2s).

    A handshake computes about twenty: built from two hashlib calls this costs ~2 us, where
    the stdlib's `hmac.digest` takes ~3 us with hashlib.blake2s and ~4.7 us through OpenSSL's
    EVP (its setup per call dominates for 32-byte inputs). The unit tests hold it to `hmac`'s."""
    if len(key) > _BLAKE2S_BLOCK:
        key = hashlib.blake2s(key).digest()
    block = key.ljust(_BLAKE2S_BLOCK, b"\0")
    inner = hashlib.blake2s(block.translate(_INNER_PAD))
    inner.update(data)
    return hashlib.blake2s(block.translate(_OUTER_PAD) + inner.digest()).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac_(key, data)
    return hmac_(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    return t1, hmac_(t0, t1 + b"\x02")


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac_(key, data)
    t1 = hmac_(t0, b"\x01")
    t2 = hmac_(t0, t1 + b"\x02")
    return t1, t2, hmac_(t0, t2 + b"\x03")


# --- X25519 ------------------------------------------------------------------

def clamp(private: bytes) -> bytes:
    """Clamp a Curve25519 scalar the way `wg genkey` prints it."""
    if len(private) != KEY_SIZE:
        raise CryptoError("a private key is 32 bytes")
    k = bytearray(private)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return bytes(k)


class StaticKey:
    """A private X25519 key held as an OpenSSL object, with its public half.

    Keeping the secret inside one `cryptography` object (instead of Python
    bytes copied around) is the best Python can do towards erasing it.
    """

    __slots__ = ("_key", "public")

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_SIZE:
            raise CryptoError("a private key is 32 bytes")
        self._key = X25519PrivateKey.from_private_bytes(private)
        self.public: bytes = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @classmethod
    def generate(cls) -> StaticKey:
        """A fresh key made inside OpenSSL (from its own CSPRNG). Loading raw bytes instead
        costs cryptography 38 (bookworm) ~0.9 ms through a PKCS#8 parse, generating ~0.1 ms
        (its public half then takes ~0.35 ms there; on 43 and later both take ~0.07 ms)."""
        key = cls.__new__(cls)
        key._key = X25519PrivateKey.generate()
        key.public = key._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return key

    def dh(self, public: bytes) -> bytes:
        """Shared secret with `public`; a low-order point (all-zero result) is refused."""
        if len(public) != KEY_SIZE:
            raise CryptoError("a public key is 32 bytes")
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError as exc:  # OpenSSL rejects the all-zero shared secret
            raise CryptoError("low-order public key") from exc
        if shared == _ZERO_KEY:
            raise CryptoError("low-order public key")
        return shared

    def private_bytes(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key(private: bytes) -> bytes:
    return StaticKey(private).public


# --- ChaCha20-Poly1305 -------------------------------------------------------

def _nonce(counter: int) -> bytes:
    return _NONCE_PREFIX + counter.to_bytes(8, "little")


def _chacha(key: bytes) -> ChaCha20Poly1305:
    """`cryptography` says ValueError for a wrong key length; callers expect CryptoError."""
    if len(key) != KEY_SIZE:
        raise CryptoError("a ChaCha20-Poly1305 key is 32 bytes")
    return ChaCha20Poly1305(key)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    return _chacha(key).encrypt(_nonce(counter), plaintext, aad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    aead = _chacha(key)
    try:
        return aead.decrypt(_nonce(counter), ciphertext, aad)
    except InvalidTag as exc:
        raise CryptoError("authentication failed") from exc


# The data path's hot loops call these directly, without a method of ours around them: a
# Python call per packet costs as much as the copy of a whole packet.
transport_nonce = struct.Struct("<4xQ").pack  # the 12-byte nonce of a transport message's counter
TagMismatch = InvalidTag  # what `decrypt` raises for a forged or damaged message


class TransportCipher:
    """One direction of a session key, kept as a ready cipher object for the data path.

    `encrypt(nonce, plaintext, None)` and `decrypt(nonce, ciphertext, None)` are the AEAD's own."""

    __slots__ = ("encrypt", "decrypt")

    def __init__(self, key: bytes) -> None:
        aead = _chacha(key)
        self.encrypt = aead.encrypt
        self.decrypt = aead.decrypt

    def seal(self, counter: int, plaintext: bytes) -> bytes:
        return self.encrypt(transport_nonce(counter), plaintext, None)

    def open(self, counter: int, ciphertext: bytes) -> bytes | None:
        """None when the tag does not verify."""
        try:
            return self.decrypt(transport_nonce(counter), ciphertext, None)
        except InvalidTag:
            return None


# --- XChaCha20-Poly1305 (cookie replies only) ----------------------------------

def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 derived from one ChaCha20 block.

    A ChaCha20 block is rounds(state) + state, word by word.  HChaCha20 is
    rounds(state) at words 0-3 and 12-15, so those words of the keystream
    minus the initial state give it.  The 16-byte `nonce16` fills words
    12-15 exactly as cryptography's ChaCha20 takes its 16-byte nonce.
    """
    if len(key) != KEY_SIZE or len(nonce16) != 16:
        raise CryptoError("HChaCha20 takes a 32-byte key and a 16-byte nonce")
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    words = struct.unpack("<16I", block)
    nonce_words = struct.unpack("<4I", nonce16)
    out = [(words[i] - _CHACHA_CONSTANTS[i]) & 0xFFFFFFFF for i in range(4)]
    out += [(words[12 + i] - nonce_words[i]) & 0xFFFFFFFF for i in range(4)]
    return struct.pack("<8I", *out)


def _xchacha_split(key: bytes, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce) != XNONCE_SIZE:
        raise CryptoError("XChaCha20 takes a 24-byte nonce")
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])), _NONCE_PREFIX + nonce[16:]


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    aead, short_nonce = _xchacha_split(key, nonce)
    return aead.encrypt(short_nonce, plaintext, aad)


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    aead, short_nonce = _xchacha_split(key, nonce)
    try:
        return aead.decrypt(short_nonce, ciphertext, aad)
    except InvalidTag as exc:
        raise CryptoError("authentication failed") from exc
