"""The server's client address pool: one stable address per family for each client key.

Pure logic, no I/O. The pool of a family is the server's subnet (optionally narrowed by
`Pool = FIRST-LAST`) minus what must never be handed out: the network and broadcast addresses,
the server's own addresses, and every network a configured [Peer] routes inside the subnet
(its fixed address). Addresses are kept as integers and the excluded ones as a sorted list of
intervals, so an IPv6 /64 is never materialised: finding the lowest free address walks past at
most every excluded interval and every lease once.

Allocation is lowest-free-first, so the same config and the same history give the same
addresses, and a lease is sticky: the same key gets the same answer until it is released.
"""

from __future__ import annotations

import bisect
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping

from .keys import encode_key

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FAMILIES = (4, 6)


class PoolExhausted(Exception):
    """No free address is left for a new client (or the server has no pool at all)."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A client's tunnel addresses, each with the prefix length of the server's subnet."""

    ipv4: ipaddress.IPv4Interface | None = None
    ipv6: ipaddress.IPv6Interface | None = None

    def get(self, version: int) -> IPInterface | None:
        return self.ipv4 if version == 4 else self.ipv6

    def with_address(self, version: int, address: IPInterface | None) -> Lease:
        if version == 4:
            return Lease(address, self.ipv6)  # type: ignore[arg-type]
        return Lease(self.ipv4, address)  # type: ignore[arg-type]

    @property
    def addresses(self) -> list[IPInterface]:
        """The addresses present, IPv4 first (the order a status line shows them)."""
        return [address for address in (self.ipv4, self.ipv6) if address is not None]


@dataclass(frozen=True, slots=True)
class _Exclusion:
    first: int
    last: int
    why: str  # for warnings: what holds these addresses


class _FamilyPool:
    """One family's range, its exclusions and its leased addresses."""

    def __init__(self, subnet: IPNetwork, first: int, last: int) -> None:
        self.subnet = subnet
        self.first = first
        self.last = last
        self.exclusions: list[_Exclusion] = []
        self.blocked: list[tuple[int, int]] = []  # merged, sorted, disjoint
        self.blocked_starts: list[int] = []
        self.owners: dict[int, bytes] = {}  # leased address -> key
        self.floor = first  # every address in [first, floor) is blocked or leased

    def describe(self) -> str:
        low, high = self.address(self.first), self.address(self.last)
        return f"{low}-{high} of {self.subnet}"

    def address(self, value: int) -> IPAddress:
        return ipaddress.IPv4Address(value) if self.subnet.version == 4 else ipaddress.IPv6Address(value)

    def interface(self, value: int) -> IPInterface:
        if self.subnet.version == 4:
            return ipaddress.IPv4Interface((value, self.subnet.prefixlen))
        return ipaddress.IPv6Interface((value, self.subnet.prefixlen))

    def set_exclusions(self, exclusions: list[_Exclusion]) -> None:
        self.exclusions = exclusions
        merged: list[tuple[int, int]] = []
        for first, last in sorted((max(e.first, self.first), min(e.last, self.last)) for e in exclusions):
            if first > last:
                continue  # outside the range
            if merged and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        self.blocked = merged
        self.blocked_starts = [first for first, _ in merged]
        self.floor = self.first  # fewer exclusions may have freed low addresses

    def blocked_interval_end(self, value: int) -> int | None:
        """The last address of the excluded interval holding `value`, or None if it is not excluded."""
        index = bisect.bisect_right(self.blocked_starts, value) - 1
        if index >= 0 and self.blocked[index][1] >= value:
            return self.blocked[index][1]
        return None

    def why_excluded(self, value: int) -> str | None:
        return next((e.why for e in self.exclusions if e.first <= value <= e.last), None)

    def lowest_free(self) -> int:
        candidate = self.floor
        # Each step passes one excluded interval or one lease, so this bound is never reached early.
        for _ in range(len(self.blocked) + len(self.owners) + 1):
            if candidate > self.last:
                break
            blocked_end = self.blocked_interval_end(candidate)
            if blocked_end is not None:
                candidate = blocked_end + 1
            elif candidate in self.owners:
                candidate += 1
            else:
                self.floor = candidate  # everything below was just seen taken
                return candidate
        self.floor = candidate
        raise PoolExhausted(f"no free IPv{self.subnet.version} address left in {self.describe()}")

    def take(self, value: int, key: bytes) -> None:
        self.owners[value] = key

    def usable(self) -> int:
        """Addresses clients can get: the range less what is excluded (the server's own, fixed ones)."""
        return self.last - self.first + 1 - sum(last - first + 1 for first, last in self.blocked)

    def give_back(self, value: int) -> None:
        del self.owners[value]
        self.floor = min(self.floor, value)


