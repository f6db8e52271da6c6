"""The address pool: lowest free first, sticky per key, never a reserved address, huge IPv6 pools."""

from __future__ import annotations

import ipaddress
import random
import time

import pytest

from tunvpn.pool import AddressPool, Lease, PoolExhausted

ip = ipaddress.ip_address
iface = ipaddress.ip_interface
net = ipaddress.ip_network

SERVER_V4 = iface("203.0.113.1/24")
SERVER_V6 = iface("2001:db8:100::1/64")


def key(number: int) -> bytes:
    return number.to_bytes(32, "big")


def v4_of(pool: AddressPool, *numbers: int) -> list[str]:
    return [str(pool.lease(key(n)).ipv4) for n in numbers]


# --- allocation order and stickiness -------------------------------------------------------------

def test_lowest_free_address_first_with_the_subnet_prefix() -> None:
    pool = AddressPool([SERVER_V4])
    assert v4_of(pool, 1, 2, 3) == ["203.0.113.2/24", "203.0.113.3/24", "203.0.113.4/24"]
    assert pool.lease(key(1)).ipv6 is None  # no IPv6 Address, no IPv6 pool


def test_same_key_same_lease_whatever_happens_in_between() -> None:
    pool = AddressPool([SERVER_V4, SERVER_V6])
    first = pool.lease(key(7))
    for other in range(20, 30):
        pool.lease(key(other))
    pool.release(key(25))
    assert pool.lease(key(7)) == first == Lease(iface("203.0.113.2/24"), iface("2001:db8:100::2/64"))
    assert pool.leases()[key(7)] == first


def test_released_address_is_reused_lowest_first() -> None:
    pool = AddressPool([SERVER_V4])
    v4_of(pool, 1, 2, 3, 4)
    assert pool.release(key(2)) is True
    assert pool.release(key(2)) is False
    assert key(2) not in pool.leases()
    assert v4_of(pool, 5, 6) == ["203.0.113.3/24", "203.0.113.6/24"]


def test_server_address_in_the_middle_is_skipped() -> None:
    pool = AddressPool([iface("203.0.113.5/24")], {4: (ip("203.0.113.3"), ip("203.0.113.7"))})
    assert v4_of(pool, 1, 2, 3, 4) == ["203.0.113.3/24", "203.0.113.4/24", "203.0.113.6/24", "203.0.113.7/24"]
    with pytest.raises(PoolExhausted):
        pool.lease(key(5))


def test_lease_only_the_families_asked_for() -> None:
    """A peer with a fixed IPv4 address takes only an IPv6 address from the pool."""
    pool = AddressPool([SERVER_V4, SERVER_V6])
    assert pool.lease(key(1), families={6}) == Lease(None, iface("2001:db8:100::2/64"))
    assert pool.lease(key(1), families={6}) == Lease(None, iface("2001:db8:100::2/64"))
    assert pool.lease(key(2)) == Lease(iface("203.0.113.2/24"), iface("2001:db8:100::3/64"))
    assert pool.lease(key(1)) == Lease(iface("203.0.113.3/24"), iface("2001:db8:100::2/64"))
    assert AddressPool([SERVER_V4]).lease(key(1), families={4, 6}) == Lease(iface("203.0.113.2/24"), None)


# --- exhaustion ----------------------------------------------------------------------------------

def test_exhaustion_leaves_existing_leases_alone() -> None:
    pool = AddressPool([iface("203.0.113.1/29")])  # .0 network, .1 server, .7 broadcast
    assert v4_of(pool, 1, 2, 3, 4, 5) == [f"203.0.113.{n}/29" for n in range(2, 7)]
    with pytest.raises(PoolExhausted, match="203.0.113"):
        pool.lease(key(6))
    assert str(pool.lease(key(3)).ipv4) == "203.0.113.4/29"
    pool.release(key(3))
    assert v4_of(pool, 6) == ["203.0.113.4/29"]


def test_dual_stack_lease_is_all_or_nothing() -> None:
    pool = AddressPool([iface("203.0.113.1/30"), SERVER_V6])  # one IPv4 client address: .2
    assert pool.lease(key(1)) == Lease(iface("203.0.113.2/30"), iface("2001:db8:100::2/64"))
    with pytest.raises(PoolExhausted, match="IPv4"):
        pool.lease(key(2))
    assert key(2) not in pool.leases()
    pool.release(key(1))
    # The failed attempt took no IPv6 address: the next client gets ::2 again.
    assert pool.lease(key(3)) == Lease(iface("203.0.113.2/30"), iface("2001:db8:100::2/64"))


