"""Full tunnel (AllowedIPs = 0.0.0.0/0, ::/0): LinkSetup.add_full_tunnel on a real tun.

The client namespace has an underlay veth to a "server" namespace, which also holds an
address standing for the internet (198.51.100.7, 2001:db8:50::7) and the client's default
routes point at it.  With the full tunnel up, the same destination is reached two ways: a
socket carrying the fwmark still goes out by the veth (the tunnel's own datagrams), an
unmarked one goes into the tun.  undo() must leave rules, routes and the sysctl as they were.
"""

from __future__ import annotations

import ipaddress
import json
import struct
import subprocess
import time
from typing import Any, Callable

from netlab import AGENT_REPLY_TIMEOUT, Host, Lab, PythonAgent, read_line

TABLE = 51820
FWMARK = 4242  # deliberately not the table number, so a mix-up cannot pass
TUN_V4, TUN_V6 = "203.0.113.2/24", "2001:db8:100::2/64"
CLIENT_V4, CLIENT_V6 = "192.0.2.2/24", "2001:db8:1::2/64"
SERVER_V4, SERVER_V6 = "192.0.2.1", "2001:db8:1::1"
INTERNET_V4, INTERNET_V6 = "198.51.100.7", "2001:db8:50::7"

_AGENT = r"""
import json, select, socket, sys
from tunvpn.io.netlink import LinkSetup, NetlinkError
from tunvpn.io.tun import TunDevice

state = {"sockets": {}}

def handle(request):
    op = request["op"]
    if op == "open":
        state["tun"] = TunDevice(request["name"])
        state["link"] = LinkSetup(state["tun"].name)
        return {"name": state["tun"].name}
    if op == "full_tunnel":
        state["link"].add_full_tunnel(request["version"], request["table"], request["fwmark"])
        return {}
    if op == "undo":
        state["link"].undo()
        return {}
    if op == "udp_open":
        family = socket.AF_INET6 if request["version"] == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if request["mark"]:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, request["mark"])
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        state["sockets"][request["id"]] = sock
        return {"port": sock.getsockname()[1]}
    if op == "udp_send":
        state["sockets"][request["id"]].sendto(bytes.fromhex(request["data"]), (request["address"], request["port"]))
        return {}
    if op == "udp_recv":
        sock = state["sockets"][request["id"]]
        sock.settimeout(request["timeout"])
        data, source = sock.recvfrom(65535)
        return {"data": data.hex(), "source": list(source[:2])}
    if op == "read_tun":
        select.select([state["tun"]], [], [], request["timeout"])
        return {"packets": [p.hex() for p in state["tun"].read_batch(64)]}
    raise ValueError(f"unknown op {op!r}")

for line in sys.stdin:
    try:
        reply = handle(json.loads(line))
    except NetlinkError as exc:
        reply = {"error": str(exc)}
    print(json.dumps(reply), flush=True)
"""

# Binds one UDP socket per address, prints {address: port}, then reports and echoes every datagram.
_ECHO_SERVER = r"""
import json, selectors, socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
sockets = {}
for address in sys.argv[2:]:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    sockets[address] = sock
print(json.dumps({address: sock.getsockname()[1] for address, sock in sockets.items()}), flush=True)
with selectors.DefaultSelector() as selector:
    for address, sock in sockets.items():
        selector.register(sock, selectors.EVENT_READ, address)
    while (remaining := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(remaining):
            data, source = key.fileobj.recvfrom(65535)
            print(json.dumps({"to": key.data, "from": source[0], "data": data.hex()}), flush=True)
            key.fileobj.sendto(b"echo:" + data, source)
"""


