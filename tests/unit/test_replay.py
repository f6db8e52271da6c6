"""The replay window (RFC 6479 bitmap sized as wireguard-go does) against a reference model."""

from __future__ import annotations

import random

import pytest

from tunvpn.protocol.keypair import REJECT_AFTER_MESSAGES
from tunvpn.protocol.replay import BLOCK_BITS, RING_BLOCKS, WINDOW_SIZE, ReplayWindow

LIMIT = REJECT_AFTER_MESSAGES


class ReferenceWindow:
    """The rule the bitmap implements, written plainly.

    A counter is accepted iff it is below the limit, has not been accepted before, and is
    at most WINDOW_SIZE behind the greatest accepted counter (which starts at 0).  The
    bitmap makes this exact: the ring's 128 blocks always hold the block of the greatest
    counter and the 127 before it, and 127 * 64 = WINDOW_SIZE.
    """

    def __init__(self) -> None:
        self.greatest = 0
        self.seen: set[int] = set()

    def accept(self, counter: int, limit: int) -> bool:
        if counter >= limit or counter in self.seen:
            return False
        if self.greatest - counter > WINDOW_SIZE:
            return False
        self.seen.add(counter)
        if counter > self.greatest:
            self.greatest = counter
            if len(self.seen) > 4 * WINDOW_SIZE:  # keep the model small; old ones are too old anyway
                self.seen = {c for c in self.seen if self.greatest - c <= WINDOW_SIZE}
        return True


def test_window_size_is_wireguard_gos() -> None:
    assert (BLOCK_BITS, RING_BLOCKS, WINDOW_SIZE) == (64, 128, 8128)
    assert LIMIT == 2**64 - 2**13 - 1


def test_counter_zero_is_accepted_once() -> None:
    window = ReplayWindow()
    assert window.accept(0, LIMIT)
    assert not window.accept(0, LIMIT)


def test_in_order_then_all_replayed() -> None:
    window = ReplayWindow()
    assert all(window.accept(c, LIMIT) for c in range(3 * WINDOW_SIZE))
    assert not any(window.accept(c, LIMIT) for c in range(3 * WINDOW_SIZE))


def test_out_of_order_inside_the_window() -> None:
    window = ReplayWindow()
    assert window.accept(5000, LIMIT)
    for counter in (4999, 1, 0, 4000, 63, 64, 65, 127, 128):
        assert window.accept(counter, LIMIT), counter
        assert not window.accept(counter, LIMIT), counter
    assert window.accept(5001, LIMIT)
    assert not window.accept(5000, LIMIT)


@pytest.mark.parametrize("greatest", [WINDOW_SIZE + 1, 10_000, 10_048, 10_047, 10_111, 2**40 + 17])
def test_exactly_at_the_window_edge(greatest: int) -> None:
    """WINDOW_SIZE behind the greatest is still inside; WINDOW_SIZE + 1 behind is too old."""
    window = ReplayWindow()
    assert window.accept(greatest, LIMIT)
    assert not window.accept(greatest - WINDOW_SIZE - 1, LIMIT)
    assert window.accept(greatest - WINDOW_SIZE, LIMIT)
    assert not window.accept(greatest - WINDOW_SIZE, LIMIT)
    assert not window.accept(greatest - WINDOW_SIZE - 1, LIMIT)  # refusing it changed nothing


def test_jump_beyond_the_window_clears_stale_bits() -> None:
    """A counter sharing ring slot and bit with an old one must not look like a replay."""
    window = ReplayWindow()
    assert all(window.accept(c, LIMIT) for c in range(200))
    # 8192 = one full turn of the ring: same block slot, same bit as counter 5.
    assert window.accept(5 + RING_BLOCKS * BLOCK_BITS, LIMIT)
    for counter in range(RING_BLOCKS * BLOCK_BITS + 100, RING_BLOCKS * BLOCK_BITS + 200):
        assert window.accept(counter, LIMIT), counter
    far = 10 * WINDOW_SIZE + 3
    assert window.accept(far, LIMIT)
    assert all(window.accept(far - d, LIMIT) for d in range(1, WINDOW_SIZE + 1))
    assert not window.accept(far - WINDOW_SIZE - 1, LIMIT)


