"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s as WireGuard uses it.

One `Handshake` per peer holds what this side knows mid-handshake; it runs
either role.  Secrets (chaining key, ephemeral) are dropped as soon as the
transport keys are derived.  Nothing here knows about indices tables,
sockets or clocks: indices, ephemerals, timestamps and `now` come in as
arguments.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from . import tai64n
from .crypto import (
    KEY_SIZE,
    CryptoError,
    StaticKey,
    aead_decrypt,
    aead_encrypt,
    hash_,
    kdf1,
    kdf2,
    kdf3,
)
from .messages import Initiation, Response

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAIN_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN_KEY, IDENTIFIER)

# At most one initiation per peer in this many seconds (a flood check on the responder).
INITIATION_MIN_INTERVAL = 0.020

_ZERO_PSK = bytes(KEY_SIZE)


class NoiseError(Exception):
    """A handshake message that does not authenticate or is not wanted now."""


class State(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class Identity:
    """This device's static key plus the hash prefix every incoming initiation starts from."""

    __slots__ = ("key", "public", "responder_hash")

    def __init__(self, key: StaticKey) -> None:
        self.key = key
        self.public = key.public
        self.responder_hash = hash_(INITIAL_HASH, key.public)


class OpenedInitiation(NamedTuple):
    """An initiation decrypted up to the sender's static key (before we know the peer)."""

    remote_static: bytes
    chain_key: bytes
    hash: bytes


class SessionKeys(NamedTuple):
    send: bytes
    receive: bytes
    is_initiator: bool
    local_index: int
    remote_index: int


def _dh(key: StaticKey, public: bytes) -> bytes:
    try:
        return key.dh(public)
    except CryptoError as exc:
        raise NoiseError(str(exc)) from exc


def _open(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return aead_decrypt(key, 0, ciphertext, aad)
    except CryptoError as exc:
        raise NoiseError("handshake payload does not authenticate") from exc


def open_initiation(identity: Identity, msg: Initiation) -> OpenedInitiation:
    """First half of consuming an initiation: learn who claims to send it."""
    h = hash_(identity.responder_hash, msg.ephemeral)
    c = kdf1(INITIAL_CHAIN_KEY, msg.ephemeral)
    c, k = kdf2(c, _dh(identity.key, msg.ephemeral))
    remote_static = _open(k, msg.encrypted_static, h)
    h = hash_(h, msg.encrypted_static)
    return OpenedInitiation(remote_static, c, h)


class Handshake:
    """The Noise state this side shares with one peer."""

    __slots__ = (
        "local",
        "remote_static",
        "preshared_key",
        "_static_static",
        "state",
        "_chain_key",
        "_hash",
        "_local_ephemeral",
        "_remote_ephemeral",
        "local_index",
        "remote_index",
        "last_timestamp",
        "last_initiation_at",
    )

    def __init__(self, local: Identity, remote_static: bytes, preshared_key: bytes | None = None) -> None:
        self.local = local
        self.remote_static = remote_static
        self.preshared_key = preshared_key or _ZERO_PSK
        try:
            self._static_static: bytes | None = local.key.dh(remote_static)
        except CryptoError:
            self._static_static = None  # such a peer can never complete a handshake
        self.last_timestamp: bytes | None = None
        self.last_initiation_at: float | None = None
        self.local_index = 0
        self.remote_index = 0
        self.clear()

    def digest(self) -> tuple:
        """Everything an incoming message could change, for tests that prove it changed nothing."""
        return (self.state, self.local_index, self.remote_index, self.last_timestamp, self.last_initiation_at,
                self._chain_key, self._hash, id(self._local_ephemeral), self._remote_ephemeral)

    def clear(self) -> None:
        """Forget every per-handshake secret; keep the replay and flood memory."""
        self.state = State.ZEROED
        self._chain_key = b""
        self._hash = b""
        self._local_ephemeral: StaticKey | None = None
        self._remote_ephemeral = b""

    def _require_static_static(self) -> bytes:
        if self._static_static is None:
            raise NoiseError("peer public key is a low-order point")
        return self._static_static

    # --- initiator ---------------------------------------------------------

    def create_initiation(self, sender_index: int, ephemeral: StaticKey, wall_time: float) -> Initiation:
        """Build message 1 (mac1/mac2 still zero: the cookie module adds them)."""
        static_static = self._require_static_static()
        h = hash_(INITIAL_HASH, self.remote_static)
        c = kdf1(INITIAL_CHAIN_KEY, ephemeral.public)
        h = hash_(h, ephemeral.public)
        c, k = kdf2(c, _dh(ephemeral, self.remote_static))
        encrypted_static = aead_encrypt(k, 0, self.local.public, h)
        h = hash_(h, encrypted_static)
        c, k = kdf2(c, static_static)
        encrypted_timestamp = aead_encrypt(k, 0, tai64n.timestamp(wall_time), h)
        h = hash_(h, encrypted_timestamp)
        self.state = State.INITIATION_CREATED
        self._chain_key, self._hash = c, h
        self._local_ephemeral = ephemeral
        self.local_index = sender_index
        return Initiation(sender_index, ephemeral.public, encrypted_static, encrypted_timestamp)

    def consume_response(self, msg: Response) -> None:
        if self.state is not State.INITIATION_CREATED or msg.receiver != self.local_index:
            raise NoiseError("response to no initiation of ours")
        assert self._local_ephemeral is not None
        h = hash_(self._hash, msg.ephemeral)
        c = kdf1(self._chain_key, msg.ephemeral)
        c = kdf1(c, _dh(self._local_ephemeral, msg.ephemeral))
        c = kdf1(c, _dh(self.local.key, msg.ephemeral))
        c, tau, k = kdf3(c, self.preshared_key)
        h = hash_(h, tau)
        _open(k, msg.encrypted_nothing, h)
        h = hash_(h, msg.encrypted_nothing)
        self.state = State.RESPONSE_CONSUMED
        self._chain_key, self._hash = c, h
        self._local_ephemeral = None
        self.remote_index = msg.sender

    # --- responder ---------------------------------------------------------

    def consume_initiation(self, msg: Initiation, opened: OpenedInitiation, now: float) -> None:
        """Second half: the timestamp proves freshness; at most one per peer per 20 ms."""
        c, k = kdf2(opened.chain_key, self._require_static_static())
        timestamp = _open(k, msg.encrypted_timestamp, opened.hash)
        h = hash_(opened.hash, msg.encrypted_timestamp)
        if not tai64n.is_after(timestamp, self.last_timestamp):
            raise NoiseError("replayed initiation (timestamp not newer)")
        if self.last_initiation_at is not None and now - self.last_initiation_at < INITIATION_MIN_INTERVAL:
            raise NoiseError("initiation flood (more than one per 20 ms)")
        self.last_timestamp = timestamp
        self.last_initiation_at = now
        self.state = State.INITIATION_CONSUMED
        self._chain_key, self._hash = c, h
        self._local_ephemeral = None
        self._remote_ephemeral = msg.ephemeral
        self.remote_index = msg.sender

    def create_response(self, sender_index: int, ephemeral: StaticKey) -> Response:
        if self.state is not State.INITIATION_CONSUMED:
            raise NoiseError("no initiation to respond to")
        h = hash_(self._hash, ephemeral.public)
        c = kdf1(self._chain_key, ephemeral.public)
        c = kdf1(c, _dh(ephemeral, self._remote_ephemeral))
        c = kdf1(c, _dh(ephemeral, self.remote_static))
        c, tau, k = kdf3(c, self.preshared_key)
        h = hash_(h, tau)
        encrypted_nothing = aead_encrypt(k, 0, b"", h)
        h = hash_(h, encrypted_nothing)
        self.state = State.RESPONSE_CREATED
        self._chain_key, self._hash = c, h
        self.local_index = sender_index
        return Response(sender_index, self.remote_index, ephemeral.public, encrypted_nothing)

    # --- both --------------------------------------------------------------

    def derive_session(self) -> SessionKeys:
        """Split the chaining key into transport keys and forget the handshake secrets."""
        if self.state is State.RESPONSE_CONSUMED:
            send, receive = kdf2(self._chain_key, b"")
            is_initiator = True
        elif self.state is State.RESPONSE_CREATED:
            receive, send = kdf2(self._chain_key, b"")
            is_initiator = False
        else:
            raise NoiseError("no completed handshake to derive keys from")
        keys = SessionKeys(send, receive, is_initiator, self.local_index, self.remote_index)
        self.clear()
        return keys
