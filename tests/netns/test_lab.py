"""The test lab itself: hosts reach each other, traffic arrives intact, and nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import netlab
from netlab import Lab, LabError, list_namespaces, sweep_dead_runs, transfer, wait_until
import stockwg
from stockwg import StockWireGuard, genkey, genpsk

TESTS_DIR = Path(__file__).resolve().parent.parent


def _processes_in_namespace_inode(inode: int) -> list[int]:
    """PIDs of live processes whose network namespace has this inode (any name or none)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino == inode:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _env_importing_netlab() -> dict[str, str]:
    paths = [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))


def test_two_hosts_over_veth_ping_over_ipv4_and_ipv6(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    eth_a, eth_b = lab.link(a, b, a_addrs=["192.0.2.1/24", "2001:db8:1::1/64"],
                            b_addrs=["192.0.2.2/24", "2001:db8:1::2/64"])
    assert (eth_a, eth_b) == ("eth0", "eth0")
    a.ping("192.0.2.2")
    b.ping("192.0.2.1")
    a.ping("2001:db8:1::2")
    b.ping("2001:db8:1::1")
    assert a.ping("192.0.2.99", timeout=1, check=False).returncode != 0


def test_switch_joins_three_hosts(lab: Lab) -> None:
    switch = lab.add_switch("sw")
    hosts = [lab.add_host(f"h{i}") for i in (1, 2, 3)]
    for i, host in enumerate(hosts, start=1):
        assert lab.connect(host, switch, addrs=[f"192.0.2.{i}/24", f"2001:db8:1::{i}/64"]) == "eth0"
    ports = {link["ifname"] for link in switch.ip_json("link", "show", "master", switch.bridge)}
    assert ports == {"port0", "port1", "port2"}
    for i, host in enumerate(hosts, start=1):
        for j in (1, 2, 3):
            if j != i:
                host.ping(f"192.0.2.{j}")
    hosts[0].ping("2001:db8:1::3")
    hosts[2].ping("2001:db8:1::2")


def test_routed_hosts_and_namespace_local_sysctl(lab: Lab) -> None:
    client, router, server = lab.add_host("client"), lab.add_host("router"), lab.add_host("server")
    lab.link(client, router, a_addrs=["192.0.2.10/24"], b_addrs=["192.0.2.1/24"])
    lab.link(router, server, a_addrs=["198.51.100.1/24"], b_addrs=["198.51.100.10/24"])
    client.add_route("198.51.100.0/24", via="192.0.2.1")
    server.add_route("192.0.2.0/24", via="198.51.100.1")
    assert client.ping("198.51.100.10", timeout=1, check=False).returncode != 0
    router.set_sysctl("net.ipv4.ip_forward", 1)
    client.ping("198.51.100.10")
    assert router.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
    assert client.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"


def test_transfer_arrives_intact_over_ipv4_and_ipv6(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.link(a, b, a_addrs=["192.0.2.1/24", "2001:db8:1::1/64"], b_addrs=["192.0.2.2/24", "2001:db8:1::2/64"])
    result = transfer(a, b, "192.0.2.2", 4 * 1024 * 1024, timeout=20)
    assert len(result.sent_sha256) == 64
    assert result.received_sha256 == result.sent_sha256
    assert 0 < result.seconds < 20
    result6 = transfer(b, a, "2001:db8:1::1", 1024 * 1024, timeout=20)
    assert result6.received_sha256 == result6.sent_sha256
    assert result6.sent_sha256 != result.sent_sha256  # random data, not a constant


def test_transfer_to_an_unreachable_address_fails_within_its_timeout(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.link(a, b, a_addrs=["192.0.2.1/24"], b_addrs=["192.0.2.2/24"])
    b.add_address("lo", "192.0.2.77/32")  # the receiver listens there...
    a.add_route("192.0.2.77/32", via="192.0.2.99")  # ...but a sends it to a neighbour that never answers
    start = time.monotonic()
    with pytest.raises(LabError):
        transfer(a, b, "192.0.2.77", 1024, timeout=1.0)
    assert time.monotonic() - start < 5


def test_close_after_an_exception_removes_namespaces_links_and_processes() -> None:
    before = set(list_namespaces())
    with pytest.raises(RuntimeError, match="boom"):
        with Lab() as lab:
            a, b = lab.add_host("a"), lab.add_host("b")
            switch = lab.add_switch("sw")
            lab.link(a, b, a_addrs=["192.0.2.1/24"], b_addrs=["192.0.2.2/24"])
            lab.connect(a, switch, addrs=["198.51.100.1/24"])
            names = lab.namespaces
            inodes = [os.stat(netlab.NETNS_DIR / name).st_ino for name in names]
            sleeper = a.popen(["sleep", "60"])
            # A grandchild the lab never saw: only the namespace sweep can find it.
            shell = b.popen(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
            assert shell.stdout is not None
            orphan = int(shell.stdout.readline())
            assert set(names) <= set(list_namespaces())
            raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())
    assert set(list_namespaces()) - before == set()
    assert sleeper.returncode is not None and shell.returncode is not None
    assert not netlab._pid_alive(orphan)
    for inode in inodes:  # no process keeps a namespace (and its veths and bridge) alive
        assert _processes_in_namespace_inode(inode) == []
    lab.close()  # idempotent
    with pytest.raises(LabError, match="closed"):
        lab.add_host("late")


_INTERRUPTED_RUN = r"""
import sys, time
from netlab import Lab
lab = Lab()
a, b = lab.add_host("a"), lab.add_host("b")
lab.link(a, b, a_addrs=["192.0.2.1/24"], b_addrs=["192.0.2.2/24"])
sleeper = a.popen(["sleep", "60"])
print(" ".join(lab.namespaces), sleeper.pid, flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_run_cleans_up(signum: int) -> None:
    run = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=_env_importing_netlab())
    try:
        assert run.stdout is not None
        *names, sleeper_pid = run.stdout.readline().split()
        assert len(names) == 2 and set(names) <= set(list_namespaces())
        run.send_signal(signum)
        run.wait(timeout=10)
    finally:
        netlab.stop_process(run)
    assert not set(names) & set(list_namespaces()), run.stderr
    assert not netlab._pid_alive(int(sleeper_pid))


_TERMINATED_DURING_CLEANUP = r"""
import os, signal
from netlab import Lab
lab = Lab()
host = lab.add_host("a")
print(host.name, flush=True)
lab.add_cleanup(lambda: os.kill(os.getpid(), signal.SIGTERM))  # runs first in close()
try:
    lab.close()
except KeyboardInterrupt as exc:
    print("interrupted after cleanup:", exc, flush=True)
"""


def test_sigterm_during_cleanup_waits_until_cleanup_is_done() -> None:
    result = subprocess.run([sys.executable, "-c", _TERMINATED_DURING_CLEANUP], capture_output=True, text=True,
                            env=_env_importing_netlab(), timeout=20)
    name, outcome = result.stdout.splitlines()
    assert outcome == "interrupted after cleanup: SIGTERM during lab cleanup", result.stderr
    assert name not in list_namespaces()


def test_sweeper_removes_only_namespaces_of_dead_runs(lab: Lab) -> None:
    live = lab.add_host("live")
    dead_pid, pidns, token = _dead_pid(), netlab._pid_namespace_id(), os.urandom(3).hex()
    dead_run = f"tvlab-{pidns}-{dead_pid}-12345-{token}-x"
    other_pid_namespace = f"tvlab-{int(pidns, 16) + 1:x}-{dead_pid}-12345-{token}-x"
    not_ours = f"tvlabnot-{token}"
    created: list[str] = []
    straggler = None
    try:
        for name in (dead_run, other_pid_namespace, not_ours):
            subprocess.run(["ip", "netns", "add", name], check=True)
            created.append(name)
        straggler = subprocess.Popen(["ip", "netns", "exec", dead_run, "sleep", "60"])
        wait_until(lambda: netlab._namespace_pids(dead_run), 5, what="the straggler to start")
        assert sweep_dead_runs() == [dead_run]
        assert straggler.wait(timeout=5) == -signal.SIGTERM
        remaining = set(list_namespaces())
        assert dead_run not in remaining
        assert {other_pid_namespace, not_ours, live.name} <= remaining
    finally:
        if straggler is not None:
            netlab.stop_process(straggler)
        for name in created:
            subprocess.run(["ip", "netns", "delete", name], stderr=subprocess.DEVNULL)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(timeout=5)
    return child.pid


def test_unique_ifnames_fit_and_differ_across_labs(lab: Lab) -> None:
    with Lab() as other:
        names = [lab.unique_ifname("wg"), lab.unique_ifname("wg"), other.unique_ifname("wg")]
    assert len(set(names)) == 3
    assert all(len(name) <= 15 for name in names)
    with pytest.raises(LabError, match="too long"):
        lab.unique_ifname("much-too-long")


def test_two_stock_wireguard_peers_ping_through_their_tunnel(lab: Lab) -> None:
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.link(a, b, a_addrs=["192.0.2.1/24"], b_addrs=["192.0.2.2/24"])
    key_a, key_b, psk = genkey(), genkey(), genpsk()
    wg_a = StockWireGuard(a, lab.unique_ifname("wg"), key_a, listen_port=51820)
    wg_b = StockWireGuard(b, lab.unique_ifname("wg"), key_b)
    assert wg_a.listen_port == 51820 and wg_b.listen_port
    key_file = wg_a._private_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600 and key_file.parent.stat().st_mode & 0o777 == 0o700
    wg_a.set_peer(wg_b.public_key, allowed_ips=["203.0.113.2/32", "2001:db8:100::2/128"],
                  endpoint=wg_b.endpoint("192.0.2.2"), preshared_key=psk)
    wg_b.set_peer(wg_a.public_key, allowed_ips=["203.0.113.1/32", "2001:db8:100::1/128"],
                  endpoint=wg_a.endpoint("192.0.2.1"), preshared_key=psk, persistent_keepalive=25)
    for wg, n in ((wg_a, 1), (wg_b, 2)):
        wg.add_address(f"203.0.113.{n}/24")
        wg.add_address(f"2001:db8:100::{n}/64")
        wg.set_up(mtu=1420)

    a.ping("203.0.113.2")
    b.ping("2001:db8:100::1")
    peer_b = wg_a.wait_for_handshake(wg_b.public_key)
    assert peer_b.endpoint == "192.0.2.2:%d" % wg_b.listen_port
    assert peer_b.preshared_key == psk and peer_b.rx_bytes > 0 and peer_b.tx_bytes > 0
    assert wg_b.show_dump().peers[wg_a.public_key].persistent_keepalive == 25

    port_b = wg_b.listen_port
    wg_b.restart()  # same key, port and configuration: the tunnel comes back
    assert wg_b.listen_port == port_b and wg_b.running
    b.ping("203.0.113.1")

    wg_b.stop()
    assert not wg_b.running and not wg_b.socket_path.exists()
    assert wg_b.ifname not in {link["ifname"] for link in b.ip_json("link", "show")}
    assert a.ping("203.0.113.2", timeout=1, check=False).returncode != 0
    wg_a.close()
    assert not key_file.exists()


def test_a_missing_stock_wireguard_fails_loudly(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    host = lab.add_host("a")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(stockwg.StockWireGuardError, match="wireguard-go and wg not found"):
        StockWireGuard(host, lab.unique_ifname("wg"), "unused")
