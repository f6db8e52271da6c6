#!/usr/bin/env python3
"""The protocol core's hot paths in memory, no root: cryptokey routing and the per-packet cost.

    python3 benchmarks/core.py

Each figure is the best of several timeit repeats (the least disturbed by other load), so two
runs on the same machine compare; run the revisions to compare one after the other, twice.
"""

from __future__ import annotations

import ipaddress
import sys
import timeit
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "tests" / "unit")]

from corepair import CorePair, a_to_b_v4, established  # noqa: E402
from tunvpn.protocol.allowedips import AllowedIPs  # noqa: E402

PEERS = 8000
BATCH = 64  # packets per tun read, as the loop reads them
PAYLOAD = 1400 - 28  # a 1400-byte IPv4/UDP packet
REPEATS = 8
BATCHES_PER_REPEAT = 50


def best(run: Callable[[], object], number: int, repeat: int = REPEATS) -> float:
    """Seconds per call."""
    return min(timeit.repeat(run, number=number, repeat=repeat)) / number


class Owner:
    """A stand-in for a peer."""


def routing() -> None:
    table: AllowedIPs[Owner] = AllowedIPs()
    owners = [Owner() for _ in range(PEERS)]
    for i, owner in enumerate(owners):
        table.insert(f"10.{i >> 8}.{i & 255}.1/32", owner)
        table.insert(f"2001:db8:100::{i:x}/128", owner)
    table.insert("198.51.100.0/24", owners[0])
    table.insert("0.0.0.0/0", owners[1])
    hit4 = ipaddress.ip_address("10.0.5.1").packed
    default4 = ipaddress.ip_address("192.0.2.9").packed
    hit6 = ipaddress.ip_address("2001:db8:100::5").packed
    print(f"lookup_v4, a /32                 {best(lambda: table.lookup_v4(hit4), 200_000) * 1e9:8.0f} ns")
    print(f"lookup_v4, falling back to /0    {best(lambda: table.lookup_v4(default4), 200_000) * 1e9:8.0f} ns")
    print(f"lookup_v6, a /128                {best(lambda: table.lookup_v6(hit6), 200_000) * 1e9:8.0f} ns")
    owner = owners[PEERS // 2]

    def replace_one_peers_prefixes() -> None:
        table.remove_owner(owner)
        table.insert("10.15.160.1/32", owner)
        table.insert("2001:db8:100::fa0/128", owner)

    print(f"networks_of, {PEERS} peers          {best(lambda: table.networks_of(owner), 20) * 1e6:8.1f} us")
    print(f"remove_owner + 2 inserts         {best(replace_one_peers_prefixes, 20) * 1e6:8.1f} us")


def per_packet(forwarding: bool | None) -> tuple[float, float]:
    """(send, receive) seconds per packet between two devices; `forwarding` on the receiver."""
    pair = established(CorePair())
    sender, receiver = pair.a.device, pair.b.device
    receiver.set_forwarding(forwarding)
    batch = [a_to_b_v4(bytes(PAYLOAD)) for _ in range(BATCH)]

    def send() -> list:
        sender.send_packets(batch, pair.now)
        return sender.datagrams_to_send()

    send_cost = best(send, BATCHES_PER_REPEAT) / BATCH
    # Every batch received must be new to the replay window: seal them all first.
    received = iter([[(data, pair.a.address) for data, _ in send()] for _ in range(BATCHES_PER_REPEAT * REPEATS)])

    def receive() -> None:
        receiver.receive_datagrams(next(received), pair.now)
        receiver.datagrams_to_send()

    return send_cost, best(receive, BATCHES_PER_REPEAT) / BATCH


def main() -> None:
    routing()
    for forwarding, role in ((None, "client (plain WireGuard)"), (False, "server, ClientToClient = no"),
                             (True, "server, ClientToClient = yes")):
        send_cost, receive_cost = per_packet(forwarding)
        print(f"per packet, {role:29} send {send_cost * 1e9:6.0f} ns, receive {receive_cost * 1e9:6.0f} ns")


if __name__ == "__main__":
    main()