def test_no_pool_without_a_subnet() -> None:
    pool = AddressPool([iface("203.0.113.1/32")])
    assert pool.subnets == {}
    with pytest.raises(PoolExhausted, match="no address pool"):
        pool.lease(key(1))


def test_point_to_point_31_has_no_network_or_broadcast() -> None:
    pool = AddressPool([iface("203.0.113.0/31")])
    assert v4_of(pool, 1) == ["203.0.113.1/31"]


def test_pool_subnet_is_the_first_server_subnet_with_room_and_all_server_addresses_are_kept_out() -> None:
    pool = AddressPool([iface("192.0.2.1/32"), SERVER_V4, iface("203.0.113.2/24"), iface("198.51.100.1/24")])
    assert pool.subnets == {4: net("203.0.113.0/24")}
    assert v4_of(pool, 1) == ["203.0.113.3/24"]


# --- Pool = FIRST-LAST ---------------------------------------------------------------------------

def test_range_narrows_the_pool() -> None:
    pool = AddressPool([SERVER_V4], {4: (ip("203.0.113.10"), ip("203.0.113.12"))})
    assert v4_of(pool, 1, 2, 3) == ["203.0.113.10/24", "203.0.113.11/24", "203.0.113.12/24"]
    with pytest.raises(PoolExhausted):
        pool.lease(key(4))


def test_range_picks_the_server_subnet_that_holds_it() -> None:
    pool = AddressPool([iface("198.51.100.1/24"), SERVER_V4], {4: (ip("203.0.113.100"), ip("203.0.113.200"))})
    assert pool.subnets == {4: net("203.0.113.0/24")}
    assert v4_of(pool, 1) == ["203.0.113.100/24"]


