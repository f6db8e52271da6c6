"""What a running daemon does when one datagram, one peer or the kernel misbehaves: it carries on.

Each test is a defect a review found with a probe like it: before the fix the daemon exited
(one authenticated datagram from port 0; a pushed IPv6 address on a host without IPv6; a pushed
route the client's own LAN already has; a reload whose new route exists via another device).
The topology is test_server_client's office.
"""

from __future__ import annotations

import ipaddress
import signal

from netlab import Host, python_env, wait_until
from stockwg import genkey, pubkey
from test_server_client import LAN_HOST, SERVER_TUNNEL, SERVER_UNDERLAY, Office, build_office, client_config
from tunvpnd import Tunvpn, wait_for_ping

# An initiation from the client's own key, sent from UDP source port 0 through a raw socket.
PORT_ZERO_INITIATION = r"""
import socket, struct, sys, time
from tunvpn.keys import decode_key
from tunvpn.protocol.device import Device

device = Device(decode_key(sys.argv[1]))
server = decode_key(sys.argv[2])
device.set_peer(server, endpoint=(sys.argv[3], 51820))
device.set_wall_clock(time.time() + 1, 0.0)  # newer than the real client's last initiation
device.initiate(server, 0.0)
((initiation, _),) = device.datagrams_to_send()
udp = struct.pack("!HHHH", 0, 51820, 8 + len(initiation), 0) + initiation  # checksum 0: none (IPv4)
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
for _ in range(3):
    raw.sendto(udp, (sys.argv[3], 0))
"""


def refused(daemon) -> dict[str, str]:
    return daemon.show()["refused"]


def test_an_authenticated_initiation_from_port_zero_is_dropped_and_the_server_lives(lab):
    office = build_office(lab, clients=("client1",), stock=False)
    client_host = office.client_hosts["client1"]
    wait_for_ping(client_host, SERVER_TUNNEL, timeout=5)
    client_host.python(PORT_ZERO_INITIATION, office.client_keys["client1"], pubkey(office.server_key),
                       SERVER_UNDERLAY)
    wait_until(lambda: office.server.show()["dropped"].get("source_port_zero") == 3, 5,
               what="three port-0 datagrams counted")
    assert office.server.process.poll() is None
    peer = office.server.peer(pubkey(office.client_keys["client1"]))
    assert peer["endpoint"].endswith(":51820") is False and not peer["endpoint"].endswith(":0")
    wait_for_ping(client_host, SERVER_TUNNEL, timeout=5)
    assert "Traceback" not in office.server.log()


def add_client(office: Office, name: str, host: Host, extra: str = "") -> Tunvpn:
    """One more tunvpn client on `host`, let in by a server reload."""
    office.client_keys[name] = genkey()
    office.server.write_config(office.server_config(list(office.client_keys)))
    mark = len(office.server.lines)
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reloaded .*: 1 peer\(s\) added", 5, after=mark)
    client = Tunvpn(host, "client", client_config(office.client_keys[name], office.server_key, extra), name=name)
    office.clients[name] = client.start()
    client.wait_log(r"applied config from the server", 10)
    return client


def test_a_client_without_ipv6_keeps_its_ipv4_tunnel_when_an_ipv6_address_is_pushed(lab):
    office = build_office(lab, clients=(), stock=False)
    host = lab.add_host("nov6")
    for scope in ("all", "default"):
        host.set_sysctl(f"net.ipv6.conf.{scope}.disable_ipv6", 1)
    lab.connect(host, office.wan, ["192.0.2.21/24"])
    client = add_client(office, "nov6", host)
    wait_for_ping(host, SERVER_TUNNEL, timeout=5)
    wait_for_ping(host, LAN_HOST, timeout=5)
    problems = refused(client)
    v6 = [what for what in problems if what.startswith("pushed address 2001:db8:100::")]
    assert v6 and "disable_ipv6" in problems[v6[0]], problems
    assert client.process.poll() is None and "Traceback" not in client.log()


def test_a_pushed_route_that_the_clients_own_lan_has_is_reported_not_fatal(lab):
    """Home and office both 198.51.100.0/24: the LAN route stays, the tunnel still works."""
    office = build_office(lab, clients=(), stock=False)
    host = lab.add_host("home")
    lab.connect(host, office.wan, ["192.0.2.22/24"])
    printer = lab.add_host("printer")
    lab.link(host, printer, ["198.51.100.77/24"], ["198.51.100.78/24"])
    client = add_client(office, "home", host)
    wait_for_ping(host, SERVER_TUNNEL, timeout=5)
    problems = refused(client)
    assert "another device already routes 198.51.100.0/24" in problems.get("route 198.51.100.0/24", ""), problems
    assert host.ping("198.51.100.78", count=1, timeout=2).returncode == 0  # the home LAN is untouched
    assert client.process.poll() is None and "Traceback" not in client.log()


