"""TunDevice and LinkSetup on a real tun inside a lab namespace.

The code under test runs in an agent process inside the namespace (the device and the
netlink socket belong to the namespace of the process that opens them); the test drives it
with one JSON request per line and checks the result with `ip -j` and real traffic.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from netlab import Host, Lab, PythonAgent
from packets import internet_checksum

_AGENT = r"""
import fcntl, ipaddress, json, os, select, socket, sys
from tunvpn.io.netlink import LinkSetup, NetlinkError
from tunvpn.io.tun import TunDevice, TunError

tuns, links, udp = [], {}, {}

def link_for(ifname):
    if ifname not in links:
        links[ifname] = LinkSetup(ifname)
    return links[ifname]

def run_step(link, step, *args):
    if step == "add_address":
        link.add_address(ipaddress.ip_interface(args[0]))
    elif step == "add_route":
        link.add_route(ipaddress.ip_network(args[0]), args[1] if len(args) > 1 else None)
    else:
        getattr(link, step)(*args)

def handle(request):
    op = request["op"]
    if op == "open":
        options = {"device_path": request["device_path"]} if "device_path" in request else {}
        tun = TunDevice(request["name"], **options)
        tuns.append(tun)
        return {"name": tun.name}
    if op == "fd_flags":
        fd = tuns[-1].fileno()
        return {"nonblocking": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
                "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)}
    if op == "link":
        link = link_for(request.get("ifname") or tuns[-1].name)
        for step in request["steps"]:
            run_step(link, *step)
        return {}
    if op == "undo":
        link_for(request.get("ifname") or tuns[-1].name).undo()
        return {}
    if op == "close_tun":
        tuns[-1].close()
        tuns[-1].close()
        return {}
    if op == "read":
        select.select([tuns[-1]], [], [], request["timeout"])
        return {"packets": [p.hex() for p in tuns[-1].read_batch(request["max_packets"])]}
    if op == "write":
        written = tuns[-1].write_batch(bytes.fromhex(p) for p in request["packets"])
        return {"written": written, "write_errors": tuns[-1].write_errors}
    if op == "udp_bind":
        sock = socket.socket(socket.AF_INET6 if ":" in request["address"] else socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((request["address"], 0))
        udp["socket"] = sock
        return {"port": sock.getsockname()[1]}
    if op == "udp_send":
        for _ in range(request["count"]):
            udp["socket"].sendto(bytes.fromhex(request["data"]), (request["address"], request["port"]))
        return {}
    if op == "udp_recv":
        udp["socket"].settimeout(request["timeout"])
        data, source = udp["socket"].recvfrom(65535)
        return {"data": data.hex(), "source": list(source[:2])}
    raise ValueError(f"unknown op {op!r}")

for line in sys.stdin:
    try:
        reply = handle(json.loads(line))
    except (TunError, NetlinkError) as exc:
        reply = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(reply), flush=True)
"""

# Drops CAP_NET_ADMIN (TUNSETIFF and rtnetlink changes need it) and the DAC overrides, so a
# root process is refused like an unprivileged daemon would be.
_UNPRIVILEGED = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all",
                 "--bounding-set=-net_admin,-dac_override,-dac_read_search", "--"]


class TunAgent(PythonAgent):
    """The tun/netlink agent in one namespace; `error` insists on a one-line TunError/NetlinkError."""

    def __init__(self, host: Host, wrapper: Sequence[str] = ()) -> None:
        super().__init__(host, _AGENT, wrapper)

    def error(self, op: str, **args: Any) -> str:
        """The one-line message of the TunError/NetlinkError the request must raise."""
        reply = self.call(op, **args)
        assert "error" in reply, f"{op} {args} should have failed: {reply}"
        assert "\n" not in reply["message"]
        return f"{reply['error']}: {reply['message']}"


# --- packets ---------------------------------------------------------------------------------


def echo_reply_for(request: bytes) -> bytes:
    """The IPv4 ICMP echo reply a real host would send back for `request`."""
    header_length = (request[0] & 0x0F) * 4
    total_length = struct.unpack("!H", request[2:4])[0]
    header, icmp = bytearray(request[:header_length]), bytearray(request[header_length:total_length])
    header[12:16], header[16:20] = request[16:20], request[12:16]
    header[8], header[10:12] = 64, b"\0\0"
    header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
    icmp[0], icmp[2:4] = 0, b"\0\0"
    icmp[2:4] = internet_checksum(bytes(icmp)).to_bytes(2, "big")
    return bytes(header + icmp)


def ipv6_udp(source: str, destination: str, source_port: int, destination_port: int, payload: bytes) -> bytes:
    src, dst = ipaddress.IPv6Address(source).packed, ipaddress.IPv6Address(destination).packed
    length = 8 + len(payload)
    datagram = struct.pack("!HHHH", source_port, destination_port, length, 0) + payload
    checksum = internet_checksum(src + dst + struct.pack("!I3xB", length, 17) + datagram) or 0xFFFF
    datagram = datagram[:6] + checksum.to_bytes(2, "big") + datagram[8:]
    return struct.pack("!IHBB", 6 << 28, length, 17, 64) + src + dst + datagram


def _is_ipv4_echo_request(packet: bytes, destination: str) -> bool:
    return (packet[0] >> 4 == 4 and packet[9] == 1 and packet[(packet[0] & 0x0F) * 4] == 8
            and ipaddress.IPv4Address(packet[16:20]) == ipaddress.IPv4Address(destination))


def _is_ipv6_udp_to(packet: bytes, destination: str, port: int) -> bool:
    return (packet[0] >> 4 == 6 and packet[6] == 17
            and ipaddress.IPv6Address(packet[24:40]) == ipaddress.IPv6Address(destination)
            and struct.unpack("!H", packet[42:44])[0] == port)


def _read_until(agent: TunAgent, wanted: Callable[[bytes], bool], timeout: float) -> list[bytes]:
    """Read batches until some packets match `wanted` (others, e.g. IPv6 router solicitations, are skipped)."""
    deadline = time.monotonic() + timeout
    seen: list[bytes] = []
    while (remaining := deadline - time.monotonic()) > 0:
        packets = [bytes.fromhex(p) for p in agent.ok("read", timeout=remaining, max_packets=64)["packets"]]
        seen += packets
        if matching := [p for p in packets if wanted(p)]:
            return matching
    raise AssertionError(f"no matching packet within {timeout} s; saw {[p.hex() for p in seen]}")


# --- tests -----------------------------------------------------------------------------------

def _routes(host: Host, family: str, ifname: str) -> dict[str, list[dict[str, Any]]]:
    by_destination: dict[str, list[dict[str, Any]]] = {}
    for route in host.ip_json(family, "route", "show", "dev", ifname):
        by_destination.setdefault(route["dst"], []).append(route)
    return by_destination


def _addresses(host: Host, ifname: str) -> dict[str, dict[str, Any]]:
    [link] = host.ip_json("addr", "show", "dev", ifname)
    return {f"{a['local']}/{a['prefixlen']}": a for a in link["addr_info"] if a["scope"] == "global"}


def test_link_setup_configures_the_tun_as_ip_shows_it_and_undo_removes_it(lab: Lab) -> None:
    host = lab.add_host("vpn")
    agent = TunAgent(host)
    name = agent.ok("open", name="tvpn%d")["name"]
    assert name == "tvpn0"
    assert agent.ok("fd_flags") == {"nonblocking": True, "cloexec": True}
    agent.ok("link", steps=[
        ["set_mtu", 1380],
        ["add_address", "203.0.113.1/24"],
        ["add_address", "2001:db8:100::1/64"],
        ["set_up"],
        ["add_route", "198.51.100.0/24"],
        ["add_route", "2001:db8:50::/64", 50],
        ["add_route", "203.0.113.0/24"],  # the address's prefix route already is exactly this
        ["add_route", "2001:db8:100::/64"],  # likewise, for IPv6 (kernel metric 256)
    ])
    [link] = host.ip_json("link", "show", "dev", name)
    assert link["mtu"] == 1380 and "UP" in link["flags"] and link["link_type"] == "none"
    addresses = _addresses(host, name)
    assert set(addresses) == {"203.0.113.1/24", "2001:db8:100::1/64"}
    assert addresses["2001:db8:100::1/64"].get("nodad") is True
    assert "tentative" not in addresses["2001:db8:100::1/64"]
    v4, v6 = _routes(host, "-4", name), _routes(host, "-6", name)
    assert set(v4) == {"198.51.100.0/24", "203.0.113.0/24"}
    assert v4["198.51.100.0/24"][0]["scope"] == "link"
    assert [r["protocol"] for r in v4["203.0.113.0/24"]] == ["kernel"]
    assert [r["metric"] for r in v6["2001:db8:50::/64"]] == [50]
    assert [r["protocol"] for r in v6["2001:db8:100::/64"]] == ["kernel"]

    agent.ok("undo")
    assert _addresses(host, name) == {}
    assert _routes(host, "-4", name) == {}
    assert set(_routes(host, "-6", name)) == {"fe80::/64"}  # the kernel's link-local route stays
    [link] = host.ip_json("link", "show", "dev", name)
    assert link["mtu"] == 1380  # undo removes what was added; MTU and state go with the device
    agent.ok("undo")  # nothing left to remove


def test_undo_leaves_alone_what_was_there_before(lab: Lab) -> None:
    host = lab.add_host("vpn")
    agent = TunAgent(host)
    name = agent.ok("open", name="tvtun0")["name"]
    for address in ("203.0.113.9/24", "2001:db8:100::9/64"):
        host.add_address(name, address)
    host.ip("link", "set", name, "up")
    host.ip("route", "add", "198.51.100.0/25", "dev", name)
    before = (_addresses(host, name), _routes(host, "-4", name), _routes(host, "-6", name))
    agent.ok("link", steps=[
        ["add_address", "2001:db8:100::9/64"],
        ["add_address", "203.0.113.1/24"],
        ["set_up"],
        ["add_route", "198.51.100.0/25"],
        ["add_route", "198.51.100.128/25"],
        ["add_route", "203.0.113.0/24"],
    ])
    assert set(_addresses(host, name)) == {"203.0.113.9/24", "203.0.113.1/24", "2001:db8:100::9/64"}
    assert set(_routes(host, "-4", name)) == {"198.51.100.0/25", "198.51.100.128/25", "203.0.113.0/24"}
    agent.ok("undo")
    # (Had the device no IPv4 address of its own, removing ours would make the kernel flush
    # every IPv4 route through it, the administrator's included: that is how Linux works.)
    assert (_addresses(host, name), _routes(host, "-4", name), _routes(host, "-6", name)) == before


def test_undo_after_the_device_vanished_with_its_descriptor(lab: Lab) -> None:
    host = lab.add_host("vpn")
    agent = TunAgent(host)
    name = agent.ok("open", name="tvtun0")["name"]
    agent.ok("link", steps=[["add_address", "203.0.113.1/24"], ["add_address", "2001:db8:100::1/64"],
                            ["set_up"], ["add_route", "198.51.100.0/24"], ["add_route", "2001:db8:50::/64"]])
    agent.ok("close_tun")  # closes twice: close() is idempotent
    assert name not in {link["ifname"] for link in host.ip_json("link", "show")}
    agent.ok("undo")


def test_ping_into_the_tun_is_read_and_an_echo_reply_written_back_reaches_ping(lab: Lab) -> None:
    host = lab.add_host("vpn")
    agent = TunAgent(host)
    agent.ok("open", name="tvtun0")
    agent.ok("link", steps=[["add_address", "203.0.113.1/24"], ["set_up"]])
    ping = host.popen(["ping", "-n", "-c", "1", "-w", "5", "203.0.113.2"], stdout=subprocess.PIPE, text=True)
    requests = _read_until(agent, lambda p: _is_ipv4_echo_request(p, "203.0.113.2"), timeout=5)
    assert ipaddress.IPv4Address(requests[0][12:16]) == ipaddress.IPv4Address("203.0.113.1")
    not_ip = bytes(20)  # version nibble 0: the kernel refuses it with EINVAL
    reply = agent.ok("write", packets=[not_ip.hex(), echo_reply_for(requests[0]).hex()])
    assert reply == {"written": 1, "write_errors": 1}
    out, _ = ping.communicate(timeout=10)
    assert ping.returncode == 0, out
    assert "1 received" in out


def test_ipv6_packets_leave_through_read_batch_in_bounded_batches_and_enter_through_write_batch(lab: Lab) -> None:
    host = lab.add_host("vpn")
    agent = TunAgent(host)
    name = agent.ok("open", name="tvtun0")["name"]
    host.set_sysctl(f"net.ipv6.conf.{name}.router_solicitations", 0)  # keep the tun free of stray RS
    agent.ok("link", steps=[["add_address", "2001:db8:100::1/64"], ["set_up"], ["add_route", "2001:db8:50::/64"]])
    port = agent.ok("udp_bind", address="2001:db8:100::1")["port"]
    agent.ok("udp_send", address="2001:db8:50::7", port=9, data=b"out".hex(), count=5)
    batches = []
    for _ in range(3):  # the datagrams were queued in the tun before udp_send returned
        packets = [bytes.fromhex(p) for p in agent.ok("read", timeout=0, max_packets=3)["packets"]]
        batches.append([p for p in packets if _is_ipv6_udp_to(p, "2001:db8:50::7", 9)])
    assert [len(batch) for batch in batches] == [3, 2, 0]
    assert all(packet[48:] == b"out" for packet in batches[0] + batches[1])

    inbound = ipv6_udp("2001:db8:50::7", "2001:db8:100::1", 4000, port, b"hello through the tun")
    assert agent.ok("write", packets=[inbound.hex()]) == {"written": 1, "write_errors": 0}
    received = agent.ok("udp_recv", timeout=5)
    assert bytes.fromhex(received["data"]) == b"hello through the tun"
    assert received["source"] == ["2001:db8:50::7", 4000]


def test_tun_errors_are_one_line_tun_errors(lab: Lab) -> None:
    agent = TunAgent(lab.add_host("vpn"))
    assert "no such device node" in agent.error("open", name="tvtun0", device_path="/nonexistent/net/tun")
    assert "/nonexistent/net/tun" in agent.error("open", name="tvtun0", device_path="/nonexistent/net/tun")
    assert "at most 15 bytes" in agent.error("open", name="x" * 16)
    assert "invalid tun device name 'a/b'" in agent.error("open", name="a/b")
    assert "a name is required" in agent.error("open", name="")
    assert "not a tun device" in agent.error("open", name="lo")
    agent.ok("open", name="tvbusy")
    assert agent.error("open", name="tvbusy") == "TunError: tun device 'tvbusy' is busy: another process has it open"


def test_errors_without_privileges_say_what_is_missing(lab: Lab) -> None:
    host = lab.add_host("vpn")
    agent = TunAgent(host, wrapper=_UNPRIVILEGED)
    assert "operation not permitted (needs CAP_NET_ADMIN)" in agent.error("open", name="tvtun0")
    with tempfile.TemporaryDirectory() as directory:
        node = Path(directory) / "tun"
        node.touch(mode=0o600)
        os.chown(node, 65534, 65534)  # someone else's 0600 file: refused without DAC override
        assert f"cannot open {node}: permission denied" in agent.error("open", name="tvtun0", device_path=str(node))
    message = agent.error("link", ifname="lo", steps=[["set_mtu", 1400]])
    assert message == "NetlinkError: cannot set MTU 1400 on lo: Operation not permitted (EPERM)"


def test_netlink_errors_name_the_operation_and_the_object(lab: Lab) -> None:
    agent = TunAgent(lab.add_host("vpn"))
    assert agent.error("link", ifname="nosuch0", steps=[]) == "NetlinkError: no network device named 'nosuch0'"
    agent.ok("open", name="tvtun0")
    message = agent.error("link", steps=[["add_address", "203.0.113.1/24"], ["add_route", "198.51.100.0/24"]])
    assert message == "NetlinkError: cannot add route 198.51.100.0/24 via tvtun0: Network is down (ENETDOWN)"
    message = agent.error("link", steps=[["set_mtu", 10]])
    assert message == "NetlinkError: cannot set MTU 10 on tvtun0: Invalid argument (EINVAL)"


def test_writes_to_a_down_link_are_dropped_and_a_deleted_device_is_an_error(lab: Lab) -> None:
    host = lab.add_host("vpn")
    agent = TunAgent(host)
    name = agent.ok("open", name="tvtun0")["name"]
    packet = ipv6_udp("2001:db8:50::7", "2001:db8:100::1", 4000, 9, b"x")
    assert agent.ok("write", packets=[packet.hex()]) == {"written": 0, "write_errors": 1}  # EIO while down
    host.ip("link", "delete", name)
    assert agent.error("read", timeout=0, max_packets=1) == (
        "TunDeleted: cannot read from tun device 'tvtun0': the device was deleted")
    assert agent.error("write", packets=[packet.hex()]) == (
        "TunDeleted: cannot write to tun device 'tvtun0': the device was deleted")
