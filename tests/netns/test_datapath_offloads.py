"""The data path's offloads on real devices: merged tun writes, UDP GSO and GRO.

Topology: client --- veth (192.0.2.0/24 or 2001:db8:1::/64) --- server --- lanhost (198.51.100.0/24)
A TCP transfer to the server itself ends in the server's own TCP stack (a merged write taken
whole); one to the LAN host is forwarded, so the kernel splits the merged packet again and
computes every segment's checksum from the pseudo-header sum we wrote. Both ends hash the data,
the receiving kernels count checksum errors, and the device counters prove the offloads worked:
far fewer packets than segments on the server's tun and on the underlay.
"""

from __future__ import annotations

import pytest

from netlab import Host, Lab, transfer
from stockwg import genkey, pubkey
from test_tunnel import UNDERLAY, server_config
from tunvpnd import Tunvpn

MB = 1024 * 1024
SEGMENT = 1368  # the TCP payload of one 1420-byte tunnel packet with timestamps
LAN_HOST = "198.51.100.2"


def client_config(key: str, server_pub: str, endpoint: str) -> str:
    """test_tunnel's client, with the LAN behind the server routed into the tunnel too."""
    return f"""[Interface]
PrivateKey = {key}
Address = 203.0.113.2/24, 2001:db8:100::2/64

[Peer]
PublicKey = {server_pub}
Endpoint = {endpoint}:51820
AllowedIPs = 203.0.113.0/24, 2001:db8:100::/64, 198.51.100.0/24
"""


def packets(host: Host, ifname: str, direction: str) -> int:
    (link,) = host.ip_json("-s", "link", "show", "dev", ifname)
    return int(link["stats64"][direction]["packets"])


def tcp_checksum_errors(host: Host) -> int:
    output = host.run(["nstat", "-az", "TcpInCsumErrors"]).stdout.split()
    return int(output[output.index("TcpInCsumErrors") + 1])


def start_pair(lab: Lab, underlay: str, offloads: str) -> tuple[Host, Host, Host, Tunvpn, Tunvpn]:
    server_host, client_host, lanhost = lab.add_host("server"), lab.add_host("client"), lab.add_host("lanhost")
    server_addr, client_addr, endpoint = UNDERLAY[underlay]
    lab.link(server_host, client_host, [server_addr], [client_addr])
    lab.link(server_host, lanhost, ["198.51.100.1/24"], [f"{LAN_HOST}/24"])
    lanhost.add_route("203.0.113.0/24", via="198.51.100.1")
    server_host.set_sysctl("net.ipv4.ip_forward", 1)
    server_key, client_key = genkey(), genkey()
    args = ("--offloads", offloads)
    server = Tunvpn(server_host, "server", server_config(server_key, pubkey(client_key)), extra_args=args).start()
    client = Tunvpn(client_host, "client", client_config(client_key, pubkey(server_key), endpoint),
                    extra_args=args).start()
    client.wait_log(r"handshake complete \(initiator\)", 10)
    client_host.ping("203.0.113.1", count=2, timeout=5)
    return server_host, client_host, lanhost, server, client


@pytest.mark.parametrize("underlay", sorted(UNDERLAY))
def test_merged_writes_and_udp_offloads_carry_tcp_intact_and_in_far_fewer_packets(lab: Lab, underlay: str) -> None:
    server_host, client_host, lanhost, server, client = start_pair(lab, underlay, "all")
    assert server.show()["offloads"] == ["coalesce", "gso", "gro"]
    assert client.show()["offloads"] == ["coalesce", "gso", "gro"]
    size = 20 * MB
    segments = size // SEGMENT
    tun_before = packets(server_host, server.show()["interface"], "rx")
    wire_before = packets(server_host, "eth0", "rx")

    to_server = transfer(client_host, server_host, "203.0.113.1", size, timeout=60)
    assert to_server.sent_sha256 == to_server.received_sha256
    to_lan = transfer(client_host, lanhost, LAN_HOST, size, timeout=60)
    assert to_lan.sent_sha256 == to_lan.received_sha256
    back = transfer(server_host, client_host, "2001:db8:100::2", size, timeout=60)
    assert back.sent_sha256 == back.received_sha256

    # Each TCP packet the server's tun took stood for many segments, and so did each datagram
    # on the wire (GSO on the client, GRO on the server keep them whole across the veth).
    tun_writes = packets(server_host, server.show()["interface"], "rx") - tun_before
    wire_packets = packets(server_host, "eth0", "rx") - wire_before
    print(f"{underlay}: {2 * segments} segments to the server arrived in {wire_packets} underlay packets "
          f"and {tun_writes} tun writes")
    assert tun_writes < 2 * segments / 4, (tun_writes, segments)
    assert wire_packets < 2 * segments / 4, (wire_packets, segments)
    for host in (server_host, lanhost, client_host):
        assert tcp_checksum_errors(host) == 0, host
    for daemon in (server, client):
        status = daemon.show()
        assert not status["internal_errors"], status
        assert "tun_write_errors" not in status["dropped"], status


def test_with_offloads_off_every_segment_is_its_own_write(lab: Lab) -> None:
    server_host, client_host, lanhost, server, client = start_pair(lab, "ipv4", "none")
    assert server.show()["offloads"] == [] and client.show()["offloads"] == []
    ifname = server.show()["interface"]
    before = packets(server_host, ifname, "rx")
    size = 5 * MB
    result = transfer(client_host, lanhost, LAN_HOST, size, timeout=60)
    assert result.sent_sha256 == result.received_sha256
    assert packets(server_host, ifname, "rx") - before >= size // SEGMENT
    assert tcp_checksum_errors(lanhost) == 0
