"""1000 clients against one tunvpn server: all connect, none shares an address, the server stays small.

The clients are simulated (tests/loadgen.py: one sans-I/O Device and one UDP port each, no tun)
and do what tunvpn's client does: handshake, config request, pings to the server's tunnel address
from the pushed address, keepalives. The deadline is functional; the speed figures are
benchmarks/scale.py's (`make bench`).
"""

from __future__ import annotations

import ipaddress

from scalelab import SERVER_TUNNEL, run_scale

PEERS = 1000
CONNECT_TIMEOUT = 120.0  # generous: a busy CI machine, not a speed target
RSS_LIMIT_KIB = 100 * 1024
TUNNEL = ipaddress.ip_network(f"{SERVER_TUNNEL}/112", strict=False)


def test_a_thousand_clients_connect_with_distinct_addresses(lab):
    run = run_scale(lab, PEERS, connect_timeout=CONNECT_TIMEOUT)
    print(run.figures())
    missing = [c["public_key"] for c in run.clients if c["connected"] is None]
    assert not missing, f"{len(missing)} of {PEERS} clients got no address, e.g. {missing[:3]}"
    got = {c["public_key"]: c["addresses"] for c in run.clients}
    assert all(len(addresses) == 1 for addresses in got.values())
    assert run.duplicate_addresses() == []
    assert all(ipaddress.ip_interface(a[0]).ip in TUNNEL for a in got.values())
    # The server's side: its leases (state file) and its peers (show) say what the clients got.
    assert run.leases == got
    server = {p["public_key"]: p for p in run.server_peers}
    assert all(server[key]["connected"] and server[key]["addresses"] == [a[0].split("/")[0]]
               for key, a in got.items())
    # Every client's pings were answered through the server's tun, and its keepalives arrived.
    unanswered = [c["public_key"] for c in run.clients if c["replies"] < c["pings"] or not c["pings"]]
    assert not unanswered, f"{len(unanswered)} clients lost echo replies"
    assert all(c["keepalive"] and c["keepalives"] >= 1 for c in run.clients)
    assert all(server[c["public_key"]]["rx_packets"] >= c["requests"] + c["pings"] + 1 for c in run.clients)
    assert run.rss_after_kib <= RSS_LIMIT_KIB, f"server RSS {run.rss_after_kib} KiB at {PEERS} peers"
    assert "Traceback" not in run.server_log
