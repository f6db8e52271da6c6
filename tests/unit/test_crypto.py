"""tunvpn.protocol.crypto against published vectors and against the definitions.

Every vector below was typed in from its authority (RFC 7748, RFC 8439, RFC 7693,
draft-irtf-cfrg-xchacha-03) and cross-checked once, outside this suite, with libsodium.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from tunvpn.protocol import crypto
from tunvpn.protocol.crypto import (
    CryptoError,
    StaticKey,
    TransportCipher,
    aead_decrypt,
    aead_encrypt,
    clamp,
    hash_,
    hchacha20,
    kdf1,
    kdf2,
    kdf3,
    mac,
    public_key,
    xaead_decrypt,
    xaead_encrypt,
)

h = bytes.fromhex

SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, "
    b"sunscreen would be it."
)

# --- X25519: RFC 7748 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("scalar", "u", "expected"),
    [
        (  # section 5.2, first vector
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (  # section 5.2, second vector (its u has bit 255 set, which X25519 must ignore)
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ],
)
def test_x25519_rfc7748_section_5_2(scalar: str, u: str, expected: str) -> None:
    assert StaticKey(h(scalar)).dh(h(u)) == h(expected)


def test_x25519_rfc7748_section_5_2_iterated_1_and_1000() -> None:
    k = u = bytes([9]) + bytes(31)
    for iteration in range(1, 1001):
        k, u = StaticKey(k).dh(u), k
        if iteration == 1:
            assert k == h("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
    assert k == h("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")


ALICE_PRIVATE = h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = h("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_section_6_1_public_keys() -> None:
    assert public_key(ALICE_PRIVATE) == ALICE_PUBLIC
    assert public_key(BOB_PRIVATE) == BOB_PUBLIC
    assert StaticKey(ALICE_PRIVATE).public == ALICE_PUBLIC
    assert StaticKey(BOB_PRIVATE).public == BOB_PUBLIC


def test_x25519_rfc7748_section_6_1_shared_secret_both_ways() -> None:
    assert StaticKey(ALICE_PRIVATE).dh(BOB_PUBLIC) == SHARED
    assert StaticKey(BOB_PRIVATE).dh(ALICE_PUBLIC) == SHARED


def test_a_generated_key_is_fresh_and_its_public_half_is_its_own() -> None:
    first, second = StaticKey.generate(), StaticKey.generate()
    assert first.public != second.public
    assert StaticKey(first.private_bytes()).public == first.public
    assert first.dh(BOB_PUBLIC) == StaticKey(BOB_PRIVATE).dh(first.public)


def test_static_key_private_bytes_round_trip() -> None:
    assert StaticKey(ALICE_PRIVATE).private_bytes() == ALICE_PRIVATE


# The points of small order on Curve25519 and its twist (cr.yp.to/ecdh.html#validate; the
# same list libsodium refuses): 0, 1, two points of order 8, p-1, p, p+1.
LOW_ORDER_POINTS = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def _with_bit_255(point: str) -> bytes:
    """The same point to X25519, which masks bit 255 (RFC 7748 section 5)."""
    raw = bytearray(h(point))
    raw[31] |= 0x80
    return bytes(raw)


@pytest.mark.parametrize("point", [h(p) for p in LOW_ORDER_POINTS] + [_with_bit_255(p) for p in LOW_ORDER_POINTS])
@pytest.mark.parametrize("private", [ALICE_PRIVATE, BOB_PRIVATE, bytes(range(32))])
def test_low_order_points_are_refused(point: bytes, private: bytes) -> None:
    with pytest.raises(CryptoError):
        StaticKey(private).dh(point)


@pytest.mark.parametrize("length", [0, 1, 31, 33, 64])
def test_x25519_wrong_lengths(length: int) -> None:
    with pytest.raises(CryptoError):
        StaticKey(bytes(length))
    with pytest.raises(CryptoError):
        public_key(bytes(length))
    with pytest.raises(CryptoError):
        StaticKey(ALICE_PRIVATE).dh(bytes([9]) * length)
    with pytest.raises(CryptoError):
        clamp(bytes(length))


def test_clamp_sets_and_clears_exactly_the_curve25519_bits() -> None:
    assert clamp(b"\xff" * 32) == b"\xf8" + b"\xff" * 30 + b"\x7f"
    assert clamp(bytes(32)) == bytes(31) + b"\x40"
    for _ in range(200):
        raw = os.urandom(32)
        clamped = clamp(raw)
        assert clamped[0] == raw[0] & 0b1111_1000
        assert clamped[1:31] == raw[1:31]
        assert clamped[31] == (raw[31] & 0b0111_1111) | 0b0100_0000
        assert clamp(clamped) == clamped


def test_clamping_does_not_change_the_public_key() -> None:
    """X25519 clamps internally, so `wg pubkey` of an unclamped key equals that of its clamp."""
    for _ in range(20):
        raw = os.urandom(32)
        assert public_key(raw) == public_key(clamp(raw))


# --- ChaCha20-Poly1305: RFC 8439 ------------------------------------------------------

# Appendix A.5: its nonce 00000000 0102030405060708 has the WireGuard form 4 zero bytes ||
# counter (u64 little-endian), so it exercises aead_* including the nonce layout.  Section
# 2.8.2's nonce (07000000 || 4041424344454647) has no such form: aead_* take a counter, and
# TransportCipher.open takes a full nonce but no AAD, so no public path can run that vector.
A5_KEY = h("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
A5_COUNTER = int.from_bytes(h("0102030405060708"), "little")
A5_AAD = h("f33388860000000000004e91")
A5_PLAINTEXT = h(
    "496e7465726e65742d4472616674732061726520647261667420646f63756d65"
    "6e74732076616c696420666f722061206d6178696d756d206f6620736978206d"
    "6f6e74687320616e64206d617920626520757064617465642c207265706c6163"
    "65642c206f72206f62736f6c65746564206279206f7468657220646f63756d65"
    "6e747320617420616e792074696d652e20497420697320696e617070726f7072"
    "6961746520746f2075736520496e7465726e65742d4472616674732061732072"
    "65666572656e6365206d6174657269616c206f7220746f206369746520746865"
    "6d206f74686572207468616e206173202fe2809c776f726b20696e2070726f67"
    "726573732e2fe2809d"
)
A5_SEALED = h(
    "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
    "4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
    "332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
    "9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
    "b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
    "af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
    "0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
    "49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
    "a6ad5cb4022b02709b"
    "eead9d67890cbb22392336fea1851f38"
)


def test_aead_rfc8439_appendix_a5_decrypt_and_encrypt() -> None:
    assert aead_decrypt(A5_KEY, A5_COUNTER, A5_SEALED, A5_AAD) == A5_PLAINTEXT
    assert aead_encrypt(A5_KEY, A5_COUNTER, A5_PLAINTEXT, A5_AAD) == A5_SEALED


def test_aead_tampering_is_refused() -> None:
    for position in (0, len(A5_PLAINTEXT) // 2, len(A5_SEALED) - 16, len(A5_SEALED) - 1):
        tampered = bytearray(A5_SEALED)
        tampered[position] ^= 0x01
        with pytest.raises(CryptoError):
            aead_decrypt(A5_KEY, A5_COUNTER, bytes(tampered), A5_AAD)
    with pytest.raises(CryptoError):
        aead_decrypt(A5_KEY, A5_COUNTER, A5_SEALED, A5_AAD[:-1] + b"\x92")
    with pytest.raises(CryptoError):
        aead_decrypt(A5_KEY, A5_COUNTER, A5_SEALED, b"")
    with pytest.raises(CryptoError):
        aead_decrypt(A5_KEY, A5_COUNTER + 1, A5_SEALED, A5_AAD)
    with pytest.raises(CryptoError):
        aead_decrypt(A5_KEY, A5_COUNTER, A5_SEALED[:-1], A5_AAD)
    with pytest.raises(CryptoError):
        aead_decrypt(A5_KEY, A5_COUNTER, A5_SEALED[:15], A5_AAD)  # shorter than a tag


@pytest.mark.parametrize("length", [0, 16, 31, 33])
def test_aead_wrong_key_length(length: int) -> None:
    with pytest.raises(CryptoError):
        aead_encrypt(bytes(length), 0, b"x", b"")
    with pytest.raises(CryptoError):
        aead_decrypt(bytes(length), 0, bytes(17), b"")
    with pytest.raises(CryptoError):
        TransportCipher(bytes(length))


def _wire_nonce(counter: int) -> bytes:
    """What the data path builds from a transport header: 4 zero bytes || counter field."""
    return bytes(4) + counter.to_bytes(8, "little")


@pytest.mark.parametrize("counter", [0, 1, 255, 256, 2**32 - 1, 2**32, A5_COUNTER, 2**63, 2**64 - 1])
def test_transport_cipher_matches_aead_without_aad(counter: int) -> None:
    """seal builds its nonce on its own: it must be the nonce aead_* use (pinned by A.5)."""
    key = os.urandom(32)
    packet = os.urandom(77)
    sealed = TransportCipher(key).seal(counter, packet)
    assert sealed == aead_encrypt(key, counter, packet, b"")
    assert len(sealed) == len(packet) + crypto.TAG_SIZE
    assert TransportCipher(key).open(counter, sealed) == packet
    assert crypto.transport_nonce(counter) == _wire_nonce(counter)


def test_transport_cipher_pinned_by_rfc_vector_nonce_layout() -> None:
    """A.5 minus its AAD: the keystream part of the output must be A.5's ciphertext."""
    sealed = TransportCipher(A5_KEY).seal(A5_COUNTER, A5_PLAINTEXT)
    assert sealed[: len(A5_PLAINTEXT)] == A5_SEALED[: len(A5_PLAINTEXT)]
    assert sealed[len(A5_PLAINTEXT) :] != A5_SEALED[len(A5_PLAINTEXT) :]  # the tag covers the AAD


