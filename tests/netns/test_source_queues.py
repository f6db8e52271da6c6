"""The server's receive queues per source address, in a real kernel: where each source's
datagrams land, that a flood from one source fills only its own queue, and that the port
stays exclusive (a second daemon is refused, not quietly made a member of the group).

Topology: one host; the sources are addresses on its loopback device.
"""

from __future__ import annotations

import ipaddress
import json
import socket

import pytest

from netlab import Lab

PORT = 51820
SOURCES = ["192.0.2.1", "192.0.2.11", "192.0.2.12", "192.0.2.13", "192.0.2.66", "203.0.113.7",
           "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1", "2001:db8:0:7::5"]
SAME_PREFIX = ["2001:db8::1", "2001:db8::2"]  # one /64: one queue
FLOODER, VICTIM = "192.0.2.66", "192.0.2.11"
FLOOD = 20_000  # 148-byte datagrams; a queue's 1 MiB receive buffer holds about a thousand

# Runs in the namespace: binds the port as the server does, sends from each source, and
# reports which socket (by index in UdpTransport.sockets) each source's datagram reached.
PROBE = r"""
import json, select, socket, sys
from tunvpn.io.udp import UdpTransport, UdpError
port, sources, flooder, victim, flood = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
udp = UdpTransport(port)

def send_from(source, payload, count=1):
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for _ in range(count):
            sock.sendto(payload, ("::1" if family == socket.AF_INET6 else "127.0.0.1", port))

def drain():
    got = []
    for index, sock in enumerate(udp.sockets):
        got.extend((index, data, source[0]) for data, source in udp.receive_batch(sock, 1 << 30))
    return got

landed = {}
for source in sources:
    send_from(source, source.encode())
    select.select(udp.sockets, [], [], 2)
    for index, data, seen in drain():
        landed[data.decode()] = index
send_from(flooder, bytes(148), flood)
send_from(victim, b"victim", 10)
after_flood = drain()
try:
    UdpTransport(port)
    second = "bound"
except UdpError as exc:
    second = str(exc)
print(json.dumps({"queues": udp.receive_queues, "families": [s.family for s in udp.sockets], "landed": landed,
                  "flood_received": sum(1 for _, data, seen in after_flood if seen == flooder),
                  "victim_received": sum(1 for _, data, seen in after_flood if data == b"victim"),
                  "second": second}))
"""


def expected_queue(address: str, queues: int) -> int:
    """The steering program's answer, computed the other way: the address (IPv4) or its /64
    prefix (IPv6) as 32-bit words xored, then the word's bytes folded together."""
    packed = ipaddress.ip_address(address).packed
    word = int.from_bytes(packed, "big") if len(packed) == 4 else \
        int.from_bytes(packed[0:4], "big") ^ int.from_bytes(packed[4:8], "big")
    word ^= word >> 16
    word ^= word >> 8
    return word & (queues - 1)


def test_each_source_has_its_queue_and_a_flood_fills_only_its_own(lab: Lab) -> None:
    host = lab.add_host("server")
    host.ip("link", "set", "lo", "up")
    for source in SOURCES:
        host.add_address("lo", source + ("/128" if ":" in source else "/32"))
    report = json.loads(host.python(PROBE, str(PORT), json.dumps(SOURCES), FLOODER, VICTIM, str(FLOOD),
                                    timeout=60).stdout)
    queues = report["queues"]
    assert queues == 8 and report["families"] == [socket.AF_INET] * queues + [socket.AF_INET6] * queues, report
    for source in SOURCES:
        offset = queues if ":" in source else 0
        assert report["landed"][source] == offset + expected_queue(source, queues), (source, report)
    assert len({report["landed"][s] for s in SAME_PREFIX}) == 1
    assert len({report["landed"][s] for s in SOURCES}) >= 7, "the sources spread over the queues"
    # The flooder's queue overflowed; the victim's, another, lost nothing.
    assert expected_queue(FLOODER, queues) != expected_queue(VICTIM, queues)
    assert report["flood_received"] < FLOOD, report
    assert report["victim_received"] == 10, report
    assert "cannot bind UDP port 51820" in report["second"] and "in use" in report["second"], report


# Runs in the namespace: UdpTransport on a kernel that refuses one step of making the group.
FALLBACK = r"""
import errno, json, logging, sys
from tunvpn.io import udp
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
refused = sys.argv[2]
if refused == "attach":
    def refuse_attach(sock, program):
        raise OSError(errno.EINVAL, "Invalid argument")
    udp.attach = refuse_attach
else:  # SO_REUSEPORT itself
    plain_open = udp._open
    def open_without_reuseport(family, port, fwmark, *, queue_of_group=None):
        if queue_of_group is not None:
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return plain_open(family, port, fwmark)
    udp._open = open_without_reuseport
transport = udp.UdpTransport(int(sys.argv[1]))
print(json.dumps({"queues": transport.receive_queues, "sockets": len(transport.sockets)}))
"""


@pytest.mark.parametrize(("refused", "reason"), [("attach", "Invalid argument"), ("reuseport", "Protocol not available")])
def test_a_kernel_that_cannot_make_the_queues_gets_one_socket_per_family_and_a_warning(
        lab: Lab, refused: str, reason: str) -> None:
    host = lab.add_host("server")
    host.ip("link", "set", "lo", "up")
    result = host.python(FALLBACK, str(PORT), refused)
    assert json.loads(result.stdout) == {"queues": 1, "sockets": 2}
    assert f"receive queues per source address unavailable ({reason}); one socket for port 51820" in result.stderr
