"""Hostile peers against a running server: a port scan learns nothing, and a client the server
knows but that misbehaves is dropped, counted and rate limited while another client keeps working.

Topology: test_server_client's office (one tunvpn client), plus a host "mallory" on the WAN
switch that drives the sans-I/O core itself (no tun): it can send what no tunvpn daemon would.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
from ipaddress import ip_interface
from pathlib import Path

from netlab import Host, Lab, PythonAgent
from stockwg import genkey, pubkey
from test_server_client import SERVER_TUNNEL, SERVER_UNDERLAY, Office, build_office
from tunvpn.protocol import control
from tunvpnd import wait_for_ping

MALLORY_UNDERLAY = "192.0.2.66"
TESTS = Path(__file__).resolve().parents[1]
LISTEN_SECONDS = 2.0  # how long a probe waits for any answer after the last datagram
TUN_SIDE_DROPS = ("no_peer_for_destination", "tun_not_ip")  # what the server's own kernel sends into the tun

# One UDP probe per message type, sent from one socket; then any UDP or ICMP answer is counted.
PORT_SCAN = r"""
import json, random, select, socket, sys, time
sys.path[:0] = [sys.argv[3], sys.argv[3] + "/fuzz"]
from targets import with_mac1
from tunvpn.keys import decode_key, generate_private_key
from tunvpn.protocol.device import Device

server_ip, server_key = sys.argv[1], decode_key(sys.argv[2])
rng = random.Random(12)
stranger = Device(generate_private_key())  # a key the server does not know
stranger.set_peer(server_key, endpoint=(server_ip, 51820))
stranger.initiate(server_key, 0.0)
((initiation, _),) = stranger.datagrams_to_send()
probes = {
    "empty": b"",
    "one_byte": b"\x01",
    "initiation_garbage": b"\x01\0\0\0" + rng.randbytes(144),
    "response_garbage": b"\x02\0\0\0" + rng.randbytes(88),
    "cookie_reply_garbage": b"\x03\0\0\0" + rng.randbytes(60),
    "keepalive_garbage": b"\x04\0\0\0" + rng.randbytes(28),
    "transport_garbage": b"\x04\0\0\0" + rng.randbytes(124),
    "initiation_valid_mac1_random": with_mac1(b"\x01\0\0\0" + rng.randbytes(144), server_key),
    "response_valid_mac1_random": with_mac1(b"\x02\0\0\0" + rng.randbytes(88), server_key),
    "initiation_unknown_key": initiation,
    "random_64": rng.randbytes(64),
    "random_1400": rng.randbytes(1400),
}
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 40066))
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for data in probes.values():
    udp.sendto(data, (server_ip, 51820))
answers = []
deadline = time.monotonic() + float(sys.argv[4])
while (left := deadline - time.monotonic()) > 0:
    ready, _, _ = select.select([udp, icmp], [], [], left)
    for sock in ready:
        data, source = sock.recvfrom(4096)
        if sock is udp or source[0] == server_ip:
            answers.append(["udp" if sock is udp else "icmp", source[0], data.hex()])
print(json.dumps({"sent": list(probes), "answers": answers}))
"""

# A client the server knows, driven from the sans-I/O core: one JSON request per line.
MALLORY = r"""
import json, select, socket, sys, time
sys.path[:0] = [sys.argv[4], sys.argv[4] + "/unit"]
from corepair import ipv4_udp
from tunvpn.keys import decode_key
from tunvpn.protocol import control
from tunvpn.protocol.device import ControlReceived, Device, HandshakeCompleted

server_ip, server_key = sys.argv[1], decode_key(sys.argv[3])
device = Device(decode_key(sys.argv[2]))
device.set_peer(server_key, endpoint=(server_ip, 51820), allowed_ips=["0.0.0.0/0", "::/0"])
device.set_control_messages(True)
device.set_wall_clock(time.time(), time.monotonic())
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 40067))
received = {"handshakes": 0, "control": []}

def flush():
    for data, destination in device.datagrams_to_send():
        udp.sendto(data, destination[:2])

