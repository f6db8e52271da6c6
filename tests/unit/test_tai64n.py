"""TAI64N labels: encoding, whitening of the nanoseconds, ordering."""

from __future__ import annotations

import random

import pytest

from tunvpn.protocol.tai64n import TAI64N_SIZE, is_after, timestamp

EPOCH_LABEL = 2**62 + 10
WHITENING = 2**24  # nanoseconds: the label's resolution (~16.8 ms)


def decode(label: bytes) -> tuple[int, int]:
    return int.from_bytes(label[:8], "big"), int.from_bytes(label[8:], "big")


@pytest.mark.parametrize(
    ("wall", "label_hex"),
    [
        (0.0, "400000000000000a" "00000000"),
        (1.0, "400000000000000b" "00000000"),
        (255.0, "4000000000000109" "00000000"),
        (0.5, "400000000000000a" "1d000000"),  # 5e8 ns rounds down to 29 * 2**24
        (1_700_000_000.25, "400000006553f10a" "0e000000"),  # 2.5e8 ns -> 14 * 2**24
    ],
)
def test_known_encodings(wall: float, label_hex: str) -> None:
    assert timestamp(wall) == bytes.fromhex(label_hex)


def test_layout_is_12_bytes_big_endian_seconds_then_nanoseconds() -> None:
    label = timestamp(1_700_000_123.75)
    assert TAI64N_SIZE == 12 and len(label) == 12
    seconds, nanos = decode(label)
    assert seconds == EPOCH_LABEL + 1_700_000_123
    assert nanos == 750_000_000 // WHITENING * WHITENING


def test_nanoseconds_are_rounded_down_to_multiples_of_2_pow_24() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        whole = rng.randint(0, 2**33)
        true_nanos = rng.randint(0, 999_999_999)
        seconds, nanos = decode(timestamp(whole + true_nanos / 1e9))
        assert seconds == EPOCH_LABEL + whole
        assert nanos % WHITENING == 0
        # Within one whitening step below the truth (a float second carries ~0.5 us of error).
        assert true_nanos - WHITENING - 1000 < nanos <= true_nanos + 1000
        assert nanos <= 999_999_999


def test_last_label_of_a_second() -> None:
    assert decode(timestamp(41.999_999_999)) == (EPOCH_LABEL + 41, 59 * WHITENING)


def test_labels_never_go_backwards_as_time_advances() -> None:
    rng = random.Random(11)
    times = sorted(rng.uniform(1.6e9, 1.6e9 + 100) for _ in range(5000))
    labels = [timestamp(t) for t in times]
    assert labels == sorted(labels)


def test_labels_a_whitening_step_apart_are_strictly_after() -> None:
    now = 1_700_000_000.0
    previous = timestamp(now)
    for step in range(1, 500):  # 20 ms steps are always in a later 16.8 ms bucket
        label = timestamp(now + step * 0.02)
        assert is_after(label, previous)
        previous = label


def test_is_after() -> None:
    earlier, later = timestamp(100.9), timestamp(101.0)
    assert is_after(later, earlier)
    assert not is_after(earlier, later)
    assert not is_after(later, later)  # equal is a replay
    assert is_after(earlier, None)  # nothing accepted from that peer yet


def test_times_inside_one_bucket_give_equal_labels() -> None:
    """So a replay within ~16 ms is still refused: its label is not after the last one."""
    base = 1_700_000_000 + 3 * WHITENING / 1e9
    first, second = timestamp(base + 0.001), timestamp(base + 0.015)
    assert first == second
    assert not is_after(second, first)
