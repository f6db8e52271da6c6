"""The invite token: what `tunvpn invite` prints and `tunvpn join` reads, round trip and damage."""

from __future__ import annotations

import base64

import pytest

from tunvpn.invitetoken import SCHEME, InvalidToken, InviteToken, decode_token, encode_token
from tunvpn.keys import generate_preshared_key, generate_private_key

TOKEN = InviteToken(bytes(range(32)), generate_private_key(), generate_preshared_key(), 1_800_000_000, "office",
                    ("vpn.example.org:51820", "[2001:db8::1]:51820", "192.0.2.1:443"))


def body_of(text: str) -> bytes:
    encoded = text[len(SCHEME):]
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))


def token_of(body: bytes) -> str:
    return SCHEME + base64.urlsafe_b64encode(body).decode().rstrip("=")


def test_round_trip_keeps_every_field():
    text = encode_token(TOKEN)
    assert text.startswith("tunvpn://join/") and " " not in text
    assert decode_token(text) == TOKEN


def test_a_wrapped_or_indented_copy_still_reads():
    text = encode_token(TOKEN)
    assert decode_token("  " + text[:30] + "\n  " + text[30:] + "\n") == TOKEN


def test_the_secrets_are_not_in_its_repr():
    assert repr(TOKEN.invite_private_key) not in repr(TOKEN)
    assert repr(TOKEN.preshared_key) not in repr(TOKEN)


@pytest.mark.parametrize("cut", [1, 5, 16, 40, 100])
def test_truncation_is_named_as_such(cut):
    text = encode_token(TOKEN)
    with pytest.raises(InvalidToken, match="truncated"):
        decode_token(text[:-cut])


def test_a_token_cut_to_its_first_bytes_is_truncated():
    with pytest.raises(InvalidToken, match="truncated"):
        decode_token(SCHEME + "AQ")


@pytest.mark.parametrize("index", [3, 10, 40, 70, 100, 120, -20, -1])
def test_any_flipped_byte_fails_the_integrity_check(index):
    body = bytearray(body_of(encode_token(TOKEN)))
    body[index] ^= 0x01
    with pytest.raises(InvalidToken, match="damaged"):
        decode_token(token_of(bytes(body)))


def test_every_single_bit_flip_is_caught():
    body = body_of(encode_token(TOKEN))
    for index in range(3, len(body)):
        for bit in range(8):
            damaged = bytearray(body)
            damaged[index] ^= 1 << bit
            with pytest.raises(InvalidToken):
                decode_token(token_of(bytes(damaged)))


def test_extra_bytes_are_damage():
    with pytest.raises(InvalidToken, match="damaged"):
        decode_token(token_of(body_of(encode_token(TOKEN)) + b"x"))


def test_a_changed_character_in_the_text_is_caught():
    text = encode_token(TOKEN)
    index = len(SCHEME) + 50
    swapped = text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1:]
    with pytest.raises(InvalidToken):
        decode_token(swapped)


@pytest.mark.parametrize("text, reason", [
    ("https://example.org/join", "not an invite"),
    ("tunvpn://join/abc$def", "characters"),
    ("", "not an invite"),
])
def test_what_is_not_a_token_says_so(text, reason):
    with pytest.raises(InvalidToken, match=reason):
        decode_token(text)


def test_another_format_version_is_named():
    body = bytearray(body_of(encode_token(TOKEN)))
    body[0] = 2
    with pytest.raises(InvalidToken, match="version 2"):
        decode_token(token_of(bytes(body)))


def test_encoding_refuses_what_decoding_would():
    with pytest.raises(ValueError):
        encode_token(InviteToken(TOKEN.server_public_key, TOKEN.invite_private_key, TOKEN.preshared_key,
                                 TOKEN.expires, "../etc", TOKEN.endpoints))
    with pytest.raises(ValueError):
        encode_token(InviteToken(TOKEN.server_public_key, TOKEN.invite_private_key, TOKEN.preshared_key,
                                 TOKEN.expires, "office", ()))
