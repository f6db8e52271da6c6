"""The Noise_IKpsk2 handshake, checked against an independent reading of the spec.

`Reference` below re-derives every message from the WireGuard paper with
nothing but hashlib, hmac and `cryptography`, so a transcription error in
tunvpn.protocol.noise (a swapped DH, a missing mix) shows up as different
bytes, not as two wrong halves that happen to agree with each other.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from corepair import LOW_ORDER_POINTS, A_ADDR, B_ADDR, WALL_EPOCH, CorePair, Datagram, private_key
from tunvpn.protocol.cookie import CookieJar
from tunvpn.protocol.crypto import StaticKey
from tunvpn.protocol.messages import INITIATION_SIZE, RESPONSE_SIZE, Initiation, Response
from tunvpn.protocol.noise import Handshake, Identity, NoiseError, State, open_initiation



# --- an independent reference ------------------------------------------------------------

def _hash(*parts: bytes) -> bytes:
    return hashlib.blake2s(b"".join(parts)).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def _kdf(key: bytes, data: bytes, n: int) -> list[bytes]:
    t0, out, previous = _hmac(key, data), [], b""
    for i in range(1, n + 1):
        previous = _hmac(t0, previous + bytes([i]))
        out.append(previous)
    return out


def _dh(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def _public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _seal(key: bytes, plaintext: bytes, aad: bytes | None, counter: int = 0) -> bytes:
    return ChaCha20Poly1305(key).encrypt(bytes(4) + counter.to_bytes(8, "little"), plaintext, aad)


def _open(key: bytes, ciphertext: bytes, aad: bytes | None, counter: int = 0) -> bytes:
    return ChaCha20Poly1305(key).decrypt(bytes(4) + counter.to_bytes(8, "little"), ciphertext, aad)


def _mac1(receiver_public: bytes, body: bytes) -> bytes:
    return hashlib.blake2s(body, digest_size=16, key=_hash(b"mac1----", receiver_public)).digest()


def _tai64n(wall: float) -> bytes:
    seconds = int(wall)
    nanos = int(round((wall - seconds) * 1e9)) & ~(2**24 - 1)
    return struct.pack(">QI", 2**62 + 10 + seconds, nanos)


C0 = _hash(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
H0 = _hash(C0, b"WireGuard v1 zx2c4 Jason@zx2c4.com")


class Reference:
    """One side of a handshake, computed straight from the paper."""

    def __init__(self, static_private: bytes, remote_public: bytes, psk: bytes = bytes(32)) -> None:
        self.s = static_private
        self.remote = remote_public
        self.psk = psk

    def initiation(self, ephemeral: bytes, sender: int, wall: float) -> bytes:
        c, h = C0, _hash(H0, self.remote)
        e_pub = _public(ephemeral)
        c = _kdf(c, e_pub, 1)[0]
        h = _hash(h, e_pub)
        c, k = _kdf(c, _dh(ephemeral, self.remote), 2)
        static = _seal(k, _public(self.s), h)
        h = _hash(h, static)
        c, k = _kdf(c, _dh(self.s, self.remote), 2)
        stamp = _seal(k, _tai64n(wall), h)
        h = _hash(h, stamp)
        self.c, self.h, self.e = c, h, ephemeral
        body = struct.pack("<II", 1, sender) + e_pub + static + stamp
        return body + _mac1(self.remote, body) + bytes(16)

    def consume_initiation(self, msg: bytes) -> tuple[bytes, bytes, int]:
        """(initiator static, timestamp, sender index); remembers the state for the response."""
        sender = struct.unpack_from("<I", msg, 4)[0]
        e_pub, static, stamp = msg[8:40], msg[40:88], msg[88:116]
        c, h = C0, _hash(H0, _public(self.s))
        c = _kdf(c, e_pub, 1)[0]
        h = _hash(h, e_pub)
        c, k = _kdf(c, _dh(self.s, e_pub), 2)
        initiator_static = _open(k, static, h)
        h = _hash(h, static)
        c, k = _kdf(c, _dh(self.s, initiator_static), 2)
        timestamp = _open(k, stamp, h)
        h = _hash(h, stamp)
        self.c, self.h, self.remote_e, self.remote_index = c, h, e_pub, sender
        self.remote = initiator_static
        return initiator_static, timestamp, sender

    def response(self, ephemeral: bytes, sender: int) -> bytes:
        e_pub = _public(ephemeral)
        c = _kdf(self.c, e_pub, 1)[0]
        h = _hash(self.h, e_pub)
        c = _kdf(c, _dh(ephemeral, self.remote_e), 1)[0]
        c = _kdf(c, _dh(ephemeral, self.remote), 1)[0]
        c, tau, k = _kdf(c, self.psk, 3)
        h = _hash(h, tau)
        empty = _seal(k, b"", h)
        self.c = c
        body = struct.pack("<III", 2, sender, self.remote_index) + e_pub + empty
        return body + _mac1(self.remote, body) + bytes(16)

    def consume_response(self, msg: bytes) -> int:
        e_pub, empty = msg[12:44], msg[44:60]
        c = _kdf(self.c, e_pub, 1)[0]
        h = _hash(self.h, e_pub)
        c = _kdf(c, _dh(self.e, e_pub), 1)[0]
        c = _kdf(c, _dh(self.s, e_pub), 1)[0]
        c, tau, k = _kdf(c, self.psk, 3)
        h = _hash(h, tau)
        _open(k, empty, h)
        self.c = c
        return struct.unpack_from("<I", msg, 4)[0]

    def transport_keys(self, initiator: bool) -> tuple[bytes, bytes]:
        """(send, receive)."""
        first, second = _kdf(self.c, b"", 2)
        return (first, second) if initiator else (second, first)


# --- fixtures -----------------------------------------------------------------------------

S_I, S_R = private_key(11), private_key(12)
E_I, E_R = private_key(21), private_key(22)
PSK = bytes(range(32))
WALL = WALL_EPOCH + 0.5


def _pair(psk_i: bytes | None = None, psk_r: bytes | None = None) -> tuple[Handshake, Handshake, Identity]:
    initiator_id, responder_id = Identity(StaticKey(S_I)), Identity(StaticKey(S_R))
    initiator = Handshake(initiator_id, responder_id.public, psk_i)
    responder = Handshake(responder_id, initiator_id.public, psk_r)
    return initiator, responder, responder_id


def _packed_initiation(hs: Handshake, sender: int = 0x11223344, ephemeral: bytes = E_I, wall: float = WALL) -> bytes:
    msg = hs.create_initiation(sender, StaticKey(ephemeral), wall)
    return CookieJar(hs.remote_static).add_macs(msg.pack(), 0.0)


def _full_handshake(initiator: Handshake, responder: Handshake, responder_id: Identity, now: float = 0.0):
    msg = Initiation.parse(_packed_initiation(initiator))
    responder.consume_initiation(msg, open_initiation(responder_id, msg), now)
    response = responder.create_response(0x55667788, StaticKey(E_R))
    initiator.consume_response(response)
    return initiator.derive_session(), responder.derive_session()


# --- byte-exact agreement with the reference --------------------------------------------------

@pytest.mark.parametrize("psk", [None, PSK])
def test_initiation_bytes_match_the_reference(psk):
    initiator, _, responder_id = _pair(psk, psk)
    ours = _packed_initiation(initiator)
    theirs = Reference(S_I, responder_id.public).initiation(E_I, 0x11223344, WALL)
    assert len(ours) == INITIATION_SIZE
    assert ours == theirs


@pytest.mark.parametrize("psk", [None, PSK])
def test_response_and_transport_keys_match_the_reference(psk):
    initiator, responder, responder_id = _pair(psk, psk)
    ref_initiator = Reference(S_I, responder_id.public, psk or bytes(32))
    ref_initiator.initiation(E_I, 0x11223344, WALL)
    ref_responder = Reference(S_R, b"", psk or bytes(32))
    msg_bytes = _packed_initiation(initiator)
    static, stamp, sender = ref_responder.consume_initiation(msg_bytes)
    assert (static, stamp, sender) == (initiator.local.public, _tai64n(WALL), 0x11223344)

    msg = Initiation.parse(msg_bytes)
    responder.consume_initiation(msg, open_initiation(responder_id, msg), 0.0)
    response = CookieJar(initiator.local.public).add_macs(responder.create_response(0x55667788, StaticKey(E_R)).pack(), 0.0)
    assert len(response) == RESPONSE_SIZE
    assert response == ref_responder.response(E_R, 0x55667788)
    assert ref_initiator.consume_response(response) == 0x55667788

    initiator.consume_response(Response.parse(response))
    ours_i, ours_r = initiator.derive_session(), responder.derive_session()
    assert (ours_i.send, ours_i.receive) == ref_initiator.transport_keys(initiator=True)
    assert (ours_r.send, ours_r.receive) == ref_responder.transport_keys(initiator=False)
    assert (ours_i.local_index, ours_i.remote_index) == (0x11223344, 0x55667788)
    assert (ours_r.local_index, ours_r.remote_index) == (0x55667788, 0x11223344)
    assert ours_i.is_initiator and not ours_r.is_initiator


def test_device_handshake_interoperates_with_the_reference():
    """The device's own messages (its own ephemeral, index, wall clock) against the reference."""
    pair = CorePair(seed=5)
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (initiation,) = pair.collect(pair.a)
    responder = Reference(private_key(5 + 1000), b"")
    static, stamp, sender = responder.consume_initiation(initiation.data)
    assert static == pair.a.device.public_key
    assert stamp == _tai64n(WALL_EPOCH + pair.now)
    assert initiation.data[-16:] == bytes(16)  # no cookie: mac2 is zero

    response = responder.response(E_R, 0xCAFE)
    pair.deliver([Datagram(response, B_ADDR, A_ADDR, "b", pair.now)])
    (keepalive,) = pair.collect(pair.a)
    assert keepalive.kind == "keepalive"
    assert struct.unpack_from("<IIQ", keepalive.data) == (4, 0xCAFE, 0)
    _, receive = responder.transport_keys(initiator=False)
    assert _open(receive, keepalive.data[16:], None) == b""