def test_jump_of_127_blocks_keeps_the_oldest_block() -> None:
    window = ReplayWindow()
    assert window.accept(5, LIMIT)
    assert window.accept(5 + WINDOW_SIZE, LIMIT)  # exactly 127 blocks ahead
    assert not window.accept(5, LIMIT)  # still inside, still seen
    assert not window.accept(4, LIMIT)  # one too old
    assert window.accept(6, LIMIT)


def test_counters_at_the_reject_limit() -> None:
    window = ReplayWindow()
    assert window.accept(10, LIMIT)
    assert not window.accept(LIMIT, LIMIT)
    assert not window.accept(LIMIT + 1, LIMIT)
    assert not window.accept(2**64 - 1, LIMIT)
    assert window.accept(9, LIMIT)  # the refused counters did not move the window
    assert window.accept(LIMIT - 1, LIMIT)
    assert not window.accept(LIMIT - 1, LIMIT)
    assert window.accept(LIMIT - 1 - WINDOW_SIZE, LIMIT)
    assert not window.accept(LIMIT - 2 - WINDOW_SIZE, LIMIT)


def test_small_limits() -> None:
    window = ReplayWindow()
    assert not window.accept(0, 0)
    assert window.accept(0, 1)
    assert not window.accept(1, 1)


def _random_counters(rng: random.Random, steps: int) -> list[int]:
    """Mostly near the front of the window, with replays, edge cases, jumps and limit hits."""
    counters: list[int] = []
    front = 0
    for _ in range(steps):
        kind = rng.random()
        if kind < 0.45:
            front += rng.randint(0, 3)
            counter = front
        elif kind < 0.70:
            counter = front - rng.randint(0, WINDOW_SIZE + 200)
        elif kind < 0.80 and counters:
            counter = rng.choice(counters[-500:])  # a replay
        elif kind < 0.85:
            counter = front - WINDOW_SIZE - rng.randint(-1, 1)
        elif kind < 0.87:
            front += rng.choice([64, 127 * 64, 128 * 64, 129 * 64, WINDOW_SIZE, rng.randint(1, 5 * WINDOW_SIZE)])
            counter = front
        elif kind < 0.89:
            counter = LIMIT + rng.randint(0, 2)  # refused, and must not move the window
        else:
            counter = front + rng.randint(1, 200)
        counters.append(max(counter, 0))
    return counters


@pytest.mark.parametrize("limit_crossed_midway", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_random_sequences_agree_with_the_reference_model(seed: int, limit_crossed_midway: bool) -> None:
    counters = _random_counters(random.Random(seed), 20_000)
    front_at_midway = max(c for c in counters[: len(counters) // 2] if c < LIMIT)
    limit = front_at_midway + 1 if limit_crossed_midway else LIMIT
    window, model = ReplayWindow(), ReferenceWindow()
    outcomes = {True: 0, False: 0}
    for step, counter in enumerate(counters):
        accepted = window.accept(counter, limit)
        assert accepted == model.accept(counter, limit), (seed, step, counter)
        outcomes[accepted] += 1
    assert min(outcomes.values()) > 2_000  # both outcomes really exercised


@pytest.mark.parametrize("seed", range(4))
def test_random_shuffles_of_a_dense_range(seed: int) -> None:
    """Reordering within a few windows (the common case on a real network)."""
    rng = random.Random(1000 + seed)
    counters = list(range(4 * WINDOW_SIZE))
    for start in range(0, len(counters), 1000):  # local reordering
        chunk = counters[start : start + 1000]
        rng.shuffle(chunk)
        counters[start : start + 1000] = chunk
    counters += rng.sample(counters, 2000)  # late duplicates
    window, model = ReplayWindow(), ReferenceWindow()
    for counter in counters:
        assert window.accept(counter, LIMIT) == model.accept(counter, LIMIT), counter