def lan_interface(host: Host, address: str) -> str:
    return next(link["ifname"] for link in host.ip_json("addr", "show")
                for info in link.get("addr_info", []) if info.get("local") == address)


def test_a_reload_whose_new_route_exists_elsewhere_applies_the_rest_and_says_so(lab):
    office = build_office(lab, clients=("client1",), stock=False)
    server_host = office.server_host
    server_host.ip("route", "add", "198.51.100.128/25", "dev", lan_interface(server_host, "198.51.100.1"))
    site = f"\n[Peer]\n# site\nPublicKey = {pubkey(genkey())}\nAllowedIPs = 203.0.113.60/32, 198.51.100.128/25\n"
    office.server.write_config(office.server_config(["client1"], extra_peers=site))
    server_host.run([office.server.python, "-m", "tunvpn", "check-config", str(office.server.config_path)],
                    env=python_env())  # the file is fine: only the kernel says no
    client_host = office.client_hosts["client1"]
    handshakes_before = office.server.peer(pubkey(office.client_keys["client1"]))["latest_handshake"]
    mark = len(office.server.lines)
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reloaded .*: 1 peer\(s\) added, 0 removed, 0 changed; not in force, refused by the "
                           r"kernel: route 198\.51\.100\.128/25", 5, after=mark)
    wait_for_ping(client_host, SERVER_TUNNEL, timeout=2)
    status = office.server.show()
    assert "another device already routes" in status["refused"]["route 198.51.100.128/25"]
    assert len(status["peers"]) == 2  # the new peer is in, without its route
    client_peer = office.server.peer(pubkey(office.client_keys["client1"]))
    assert client_peer["latest_handshake"] == handshakes_before  # the session was kept
    # The admin removes the conflicting route and reloads: now it goes in.
    server_host.ip("route", "del", "198.51.100.128/25")
    mark = len(office.server.lines)
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"route 198\.51\.100\.128/25 applied now", 5, after=mark)
    assert office.server.show()["refused"] == {}
    routes = server_host.ip_json("route", "show", "198.51.100.128/25")
    assert [r["dev"] for r in routes] == [office.server.device]


def tun_routes(client: Tunvpn, family: str) -> set[str]:
    return {route["dst"] for route in client.host.ip_json(family, "route", "show", "dev", client.device)}


def test_client_reload_and_pushes_keep_the_kernels_routes_exact(lab):
    """Removed, narrowed, widened and withdrawn networks, checked in the kernel's routing table."""
    office = build_office(lab, clients=("client1",), stock=False)
    client = office.clients["client1"]
    site_key = pubkey(genkey())

    def reload_client(site_networks: str | None) -> None:
        site = "" if site_networks is None else (f"\n[Peer]\nPublicKey = {site_key}\nAllowedIPs = {site_networks}\n"
                                                 "Endpoint = 192.0.2.99:51820\n")  # nobody there
        client.write_config(client_config(office.client_keys["client1"], office.server_key) + site)
        mark = len(client.lines)
        client.signal(signal.SIGHUP)
        client.wait_log(r"reloaded ", 5, after=mark)

    assert "198.51.100.0/24" in tun_routes(client, "-4")
    for networks, expected in (("2001:db8:50::/64", {"2001:db8:50::/64"}),       # added
                               ("2001:db8:50::/80", {"2001:db8:50::/80"}),       # narrowed
                               ("2001:db8:50::/56", {"2001:db8:50::/56"}),       # widened
                               (None, set())):                                   # removed
        reload_client(networks)
        site_routes = {r for r in tun_routes(client, "-6") if r.startswith("2001:db8:50:")}
        assert site_routes == expected, (networks, tun_routes(client, "-6"))
    # The server withdraws its pushed LAN route: the client takes it out of the kernel.
    office.server.write_config(office.server_config(["client1"]).replace("PushRoute = 198.51.100.0/24\n", ""))
    mark = len(client.lines)
    office.server.signal(signal.SIGHUP)
    client.wait_log(r"updated config from the server", 5, after=mark)
    wait_until(lambda: "198.51.100.0/24" not in tun_routes(client, "-4"), 5, what="the withdrawn route gone")
    assert ipaddress.ip_network("203.0.113.0/24").with_prefixlen in tun_routes(client, "-4")
    assert client.show()["refused"] == {}
