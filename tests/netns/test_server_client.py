"""The main job: one tunvpn server, a LAN behind it, tunvpn clients from the pool and a stock peer.

Topology (all in namespaces of this run):
    client1, client2, stock  --- switch "wan" (192.0.2.0/24) ---  server  --- lanhost (198.51.100.0/24)
Tunnel 203.0.113.0/24 and 2001:db8:100::/64; the server pushes the LAN route.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import sys
from pathlib import Path
import threading
import time
from dataclasses import dataclass, field

import pytest

from netlab import Host, Lab, transfer, wait_until
from stockwg import StockWireGuard, genkey, pubkey
from tunvpnd import Tunvpn, wait_for_ping

MB = 1024 * 1024
SERVER_UNDERLAY = "192.0.2.1"
LAN_HOST = "198.51.100.2"
SERVER_TUNNEL = "203.0.113.1"
STOCK_TUNNEL = "203.0.113.50"


@dataclass
class Office:
    lab: Lab
    wan: Host
    server_host: Host
    lanhost: Host
    server: Tunvpn
    server_key: str
    clients: dict[str, Tunvpn] = field(default_factory=dict)
    client_keys: dict[str, str] = field(default_factory=dict)
    client_hosts: dict[str, Host] = field(default_factory=dict)
    stock: StockWireGuard | None = None
    stock_host: Host | None = None
    stock_key: str = ""

    def server_config(self, peers: list[str], client_to_client: bool = False, extra_peers: str = "") -> str:
        text = f"""[Interface]
PrivateKey = {self.server_key}
ListenPort = 51820
Address = {SERVER_TUNNEL}/24, 2001:db8:100::1/64
PushRoute = 198.51.100.0/24
ClientToClient = {"yes" if client_to_client else "no"}
"""
        for name in peers:
            text += f"\n[Peer]\n# {name}\nPublicKey = {pubkey(self.client_keys[name])}\n"
        if self.stock_key:
            text += f"\n[Peer]\n# stock\nPublicKey = {pubkey(self.stock_key)}\nAllowedIPs = {STOCK_TUNNEL}/32\n"
        return text + extra_peers

    def address_of(self, name: str) -> str:
        """The tunnel address the server gave a tunvpn client, as the client reports it."""
        pushed = self.clients[name].show()["pushed"]
        assert pushed and pushed["from_server"], f"{name} has no pushed config"
        return next(str(ipaddress.ip_interface(a).ip) for a in pushed["addresses"] if "." in a)


def client_config(key: str, server_key: str, extra: str = "") -> str:
    return f"""[Interface]
