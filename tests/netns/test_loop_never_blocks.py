"""Packets keep flowing while the daemon does slow things: a reload whose endpoint names resolve
through a DNS server that answers after 3 s, and `tunvpn show` asked about 2000 peers.

A 20 ms ping from a client to the server's tunnel address runs through it all; no gap between two
answers may exceed 200 ms.  Before name resolution moved off the loop, the reload alone stopped
every packet for the full 3 s.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

from netlab import read_line
from stockwg import genkey, pubkey
from test_server_client import SERVER_TUNNEL, build_office
from tunvpnd import Tunvpn, wait_for_ping

DNS_DELAY = 3.0
SLOW_NAME = "slow.office.example"
SLOW_ANSWER = "192.0.2.99"
EXTRA_PEERS = 2000
PING_INTERVAL = 0.02
MAX_GAP = 0.2

# A DNS server that answers every A query for any name after DNS_DELAY seconds (NODATA otherwise).
SLOW_DNS = r"""
import socket, struct, sys, threading, time
address, answer, delay = sys.argv[1], socket.inet_aton(sys.argv[2]), float(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((address, 53))
print("listening", flush=True)

def reply(query, client):
    time.sleep(delay)
    end = 12
    while query[end]:
        end += query[end] + 1
    question = query[12:end + 5]
    qtype = struct.unpack("!H", query[end + 1:end + 3])[0]
    records = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + answer) if qtype == 1 else b""
    header = query[:2] + struct.pack("!HHHHH", 0x8180, 1, 1 if records else 0, 0, 0)
    sock.sendto(header + question + records, client)

for _ in range(200):  # bounded: a test asks a handful of times
    query, client = sock.recvfrom(512)
    threading.Thread(target=reply, args=(query, client), daemon=True).start()
"""

# The server's interpreter: its own /etc/resolv.conf (pointing at the slow DNS server), bound in
# the mount namespace `ip netns exec` made for it alone; the host's file is never touched.
WITH_RESOLV_CONF = """#!/bin/sh
mount --bind {resolv_conf} /etc/resolv.conf && exec {python} "$@"
"""


def ping_gaps(output: str) -> tuple[int, float]:
    """(answers, the longest time between two consecutive answers) from `ping -D` output."""
    stamps = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", output, re.MULTILINE)]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return len(stamps), max(gaps, default=float("inf"))


def test_reload_with_slow_dns_and_a_big_show_do_not_stop_packets(lab, tmp_path):
    office = build_office(lab, clients=("client1",), stock=False)
    server_host, client_host = office.server_host, office.client_hosts["client1"]
    dns = server_host.popen_python(SLOW_DNS, "192.0.2.1", SLOW_ANSWER, str(DNS_DELAY), stdout=subprocess.PIPE)
    read_line(dns, time.monotonic() + 5, "the slow DNS server")
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 192.0.2.1\noptions timeout:10 attempts:1\n")
    interpreter = tmp_path / "python-with-resolv-conf"
    interpreter.write_text(WITH_RESOLV_CONF.format(resolv_conf=resolv_conf, python=sys.executable))
    interpreter.chmod(0o755)
    # The server again, on that interpreter, with 2000 more peers for `show` to walk.
    crowd = "".join(f"\n[Peer]\nPublicKey = {pubkey(genkey())}\n" for _ in range(EXTRA_PEERS))
    assert office.server.stop() == 0
    server = Tunvpn(server_host, "server", office.server_config(["client1"]) + crowd, python=str(interpreter))
    office.server = server.start()
    wait_for_ping(client_host, SERVER_TUNNEL, timeout=20)

    count = int(8.0 / PING_INTERVAL)
    ping = client_host.popen(["ping", "-D", "-n", "-i", str(PING_INTERVAL), "-c", str(count), "-W", "1",
                              SERVER_TUNNEL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    slow_peer = pubkey(genkey())
    server.write_config(server.config_path.read_text()
                        + f"\n[Peer]\nPublicKey = {slow_peer}\nEndpoint = {SLOW_NAME}:51820\n")
    mark = len(server.lines)
    started = time.monotonic()
    server.signal(signal.SIGHUP)
    shows = []
    while time.monotonic() - started < DNS_DELAY + 1.0:  # bounded: about 4 s of `show`
        status = server.show()
        shows.append(len(status["peers"]))
    server.wait_log(r"reloaded .*: 1 peer\(s\) added", 10, after=mark)
    reloaded_after = time.monotonic() - started
    output, _ = ping.communicate(timeout=count * PING_INTERVAL + 15)
    answers, longest_gap = ping_gaps(output)

    assert min(shows) >= EXTRA_PEERS + 1 and len(shows) >= 3, shows
    assert reloaded_after >= DNS_DELAY - 0.5, "the reload did not wait for the slow DNS server"
    assert server.peer(slow_peer)["endpoint"] == f"{SLOW_ANSWER}:51820"
    assert answers >= count * 0.97, f"{answers} of {count} pings answered\n{output[-2000:]}"
    assert longest_gap <= MAX_GAP, f"packets stopped for {longest_gap:.3f} s"
    dns.kill()
