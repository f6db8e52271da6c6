"""Cryptokey routing: longest-prefix match against a brute-force model built on ipaddress."""

from __future__ import annotations

import ipaddress
import random

import pytest

from tunvpn.protocol.allowedips import AllowedIPs


class Owner:
    """A stand-in for a peer: owners are told apart by identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Owner({self.name})"


def packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


A, B, C, D, E = (Owner(n) for n in "ABCDE")


@pytest.fixture
def table() -> AllowedIPs[Owner]:
    t: AllowedIPs[Owner] = AllowedIPs()
    t.insert("0.0.0.0/0", A)
    t.insert("192.0.2.0/24", B)
    t.insert("192.0.2.128/25", C)
    t.insert("192.0.2.200/32", D)
    t.insert("::/0", E)
    t.insert("2001:db8::/32", B)
    t.insert("2001:db8:50::/64", C)
    t.insert("2001:db8:50::1/128", D)
    return t


@pytest.mark.parametrize(
    ("address", "owner"),
    [
        ("192.0.2.200", D),
        ("192.0.2.201", C),
        ("192.0.2.128", C),
        ("192.0.2.255", C),
        ("192.0.2.127", B),
        ("192.0.2.0", B),
        ("198.51.100.1", A),
        ("0.0.0.0", A),
        ("255.255.255.255", A),
        ("2001:db8:50::1", D),
        ("2001:db8:50::2", C),
        ("2001:db8:50:0:ffff:ffff:ffff:ffff", C),
        ("2001:db8:50:1::", B),
        ("2001:db8:ffff::1", B),
        ("2001:db9::", E),
        ("::", E),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", E),
    ],
)
def test_longest_prefix_match(table: AllowedIPs[Owner], address: str, owner: Owner) -> None:
    assert table.lookup(packed(address)) is owner
    family_lookup = table.lookup_v4 if ":" not in address else table.lookup_v6
    assert family_lookup(packed(address)) is owner


def test_families_are_separate() -> None:
    t: AllowedIPs[Owner] = AllowedIPs()
    t.insert("0.0.0.0/0", A)
    assert t.lookup(packed("::")) is None
    assert t.lookup(packed("::ffff:192.0.2.1")) is None  # IPv4-mapped is IPv6 here, as in wg
    t.insert("::/0", B)
    assert t.lookup(packed("192.0.2.1")) is A
    assert t.lookup(packed("2001:db8::1")) is B


def test_empty_table_and_odd_lengths(table: AllowedIPs[Owner]) -> None:
    assert AllowedIPs().lookup(packed("192.0.2.1")) is None
    assert AllowedIPs().lookup(packed("2001:db8::1")) is None
    for length in (0, 3, 5, 15, 17):
        assert table.lookup(bytes(length)) is None


def test_host_routes_only_match_themselves() -> None:
    t: AllowedIPs[Owner] = AllowedIPs()
    t.insert("203.0.113.7/32", A)
    t.insert("2001:db8:100::7/128", B)
    assert t.lookup(packed("203.0.113.7")) is A
    assert t.lookup(packed("203.0.113.6")) is None
    assert t.lookup(packed("203.0.113.8")) is None
    assert t.lookup(packed("2001:db8:100::7")) is B
    assert t.lookup(packed("2001:db8:100::6")) is None


def test_host_bits_are_masked_on_insert() -> None:
    t: AllowedIPs[Owner] = AllowedIPs()
    t.insert("192.0.2.77/24", A)
    t.insert(ipaddress.ip_network("2001:db8::/48"), B)
    assert t.lookup(packed("192.0.2.1")) is A
    assert t.networks_of(A) == [ipaddress.ip_network("192.0.2.0/24")]
    assert t.networks_of(B) == [ipaddress.ip_network("2001:db8::/48")]


def test_reinsert_moves_ownership(table: AllowedIPs[Owner]) -> None:
    table.insert("192.0.2.128/25", E)
    assert table.lookup(packed("192.0.2.130")) is E
    assert ipaddress.ip_network("192.0.2.128/25") not in table.networks_of(C)
    assert ipaddress.ip_network("192.0.2.128/25") in table.networks_of(E)
    table.insert("0.0.0.0/0", B)
    assert table.lookup(packed("198.51.100.1")) is B
    assert table.networks_of(A) == []


def test_remove_owner(table: AllowedIPs[Owner]) -> None:
    table.remove_owner(C)
    assert table.networks_of(C) == []
    assert table.lookup(packed("192.0.2.201")) is B
    assert table.lookup(packed("2001:db8:50::2")) is B
    assert table.lookup(packed("192.0.2.200")) is D
    table.remove_owner(D)
    table.remove_owner(B)
    assert table.lookup(packed("192.0.2.200")) is A
    assert table.lookup(packed("2001:db8:50::1")) is E
    table.remove_owner(A)
    table.remove_owner(E)
    assert table.lookup(packed("192.0.2.200")) is None
    assert table.lookup(packed("2001:db8:50::1")) is None
    table.remove_owner(A)  # removing an owner with nothing left is harmless


def test_a_moved_prefix_stays_with_its_new_owner_when_the_old_one_goes() -> None:
    t: AllowedIPs[Owner] = AllowedIPs()
    t.insert("192.0.2.0/24", A)
    t.insert("2001:db8::/32", A)
    t.insert("192.0.2.0/24", B)
    assert t.networks_of(A) == [ipaddress.ip_network("2001:db8::/32")]
    t.remove_owner(A)
    assert t.lookup(packed("192.0.2.1")) is B
    assert t.networks_of(B) == [ipaddress.ip_network("192.0.2.0/24")]


def test_removing_every_owner_leaves_nothing_behind(table: AllowedIPs[Owner]) -> None:
    """The per-owner lists are an index into the tables: neither may keep what the other lost."""
    table.insert("192.0.2.0/24", C)  # moved from B
    for owner in (A, B, C, D, E):
        table.remove_owner(owner)
    for family in (table._v4, table._v6):
        assert family.tables == {} and family.owned == {} and family.lengths == ()


def test_networks_of_lists_both_families_sorted(table: AllowedIPs[Owner]) -> None:
    assert table.networks_of(B) == [ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32")]
    assert table.networks_of(A) == [ipaddress.ip_network("0.0.0.0/0")]
    assert table.networks_of(E) == [ipaddress.ip_network("::/0")]
    assert table.networks_of(Owner("stranger")) == []


class Model:
    """Brute force: every prefix that contains the address, the longest wins."""

    def __init__(self) -> None:
        self.routes: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, Owner] = {}

    def insert(self, network, owner: Owner) -> None:
        self.routes[network] = owner

    def remove_owner(self, owner: Owner) -> None:
        self.routes = {n: o for n, o in self.routes.items() if o is not owner}

    def lookup(self, address) -> Owner | None:
        matches = [n for n in self.routes if n.version == address.version and address in n]
        return self.routes[max(matches, key=lambda n: n.prefixlen)] if matches else None

    def networks_of(self, owner: Owner) -> list:
        owned = [n for n, o in self.routes.items() if o is owner]
        return sorted(owned, key=lambda n: (n.version, n.network_address, n.prefixlen))


def _random_network(rng: random.Random, bits: int, near: list[int]):
    """Prefixes clustered around a few base addresses, so that they nest and overlap."""
    base = rng.choice(near) ^ rng.getrandbits(rng.choice([0, 4, 12, bits // 2]))
    typical = [0, 1, bits // 4, bits // 2, bits - 8, bits - 3, bits - 1, bits]
    prefixlen = rng.choice(typical + [rng.randint(0, bits)] * 4)
    factory = ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network
    return factory((base >> (bits - prefixlen) << (bits - prefixlen), prefixlen))


def _random_address(rng: random.Random, bits: int, near: list[int]):
    base = rng.choice(near) ^ rng.getrandbits(rng.choice([0, 2, 8, 16, bits]))
    return ipaddress.IPv4Address(base) if bits == 32 else ipaddress.IPv6Address(base)


@pytest.mark.parametrize("seed", range(5))
def test_random_prefixes_against_the_brute_force_model(seed: int) -> None:
    rng = random.Random(seed)
    owners = [Owner(str(i)) for i in range(12)]
    near = {32: [rng.getrandbits(32) for _ in range(4)], 128: [rng.getrandbits(128) for _ in range(4)]}
    table: AllowedIPs[Owner] = AllowedIPs()
    model = Model()
    peak = 0
    for _ in range(400):
        action = rng.random()
        if action < 0.03:
            owner = rng.choice(owners)
            table.remove_owner(owner)
            model.remove_owner(owner)
        else:
            bits = rng.choice([32, 128])
            network = _random_network(rng, bits, near[bits])
            owner = rng.choice(owners)
            table.insert(network if rng.random() < 0.5 else str(network), owner)
            model.insert(network, owner)
        peak = max(peak, len(model.routes))
        for _ in range(10):
            bits = rng.choice([32, 128])
            address = _random_address(rng, bits, near[bits])
            assert table.lookup(address.packed) is model.lookup(address), (seed, address)
        owner = rng.choice(owners)
        assert table.networks_of(owner) == model.networks_of(owner)
    for owner in owners:
        assert table.networks_of(owner) == model.networks_of(owner)
    assert peak > 100  # the table really held many prefixes


def test_remembered_answers_follow_every_change_of_the_table():
    table: AllowedIPs[str] = AllowedIPs()
    address = ipaddress.ip_address("198.51.100.7").packed
    assert table.lookup(address) is None
    table.insert("198.51.100.0/24", "wide")
    assert table.lookup(address) == "wide"
    table.insert("198.51.100.7/32", "narrow")
    assert table.lookup(address) == "narrow"
    table.insert("198.51.100.7/32", "other")  # the same prefix to a new owner
    assert table.lookup(address) == "other"
    table.remove_owner("other")
    assert table.lookup(address) == "wide"
    table.remove_owner("wide")
    assert table.lookup(address) is None
    v6 = ipaddress.ip_address("2001:db8::1").packed
    assert table.lookup(v6) is None
    table.insert("2001:db8::/32", "six")
    assert table.lookup(v6) == "six"


def test_many_distinct_addresses_neither_grow_the_memory_nor_change_answers():
    table: AllowedIPs[str] = AllowedIPs()
    table.insert("10.0.0.0/8", "ten")
    for value in range(10_000):
        assert table.lookup((0x0A000000 + value).to_bytes(4, "big")) == "ten"
        assert table.lookup((0x0B000000 + value).to_bytes(4, "big")) is None
    assert len(table._v4.memo) <= 4096
