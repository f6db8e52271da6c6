"""TOTP against RFC 6238 Appendix B (SHA1 rows) and RFC 4226 Appendix D, and the secret codec."""

from __future__ import annotations

import pytest

from tunvpn.totp import (decode_secret, encode_secret, generate_secret, hotp, otpauth_uri, time_step, totp)

RFC_SEED = b"12345678901234567890"

# RFC 6238, Appendix B: (Unix time, 8-digit TOTP) for the SHA1 mode.
RFC6238_SHA1 = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]

# RFC 4226, Appendix D: HOTP values for counters 0-9, 6 digits.
RFC4226 = ["755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871", "520489"]


@pytest.mark.parametrize("unix_time, expected", RFC6238_SHA1)
def test_rfc6238_sha1_vectors(unix_time, expected):
    assert totp(RFC_SEED, unix_time, digits=8) == expected


def test_rfc6238_time_steps():
    assert [time_step(t) for t, _ in RFC6238_SHA1] == [1, 0x23523EC, 0x23523ED, 0x273EF07, 0x3F940AA, 0x27BC86AA]


@pytest.mark.parametrize("counter, expected", list(enumerate(RFC4226)))
def test_rfc4226_hotp_vectors(counter, expected):
    assert hotp(RFC_SEED, counter) == expected


def test_six_digits_are_the_last_six_of_eight():
    assert totp(RFC_SEED, 59) == "287082"


def test_a_step_lasts_thirty_seconds():
    assert totp(RFC_SEED, 30) == totp(RFC_SEED, 59.999) != totp(RFC_SEED, 60)


def test_secrets_round_trip_through_base32():
    secret = generate_secret()
    assert len(secret) == 20
    text = encode_secret(secret)
    assert "=" not in text and decode_secret(text) == secret
    spaced = " ".join(text[i:i + 4] for i in range(0, len(text), 4)).lower() + "\n"
    assert decode_secret(spaced) == secret


@pytest.mark.parametrize("text", ["", "not base32!", "AAAA1AAA", "A", encode_secret(b"short secret")])
def test_bad_secrets_are_refused(text):
    with pytest.raises(ValueError):
        decode_secret(text)


def test_otpauth_uri_carries_everything_an_app_needs():
    uri = otpauth_uri(RFC_SEED, "tunvpn office", "alice")
    assert uri == ("otpauth://totp/tunvpn%20office:alice?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"
                   "&issuer=tunvpn%20office&algorithm=SHA1&digits=6&period=30")
