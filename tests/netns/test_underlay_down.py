"""The client's underlay link down for longer than a session lives (REJECT_AFTER_TIME, 180 s),
then up again: the tunnel comes back by itself (no restart of either daemon), through a new
handshake, and the client keeps its address. The tunnel is idle while the link is down (a laptop
with its lid shut): only the client's timers send, and every send fails.

Twice: on a clock six times as fast (tests/scaledclock.py: the daemons' protocol timers, the
client's reconnect backoff and all, in a sixth of the time), and once in real time (200 s down),
which is what a user sees. The real-time case runs under one interpreter only (the venv's): the
protocol code is the same under both, and CI's budget has room for one 200 s test, not two.
"""

from __future__ import annotations

import os
import time

import pytest

from netlab import Host, wait_until
from test_server_client import SERVER_TUNNEL, Office, build_office
from tunvpn.config import DEFAULT_PUSH_KEEPALIVE
from tunvpn.protocol.keypair import REJECT_AFTER_TIME
from tunvpn.protocol.timers import REKEY_ATTEMPT_TIME

SCALE = 6.0
PUSHED_KEEPALIVE = DEFAULT_PUSH_KEEPALIVE  # seconds: what the server pushes as the persistent keepalive
RECOVERY_DEADLINE = 60.0 + 15.0  # real seconds: the client's longest reconnect backoff, a handshake, slack


def underlay_interface(host: Host, address: str) -> str:
    for link in host.ip_json("-4", "addr"):
        if any(info.get("local") == address for info in link.get("addr_info", [])):
            return link["ifname"]
    raise AssertionError(f"no interface with {address} on {host}")


@pytest.mark.parametrize("scale, down_for", [(SCALE, REJECT_AFTER_TIME + 30.0), (None, 200.0)],
                         ids=["scaled-x6", "real-time-200s"])
def test_the_tunnel_recovers_by_itself_after_the_underlay_was_down_longer_than_a_session(lab, scale, down_for):
    if scale is None and os.environ.get("TUNVPN_EXPECT_DEBIAN_LIBS"):
        pytest.skip("the 200 s real-time case runs once per `make test`, under the venv's interpreter")
    office: Office = build_office(lab, clients=("client1",), stock=False, time_scale=scale)
    client, host = office.clients["client1"], office.client_hosts["client1"]
    address = office.address_of("client1")
    host.ping(SERVER_TUNNEL, count=2, timeout=5)
    pids = (office.server.process.pid, client.process.pid)
    ifname = underlay_interface(host, "192.0.2.11")
    real_down = down_for / (scale or 1.0)
    assert down_for > REJECT_AFTER_TIME and down_for > REKEY_ATTEMPT_TIME

    # Idle while the link is down, as a laptop with its lid shut: only the client's own timers send
    # (the pushed persistent keepalive, then handshakes once the session is past REJECT_AFTER_TIME),
    # and each send fails for the missing route. On the fast clock they come that much faster.
    unreachable = client.show()["dropped"].get("udp_ENETUNREACH", 0)
    mark = len(client.lines)
    host.ip("link", "set", ifname, "down")
    went_down = time.monotonic()
    try:
        time.sleep(real_down)
        unreachable = client.show()["dropped"].get("udp_ENETUNREACH", 0) - unreachable
    finally:
        host.ip("link", "set", ifname, "up")
    came_up = time.monotonic()
    was_down = came_up - went_down
    assert was_down * (scale or 1.0) > REJECT_AFTER_TIME
    assert unreachable >= down_for / PUSHED_KEEPALIVE - 1, f"{unreachable} sends failed: is the clock {scale} times as fast?"

    def answers() -> bool:
        return host.ping(SERVER_TUNNEL, count=1, timeout=1, check=False).returncode == 0

    wait_until(answers, RECOVERY_DEADLINE, interval=0.5, what="the tunnel to answer again")
    recovered = time.monotonic() - came_up
    client.wait_log(r"handshake complete", 5, after=mark)  # a new session: the old one had run out
    assert (office.server.process.pid, client.process.pid) == pids
    assert office.server.process.poll() is None and client.process.poll() is None, "no daemon restarted"
    assert office.address_of("client1") == address
    for daemon in (office.server, client):
        assert "Traceback" not in daemon.log()
    scaled = f" (x{scale:g}: {was_down * scale:.0f} s and {recovered * scale:.0f} s of protocol time)" if scale else ""
    print(f"underlay down {was_down:.0f} s, tunnel back {recovered:.1f} s after the link came up{scaled};"
          f" address kept: {address}; {unreachable} sends failed while down")