class AddressPool:
    """Sticky per-key leases from the server's subnets; see the module docstring for the rules.

    A reload builds a new pool from the new config and hands it `old.leases()` through
    `restore`, which keeps what still fits and reports the rest.
    """

    def __init__(
        self,
        server_addresses: Iterable[IPInterface],
        ranges: Mapping[int, tuple[IPAddress, IPAddress]] | None = None,
        reserved: Iterable[IPNetwork] = (),
    ) -> None:
        server_addresses = list(server_addresses)
        ranges = dict(ranges or {})
        unknown = set(ranges) - set(FAMILIES)
        if unknown:
            raise ValueError(f"pool ranges are keyed by IP version 4 or 6, not {sorted(unknown)}")
        self._server_addresses = server_addresses
        self._families: dict[int, _FamilyPool] = {}
        for version in FAMILIES:
            family = _family_pool(version, server_addresses, ranges.get(version))
            if family is not None:
                self._families[version] = family
        self._leases: dict[bytes, Lease] = {}
        self._set_reserved(reserved)

    # --- what the pool is ------------------------------------------------------------------------

    @property
    def subnets(self) -> dict[int, IPNetwork]:
        """The subnet of each family that has a pool (pushed to clients as a route)."""
        return {version: family.subnet for version, family in self._families.items()}

    def fixed_lease(self, allowed_ips: Iterable[IPNetwork]) -> Lease | None:
        """A configured peer's fixed address: its first host route inside each pool subnet.

        None when it has none; such a peer is a pool peer. The prefix length is the subnet's, as
        for a pool lease, so the pushed config looks the same either way.
        """
        lease = Lease()
        for network in allowed_ips:
            family = self._families.get(network.version)
            is_host_route = network.prefixlen == network.max_prefixlen
            if family is None or not is_host_route or network.network_address not in family.subnet:
                continue
            if lease.get(network.version) is None:
                lease = lease.with_address(network.version, family.interface(int(network.network_address)))
        return lease if lease.addresses else None

    # --- leases ----------------------------------------------------------------------------------

    def lease(self, public_key: bytes, families: Iterable[int] | None = None) -> Lease:
        """This key's lease, allocating the lowest free address of each family it lacks.

        `families` limits that to some IP versions (default: every family with a pool), for a peer
        whose other family is a fixed address. All or nothing: if one family is exhausted,
        PoolExhausted is raised and nothing is taken.
        """
        if not self._families:
            raise PoolExhausted("the server has no address pool (no Address with room for clients)")
        wanted = set(self._families if families is None else families) & set(self._families)
        current = self._leases.get(public_key, Lease())
        missing = [version for version in self._families if version in wanted and current.get(version) is None]
        if not missing:
            return current
        chosen = {version: self._families[version].lowest_free() for version in missing}
        for version, value in chosen.items():
            family = self._families[version]
            family.take(value, public_key)
            current = current.with_address(version, family.interface(value))
        self._leases[public_key] = current
        return current

    def release(self, public_key: bytes) -> bool:
        """Forget a key's lease (its addresses become free again); False if it had none."""
        lease = self._leases.pop(public_key, None)
        if lease is None:
            return False
        for address in lease.addresses:
            self._families[address.version].give_back(int(address.ip))
        return True

    def leases(self) -> dict[bytes, Lease]:
        return dict(self._leases)

    def usage(self) -> dict[int, tuple[int, int]]:
        """IP version -> (addresses clients can get, addresses leased), for status and metrics."""
        return {version: (family.usable(), len(family.owners)) for version, family in self._families.items()}

    def lease_of(self, public_key: bytes) -> Lease | None:
        """This key's lease, if it has one, without copying the table (a config request's lookup)."""
        return self._leases.get(public_key)

    def restore(self, leases: Mapping[bytes, Lease]) -> list[str]:
        """Adopt persisted leases; return one warning per address that no longer fits.

        An address outside the pool, held by an exclusion, or already leased to another key is
        dropped (the key gets a new one on its next `lease`); its other family's address stays.
        A key that already has a lease here keeps it.
        """
        warnings = []
        for public_key, persisted in leases.items():
            if public_key in self._leases:
                if self._leases[public_key] != persisted:
                    warnings.append(f"peer {encode_key(public_key)}: already leased "
                                    f"{_show(self._leases[public_key])}; ignoring the saved {_show(persisted)}")
                continue
            adopted = Lease()
            for address in persisted.addresses:
                problem = self._why_unusable(address)
                if problem:
                    warnings.append(f"peer {encode_key(public_key)}: dropping its saved address {address.ip}: "
                                    f"{problem}; it gets a new one")
                    continue
                family = self._families[address.version]
                family.take(int(address.ip), public_key)
                adopted = adopted.with_address(address.version, family.interface(int(address.ip)))
            if adopted.addresses:
                self._leases[public_key] = adopted
        return warnings

    # --- internals -------------------------------------------------------------------------------

    def _set_reserved(self, reserved: Iterable[IPNetwork]) -> None:
        reserved = list(reserved)
        for version, family in self._families.items():
            exclusions = _fixed_exclusions(family.subnet, self._server_addresses)
            for network in reserved:
                # Only networks inside the subnet: a peer routing a wider net (say 0.0.0.0/0) is
                # a gateway; the /32 routes of pool clients are more specific and win over it.
                if (network.version == version and network.network_address in family.subnet
                        and network.prefixlen >= family.subnet.prefixlen):
                    exclusions.append(_Exclusion(int(network.network_address), int(network.broadcast_address),
                                                 f"routed by a configured peer ({network})"))
            family.set_exclusions(exclusions)

    def _why_unusable(self, address: IPInterface) -> str | None:
        family = self._families.get(address.version)
        if family is None:
            return f"the server has no IPv{address.version} pool any more"
        value = int(address.ip)
        if not family.first <= value <= family.last:
            return f"outside the pool {family.describe()}"
        why = family.why_excluded(value)
        if why:
            return why
        owner = family.owners.get(value)
        if owner is not None:
            return f"already leased to peer {encode_key(owner)}"
        return None


