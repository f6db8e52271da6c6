"""Receiver indices: unique, random, released only by their owner, bounded on a broken RNG."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from tunvpn.protocol.indextable import IndexTable


class Owner:
    pass


def test_allocate_gives_unique_indices_that_map_back() -> None:
    table: IndexTable[Owner] = IndexTable(os.urandom)
    owners = [Owner() for _ in range(5000)]
    indices = [table.allocate(owner) for owner in owners]
    assert len(set(indices)) == len(indices) == len(table)
    assert all(0 <= index < 2**32 for index in indices)
    for index, owner in zip(indices, owners):
        assert table.get(index) is owner


def test_indices_come_from_the_random_source_little_endian() -> None:
    table: IndexTable[Owner] = IndexTable(lambda n: bytes([1, 2, 3, 4])[:n])
    assert table.allocate(Owner()) == 0x04030201


def test_collisions_are_retried() -> None:
    """A source that repeats itself a few times still yields a fresh index."""
    zero, one = bytes(4), (1).to_bytes(4, "little")
    draws = iter([zero] + [zero] * 10 + [one])  # the first owner's draw, then ten collisions
    table: IndexTable[Owner] = IndexTable(lambda n: next(draws))
    assert table.allocate(Owner()) == 0
    assert table.allocate(Owner()) == 1


def test_a_broken_random_source_raises_after_bounded_attempts() -> None:
    calls = itertools.count()

    def stuck(n: int) -> bytes:
        next(calls)
        return bytes(n)

    table: IndexTable[Owner] = IndexTable(stuck)
    table.allocate(Owner())
    with pytest.raises(RuntimeError):
        table.allocate(Owner())
    attempts = next(calls) - 1  # minus the first, successful allocation
    assert 1 < attempts <= 1000
    assert len(table) == 1


def test_get_unknown_index() -> None:
    table: IndexTable[Owner] = IndexTable(os.urandom)
    assert table.get(12345) is None


def test_release_only_by_owner() -> None:
    table: IndexTable[Owner] = IndexTable(os.urandom)
    owner, intruder = Owner(), Owner()
    index = table.allocate(owner)
    table.release(index, intruder)
    assert table.get(index) is owner
    table.release(index, owner)
    assert table.get(index) is None
    assert len(table) == 0
    table.release(index, owner)  # twice is harmless
    table.release(index)


def test_release_without_owner_frees_unconditionally() -> None:
    table: IndexTable[Owner] = IndexTable(os.urandom)
    index = table.allocate(Owner())
    table.release(index)
    assert table.get(index) is None


def test_replace_hands_the_index_over() -> None:
    """A finished handshake passes its index to the keypair; the handshake can no longer free it."""
    table: IndexTable[Owner] = IndexTable(os.urandom)
    handshake, keypair = Owner(), Owner()
    index = table.allocate(handshake)
    table.replace(index, keypair)
    assert table.get(index) is keypair
    assert len(table) == 1
    table.release(index, handshake)
    assert table.get(index) is keypair
    table.release(index, keypair)
    assert len(table) == 0


def test_released_indices_can_be_reused() -> None:
    values = iter([b"\x07\x00\x00\x00", b"\x07\x00\x00\x00"])
    table: IndexTable[Owner] = IndexTable(lambda n: next(values))
    first = Owner()
    index = table.allocate(first)
    table.release(index, first)
    second = Owner()
    assert table.allocate(second) == index
    assert table.get(index) is second


def test_random_allocate_release_churn_stays_consistent() -> None:
    rng = random.Random(3)
    table: IndexTable[Owner] = IndexTable(lambda n: rng.getrandbits(8 * n).to_bytes(n, "little"))
    live: dict[int, Owner] = {}
    for _ in range(20_000):
        if live and rng.random() < 0.5:
            index = rng.choice(list(live))
            table.release(index, live.pop(index))
        else:
            owner = Owner()
            index = table.allocate(owner)
            assert index not in live
            live[index] = owner
    assert len(table) == len(live)
    assert all(table.get(index) is owner for index, owner in live.items())
