"""Per-client policy on a real server: rate limits both ways (iperf3, TCP, 10 s) and access rules.

client1: RateLimit = 20mbit, Access = 198.51.100.0/25; client2: no limit, Access = 198.51.100.128/25.
The LAN host answers on 198.51.100.2 (in client1's half) and 198.51.100.130 (in client2's).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

from netlab import Host, read_line, stop_process
from stockwg import pubkey
from test_server_client import LAN_HOST, SERVER_TUNNEL, Office, build_office
from tunvpnd import wait_for_ping

LIMIT = 20_000_000
TOLERANCE = 0.10
SECONDS = 10
OTHER_LAN_HOST = "198.51.100.130"


def policy_config(office: Office, client1_limit: str = "20mbit") -> str:
    text = office.server_config(["client1", "client2"])
    for name, lines in (("client1", f"RateLimit = {client1_limit}\nAccess = 198.51.100.0/25\n"),
                        ("client2", "Access = 198.51.100.128/25\n")):
        key_line = f"PublicKey = {pubkey(office.client_keys[name])}\n"
        text = text.replace(key_line, key_line + lines)
    return text


def apply(office: Office, text: str) -> None:
    office.server.write_config(text)
    mark = len(office.server.lines)
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reloaded ", 5, after=mark)


def iperf_server(host: Host, port: int) -> subprocess.Popen:
    server = host.popen(["iperf3", "-s", "-1", "-p", str(port), "-B", SERVER_TUNNEL, "--forceflush"],
                        stdout=subprocess.PIPE)
    read_line(server, time.monotonic() + 5, "iperf3 to listen")
    return server


def iperf_client(host: Host, port: int, reverse: bool = False) -> subprocess.Popen:
    return host.popen(["iperf3", "-c", SERVER_TUNNEL, "-p", str(port), "-t", str(SECONDS), "-J",
                       *(["-R"] if reverse else [])], stdout=subprocess.PIPE, text=True)


def received_rate(client: subprocess.Popen) -> float:
    output, _ = client.communicate(timeout=SECONDS + 20)
    assert client.returncode == 0, output[-2000:]
    return json.loads(output)["end"]["sum_received"]["bits_per_second"]


def measure(office: Office, reverse: bool) -> tuple[float, float]:
    """(limited client1's rate, unlimited client2's rate), measured at the same time."""
    servers = [iperf_server(office.server_host, port) for port in (5201, 5202)]
    try:
        clients = [iperf_client(office.client_hosts["client1"], 5201, reverse),
                   iperf_client(office.client_hosts["client2"], 5202, reverse)]
        return received_rate(clients[0]), received_rate(clients[1])
    finally:
        for server in servers:
            stop_process(server, term_grace=1.0)


def test_a_rate_limited_client_gets_its_limit_both_ways_and_the_other_is_not_slowed(lab):
    office = build_office(lab, stock=False)
    apply(office, policy_config(office))
    for host in office.client_hosts.values():
        wait_for_ping(host, SERVER_TUNNEL, timeout=10)
    for reverse in (False, True):
        limited, free = measure(office, reverse)
        direction = "download" if reverse else "upload"
        print(f"{direction}: limited client {limited / 1e6:.1f} Mbit/s, unlimited client {free / 1e6:.1f} Mbit/s")
        assert abs(limited - LIMIT) <= TOLERANCE * LIMIT, f"{direction}: {limited / 1e6:.1f} Mbit/s"
        assert free > 2 * LIMIT, f"{direction}: the unlimited client got only {free / 1e6:.1f} Mbit/s"
    key = pubkey(office.client_keys["client1"])
    peer = office.server.peer(key)
    assert peer["rate_limit"] == LIMIT and peer["dropped"].get("rate_limit", 0) > 0
    # A reload changes the limit in place: the session stays.
    handshake = peer["latest_handshake"]
    apply(office, policy_config(office, client1_limit="10mbit"))
    peer = office.server.peer(key)
    assert peer["rate_limit"] == 10_000_000 and peer["latest_handshake"] == handshake


def test_access_rules_decide_which_lan_addresses_each_client_reaches(lab):
    office = build_office(lab, stock=False)
    office.lanhost.add_address(office.lanhost.ip_json("route", "get", "198.51.100.1")[0]["dev"],
                               f"{OTHER_LAN_HOST}/24")
    apply(office, policy_config(office))
    client1, client2 = office.client_hosts["client1"], office.client_hosts["client2"]
    wait_for_ping(client1, LAN_HOST, timeout=10)
    wait_for_ping(client2, OTHER_LAN_HOST, timeout=10)
    assert client1.ping(OTHER_LAN_HOST, count=2, timeout=3, check=False).returncode != 0
    assert client2.ping(LAN_HOST, count=2, timeout=3, check=False).returncode != 0
    wait_for_ping(client1, SERVER_TUNNEL, timeout=5)  # the tunnel itself is always reachable
    for name in ("client1", "client2"):
        assert office.server.peer(pubkey(office.client_keys[name]))["dropped"]["access_denied"] >= 2
