"""Interop with a stock WireGuard peer (Debian's wireguard-go + wg) that nobody here wrote.

Deadlines follow WireGuard's timers: a stock initiator retries every 5 s (+ up to 1/3 s jitter),
and after silence a peer starts a new handshake 15 s after its first unanswered packet.
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
from dataclasses import dataclass

import pytest

from netlab import Host, Lab, stop_process, transfer
from stockwg import StockWireGuard, genkey, genpsk, pubkey
from tunvpnd import Tunvpn, wait_for_ping

MB = 1024 * 1024
STOCK_RETRY = 5.0 + 1 / 3
LISTEN_PORT = 51820

# Underlay: 192.0.2.1 = the listening (responder) side, 192.0.2.2 = the initiating side.
# Tunnel: 203.0.113.1 / 2001:db8:100::1 responder side, .2 / ::2 initiator side.
RESPONDER_TUNNEL = ("203.0.113.1", "2001:db8:100::1")
INITIATOR_TUNNEL = ("203.0.113.2", "2001:db8:100::2")


@dataclass
class Setup:
    lab: Lab
    responder_host: Host
    initiator_host: Host
    tunvpn: Tunvpn
    stock: StockWireGuard
    tunvpn_key: str
    stock_key: str


def _tunvpn_config(key: str, peer_pub: str, psk: str | None, *, listening: bool) -> str:
    own, other = (RESPONDER_TUNNEL, INITIATOR_TUNNEL) if listening else (INITIATOR_TUNNEL, RESPONDER_TUNNEL)
    lines = ["[Interface]", f"PrivateKey = {key}", f"Address = {own[0]}/24, {own[1]}/64"]
    if listening:
        lines.append(f"ListenPort = {LISTEN_PORT}")
    lines += ["", "[Peer]", f"PublicKey = {peer_pub}"]
    if psk:
        lines.append(f"PresharedKey = {psk}")
    if listening:
        lines.append(f"AllowedIPs = {other[0]}/32, {other[1]}/128")
    else:
        lines += [f"Endpoint = 192.0.2.1:{LISTEN_PORT}", "AllowedIPs = 203.0.113.0/24, 2001:db8:100::/64"]
    return "\n".join(lines) + "\n"


def _stock_peer(host: Host, lab: Lab, key: str, peer_pub: str, psk: str | None, *, listening: bool) -> StockWireGuard:
    stock = StockWireGuard(host, lab.unique_ifname("wg"), key, listen_port=LISTEN_PORT if listening else None)
    lab.add_cleanup(stock.close)
    own = RESPONDER_TUNNEL if listening else INITIATOR_TUNNEL
    if listening:
        stock.set_peer(peer_pub, allowed_ips=[f"{INITIATOR_TUNNEL[0]}/32", f"{INITIATOR_TUNNEL[1]}/128"],
                       preshared_key=psk)
    else:
        stock.set_peer(peer_pub, allowed_ips=["203.0.113.0/24", "2001:db8:100::/64"],
                       endpoint=f"192.0.2.1:{LISTEN_PORT}", preshared_key=psk)
    stock.add_address(f"{own[0]}/24")
    stock.add_address(f"{own[1]}/64")
    stock.set_up(mtu=1420)
    return stock


def build(lab: Lab, *, stock_initiates: bool, psk: str | None = None, tunvpn_args: tuple[str, ...] = (),
          start_tunvpn: bool = True) -> Setup:
    responder_host, initiator_host = lab.add_host("responder"), lab.add_host("initiator")
    lab.link(responder_host, initiator_host, ["192.0.2.1/24"], ["192.0.2.2/24"])
    tunvpn_key, stock_key = genkey(), genkey()
    tunvpn_host, stock_host = (responder_host, initiator_host) if stock_initiates else (initiator_host, responder_host)
    stock = _stock_peer(stock_host, lab, stock_key, pubkey(tunvpn_key), psk, listening=not stock_initiates)
    role = "server" if stock_initiates else "client"
    tunvpn = Tunvpn(tunvpn_host, role,
                    _tunvpn_config(tunvpn_key, pubkey(stock_key), psk, listening=stock_initiates),
                    extra_args=tunvpn_args)
    if start_tunvpn:
        tunvpn.start()
    return Setup(lab, responder_host, initiator_host, tunvpn, stock, tunvpn_key, stock_key)


def check_traffic(setup: Setup) -> None:
    """Ping both families both ways, then a sha256-checked 20 MB transfer each way."""
    initiator, responder = setup.initiator_host, setup.responder_host
    initiator.ping(RESPONDER_TUNNEL[0], count=3, timeout=5)
    initiator.ping(RESPONDER_TUNNEL[1], count=3, timeout=5)
    responder.ping(INITIATOR_TUNNEL[0], count=3, timeout=5)
    responder.ping(INITIATOR_TUNNEL[1], count=3, timeout=5)
    up = transfer(initiator, responder, RESPONDER_TUNNEL[0], 20 * MB, timeout=60)
    assert up.sent_sha256 == up.received_sha256
    down = transfer(responder, initiator, INITIATOR_TUNNEL[1], 20 * MB, timeout=60)
    assert down.sent_sha256 == down.received_sha256
    stock_view = setup.stock.show_dump().peers[pubkey(setup.tunvpn_key)]
    assert stock_view.latest_handshake > 0
    assert stock_view.rx_bytes > 20 * MB and stock_view.tx_bytes > 20 * MB


@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
def test_stock_initiator_to_tunvpn_responder(lab, psk):
    setup = build(lab, stock_initiates=True, psk=genpsk() if psk else None)
    wait_for_ping(setup.initiator_host, RESPONDER_TUNNEL[0], timeout=10)  # the stock peer initiates on traffic
    setup.tunvpn.wait_log(r"handshake complete \(responder\)", 5)
    check_traffic(setup)
    assert setup.tunvpn.stop() == 0


@pytest.mark.parametrize("psk", [False, True], ids=["no-psk", "psk"])
def test_tunvpn_initiator_to_stock_responder(lab, psk):
    setup = build(lab, stock_initiates=False, psk=genpsk() if psk else None)
    setup.tunvpn.wait_log(r"handshake complete \(initiator\)", 10)  # the tunvpn client initiates at start
    setup.stock.wait_for_handshake(pubkey(setup.tunvpn_key), timeout=5)
    check_traffic(setup)
    # The stock server ignored the config requests; the client said so and runs on its own config.
    setup.tunvpn.wait_log(r"did not answer the config request .*running on the local Address", 10)
    assert setup.tunvpn.show()["pushed"] is None
    assert setup.tunvpn.stop() == 0


def test_psk_mismatch_never_completes(lab):
    setup = build(lab, stock_initiates=False, psk=genpsk(), start_tunvpn=False)
    setup.stock.set_peer(pubkey(setup.tunvpn_key), allowed_ips=[f"{INITIATOR_TUNNEL[0]}/32"], preshared_key=genpsk())
    setup.tunvpn.start()
    result = setup.initiator_host.ping(RESPONDER_TUNNEL[0], count=1, timeout=3, check=False)
    assert result.returncode != 0
    assert setup.stock.show_dump().peers[pubkey(setup.tunvpn_key)].latest_handshake == 0
    assert "handshake complete" not in setup.tunvpn.log()


def test_stock_initiator_completes_through_tunvpn_cookie_reply(lab):
    """tunvpn held under load: the stock peer's first initiation gets a cookie, its retry carries mac2."""
    setup = build(lab, stock_initiates=True, tunvpn_args=("--handshake-load-threshold", "0"))
    started = time.monotonic()
    took = wait_for_ping(setup.initiator_host, RESPONDER_TUNNEL[0], timeout=3 * STOCK_RETRY + 5)
    setup.tunvpn.wait_log(r"handshake complete \(responder\)", 5)
    assert took >= 5.0 - 0.5, "under load the first initiation must not succeed without a cookie"
    stats = "\n".join(setup.tunvpn.statistics())
    sent = int(re.search(r"cookie_reply_sent=(\d+)", stats).group(1))
    assert sent >= 1, stats
    check_traffic(setup)
    print(f"stock initiator through tunvpn's cookie: {time.monotonic() - started:.1f} s, {sent} cookie replies")