# --- state machine ------------------------------------------------------------------------------

@pytest.mark.parametrize("psk", [None, PSK])
def test_both_sides_derive_crossed_keys_and_forget_secrets(psk):
    initiator, responder, responder_id = _pair(psk, psk)
    keys_i, keys_r = _full_handshake(initiator, responder, responder_id)
    assert keys_i.send == keys_r.receive and keys_i.receive == keys_r.send
    assert keys_i.send != keys_i.receive
    for hs in (initiator, responder):
        assert hs.state is State.ZEROED
        assert hs._chain_key == b"" and hs._hash == b"" and hs._local_ephemeral is None
        with pytest.raises(NoiseError):
            hs.derive_session()


def test_psk_changes_the_keys():
    keys_plain, _ = _full_handshake(*_pair())
    keys_psk, _ = _full_handshake(*_pair(PSK, PSK))
    assert keys_plain.send != keys_psk.send


def test_mismatched_psk_fails_at_the_initiator_and_leaves_it_waiting():
    initiator, responder, responder_id = _pair(PSK, bytes(32))
    msg = Initiation.parse(_packed_initiation(initiator))
    responder.consume_initiation(msg, open_initiation(responder_id, msg), 0.0)  # no PSK in message 1
    response = responder.create_response(7, StaticKey(E_R))
    with pytest.raises(NoiseError):
        initiator.consume_response(response)
    assert initiator.state is State.INITIATION_CREATED


