"""Cryptokey routing: which peer owns an address (longest-prefix match).

Prefixes are kept in one dict per prefix length, keyed by the masked
network as an integer.  A lookup tries the lengths in use from longest to
shortest, so its cost is the number of distinct prefix lengths (a handful in
practice), with no per-bit tree walk in Python.

Each owner also has the list of its own prefixes (as wireguard-go keeps one
per peer), so listing or removing one peer's prefixes costs what that peer
has, not what the whole table holds: a server with thousands of peers
reloads and reports without scanning every prefix per peer.

The answers for recently seen addresses are memoized per family (a packet
stream has few distinct addresses), and the memo is dropped whenever the
table changes, so a cached answer is never stale.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

Owner = TypeVar("Owner")

_MEMO_MAX = 4096  # addresses remembered per family; spoofed floods only make it start over
_UNKNOWN = object()

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NETWORK_TYPES = (ipaddress.IPv4Network, ipaddress.IPv6Network)


class _Family(Generic[Owner]):
    __slots__ = ("bits", "tables", "lengths", "owned", "memo")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.memo: dict[bytes, Owner | None] = {}  # packed address -> lookup's answer
        self.tables: dict[int, dict[int, Owner]] = {}  # prefix length -> masked network >> host bits -> owner
        self.lengths: tuple[int, ...] = ()  # longest first
        self.owned: dict[Owner, set[tuple[int, int]]] = {}  # owner -> its (prefix length, key) entries

    def insert(self, network: int, prefixlen: int, owner: Owner) -> None:
        self.memo.clear()
        table = self.tables.get(prefixlen)
        if table is None:
            table = self.tables[prefixlen] = {}
            self.lengths = tuple(sorted(self.tables, reverse=True))
        key = network >> (self.bits - prefixlen)
        entry = (prefixlen, key)
        previous = table.get(key)
        if previous is not None and previous is not owner:
            self._disown(previous, entry)
        table[key] = owner
        self.owned.setdefault(owner, set()).add(entry)

    def _disown(self, owner: Owner, entry: tuple[int, int]) -> None:
        entries = self.owned[owner]
        entries.discard(entry)
        if not entries:
            del self.owned[owner]

    def lookup(self, address: int) -> Owner | None:
        # Locals, not attributes, inside the loop: this runs for every packet in both directions.
        bits = self.bits
        tables = self.tables
        for prefixlen in self.lengths:
            owner = tables[prefixlen].get(address >> (bits - prefixlen))
            if owner is not None:
                return owner
        return None

    def lookup_packed(self, address: bytes) -> Owner | None:
        memo = self.memo
        owner = memo.get(address, _UNKNOWN)
        if owner is _UNKNOWN:
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            owner = memo[address] = self.lookup(int.from_bytes(address, "big"))
        return owner  # type: ignore[return-value]

    def remove_owner(self, owner: Owner) -> None:
        self.memo.clear()
        emptied = False
        for prefixlen, key in self.owned.pop(owner, ()):
            table = self.tables[prefixlen]
            del table[key]
            if not table:
                del self.tables[prefixlen]
                emptied = True
        if emptied:
            self.lengths = tuple(sorted(self.tables, reverse=True))

    def networks_of(self, owner: Owner) -> list[tuple[int, int]]:
        """(network, prefix length) of each of the owner's prefixes."""
        bits = self.bits
        return [(key << (bits - prefixlen), prefixlen) for prefixlen, key in self.owned.get(owner, ())]


class AllowedIPs(Generic[Owner]):
    """A prefix inserted twice belongs to the last owner, as with `wg set`.

    Owners are told apart by hash and equality (peers: by identity)."""

    def __init__(self) -> None:
        self._v4: _Family[Owner] = _Family(32)
        self._v6: _Family[Owner] = _Family(128)

    def insert(self, network: IPNetwork | str, owner: Owner) -> None:
        # A network object needs no parsing (ip_network would first fail at IPv4 for an IPv6 one).
        net = network if isinstance(network, _NETWORK_TYPES) else ipaddress.ip_network(network, strict=False)
        family = self._v4 if net.version == 4 else self._v6
        family.insert(int(net.network_address), net.prefixlen, owner)

    def remove_owner(self, owner: Owner) -> None:
        """Forget every prefix of `owner`: O(its prefixes)."""
        self._v4.remove_owner(owner)
        self._v6.remove_owner(owner)

    def lookup_v4(self, address: bytes) -> Owner | None:
        return self._v4.lookup_packed(address)

    def lookup_v6(self, address: bytes) -> Owner | None:
        return self._v6.lookup_packed(address)

    def lookup(self, address: bytes) -> Owner | None:
        """Owner of a 4- or 16-byte packed address."""
        if len(address) == 4:
            return self.lookup_v4(address)
        if len(address) == 16:
            return self.lookup_v6(address)
        return None

    def networks_of(self, owner: Owner) -> list[IPNetwork]:
        """The owner's prefixes, IPv4 first, each family by address: O(its prefixes)."""
        found: list[IPNetwork] = [ipaddress.IPv4Network(entry) for entry in sorted(self._v4.networks_of(owner))]
        found += [ipaddress.IPv6Network(entry) for entry in sorted(self._v6.networks_of(owner))]
        return found