FLOOD = r"""
import os, socket, sys, time
from tunvpn.protocol.cookie import CookieJar
from tunvpn.protocol.messages import INITIATION_SIZE
target_pub, target, source, seconds = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
jar = CookieJar(target_pub)
# Initiations with a valid mac1 (only the public key is needed) and garbage inside.
burst = [jar.add_macs(b"\x01\0\0\0" + os.urandom(INITIATION_SIZE - 4), 0.0) for _ in range(600)]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((source, 0))
print("flooding", flush=True)
end = time.monotonic() + seconds
sent = bursts = 0
while time.monotonic() < end:
    for packet in burst:
        try:
            sock.sendto(packet, (target, 51820))
            sent += 1
        except BlockingIOError:
            pass
    bursts += 1
    if bursts == 3:  # 1800 valid-mac1 initiations: far more than wireguard-go's 128-message load bar
        print("loaded", flush=True)
    time.sleep(0.03)
print("sent", sent, flush=True)
"""


def test_tunvpn_uses_stock_responders_cookie(lab):
    """wireguard-go under load (>= 128 queued initiations) answers with a cookie; tunvpn must use it."""
    setup = build(lab, stock_initiates=False, start_tunvpn=False)
    attacker = setup.initiator_host
    attacker.add_address("eth0", "192.0.2.3/24")
    stock_pub = base64.b64decode(pubkey(setup.stock_key))
    flood = attacker.popen_python(FLOOD, stock_pub.hex(), "192.0.2.1", "192.0.2.3", "40",
                                  stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().strip() == "flooding"
        assert flood.stdout.readline().strip() == "loaded"  # wireguard-go's handshake queue is full by now
        setup.tunvpn.start()
        setup.tunvpn.wait_log(r"sent a cookie", 10)
        setup.tunvpn.wait_log(r"handshake complete \(initiator\)", 3 * STOCK_RETRY + 5)
        assert flood.poll() is None, "the handshake must complete while the flood still runs"
    finally:
        stop_process(flood, term_grace=1.0)
    lines = setup.tunvpn.log().splitlines()
    cookie_at = next(i for i, line in enumerate(lines) if "sent a cookie" in line)
    done_at = next(i for i, line in enumerate(lines) if "handshake complete" in line)
    assert cookie_at < done_at
    check_traffic(setup)


def test_stock_initiator_restarts(lab):
    setup = build(lab, stock_initiates=True)
    wait_for_ping(setup.initiator_host, RESPONDER_TUNNEL[0], timeout=10)
    setup.stock.restart()
    mark = len(setup.tunvpn.lines)
    took = wait_for_ping(setup.initiator_host, RESPONDER_TUNNEL[0], timeout=10)
    setup.tunvpn.wait_log(r"handshake complete \(responder\)", 5, after=mark)
    print(f"after the stock initiator restarted: traffic again in {took:.1f} s")
    check_traffic(setup)


def test_stock_responder_restarts(lab):
    """The restarted stock peer forgot the session: tunvpn re-handshakes 15 s after unanswered data."""
    setup = build(lab, stock_initiates=False)
    setup.tunvpn.wait_log(r"handshake complete \(initiator\)", 10)
    wait_for_ping(setup.initiator_host, RESPONDER_TUNNEL[0], timeout=5)
    setup.stock.restart()
    mark = len(setup.tunvpn.lines)
    took = wait_for_ping(setup.initiator_host, RESPONDER_TUNNEL[0], timeout=15 + 2 * STOCK_RETRY + 5)
    setup.tunvpn.wait_log(r"handshake complete \(initiator\)", 5, after=mark)
    print(f"after the stock responder restarted: traffic again in {took:.1f} s")
    check_traffic(setup)