def test_transport_cipher_open_returns_none_on_bad_input() -> None:
    key = os.urandom(32)
    cipher = TransportCipher(key)
    sealed = cipher.seal(7, b"payload")
    assert cipher.open(7, sealed) == b"payload"
    for position in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x80
        assert cipher.open(7, bytes(tampered)) is None
    assert cipher.open(8, sealed) is None
    assert TransportCipher(os.urandom(32)).open(7, sealed) is None
    assert cipher.open(7, sealed[:15]) is None
    assert cipher.open(7, b"") is None


def test_transport_keepalive_is_a_bare_tag() -> None:
    cipher = TransportCipher(os.urandom(32))
    sealed = cipher.seal(3, b"")
    assert len(sealed) == 16
    assert cipher.open(3, sealed) == b""


# --- XChaCha20-Poly1305 and HChaCha20: draft-irtf-cfrg-xchacha-03 -------------------------


def test_hchacha20_draft_section_2_2_1() -> None:
    subkey = hchacha20(bytes(range(32)), h("000000090000004a0000000031415927"))
    assert subkey == h("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")


XKEY = bytes(range(0x80, 0xA0))
XNONCE = bytes(range(0x40, 0x58))
XAAD = h("50515253c0c1c2c3c4c5c6c7")
XSEALED = h(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49"
)


