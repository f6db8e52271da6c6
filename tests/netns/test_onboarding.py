"""Onboarding end to end on the office topology: `tunvpn invite` on the server, `tunvpn join` on a
new machine, and the client is in (address pushed, server and LAN host reachable); the invite
works once and not after expiry; a revoked client is cut off at once and stays out; a server
restart keeps enrolled peers; a stock wireguard-go peer set up from `invite --stock` connects."""

from __future__ import annotations

import json
import subprocess
import sys

from netlab import Host, python_env, wait_until
from stockwg import StockWireGuard, pubkey
from test_server_client import LAN_HOST, SERVER_TUNNEL, SERVER_UNDERLAY, Office, build_office
from tunvpnd import Tunvpn, wait_for_ping

ENDPOINT = f"{SERVER_UNDERLAY}:51820"


def tunvpn(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return host.run([sys.executable, "-m", "tunvpn", *args], env=python_env(), check=False, timeout=60)


def invite(office: Office, name: str, *options: str) -> subprocess.CompletedProcess[str]:
    result = tunvpn(office.server_host, "invite", "--control-socket", str(office.server.control_socket),
                    "--name", name, "--endpoint", ENDPOINT, *options)
    assert result.returncode == 0, result.stderr
    return result


def join_line(office: Office, name: str, *options: str) -> str:
    [line] = invite(office, name, *options).stdout.splitlines()
    assert line.startswith("tunvpn join tunvpn://join/")
    return line.split()[2]


def new_machine(office: Office, name: str, address: str) -> tuple[Host, Tunvpn]:
    host = office.lab.add_host(name)
    office.lab.connect(host, office.wan, [f"{address}/24"])
    return host, Tunvpn(host, "client", "", name="office")  # join writes its config over this one


def join(host: Host, client: Tunvpn, token: str, timeout: str = "20") -> subprocess.CompletedProcess[str]:
    return tunvpn(host, "join", token, "--name", "office", "--config-dir", str(client.config_path.parent),
                  "--force", "--timeout", timeout)


def peers(office: Office) -> dict:
    """The server's answer to `tunvpn peers`, as the command gets it."""
    result = office.server_host.run([sys.executable, "-c", "import json, sys\nfrom tunvpn.io.controlsocket import query\n"
                                     "print(json.dumps(query(sys.argv[1], {'command': 'peers'})))",
                                     str(office.server.control_socket)], env=python_env())
    return json.loads(result.stdout)


def test_invite_join_once_restart_and_revoke(lab):
    office = build_office(lab, clients=(), stock=False)
    token = join_line(office, "laptop")
    host, client = new_machine(office, "laptop", "192.0.2.11")
    result = join(host, client, token)
    assert result.returncode == 0, result.stderr
    assert "joined server server as laptop" in result.stdout
    conf = client.config_path.read_text()
    assert "PrivateKeyFile = office.key" in conf and "PrivateKey =" not in conf
    assert oct(client.config_path.with_suffix(".key").stat().st_mode & 0o777) == "0o600"
    office.server.wait_log(r"invite laptop: enrolled peer laptop", 5)
    client.start().wait_log(r"applied config from the server", 10)
    wait_for_ping(host, SERVER_TUNNEL, timeout=10)
    host.ping(LAN_HOST, count=2, timeout=5)
    laptop_key = next(p["public_key"] for p in office.server.show()["peers"] if p["name"] == "laptop")

    # The invite is spent: a second machine with the same line is refused and gets no config.
    other, other_client = new_machine(office, "other", "192.0.2.12")
    again = join(other, other_client, token)
    assert again.returncode == 1 and "used up" in again.stderr
    assert not other_client.config_path.read_text()

    # A restart keeps the enrolled peer: the client is back without doing anything.
    assert office.server.stop() == 0
    office.server.start()
    assert [p["name"] for p in peers(office)["enrolled"]] == ["laptop"]
    wait_for_ping(host, SERVER_TUNNEL, timeout=15)

    # Revoked: cut off at once, and its handshakes go unanswered from then on.
    revoked = tunvpn(office.server_host, "revoke", "--control-socket", str(office.server.control_socket), "laptop")
    assert revoked.returncode == 0, revoked.stderr
    assert host.ping(SERVER_TUNNEL, count=1, timeout=2, check=False).returncode != 0
    assert laptop_key not in [p["public_key"] for p in office.server.show()["peers"]]
    assert peers(office)["enrolled"] == []
    assert client.stop() == 0
    unknown_before = office.server.show()["dropped"].get("unknown_peer", 0)
    client.start()  # initiates at once, with the revoked key
    wait_until(lambda: office.server.show()["dropped"].get("unknown_peer", 0) > unknown_before, 10,
               what="the server refusing the revoked key's handshake")
    assert host.ping(SERVER_TUNNEL, count=2, timeout=3, check=False).returncode != 0
    assert "applied config from the server" not in client.log()


def test_an_expired_invite_lets_nobody_in(lab):
    office = build_office(lab, clients=(), stock=False)
    token = join_line(office, "late", "--expires", "2s")
    office.server.wait_log(r"invite late: expired", 10)
    assert peers(office)["invites"] == []
    host, client = new_machine(office, "late", "192.0.2.11")
    result = join(host, client, token, timeout="5")
    assert result.returncode == 1 and "expired" in result.stderr


def test_a_stock_peer_from_invite_stock_connects(lab):
    office = build_office(lab, clients=(), stock=False)
    result = invite(office, "phone", "--stock")
    assert "made on this server" in result.stderr
    config = parse_wg_quick(result.stdout)
    host = lab.add_host("phone")
    lab.connect(host, office.wan, ["192.0.2.13/24"])
    stock = StockWireGuard(host, lab.unique_ifname("wg"), config["PrivateKey"])
    lab.add_cleanup(stock.close)
    stock.set_peer(config["PublicKey"], allowed_ips=config["AllowedIPs"].split(", "), endpoint=config["Endpoint"],
                   preshared_key=config["PresharedKey"], persistent_keepalive=int(config["PersistentKeepalive"]))
    addresses, routes = config["Address"].split(", "), config["AllowedIPs"].split(", ")
    assert addresses == ["203.0.113.2/32", "2001:db8:100::2/128"] and config["Endpoint"] == ENDPOINT
    assert routes == ["203.0.113.0/24", "2001:db8:100::/64", "198.51.100.0/24"]
    for address in addresses:
        stock.add_address(address)
    stock.set_up(mtu=int(config["MTU"]))
    for route in routes:  # what wg-quick does with AllowedIPs
        stock.add_route(route)
    assert pubkey(config["PrivateKey"]) in [p["public_key"] for p in office.server.show()["peers"]]
    wait_for_ping(host, SERVER_TUNNEL, timeout=10)
    host.ping(LAN_HOST, count=2, timeout=5)
    assert [(p["name"], p["kind"]) for p in peers(office)["enrolled"]] == [("phone", "stock")]


def parse_wg_quick(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, equals, value = line.partition("=")
        if equals:
            values[key.strip()] = value.strip()
    return values
