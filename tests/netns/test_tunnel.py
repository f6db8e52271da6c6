"""Two tunvpn peers on real tun devices in network namespaces."""

from __future__ import annotations

import json

import pytest

from netlab import transfer
from stockwg import genkey, pubkey
from tunvpnd import Tunvpn

MB = 1024 * 1024
UNDERLAY = {
    "ipv4": ("192.0.2.1/24", "192.0.2.2/24", "192.0.2.1"),
    "ipv6": ("2001:db8:1::1/64", "2001:db8:1::2/64", "[2001:db8:1::1]"),
}


def server_config(key: str, client_pub: str) -> str:
    return f"""# tunvpn server for a two-peer test
[Interface]
PrivateKey = {key}
ListenPort = 51820
Address = 203.0.113.1/24, 2001:db8:100::1/64

[Peer]
PublicKey = {client_pub}
AllowedIPs = 203.0.113.2/32, 2001:db8:100::2/128
"""


def client_config(key: str, server_pub: str, endpoint_host: str) -> str:
    return f"""[Interface]
PrivateKey = {key}
Address = 203.0.113.2/24, 2001:db8:100::2/64

[Peer]
PublicKey = {server_pub}
Endpoint = {endpoint_host}:51820
AllowedIPs = 203.0.113.0/24, 2001:db8:100::/64
"""


@pytest.mark.parametrize("underlay", sorted(UNDERLAY))
def test_two_tunvpn_peers_carry_ipv4_and_ipv6(lab, underlay):
    server_host, client_host = lab.add_host("server"), lab.add_host("client")
    server_addr, client_addr, endpoint_host = UNDERLAY[underlay]
    lab.link(server_host, client_host, [server_addr], [client_addr])
    server_key, client_key = genkey(), genkey()
    server = Tunvpn(server_host, "server", server_config(server_key, pubkey(client_key))).start()
    client = Tunvpn(client_host, "client", client_config(client_key, pubkey(server_key), endpoint_host)).start()

    client.wait_log(r"handshake complete \(initiator\)", 10)
    client_host.ping("203.0.113.1", count=3, timeout=5)
    client_host.ping("2001:db8:100::1", count=3, timeout=5)
    server_host.ping("203.0.113.2", count=3, timeout=5)
    server_host.ping("2001:db8:100::2", count=3, timeout=5)

    up = transfer(client_host, server_host, "203.0.113.1", 20 * MB, timeout=60)
    print(f"20 MB client->server over {underlay}: {up.seconds:.2f} s")
    assert up.sent_sha256 == up.received_sha256
    down = transfer(server_host, client_host, "2001:db8:100::2", 20 * MB, timeout=60)
    assert down.sent_sha256 == down.received_sha256

    # The counters saw the traffic: at least the payload went each way, on both ends.
    client_peer = server.peer(pubkey(client_key))
    assert client_peer["rx_bytes"] >= 20 * MB and client_peer["tx_bytes"] >= 20 * MB, client_peer
    server_peer = client.peer(pubkey(server_key))
    assert server_peer["rx_bytes"] >= 20 * MB and server_peer["tx_bytes"] >= 20 * MB, server_peer
    assert client_peer["latest_handshake"] is not None
    stats = "\n".join(server.statistics())
    assert "handshake never" not in stats, stats

    for daemon, host in ((client, client_host), (server, server_host)):
        assert daemon.stop() == 0, daemon.log()
        links = [link["ifname"] for link in host.ip_json("link", "show")]
        assert daemon.device not in links
        routes = json.dumps(host.ip_json("route", "show")) + json.dumps(host.ip_json("-6", "route", "show"))
        assert "203.0.113." not in routes and "2001:db8:100::" not in routes


def test_config_error_exits_2_with_file_and_line(lab):
    host = lab.add_host("server")
    daemon = Tunvpn(host, "server", "[Interface]\nPrivateKey = nonsense\n")
    daemon.start(wait=False)
    assert daemon.process.wait(timeout=10) == 2
    log = daemon.log()
    assert f"{daemon.config_path}:2: PrivateKey:" in log
    assert "Traceback" not in log