def pump(seconds):
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        timer = device.get_timer()
        wait = left if timer is None else max(0.0, min(left, timer - time.monotonic()))
        if select.select([udp], [], [], wait)[0]:
            data, source = udp.recvfrom(4096)
            device.receive_datagrams([(data, source)], time.monotonic())
        if (timer := device.get_timer()) is not None and timer <= time.monotonic():
            device.handle_timer(time.monotonic())
        flush()
        while (event := device.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                received["handshakes"] += 1
            elif isinstance(event, ControlReceived):
                message = control.decode(event.payload)
                received["control"].append(type(message).__name__)
                if isinstance(message, control.ConfigPush):
                    received["address"] = str(message.addresses[0].ip)

for line in sys.stdin:
    request = json.loads(line)
    now = time.monotonic()
    if request["op"] == "connect":
        device.initiate(server_key, now)
        flush()
        pump(3.0)
    elif request["op"] == "packets":
        device.send_packets([ipv4_udp(src, SERVER_TUNNEL_ADDRESS, b"x" * 20) for src in request["sources"]], now)
    elif request["op"] == "control":
        device.send_to_peer(server_key, [bytes.fromhex(p) for p in request["payloads"]], now)
    flush()
    pump(request.get("listen", 0.5))
    print(json.dumps(received), flush=True)
    received["control"] = []
""".replace("SERVER_TUNNEL_ADDRESS", repr(SERVER_TUNNEL))


def total_drops(show: dict) -> dict[str, int]:
    """Device-wide and every peer's drops, by reason."""
    drops = {k: v for k, v in show["dropped"].items() if not k.startswith("udp_")}
    for peer in show["peers"]:
        for reason, count in peer["dropped"].items():
            drops[reason] = drops.get(reason, 0) + count
    return drops


def grew(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def add_wan_host(lab: Lab, office: Office, role: str, address: str) -> Host:
    host = lab.add_host(role)
    lab.connect(host, office.wan, [f"{address}/24"])
    return host


def test_a_port_scan_gets_no_answer_and_every_probe_is_a_counted_drop(lab):
    office = build_office(lab, clients=("client1",), stock=False)
    scanner = add_wan_host(lab, office, "scanner", MALLORY_UNDERLAY)
    before = total_drops(office.server.show())
    result = json.loads(scanner.python(PORT_SCAN, SERVER_UNDERLAY, pubkey(office.server_key), str(TESTS),
                                       str(LISTEN_SECONDS), timeout=30).stdout)
    assert result["answers"] == [], f"the server answered a scan: {result['answers']}"
    changed = grew(before, total_drops(office.server.show()))
    changed = {reason: count for reason, count in changed.items() if reason not in TUN_SIDE_DROPS}
    assert sum(changed.values()) == len(result["sent"]), changed
    assert changed == {
        "unknown_type": 4,  # empty, one byte, and the two random ones (seeded: no valid type byte)
        "bad_mac1": 2,  # initiation and response sizes with garbage
        "bad_cookie_reply": 1,  # a cookie reply for no handshake of ours
        "unknown_receiver_index": 3,  # keepalive, transport, and the valid-mac1 response
        "handshake_rejected": 1,  # random contents behind a valid mac1
        "unknown_peer": 1,  # a real initiation from a key the server does not know
    }, changed  # and no cookie_reply_sent: not under load, so not even a cookie
    wait_for_ping(office.client_hosts["client1"], SERVER_TUNNEL, timeout=5)
    print(f"port scan: {len(result['sent'])} probes, no answer; drops {changed}")


def test_a_misbehaving_known_client_is_dropped_counted_and_limited_while_others_work(lab):
    office = build_office(lab, clients=("client1",), stock=False)
    mallory_host = add_wan_host(lab, office, "mallory", MALLORY_UNDERLAY)
    mallory_key = genkey()
    office.server.write_config(office.server_config(
        ["client1"], extra_peers=f"\n[Peer]\n# mallory\nPublicKey = {pubkey(mallory_key)}\n"))
    mark = len(office.server.lines)
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reloaded .*: 1 peer\(s\) added", 5, after=mark)
    client1_address = office.address_of("client1")
    pinger = office.client_hosts["client1"].popen(
        ["ping", "-n", "-q", "-i", "0.1", "-w", "25", SERVER_TUNNEL], stdout=subprocess.PIPE, text=True)
    arguments = [SERVER_UNDERLAY, mallory_key, pubkey(office.server_key), str(TESTS)]
    mallory = PythonAgent(mallory_host, f"import sys; sys.argv[1:] = {arguments!r}\n" + MALLORY)
    reply = mallory.ok("connect")
    assert reply["handshakes"] == 1, reply
    reply = mallory.ok("control", payloads=[control_hex("request", 1)], listen=1.0)
    assert reply["control"] == ["ConfigPush"], reply
    mallory_address = reply["address"]
    peer_key = pubkey(mallory_key)

    def mallory_drops() -> dict[str, int]:
        return dict(office.server.peer(peer_key)["dropped"])

    steps = [
        ("spoofed inner source", {"op": "packets", "sources": ["203.0.113.200"] * 5}, {"source_not_allowed": 5}),
        ("another client's address", {"op": "packets", "sources": [client1_address] * 5}, {"source_not_allowed": 5}),
        ("oversized control message", {"op": "control", "payloads": [oversized_control_hex()]}, {"bad_control_message": 1}),
        ("malformed control messages", {"op": "control", "payloads": malformed_control_hex()},
         {"bad_control_message": len(malformed_control_hex())}),
        ("an unknown version", {"op": "control", "payloads": [unknown_version_hex()]}, {"ignored_control_message": 1}),
        ("a push to the server", {"op": "control", "payloads": [control_hex("push", 2), control_hex("refused", 3)]},
         {"unexpected_control_message": 2}),
    ]
    report = {}
    for label, request, expected in steps:
        before = mallory_drops()
        reply = mallory.ok(request.pop("op"), **request)
        assert reply["control"] == [], f"{label}: the server answered {reply['control']}"
        changed = grew(before, mallory_drops())
        assert changed == expected, f"{label}: drops {changed}, expected {expected}"
        report[label] = changed
    # A flood of config requests: one answer per REQUESTS_PER_PEER_INTERVAL (0.2 s), the rest counted.
    # 200 requests in bursts of 20 over about a second (mallory's own core stages at most 128 at once).
    before = mallory_drops()
    bursts, burst = 10, 20
    answered = 0
    for n in range(bursts):
        reply = mallory.ok("control", payloads=[control_hex("request", 10 + n * burst + i) for i in range(burst)],
                           listen=0.1)
        answered += reply["control"].count("ConfigPush")
    reply = mallory.ok("control", payloads=[], listen=1.0)
    answered += reply["control"].count("ConfigPush")
    changed = grew(before, mallory_drops())
    assert 1 <= answered <= 8 and changed == {"control_rate_limited": bursts * burst - answered}, (answered, changed)
    report["config request flood"] = changed
    # The server still answers mallory's next request after the interval, with the same address.
    reply = mallory.ok("control", payloads=[control_hex("request", 999)], listen=1.0)
    assert reply["control"] == ["ConfigPush"] and reply["address"] == mallory_address, reply

    pinger.send_signal(signal.SIGINT)
    out, _ = pinger.communicate(timeout=10)
    summary = next(line for line in out.splitlines() if "packets transmitted" in line)
    transmitted, received = (int(part.split()[0]) for part in summary.split(",")[:2])
    assert transmitted >= 20 and received >= transmitted - 1, f"client1 suffered: {summary}"
    assert office.address_of("client1") == client1_address
    print(f"misbehaving client: {report}; client1's ping: {summary}")


def control_hex(kind: str, request_id: int = 1) -> str:
    message = {
        "request": lambda: control.ConfigRequest(request_id),
        "push": lambda: control.ConfigPush(request_id, addresses=[ip_interface("203.0.113.9/24")]),
        "refused": lambda: control.ConfigRefused(request_id, "no"),
    }[kind]()
    return control.encode(message).hex()


def oversized_control_hex() -> str:
    """A header that claims a 1300-byte body, and the body: more than any message may be."""
    return (struct.pack("!BBBBHH", control.CONTROL_MARKER, control.CONTROL_VERSION, 1, 0, 1, 1300) + bytes(1300)).hex()


def malformed_control_hex() -> list[str]:
    """Each breaks the format in a way the transport's zero padding cannot hide."""
    def message(body: bytes) -> bytes:
        return struct.pack("!BBBBHH", control.CONTROL_MARKER, control.CONTROL_VERSION, 2, 0, 1, len(body)) + body

    request = bytes.fromhex(control_hex("request"))
    return [message(bytes([1, 200]) + bytes(10)).hex(),  # an attribute overrunning the body
            (request[:6] + b"\xff\xff").hex(),  # body length 65535
            message(bytes([1, 3, 203, 0, 113])).hex(),  # an ADDRESS of 3 bytes
            message(bytes([7, 9]) + b"evil\nhost").hex()]  # a search domain with a line break


def unknown_version_hex() -> str:
    """A later version of the extension: ignored (and counted), as the versioning rule says."""
    request = bytearray.fromhex(control_hex("request"))
    request[1] = 9
    return request.hex()