def test_xchacha20_poly1305_draft_appendix_a_3_1() -> None:
    assert xaead_encrypt(XKEY, XNONCE, SUNSCREEN, XAAD) == XSEALED
    assert xaead_decrypt(XKEY, XNONCE, XSEALED, XAAD) == SUNSCREEN


def test_xaead_tampering_is_refused() -> None:
    for position in (0, 50, len(XSEALED) - 16, len(XSEALED) - 1):
        tampered = bytearray(XSEALED)
        tampered[position] ^= 0x01
        with pytest.raises(CryptoError):
            xaead_decrypt(XKEY, XNONCE, bytes(tampered), XAAD)
    for position in (0, 15, 16, 23):  # both halves of the nonce matter
        nonce = bytearray(XNONCE)
        nonce[position] ^= 0x01
        with pytest.raises(CryptoError):
            xaead_decrypt(XKEY, bytes(nonce), XSEALED, XAAD)
    with pytest.raises(CryptoError):
        xaead_decrypt(XKEY, XNONCE, XSEALED, XAAD + b"\x00")


@pytest.mark.parametrize(("key_length", "nonce_length"), [(31, 24), (33, 24), (32, 23), (32, 25), (32, 12)])
def test_xaead_wrong_lengths(key_length: int, nonce_length: int) -> None:
    with pytest.raises(CryptoError):
        xaead_encrypt(bytes(key_length), bytes(nonce_length), b"", b"")
    with pytest.raises(CryptoError):
        xaead_decrypt(bytes(key_length), bytes(nonce_length), bytes(16), b"")