@pytest.mark.parametrize(
    "ranges, message",
    [
        ({4: (ip("203.0.114.2"), ip("203.0.114.9"))}, "not inside"),
        ({4: (ip("203.0.113.200"), ip("203.0.114.9"))}, "not inside"),
        ({4: (ip("203.0.113.9"), ip("203.0.113.2"))}, "ends before it starts"),
        ({4: (ip("203.0.113.2"), ip("2001:db8:100::9"))}, "another IP version"),
        ({6: (ip("2001:db8:100::2"), ip("2001:db8:100::9"))}, "no IPv6 Address"),
        ({5: (ip("203.0.113.2"), ip("203.0.113.9"))}, "version 4 or 6"),
    ],
)
def test_bad_range_is_refused(ranges: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AddressPool([SERVER_V4], ranges)


# --- reservations and fixed addresses ------------------------------------------------------------

def test_fixed_host_routes_and_networks_inside_the_subnet_are_never_handed_out() -> None:
    reserved = [net("203.0.113.2/32"), net("203.0.113.4/30"), net("198.51.100.0/24"), net("2001:db8:100::2/128")]
    pool = AddressPool([SERVER_V4, SERVER_V6], None, reserved)
    leases = [pool.lease(key(n)) for n in range(1, 4)]
    assert [str(lease.ipv4.ip) for lease in leases] == ["203.0.113.3", "203.0.113.8", "203.0.113.9"]
    assert [str(lease.ipv6.ip) for lease in leases] == ["2001:db8:100::3", "2001:db8:100::4", "2001:db8:100::5"]


def test_a_wider_route_of_a_gateway_peer_does_not_block_the_pool() -> None:
    wider = [net("0.0.0.0/0"), net("203.0.112.0/23"), net("2001:db8:100::/56"), net("::/0")]
    pool = AddressPool([SERVER_V4, SERVER_V6], None, wider)
    assert pool.lease(key(1)) == Lease(iface("203.0.113.2/24"), iface("2001:db8:100::2/64"))


def test_a_peer_routing_the_whole_subnet_leaves_nothing() -> None:
    pool = AddressPool([SERVER_V4], None, [net("203.0.113.0/24")])
    with pytest.raises(PoolExhausted):
        pool.lease(key(1))


def test_fixed_lease_is_a_host_route_inside_the_subnet() -> None:
    pool = AddressPool([SERVER_V4, SERVER_V6])
    allowed = [net("198.51.100.0/24"), net("203.0.113.0/28"), net("203.0.113.9/32"), net("203.0.113.10/32"),
               net("2001:db8:100::9/128")]
    assert pool.fixed_lease(allowed) == Lease(iface("203.0.113.9/24"), iface("2001:db8:100::9/64"))
    assert pool.fixed_lease([net("198.51.100.7/32"), net("203.0.113.0/28")]) is None
    assert pool.fixed_lease([]) is None


# --- IPv6 ----------------------------------------------------------------------------------------

def test_ipv6_64_skips_the_subnet_router_anycast_and_server() -> None:
    pool = AddressPool([SERVER_V6])
    leases = [pool.lease(key(n)) for n in range(3)]
    assert [str(lease.ipv6) for lease in leases] == ["2001:db8:100::2/64", "2001:db8:100::3/64", "2001:db8:100::4/64"]
    assert all(lease.ipv4 is None for lease in leases)


def test_ipv6_64_pool_is_never_materialised() -> None:
    """Half of a /64 reserved, a range over the rest: both are 2**63 addresses, skipped in one step."""
    top = ip("2001:db8:100::ffff:ffff:ffff:ffff")
    pool = AddressPool([SERVER_V6], {6: (ip("2001:db8:100::2"), top)}, [net("2001:db8:100::/65")])
    started = time.monotonic()
    leases = [pool.lease(key(n)).ipv6 for n in range(2000)]
    elapsed = time.monotonic() - started
    assert str(leases[0]) == "2001:db8:100:0:8000::/64"
    assert str(leases[-1]) == "2001:db8:100:0:8000::7cf/64"
    assert len(set(leases)) == 2000
    assert elapsed < 2.0, f"2000 leases took {elapsed:.2f}s"


def test_ipv6_range_at_the_very_top_of_a_64() -> None:
    top = ip("2001:db8:100::ffff:ffff:ffff:ffff")
    pool = AddressPool([SERVER_V6], {6: (ip("2001:db8:100::ffff:ffff:ffff:fffe"), top)})
    assert [str(pool.lease(key(n)).ipv6.ip) for n in (1, 2)] == [str(top - 1), str(top)]
    with pytest.raises(PoolExhausted, match="IPv6"):
        pool.lease(key(3))


def test_ipv6_120_pool_holds_254_clients_including_the_last_address() -> None:
    pool = AddressPool([iface("2001:db8:100::1/120")])
    leases = [pool.lease(key(n)).ipv6 for n in range(254)]
    assert str(leases[0]) == "2001:db8:100::2/120"
    assert str(leases[-1]) == "2001:db8:100::ff/120"  # IPv6 has no broadcast address
    with pytest.raises(PoolExhausted):
        pool.lease(key(999))


# --- restore -------------------------------------------------------------------------------------

def test_restore_adopts_saved_leases_and_allocation_goes_around_them() -> None:
    pool = AddressPool([SERVER_V4, SERVER_V6])
    saved = {
        key(1): Lease(iface("203.0.113.2/24"), iface("2001:db8:100::7/64")),
        key(2): Lease(iface("203.0.113.4/32"), None),  # a saved prefix is replaced by the subnet's
    }
    assert pool.restore(saved) == []
    assert pool.lease(key(1)) == saved[key(1)]
    assert pool.lease(key(2)) == Lease(iface("203.0.113.4/24"), iface("2001:db8:100::2/64"))
    assert pool.lease(key(3)) == Lease(iface("203.0.113.3/24"), iface("2001:db8:100::3/64"))
    assert pool.lease(key(4)).ipv4 == iface("203.0.113.5/24")


def test_restore_drops_and_reports_what_no_longer_fits() -> None:
    pool = AddressPool([SERVER_V4], {4: (ip("203.0.113.1"), ip("203.0.113.20"))}, [net("203.0.113.12/32")])
    saved = {
        key(1): Lease(iface("203.0.113.11/24"), None),  # fine
        key(2): Lease(iface("203.0.113.30/24"), None),  # outside the range now
        key(3): Lease(iface("203.0.113.12/24"), None),  # a peer's fixed address now
        key(4): Lease(iface("203.0.113.11/24"), None),  # same address as key 1
        key(5): Lease(iface("203.0.113.13/24"), iface("2001:db8:100::5/64")),  # no IPv6 pool any more
        key(6): Lease(iface("203.0.113.1/24"), None),  # the server's own address
    }
    warnings = pool.restore(saved)
    assert len(warnings) == 5
    joined = "\n".join(warnings)
    for needle in ("203.0.113.30", "outside the pool", "203.0.113.12", "routed by a configured peer",
                   "already leased", "no IPv6 pool", "server's own address"):
        assert needle in joined
    assert all("\n" not in line for line in warnings)
    assert set(pool.leases()) == {key(1), key(5)}
    assert pool.leases()[key(5)] == Lease(iface("203.0.113.13/24"), None)
    # The dropped peers get fresh addresses, lowest free first, avoiding the adopted ones.
    assert v4_of(pool, 2, 3, 4, 6) == ["203.0.113.2/24", "203.0.113.3/24", "203.0.113.4/24", "203.0.113.5/24"]


def test_restore_keeps_the_good_family_of_a_half_bad_lease() -> None:
    pool = AddressPool([SERVER_V4, SERVER_V6], None, [net("203.0.113.2/32")])
    warnings = pool.restore({key(1): Lease(iface("203.0.113.2/24"), iface("2001:db8:100::9/64"))})
    assert len(warnings) == 1 and "203.0.113.2" in warnings[0]
    assert pool.lease(key(1)) == Lease(iface("203.0.113.3/24"), iface("2001:db8:100::9/64"))


def test_restore_does_not_override_a_live_lease() -> None:
    pool = AddressPool([SERVER_V4])
    live = pool.lease(key(1))
    warnings = pool.restore({key(1): Lease(iface("203.0.113.50/24"), None)})
    assert len(warnings) == 1
    assert pool.lease(key(1)) == live
    assert v4_of(pool, 2) == ["203.0.113.3/24"]  # .50 was not taken either


def test_changed_address_or_range_means_a_new_pool_restored_from_the_old() -> None:
    old = AddressPool([SERVER_V4])
    v4_of(old, 1, 2, 3)  # .2 .3 .4
    new = AddressPool([SERVER_V4], {4: (ip("203.0.113.3"), ip("203.0.113.100"))})
    warnings = new.restore(old.leases())
    assert len(warnings) == 1 and "203.0.113.2" in warnings[0]
    assert v4_of(new, 2, 3, 1) == ["203.0.113.3/24", "203.0.113.4/24", "203.0.113.5/24"]


# --- config reloads: the server builds a new pool and restores the old leases into it -------------

def reloaded(pool: AddressPool, reserved: list, servers=(SERVER_V4, SERVER_V6)) -> tuple[AddressPool, list[str]]:
    fresh = AddressPool(list(servers), None, reserved)
    return fresh, fresh.restore(pool.leases())


def test_a_reload_moves_a_lease_that_became_a_fixed_address() -> None:
    pool = AddressPool([SERVER_V4, SERVER_V6])
    first = pool.lease(key(1))
    pool.lease(key(2))
    pool, warnings = reloaded(pool, [net("203.0.113.2/32")])
    assert len(warnings) == 1 and "203.0.113.2" in warnings[0]
    moved = pool.lease(key(1))
    assert moved.ipv6 == first.ipv6  # only the colliding family changes
    assert moved.ipv4 == iface("203.0.113.4/24")


def test_a_reload_frees_addresses_no_longer_fixed() -> None:
    pool = AddressPool([SERVER_V4], None, [net("203.0.113.2/31")])  # .2 and .3
    assert v4_of(pool, 1) == ["203.0.113.4/24"]
    pool, warnings = reloaded(pool, [], servers=(SERVER_V4,))
    assert warnings == []
    assert v4_of(pool, 2, 3, 4) == ["203.0.113.2/24", "203.0.113.3/24", "203.0.113.5/24"]


def test_a_reload_drops_a_lease_left_with_nothing() -> None:
    pool = AddressPool([SERVER_V4])
    pool.lease(key(1))
    pool, _ = reloaded(pool, [net("203.0.113.0/28")], servers=(SERVER_V4,))
    assert key(1) not in pool.leases()
    assert v4_of(pool, 1) == ["203.0.113.16/24"]


# --- against a brute-force model -----------------------------------------------------------------

def test_random_operations_match_a_brute_force_model() -> None:
    """Lease/release/reload in random order on a /27; the model scans every address each time."""
    rng = random.Random(4)
    subnet = net("203.0.113.32/27")
    server = iface("203.0.113.33/27")
    pool = AddressPool([server])
    model: dict[bytes, ipaddress.IPv4Address] = {}
    reserved: set[ipaddress.IPv4Address] = set()
    for step in range(3000):
        action = rng.random()
        peer = key(rng.randrange(40))
        if action < 0.6:
            if peer not in model:
                taken = set(model.values()) | reserved | {server.ip}
                free = [a for a in subnet.hosts() if a not in taken]
                if not free:
                    with pytest.raises(PoolExhausted):
                        pool.lease(peer)
                    continue
                model[peer] = free[0]
            assert pool.lease(peer).ipv4 == ipaddress.IPv4Interface((model[peer], 27)), step
        elif action < 0.9:
            assert pool.release(peer) == (model.pop(peer, None) is not None)
        else:
            reserved = set(rng.sample(list(subnet.hosts()), rng.randrange(4)))
            pool, _ = reloaded(pool, [ipaddress.ip_network(a) for a in reserved], servers=(server,))
            model = {k: a for k, a in model.items() if a not in reserved}
        assert {k: lease.ipv4.ip for k, lease in pool.leases().items()} == model, step