def test_initiation_for_another_responder_does_not_open():
    initiator, _, _ = _pair()
    stranger = Identity(StaticKey(private_key(99)))
    with pytest.raises(NoiseError):
        open_initiation(stranger, Initiation.parse(_packed_initiation(initiator)))


def test_response_needs_a_pending_initiation_with_that_index():
    initiator, responder, responder_id = _pair()
    with pytest.raises(NoiseError):
        responder.create_response(1, StaticKey(E_R))
    msg = Initiation.parse(_packed_initiation(initiator, sender=5))
    responder.consume_initiation(msg, open_initiation(responder_id, msg), 0.0)
    response = responder.create_response(9, StaticKey(E_R))
    with pytest.raises(NoiseError):
        initiator.consume_response(response._replace(receiver=6))
    with pytest.raises(NoiseError):  # the responder never initiated
        responder.consume_response(response)
    initiator.consume_response(response)
    with pytest.raises(NoiseError):  # and only once
        initiator.consume_response(response)


@pytest.mark.parametrize("field", ["ephemeral", "encrypted_static", "encrypted_timestamp"])
def test_tampered_initiation_fields_are_refused(field):
    initiator, responder, responder_id = _pair()
    msg = Initiation.parse(_packed_initiation(initiator))
    for position in range(len(getattr(msg, field))):
        value = bytearray(getattr(msg, field))
        value[position] ^= 0x80
        forged = msg._replace(**{field: bytes(value)})
        with pytest.raises(NoiseError):
            responder.consume_initiation(forged, open_initiation(responder_id, forged), 0.0)
    assert responder.state is State.ZEROED and responder.last_timestamp is None
    responder.consume_initiation(msg, open_initiation(responder_id, msg), 0.0)  # the genuine one still works


@pytest.mark.parametrize("field", ["ephemeral", "encrypted_nothing"])
def test_tampered_response_fields_are_refused(field):
    initiator, responder, responder_id = _pair()
    msg = Initiation.parse(_packed_initiation(initiator))
    responder.consume_initiation(msg, open_initiation(responder_id, msg), 0.0)
    response = responder.create_response(9, StaticKey(E_R))
    for position in range(len(getattr(response, field))):
        value = bytearray(getattr(response, field))
        value[position] ^= 0x01
        with pytest.raises(NoiseError):
            initiator.consume_response(response._replace(**{field: bytes(value)}))
    assert initiator.state is State.INITIATION_CREATED
    initiator.consume_response(response)