PrivateKey = {key}
{extra}
[Peer]
PublicKey = {pubkey(server_key)}
Endpoint = {SERVER_UNDERLAY}:51820
"""


def build_office(lab: Lab, clients: tuple[str, ...] = ("client1", "client2"), stock: bool = True,
                 client_to_client: bool = False, time_scale: float | None = None) -> Office:
    """`time_scale` runs the tunvpn daemons on a clock that fast (tests/scaledclock.py)."""
    wan = lab.add_switch("wan")
    server_host = lab.add_host("server")
    lanhost = lab.add_host("lanhost")
    lab.connect(server_host, wan, [f"{SERVER_UNDERLAY}/24"])
    lab.link(server_host, lanhost, ["198.51.100.1/24"], [f"{LAN_HOST}/24"])
    server_host.set_sysctl("net.ipv4.ip_forward", 1)
    lanhost.add_route("203.0.113.0/24", via="198.51.100.1")
    office = Office(lab, wan, server_host, lanhost, server=None, server_key=genkey())  # type: ignore[arg-type]
    for index, name in enumerate(clients):
        host = lab.add_host(name)
        lab.connect(host, wan, [f"192.0.2.{11 + index}/24"])
        office.client_hosts[name] = host
        office.client_keys[name] = genkey()
    if stock:
        office.stock_host = lab.add_host("stock")
        lab.connect(office.stock_host, wan, ["192.0.2.13/24"])
        office.stock_key = genkey()
    office.server = Tunvpn(server_host, "server", office.server_config(list(clients), client_to_client),
                           time_scale=time_scale).start()
    for name in clients:
        office.clients[name] = Tunvpn(office.client_hosts[name], "client",
                                      client_config(office.client_keys[name], office.server_key), name=name,
                                      time_scale=time_scale).start()
    if stock:
        office.stock = StockWireGuard(office.stock_host, lab.unique_ifname("wg"), office.stock_key)
        lab.add_cleanup(office.stock.close)
        office.stock.set_peer(pubkey(office.server_key), allowed_ips=["203.0.113.0/24", "198.51.100.0/24"],
                              endpoint=f"{SERVER_UNDERLAY}:51820")
        office.stock.add_address(f"{STOCK_TUNNEL}/24")
        office.stock.set_up(mtu=1420)
        office.stock.add_route("198.51.100.0/24")
    for name in clients:
        office.clients[name].wait_log(r"applied config from the server", 10)
    return office


def test_pool_clients_and_stock_peer_reach_server_and_lan(lab):
    office = build_office(lab)
    addresses = {name: office.address_of(name) for name in office.clients}
    assert len(set(addresses.values())) == 2 and STOCK_TUNNEL not in addresses.values()
    v6 = {name: office.clients[name].show()["pushed"]["addresses"][1] for name in office.clients}
    assert len(set(v6.values())) == 2
    assert all(ipaddress.ip_interface(a).network == ipaddress.ip_network("2001:db8:100::/64") for a in v6.values())
    for address in addresses.values():
        assert ipaddress.ip_address(address) in ipaddress.ip_network("203.0.113.0/24")
    hosts = [*office.client_hosts.values(), office.stock_host]
    for host in hosts:
        wait_for_ping(host, SERVER_TUNNEL, timeout=10)
        host.ping(LAN_HOST, count=2, timeout=5)
    for host in office.client_hosts.values():
        host.ping("2001:db8:100::1", count=2, timeout=5)
    for host in hosts:
        result = transfer(host, office.lanhost, LAN_HOST, 20 * MB, timeout=60)
        assert result.sent_sha256 == result.received_sha256
    # The same addresses after restarting a client, and after restarting the server.
    office.clients["client1"].stop()
    office.clients["client1"].start().wait_log(r"applied config from the server", 10)
    assert office.address_of("client1") == addresses["client1"]
    marks = {name: len(daemon.lines) for name, daemon in office.clients.items()}
    assert office.server.stop() == 0
    for name, daemon in office.clients.items():
        daemon.wait_log(r"server said goodbye", 5, after=marks[name])
    office.server.start()
    for name in office.clients:
        wait_for_ping(office.client_hosts[name], SERVER_TUNNEL, timeout=10)
        assert office.address_of(name) == addresses[name]
    assert {p["address"] for p in office.server.show()["peers"]} == {*addresses.values(), STOCK_TUNNEL}


@pytest.mark.parametrize("client_to_client", [True, False], ids=["c2c-yes", "c2c-no"])
def test_client_to_client(lab, client_to_client):
    office = build_office(lab, stock=False, client_to_client=client_to_client)
    client2_address = office.address_of("client2")
    client1 = office.client_hosts["client1"]
    wait_for_ping(client1, SERVER_TUNNEL, timeout=10)
    result = client1.ping(client2_address, count=3, timeout=3, check=False)
    client1_key = pubkey(office.client_keys["client1"])
    blocked = office.server.peer(client1_key)["dropped"].get("peer_to_peer_blocked", 0)
    if client_to_client:
        assert result.returncode == 0, result.stdout
        assert blocked == 0
    else:
        assert result.returncode != 0
        assert blocked >= 1


def test_server_killed_and_restarted_clients_recover_within_5s(lab):
    office = build_office(lab)
    hosts = [*office.client_hosts.values(), office.stock_host]
    for host in hosts:
        wait_for_ping(host, SERVER_TUNNEL, timeout=10)
    state_file = office.server.state_dir / "state.json"
    wait_until(lambda: state_file.exists() and len(json.loads(state_file.read_text())["endpoints"]) == len(hosts),
               5, what="every client's endpoint saved")  # saves come at most once a second
    office.server.kill()
    restarted = time.monotonic()  # from launching the new process, start-up included
    office.server.start()
    for host in hosts:  # each within what is left of the 5 s since the restart
        wait_for_ping(host, SERVER_TUNNEL, timeout=max(0.5, restarted + 5.0 - time.monotonic()))
    took = time.monotonic() - restarted
    print(f"after kill -9 and restart, all {len(hosts)} clients pass traffic again within {took:.2f} s")


def test_client_roams_to_a_new_address(lab):
    office = build_office(lab, clients=("client1",), stock=False)
    host = office.client_hosts["client1"]
    wait_for_ping(host, SERVER_TUNNEL, timeout=10)
    key = pubkey(office.client_keys["client1"])
    assert office.server.peer(key)["endpoint"].startswith("192.0.2.11:")
    # (Deleting a primary IPv4 address also deletes its secondaries: drop the old one first.)
    host.ip("addr", "del", "192.0.2.11/24", "dev", "eth0")
    host.ip("addr", "add", "192.0.2.21/24", "dev", "eth0")
    wait_for_ping(host, SERVER_TUNNEL, timeout=10)
    wait_until(lambda: office.server.peer(key)["endpoint"].startswith("192.0.2.21:"), 5,
               what="the server to follow the client to its new address")
    result = transfer(host, office.server_host, SERVER_TUNNEL, 5 * MB, timeout=30)
    assert result.sent_sha256 == result.received_sha256


def test_sighup_adds_and_removes_peers_while_a_transfer_runs(lab):
    office = build_office(lab, clients=("client1", "client2", "client3"), stock=False)
    office.server.write_config("[Interface]\nPrivateKey = broken\n")
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reload refused, keeping the running config: .*:2: PrivateKey:", 5)
    wait_for_ping(office.client_hosts["client3"], SERVER_TUNNEL, timeout=5)
    office.server.write_config(office.server_config(["client1", "client2"]))  # client3 not yet allowed
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reloaded .*: 0 peer\(s\) added, 1 removed", 5)
    client3 = office.client_hosts["client3"]
    assert client3.ping(SERVER_TUNNEL, count=1, timeout=2, check=False).returncode != 0
    # Slow client1's uplink so that its transfer spans the reload.
    client1 = office.client_hosts["client1"]
    client1.run(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit", "burst", "64kb",
                 "latency", "50ms"])
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(
        result=transfer(client1, office.server_host, SERVER_TUNNEL, 20 * MB, timeout=60)))
    worker.start()
    try:
        client1_key = pubkey(office.client_keys["client1"])
        wait_until(lambda: office.server.peer(client1_key)["rx_bytes"] > 2 * MB, 10, interval=0.1,
                   what="client1's transfer under way")
        office.server.write_config(office.server_config(["client1", "client3"]))
        mark = len(office.server.lines)
        office.server.signal(signal.SIGHUP)
        office.server.wait_log(r"reloaded .*: 1 peer\(s\) added, 1 removed, 0 changed", 5, after=mark)
        assert worker.is_alive(), "the transfer should still be running across the reload"
        wait_for_ping(client3, SERVER_TUNNEL, timeout=15)
        assert office.client_hosts["client2"].ping(SERVER_TUNNEL, count=2, timeout=2, check=False).returncode != 0
    finally:
        worker.join(timeout=70)
    result = outcome["result"]
    assert result.sent_sha256 == result.received_sha256
    assert result.seconds > 2.0


def test_show_json_counts_what_moved(lab):
    office = build_office(lab, clients=("client1",), stock=False)
    host = office.client_hosts["client1"]
    wait_for_ping(host, SERVER_TUNNEL, timeout=10)
    key = pubkey(office.client_keys["client1"])
    before_server = office.server.peer(key)
    before_client = office.clients["client1"].show()["peers"][0]
    size = 10 * MB
    result = transfer(host, office.server_host, SERVER_TUNNEL, size, timeout=60)
    assert result.sent_sha256 == result.received_sha256
    after_server = office.server.peer(key)
    after_client = office.clients["client1"].show()["peers"][0]
    received = after_server["rx_bytes"] - before_server["rx_bytes"]
    sent = after_client["tx_bytes"] - before_client["tx_bytes"]
    # Payload plus per-packet headers: IP+TCP (~52 B) and WireGuard (32 B) on ~1368-byte segments.
    assert size < received < size * 1.12, received
    assert size < sent < size * 1.12, sent
    status = office.server.show()
    assert status["role"] == "server" and status["listen_port"] == 51820
    assert status["public_key"] == pubkey(office.server_key)
    peer = status["peers"][0]
    assert peer["latest_handshake"] and abs(peer["latest_handshake"] - time.time()) < 60
    assert peer["address"] == office.address_of("client1")
    client_status = office.clients["client1"].show()
    assert client_status["pushed"]["routes"] == ["203.0.113.0/24", "2001:db8:100::/64", "198.51.100.0/24"]


def test_full_tunnel_client_reaches_the_lan(lab):
    office = build_office(lab, clients=(), stock=False)
    host = lab.add_host("roadwarrior")
    lab.connect(host, office.wan, ["192.0.2.14/24"])
    key = genkey()
    office.client_keys["roadwarrior"] = key
    office.server.write_config(office.server_config(["roadwarrior"]))
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reloaded", 5)
    client = Tunvpn(host, "client", client_config(key, office.server_key).replace(
        "Endpoint", "AllowedIPs = 0.0.0.0/0, ::/0\nEndpoint"), name="roadwarrior").start()
    client.wait_log(r"full tunnel", 10)
    client.wait_log(r"applied config from the server", 10)
    wait_for_ping(host, LAN_HOST, timeout=10)
    # Anything without a more specific route goes into the tunnel: the default routes live in
    # the tunnel's own table, behind a rule that spares the marked UDP of the tunnel itself.
    assert client.device in host.run(["ip", "-6", "route", "get", "2001:db8:ffff::1"]).stdout
    assert client.device in host.run(["ip", "route", "show", "table", "all", "default"]).stdout
    # The handshake traffic itself still reaches the server over the underlay.
    assert office.server.peer(pubkey(key))["endpoint"].startswith("192.0.2.14:")
    result = transfer(host, office.lanhost, LAN_HOST, 5 * MB, timeout=30)
    assert result.sent_sha256 == result.received_sha256
    assert client.stop() == 0
    for family in ("-4", "-6"):
        rules = host.run(["ip", family, "rule", "show"]).stdout
        assert "fwmark" not in rules and "suppress_prefixlength" not in rules, rules
        assert host.run(["ip", family, "route", "show", "table", "all", "default"]).stdout.strip() == ""


FAKE_RESOLVCONF = """#!/bin/sh
# Records how tunvpn called resolvconf; touches nothing else.
{ echo "ARGS $*"; cat; echo "END"; } >> "$FAKE_RESOLVCONF_LOG"
"""

# The daemon looks for resolvconf in the system directories only, never on $PATH. This stands in
# for its interpreter and puts the fake where the daemon looks, in the mount namespace `ip netns
# exec` made for it alone: the host's /usr/sbin is never touched.
WITH_FAKE_SBIN = """#!/bin/sh
mount --bind {tools} /usr/sbin && exec {python} "$@"
"""


def test_pushed_dns_goes_through_resolvconf_and_is_removed(lab, tmp_path):
    office = build_office(lab, clients=(), stock=False)
    host = lab.add_host("laptop")
    lab.connect(host, office.wan, ["192.0.2.15/24"])
    key = genkey()
    office.client_keys["laptop"] = key
    office.server.write_config(office.server_config(["laptop"]).replace(
        "ClientToClient = no", "ClientToClient = no\nPushDNS = 198.51.100.53, office.example"))
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reloaded", 5)
    tools = tmp_path / "sbin"
    tools.mkdir()
    (tools / "resolvconf").write_text(FAKE_RESOLVCONF)
    (tools / "resolvconf").chmod(0o755)
    interpreter = tmp_path / "python-with-fake-sbin"
    interpreter.write_text(WITH_FAKE_SBIN.format(tools=tools, python=sys.executable))
    interpreter.chmod(0o755)
    calls = tmp_path / "resolvconf.log"
    host_resolv_conf = Path("/etc/resolv.conf").read_bytes()
    client = Tunvpn(host, "client", client_config(key, office.server_key), name="laptop",
                    env={"FAKE_RESOLVCONF_LOG": str(calls)}, python=str(interpreter)).start()
    client.wait_log(r"dns: ", 10)
    applied = calls.read_text()
    assert "ARGS -a tv-laptop" in applied or "ARGS -a tun.tv-laptop" in applied, applied
    assert "nameserver 198.51.100.53" in applied and "search office.example" in applied, applied
    assert client.show()["pushed"]["dns"] == ["198.51.100.53"]
    assert client.stop() == 0
    assert "ARGS -d" in calls.read_text().split("END")[-2], calls.read_text()
    assert Path("/etc/resolv.conf").read_bytes() == host_resolv_conf


def test_daemon_reports_to_systemd(lab, tmp_path):
    import socket as socketlib

    host = lab.add_host("server")
    notify_path = tmp_path / "notify"
    receiver = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    receiver.bind(str(notify_path))
    receiver.settimeout(5)
    messages: list[str] = []

    def wait_for(field: str) -> None:
        deadline = time.monotonic() + 5
        while not any(field in m for m in messages):
            assert time.monotonic() < deadline, f"no {field} from the daemon; got {messages}"
            messages.append(receiver.recv(4096).decode())

    try:
        key, peer = genkey(), genkey()
        daemon = Tunvpn(host, "server", f"[Interface]\nPrivateKey = {key}\nAddress = 203.0.113.1/24\n"
                                        f"[Peer]\nPublicKey = {pubkey(peer)}\n",
                        env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"})
        daemon.start(wait=False)
        wait_for("READY=1")
        assert any(link["ifname"] == daemon.device for link in host.ip_json("link", "show"))
        wait_for("STATUS=0 of 1 peers connected")
        messages.clear()
        wait_for("WATCHDOG=1")
        daemon.signal(signal.SIGTERM)
        wait_for("STOPPING=1")
        assert daemon.process.wait(timeout=10) == 0
    finally:
        receiver.close()