@pytest.mark.parametrize(("key_length", "nonce_length"), [(31, 16), (33, 16), (32, 15), (32, 17), (32, 24)])
def test_hchacha20_wrong_lengths(key_length: int, nonce_length: int) -> None:
    with pytest.raises(CryptoError):
        hchacha20(bytes(key_length), bytes(nonce_length))


# --- BLAKE2s, HMAC, KDF, MAC ---------------------------------------------------------------


def test_hash_rfc7693_abc() -> None:
    assert hash_(b"abc") == h("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982")


def test_hash_is_over_the_concatenation() -> None:
    assert hash_(b"a", b"", b"bc") == hash_(b"abc")
    assert hash_() == hashlib.blake2s(b"").digest()


def _hmac_blake2s_by_definition(key: bytes, message: bytes) -> bytes:
    """RFC 2104 written out: BLAKE2s has 64-byte blocks; longer keys are hashed first."""
    block = 64
    if len(key) > block:
        key = hashlib.blake2s(key).digest()
    key = key.ljust(block, b"\x00")
    inner = hashlib.blake2s(bytes(b ^ 0x36 for b in key) + message).digest()
    return hashlib.blake2s(bytes(b ^ 0x5C for b in key) + inner).digest()


# The definition written out, and the stdlib's own HMAC over BLAKE2s as a second oracle.
@pytest.mark.parametrize("key_length", [0, 1, 16, 32, 63, 64, 65, 100])
def test_hmac_blake2s_matches_its_definition_and_the_stdlib(key_length: int) -> None:
    key = os.urandom(key_length)
    for message in (b"", b"\x01", os.urandom(31), os.urandom(200)):
        expected = _hmac_blake2s_by_definition(key, message)
        assert crypto.hmac_(key, message) == expected == hmac.digest(key, message, hashlib.blake2s)


def _kdf_by_definition(count: int, key: bytes, data: bytes) -> list[bytes]:
    """WireGuard paper: t0 = HMAC(key, data); t1 = HMAC(t0, 0x1); t_i = HMAC(t0, t_{i-1} || i)."""
    t0 = _hmac_blake2s_by_definition(key, data)
    outputs = [_hmac_blake2s_by_definition(t0, b"\x01")]
    for i in range(2, count + 1):
        outputs.append(_hmac_blake2s_by_definition(t0, outputs[-1] + bytes([i])))
    return outputs


@pytest.mark.parametrize("data_length", [0, 32, 100])
def test_kdf_1_2_3_match_the_definition(data_length: int) -> None:
    key = os.urandom(32)
    data = os.urandom(data_length)
    assert [kdf1(key, data)] == _kdf_by_definition(1, key, data)
    assert list(kdf2(key, data)) == _kdf_by_definition(2, key, data)
    assert list(kdf3(key, data)) == _kdf_by_definition(3, key, data)
    assert kdf2(key, data)[0] == kdf1(key, data) == kdf3(key, data)[0]


def test_mac_is_keyed_blake2s_with_a_16_byte_digest() -> None:
    for key_length in (16, 32):
        key = os.urandom(key_length)
        data = os.urandom(116)
        tag = mac(key, data)
        assert len(tag) == 16
        assert tag == hashlib.blake2s(data, digest_size=16, key=key).digest()
        # The digest size is a BLAKE2 parameter, not a truncation; and the key matters.
        assert tag != hashlib.blake2s(data, key=key).digest()[:16]
        assert tag != hashlib.blake2s(data, digest_size=16).digest()