# --- replay and flood -----------------------------------------------------------------------------

def _consume(responder: Handshake, responder_id: Identity, packed: bytes, now: float) -> None:
    msg = Initiation.parse(packed)
    responder.consume_initiation(msg, open_initiation(responder_id, msg), now)


def test_replayed_and_older_initiations_are_refused_without_touching_state():
    initiator, responder, responder_id = _pair()
    first = _packed_initiation(initiator, wall=WALL + 10)
    _consume(responder, responder_id, first, 0.0)
    remembered = (responder.last_timestamp, responder.last_initiation_at, responder.remote_index)
    for packed, now in [
        (first, 1.0),  # the same bytes again
        (_packed_initiation(initiator, sender=2, wall=WALL + 10), 1.0),  # same timestamp
        (_packed_initiation(initiator, sender=3, wall=WALL + 5), 1.0),  # older
        (_packed_initiation(initiator, sender=4, wall=WALL + 10.001), 1.0),  # same after whitening
    ]:
        with pytest.raises(NoiseError, match="replay"):
            _consume(responder, responder_id, packed, now)
        assert (responder.last_timestamp, responder.last_initiation_at, responder.remote_index) == remembered
    _consume(responder, responder_id, _packed_initiation(initiator, sender=5, wall=WALL + 11), 1.0)
    assert responder.remote_index == 5


def test_at_most_one_initiation_per_peer_per_20_ms():
    initiator, responder, responder_id = _pair()
    _consume(responder, responder_id, _packed_initiation(initiator, sender=1, wall=WALL + 1), 100.0)
    for sender, now in [(2, 100.0), (3, 100.010), (4, 100.0199)]:
        with pytest.raises(NoiseError, match="flood"):
            _consume(responder, responder_id, _packed_initiation(initiator, sender=sender, wall=WALL + sender), now)
        assert responder.remote_index == 1 and responder.last_initiation_at == 100.0
    _consume(responder, responder_id, _packed_initiation(initiator, sender=9, wall=WALL + 9), 100.021)
    assert responder.remote_index == 9


def test_a_flood_rejection_does_not_burn_the_timestamp():
    """A refused initiation must not raise the timestamp floor (else a retry would look replayed)."""
    initiator, responder, responder_id = _pair()
    _consume(responder, responder_id, _packed_initiation(initiator, sender=1, wall=WALL + 1), 0.0)
    second = _packed_initiation(initiator, sender=2, wall=WALL + 2)
    with pytest.raises(NoiseError, match="flood"):
        _consume(responder, responder_id, second, 0.005)
    _consume(responder, responder_id, second, 0.5)
    assert responder.remote_index == 2


# --- low-order points --------------------------------------------------------------------------------

@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=range(len(LOW_ORDER_POINTS)))
def test_low_order_ephemeral_in_an_initiation_is_refused(point):
    initiator, _, responder_id = _pair()
    msg = Initiation.parse(_packed_initiation(initiator))._replace(ephemeral=point)
    with pytest.raises(NoiseError):
        open_initiation(responder_id, msg)


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=range(len(LOW_ORDER_POINTS)))
def test_low_order_ephemeral_in_a_response_is_refused(point):
    initiator, responder, responder_id = _pair()
    msg = Initiation.parse(_packed_initiation(initiator))
    responder.consume_initiation(msg, open_initiation(responder_id, msg), 0.0)
    response = responder.create_response(9, StaticKey(E_R))
    with pytest.raises(NoiseError):
        initiator.consume_response(response._replace(ephemeral=point))
    assert initiator.state is State.INITIATION_CREATED


@pytest.mark.parametrize("point", LOW_ORDER_POINTS, ids=range(len(LOW_ORDER_POINTS)))
def test_a_peer_with_a_low_order_public_key_can_never_handshake(point):
    identity = Identity(StaticKey(S_I))
    hs = Handshake(identity, point)
    with pytest.raises(NoiseError):
        hs.create_initiation(1, StaticKey(E_I), WALL)
    assert hs.state is State.ZEROED


def test_timestamp_carries_the_wall_clock_whitened():
    initiator, _, responder_id = _pair()
    wall = WALL_EPOCH + 1234.999
    ref = Reference(S_R, b"")
    _, stamp, _ = ref.consume_initiation(_packed_initiation(initiator, wall=wall))
    seconds, nanos = struct.unpack(">QI", stamp)
    assert seconds == 2**62 + 10 + int(wall)
    assert nanos % 2**24 == 0 and 999_000_000 - 2**24 < nanos <= 999_000_000

