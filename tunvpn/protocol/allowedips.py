"""Cryptokey routing: which peer owns an address (longest-prefix match).

Prefixes are kept in one dict per prefix length, keyed by the masked
network as an integer.  A lookup tries the lengths in use from longest to
shortest, so its cost is the number of distinct prefix lengths (a handful in
practice), with no per-bit tree walk in Python.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Family(Generic[T]):
    __slots__ = ("bits", "tables", "lengths")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: tuple[int, ...] = ()  # longest first

    def insert(self, network: int, prefixlen: int, owner: T) -> None:
        table = self.tables.get(prefixlen)
        if table is None:
            table = self.tables[prefixlen] = {}
            self.lengths = tuple(sorted(self.tables, reverse=True))
        table[network >> (self.bits - prefixlen)] = owner

    def lookup(self, address: int) -> T | None:
        bits = self.bits
        tables = self.tables
        for prefixlen in self.lengths:
            owner = tables[prefixlen].get(address >> (bits - prefixlen))
            if owner is not None:
                return owner
        return None

    def remove_owner(self, owner: T) -> None:
        for prefixlen in list(self.tables):
            table = self.tables[prefixlen]
            for key in [k for k, v in table.items() if v is owner]:
                del table[key]
            if not table:
                del self.tables[prefixlen]
        self.lengths = tuple(sorted(self.tables, reverse=True))

    def entries(self) -> Iterator[tuple[int, int, T]]:
        for prefixlen, table in self.tables.items():
            for key, owner in table.items():
                yield key << (self.bits - prefixlen) if prefixlen else 0, prefixlen, owner


class AllowedIPs(Generic[T]):
    """A prefix inserted twice belongs to the last owner, as with `wg set`."""

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def insert(self, network: IPNetwork | str, owner: T) -> None:
        net = ipaddress.ip_network(network, strict=False)
        family = self._v4 if net.version == 4 else self._v6
        family.insert(int(net.network_address), net.prefixlen, owner)

    def remove_owner(self, owner: T) -> None:
        self._v4.remove_owner(owner)
        self._v6.remove_owner(owner)

    def lookup_v4(self, address: bytes) -> T | None:
        return self._v4.lookup(int.from_bytes(address, "big"))

    def lookup_v6(self, address: bytes) -> T | None:
        return self._v6.lookup(int.from_bytes(address, "big"))

    def lookup(self, address: bytes) -> T | None:
        """Owner of a 4- or 16-byte packed address."""
        if len(address) == 4:
            return self.lookup_v4(address)
        if len(address) == 16:
            return self.lookup_v6(address)
        return None

    def networks_of(self, owner: T) -> list[IPNetwork]:
        found: list[IPNetwork] = []
        for family, factory in ((self._v4, ipaddress.IPv4Network), (self._v6, ipaddress.IPv6Network)):
            for network, prefixlen, entry_owner in family.entries():
                if entry_owner is owner:
                    found.append(factory((network, prefixlen)))
        return sorted(found, key=lambda n: (n.version, n.network_address, n.prefixlen))