def _show(lease: Lease) -> str:
    return ", ".join(str(address.ip) for address in lease.addresses) or "nothing"


def _family_pool(
    version: int, server_addresses: list[IPInterface], pool_range: tuple[IPAddress, IPAddress] | None
) -> _FamilyPool | None:
    """The pool of one family: the subnet holding the range, else the first server subnet with room."""
    subnets = [address.network for address in server_addresses if address.version == version]
    if pool_range is None:
        subnet = next((net for net in subnets if net.num_addresses > 1), None)
        if subnet is None:
            return None
        return _FamilyPool(subnet, int(subnet.network_address), int(subnet.broadcast_address))
    first, last = pool_range
    if first.version != version or last.version != version:
        raise ValueError(f"the IPv{version} pool range {first}-{last} mixes in another IP version")
    if int(first) > int(last):
        raise ValueError(f"the pool range {first}-{last} ends before it starts")
    subnet = next((net for net in subnets if first in net and last in net), None)
    if subnet is None:
        where = ", ".join(str(net) for net in subnets) or f"none: the server has no IPv{version} Address"
        raise ValueError(f"the pool range {first}-{last} is not inside a subnet of the server's Address ({where})")
    return _FamilyPool(subnet, int(first), int(last))


def _fixed_exclusions(subnet: IPNetwork, server_addresses: list[IPInterface]) -> list[_Exclusion]:
    """Addresses of the subnet no client may have, whatever the peers are."""
    exclusions = []
    network, broadcast = int(subnet.network_address), int(subnet.broadcast_address)
    if subnet.version == 4 and subnet.prefixlen <= 30:  # a /31 has neither (RFC 3021)
        exclusions.append(_Exclusion(network, network, "the subnet's network address"))
        exclusions.append(_Exclusion(broadcast, broadcast, "the subnet's broadcast address"))
    elif subnet.version == 6 and subnet.prefixlen <= 126:
        # The Subnet-Router anycast address (RFC 4291 2.6.1): a forwarding Linux server owns it.
        exclusions.append(_Exclusion(network, network, "the subnet's Subnet-Router anycast address"))
    for address in server_addresses:
        if address.version == subnet.version and address.ip in subnet:
            value = int(address.ip)
            exclusions.append(_Exclusion(value, value, "the server's own address"))
    return exclusions