class EchoServer:
    """UDP echo sockets in the server namespace; `next()` returns the next datagram it got."""

    def __init__(self, host: Host, addresses: list[str], lifetime: float = 60.0) -> None:
        self.process = host.popen_python(_ECHO_SERVER, str(lifetime), *addresses,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ports: dict[str, int] = json.loads(self._line("the echo server to bind"))

    def _line(self, what: str) -> str:
        return read_line(self.process, time.monotonic() + AGENT_REPLY_TIMEOUT, what)

    def next(self) -> dict[str, str]:
        return json.loads(self._line("a datagram at the echo server"))


def _build(lab: Lab) -> tuple[Host, Host, PythonAgent, str]:
    client, server = lab.add_host("client"), lab.add_host("server")
    lab.link(client, server, [CLIENT_V4, CLIENT_V6], [f"{SERVER_V4}/24", f"{SERVER_V6}/64"])
    server.add_address("lo", f"{INTERNET_V4}/32")
    server.add_address("lo", f"{INTERNET_V6}/128")
    client.add_route("default", via=SERVER_V4)
    client.ip("-6", "route", "add", "default", "via", SERVER_V6)
    # Debian's and Ubuntu's default (loose reverse-path filtering); see the report for strict mode.
    client.set_sysctl("net.ipv4.conf.all.rp_filter", 2)
    client.set_sysctl("net.ipv4.conf.all.src_valid_mark", 0)
    # A new tun's link-local address is then usable at once, and it sends no router solicitations.
    client.set_sysctl("net.ipv6.conf.default.accept_dad", 0)
    client.set_sysctl("net.ipv6.conf.default.router_solicitations", 0)
    agent = PythonAgent(client, _AGENT)
    name = agent.ok("open", name="tvfull0")["name"]
    # Addressed by the lab, not by the agent's LinkSetup: its undo() then reverts the full tunnel only.
    client.add_address(name, TUN_V4)
    client.add_address(name, TUN_V6)
    client.ip("link", "set", name, "up")  # a tun's operstate stays UNKNOWN: nothing to wait for
    return client, server, agent, name


def _routing_state(host: Host) -> dict[str, Any]:
    return {
        "rules4": host.ip_json("-4", "rule", "show"),
        "rules6": host.ip_json("-6", "rule", "show"),
        "routes4": host.ip_json("-4", "route", "show", "table", "all"),
        "routes6": host.ip_json("-6", "route", "show", "table", "all"),
        "src_valid_mark": host.run(["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"]).stdout.strip(),
    }


def _udp_fields(packet: bytes) -> tuple[str, str, int, bytes] | None:
    """(source, destination, destination port, payload) of an IPv4/IPv6 UDP packet, else None."""
    if packet[0] >> 4 == 4 and packet[9] == 17:
        header = (packet[0] & 0x0F) * 4
        source, destination = packet[12:16], packet[16:20]
    elif packet[0] >> 4 == 6 and packet[6] == 17:
        header = 40
        source, destination = packet[8:24], packet[24:40]
    else:
        return None
    port, length = struct.unpack("!2xHH", packet[header:header + 6])
    return (str(ipaddress.ip_address(source)), str(ipaddress.ip_address(destination)), port,
            packet[header + 8:header + length])


def _read_tun_until(agent: PythonAgent, wanted: Callable[[tuple[str, str, int, bytes]], bool],
                    timeout: float = 5.0) -> tuple[str, str, int, bytes]:
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        for hex_packet in agent.ok("read_tun", timeout=remaining)["packets"]:
            fields = _udp_fields(bytes.fromhex(hex_packet))
            if fields is not None and wanted(fields):
                return fields
            seen.append(hex_packet)
    raise AssertionError(f"no such packet in the tun within {timeout} s; saw {seen}")


def _goes_by_underlay(agent: PythonAgent, server: EchoServer, socket_id: str, address: str, payload: bytes) -> None:
    """A datagram from `socket_id` reaches the server namespace, and the echo comes back."""
    agent.ok("udp_send", id=socket_id, address=address, port=server.ports[address], data=payload.hex())
    arrival = server.next()
    assert (arrival["to"], bytes.fromhex(arrival["data"])) == (address, payload)
    echo = agent.ok("udp_recv", id=socket_id, timeout=5)
    assert bytes.fromhex(echo["data"]) == b"echo:" + payload
    assert echo["source"] == [address, server.ports[address]]


def _goes_into_tun(agent: PythonAgent, server: EchoServer, socket_id: str, address: str, payload: bytes,
                   tun_address: str) -> None:
    agent.ok("udp_send", id=socket_id, address=address, port=server.ports[address], data=payload.hex())
    source, destination, port, data = _read_tun_until(agent, lambda fields: fields[3] == payload)
    assert (source, destination, port) == (tun_address, address, server.ports[address])


def test_marked_datagrams_leave_by_the_underlay_everything_else_enters_the_tun(lab: Lab) -> None:
    client, server_host, agent, _ = _build(lab)
    server = EchoServer(server_host, [INTERNET_V4, INTERNET_V6, SERVER_V4, SERVER_V6])
    for version in (4, 6):
        agent.ok("udp_open", id=f"marked{version}", version=version, mark=FWMARK)
        agent.ok("udp_open", id=f"plain{version}", version=version, mark=0)
    internet = {4: INTERNET_V4, 6: INTERNET_V6}
    server_address = {4: SERVER_V4, 6: SERVER_V6}
    tun_address = {4: TUN_V4.split("/")[0], 6: TUN_V6.split("/")[0]}

    # Without the full tunnel the internet address is reached by the underlay: it is the setup,
    # not the route lookup by chance, that sends the unmarked datagram into the tun below.
    for version in (4, 6):
        _goes_by_underlay(agent, server, f"plain{version}", internet[version], b"before")
    before = _routing_state(client)

    agent.ok("full_tunnel", version=4, table=TABLE, fwmark=FWMARK)
    agent.ok("full_tunnel", version=6, table=TABLE, fwmark=FWMARK)
    for version in (4, 6):
        # The tunnel's own datagrams (handshakes, transport) still reach their server, both ways.
        _goes_by_underlay(agent, server, f"marked{version}", internet[version], b"handshake")
        # Everything else to the same address now goes into the tun.
        _goes_into_tun(agent, server, f"plain{version}", internet[version], f"v{version} app".encode(),
                       tun_address[version])
        # More specific main-table routes still win: the LAN stays reachable outside the tunnel.
        _goes_by_underlay(agent, server, f"plain{version}", server_address[version], b"lan")

    during = _routing_state(client)
    assert during["src_valid_mark"] == "1"
    for family in ("4", "6"):
        added = [rule for rule in during[f"rules{family}"] if rule not in before[f"rules{family}"]]
        assert sorted(added, key=lambda rule: rule["priority"]) == [
            {"priority": 32764, "src": "all", "table": "main", "suppress_prefixlen": 0},
            {"priority": 32765, "not": None, "src": "all", "fwmark": hex(FWMARK), "table": str(TABLE)},
        ]
        new_routes = [route for route in during[f"routes{family}"] if route not in before[f"routes{family}"]]
        assert [(route["dst"], route["dev"], route["table"]) for route in new_routes] == [
            ("default", "tvfull0", str(TABLE))]

    agent.ok("undo")
    assert _routing_state(client) == before
    for version in (4, 6):
        _goes_by_underlay(agent, server, f"plain{version}", internet[version], b"after")


def test_a_stale_rule_from_a_crashed_run_is_taken_over_and_removed(lab: Lab) -> None:
    client, _, agent, _ = _build(lab)
    before = _routing_state(client)
    client.ip("-4", "rule", "add", "not", "fwmark", str(FWMARK), "table", str(TABLE), "priority", "32765")
    client.ip("-6", "rule", "add", "table", "main", "suppress_prefixlength", "0", "priority", "32764")
    agent.ok("full_tunnel", version=4, table=TABLE, fwmark=FWMARK)
    agent.ok("full_tunnel", version=6, table=TABLE, fwmark=FWMARK)
    during = _routing_state(client)
    for family in ("rules4", "rules6"):
        assert len(during[family]) == len(before[family]) + 2, during[family]  # no duplicates
    agent.ok("undo")
    assert _routing_state(client) == before


def test_src_valid_mark_already_set_or_still_needed_by_another_tunnel_stays_set(lab: Lab) -> None:
    client, _, agent, _ = _build(lab)
    client.set_sysctl("net.ipv4.conf.all.src_valid_mark", 1)
    before = _routing_state(client)
    agent.ok("full_tunnel", version=4, table=TABLE, fwmark=FWMARK)
    agent.ok("undo")
    assert _routing_state(client) == before

    client.set_sysctl("net.ipv4.conf.all.src_valid_mark", 0)
    agent.ok("full_tunnel", version=4, table=TABLE, fwmark=FWMARK)
    # Meanwhile another tunnel (wg-quick, say) comes up with its own marked rule.
    client.ip("-4", "rule", "add", "not", "fwmark", "51821", "table", "51821", "priority", "32000")
    agent.ok("undo")
    state = _routing_state(client)
    assert state["src_valid_mark"] == "1"
    assert [rule.get("fwmark") for rule in state["rules4"] if "fwmark" in rule] == [hex(51821)]


def test_a_table_in_use_and_a_missing_mark_are_refused_with_a_clear_message(lab: Lab) -> None:
    client, _, agent, _ = _build(lab)
    before = _routing_state(client)
    assert agent.call("full_tunnel", version=4, table=TABLE, fwmark=0) == {
        "error": "full tunnel on tvfull0 needs a non-zero fwmark on the UDP socket"}
    client.ip("-6", "route", "add", "default", "dev", "lo", "table", str(TABLE))
    assert agent.call("full_tunnel", version=6, table=TABLE, fwmark=FWMARK) == {
        "error": f"cannot add IPv6 default route via tvfull0 in table {TABLE}: "
                 f"the table already has one (another tunnel uses table {TABLE}?)"}
    client.ip("-6", "route", "del", "default", "dev", "lo", "table", str(TABLE))
    agent.ok("undo")
    assert _routing_state(client) == before
