"""Receiver indices: the random 32-bit handles that route incoming messages.

Each live handshake and each keypair owns one index; a response, cookie reply
or transport message names it.  Indices are random so that they say nothing
about how many sessions exist.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")

_MAX_ATTEMPTS = 64


class IndexTable(Generic[T]):
    def __init__(self, random_bytes: Callable[[int], bytes]) -> None:
        self._random_bytes = random_bytes
        self._entries: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, index: int) -> T | None:
        return self._entries.get(index)

    def items(self) -> list[tuple[int, T]]:
        return list(self._entries.items())

    def allocate(self, owner: T) -> int:
        for _ in range(_MAX_ATTEMPTS):
            index = int.from_bytes(self._random_bytes(4), "little")
            if index not in self._entries:
                self._entries[index] = owner
                return index
        raise RuntimeError("could not find a free receiver index; is the random source broken?")

    def replace(self, index: int, owner: T) -> None:
        """Hand an index from a finished handshake to the keypair it produced."""
        self._entries[index] = owner

    def release(self, index: int, owner: T | None = None) -> None:
        """Free `index`, but only if it still belongs to `owner` when one is given."""
        if owner is None or self._entries.get(index) is owner:
            self._entries.pop(index, None)
