"""5% random loss on the underlay, both directions: handshakes complete and 20 MB arrive intact.

sch_netem is not in this kernel, so the loss is an nftables rule in the peer's namespace,
`numgen random mod 100 < 5 drop`, on UDP in and out: 5% of what it sends and 5% of what it
receives are lost, handshake messages included.  Topology: test_server_client's office; the
transfer goes from the peer through the server to the LAN host.
"""

from __future__ import annotations

import time

from netlab import Host, transfer
from test_server_client import LAN_HOST, MB, SERVER_TUNNEL, build_office
from tunvpnd import wait_for_ping

LOSS_PERCENT = 5
# UDP GSO trains cross a veth whole, so nftables would see (and drop) 40-odd datagrams as one
# packet; a real path loses single datagrams, as it sees them after the NIC split the train.
PER_DATAGRAM = ("--offloads", "coalesce")
TRANSFER_BYTES = 20 * MB
HANDSHAKE_TIMEOUT = 40.0  # retries every 5 s; a handshake needs two datagrams through, ~90% each time
TRANSFER_TIMEOUT = 180.0
HANDSHAKE_ROUNDS = 5


def lose_udp(host: Host, percent: int) -> None:
    """Drop `percent`% of the UDP datagrams `host` sends and receives, at random."""
    rules = f"""
table inet lossy {{
    chain incoming {{ type filter hook input priority 0; meta l4proto udp numgen random mod 100 < {percent} counter drop; }}
    chain outgoing {{ type filter hook output priority 0; meta l4proto udp numgen random mod 100 < {percent} counter drop; }}
}}
"""
    host.run(["nft", "-f", "-"], input=rules)


def dropped_by_rules(host: Host) -> int:
    """The rules' counters: `counter packets N bytes M`, summed over both chains."""
    words = host.run(["nft", "list", "table", "inet", "lossy"]).stdout.split()
    return sum(int(words[i + 1]) for i, word in enumerate(words) if word == "packets")


def move_20mb(peer: Host, lanhost: Host) -> float:
    result = transfer(peer, lanhost, LAN_HOST, TRANSFER_BYTES, timeout=TRANSFER_TIMEOUT)
    assert result.sent_sha256 == result.received_sha256
    return result.seconds


def test_tunvpn_client_and_server_survive_five_percent_loss(lab):
    office = build_office(lab, clients=("client1",), stock=False)
    host, client = office.client_hosts["client1"], office.clients["client1"]
    office.server.stop()
    office.server.extra_args = client.extra_args = PER_DATAGRAM
    office.server.start()
    lose_udp(host, LOSS_PERCENT)
    connects = []
    for _ in range(HANDSHAKE_ROUNDS):  # each a fresh handshake and config request, under loss
        client.stop()
        started = time.monotonic()
        client.start().wait_log(r"applied config from the server", HANDSHAKE_TIMEOUT)
        wait_for_ping(host, SERVER_TUNNEL, timeout=HANDSHAKE_TIMEOUT)
        connects.append(time.monotonic() - started)
    seconds = move_20mb(host, office.lanhost)
    lost = dropped_by_rules(host)
    assert lost > 100, f"only {lost} datagrams dropped: the loss rules did not bite"
    print(f"tunvpn <-> tunvpn at {LOSS_PERCENT}% loss each way: {HANDSHAKE_ROUNDS} connects, slowest "
          f"{max(connects):.1f} s; 20 MB in {seconds:.1f} s; {lost} datagrams dropped")


def test_stock_wireguard_and_tunvpn_server_survive_five_percent_loss(lab):
    office = build_office(lab, clients=(), stock=True)
    assert office.stock_host is not None and office.stock is not None
    lose_udp(office.stock_host, LOSS_PERCENT)  # before its first handshake: that one is under loss too
    connects = []
    for round_ in range(HANDSHAKE_ROUNDS):
        if round_:
            office.stock.restart()  # a new wireguard-go, so a new handshake
        started = time.monotonic()
        wait_for_ping(office.stock_host, SERVER_TUNNEL, timeout=HANDSHAKE_TIMEOUT)
        connects.append(time.monotonic() - started)
    seconds = move_20mb(office.stock_host, office.lanhost)
    lost = dropped_by_rules(office.stock_host)
    assert lost > 100, f"only {lost} datagrams dropped: the loss rules did not bite"
    print(f"wireguard-go <-> tunvpn at {LOSS_PERCENT}% loss each way: {HANDSHAKE_ROUNDS} connects, slowest "
          f"{max(connects):.1f} s; 20 MB in {seconds:.1f} s; {lost} datagrams dropped")
