"""Faults around a running server: it recovers, or refuses clearly and recovers once restarted;
no client needs a manual restart and no lease is lost or handed to a second client.

Topology: test_server_client's office with two tunvpn clients.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import threading

import pytest

from netlab import transfer, wait_until
from stockwg import genkey, pubkey
from test_server_client import LAN_HOST, MB, SERVER_TUNNEL, Office, build_office, client_config
from tunvpnd import Tunvpn, wait_for_ping

RECOVERY_TIMEOUT = 15.0


def addresses(office: Office) -> dict[str, str]:
    return {name: office.address_of(name) for name in office.clients}


def leases_saved(office: Office) -> dict:
    """The state file's leases once every client's lease and endpoint is in it (saves are batched)."""
    state_file = office.server.state_dir / "state.json"

    def complete() -> dict | None:
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        return state if len(state["leases"]) == len(state["endpoints"]) == len(office.clients) else None

    return wait_until(complete, 5, what="every client's lease and endpoint saved")["leases"]


def all_pass_traffic(office: Office, timeout: float = RECOVERY_TIMEOUT) -> None:
    for host in office.client_hosts.values():
        wait_for_ping(host, SERVER_TUNNEL, timeout=timeout)


def same_addresses_again(office: Office, before: dict[str, str]) -> None:
    """Each client, without a restart of its own, has its address back from the server."""
    all_pass_traffic(office)
    wait_until(lambda: addresses(office) == before, RECOVERY_TIMEOUT, what=f"the addresses {before} again")
    leases = {str(ipaddress.ip_interface(lease["ipv4"]).ip) for lease in leases_saved(office).values()}
    assert leases == set(before.values()), f"leases {leases}, clients {before}"


def test_kill_9_mid_transfer_and_restart_loses_neither_the_transfer_nor_a_lease(lab):
    office = build_office(lab, stock=False)
    before = addresses(office)
    leases_saved(office)
    host = office.client_hosts["client1"]
    outcome: dict[str, object] = {}

    def move() -> None:
        try:
            outcome["result"] = transfer(host, office.lanhost, LAN_HOST, 200 * MB, timeout=90)
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    mover = threading.Thread(target=move)
    mover.start()
    try:
        wait_until(lambda: sum(p["rx_bytes"] for p in office.server.show()["peers"]) > 20 * MB, 30,
                   what="20 MB through the server")
        office.server.kill()
        office.server.start()
    finally:
        mover.join(timeout=120)
    assert "error" not in outcome, f"the transfer broke: {outcome['error']}"
    result = outcome["result"]
    assert result.sent_sha256 == result.received_sha256
    same_addresses_again(office, before)
    print(f"kill -9 mid-transfer: 200 MB arrived intact in {result.seconds:.1f} s; addresses kept")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbled(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + b"\x00\xff garbage \x00" + data[middle + 12 :]


@pytest.mark.parametrize("damage", [_truncated, _garbled, lambda data: b""], ids=["truncated", "garbled", "empty"])
def test_a_damaged_lease_file_is_set_aside_and_no_client_gets_another_ones_address(lab, damage):
    office = build_office(lab, stock=False)
    before = addresses(office)
    leases_saved(office)
    assert office.server.stop() == 0
    state_file = office.server.state_dir / "state.json"
    state_file.write_bytes(damage(state_file.read_bytes()))
    office.server.start()
    office.server.wait_log(r"state: .*(moved the damaged file|not valid JSON)", 5)
    same_addresses_again(office, before)
    assert list(office.server.state_dir.glob("state.json.corrupt-*")), "the damaged file was not kept"


def test_a_lost_lease_file_gives_each_client_its_own_address_back_whoever_asks_first(lab):
    """The state file is gone and client2 asks first: lowest-free-first alone would give it
    client1's address. Each client's request names the address it has, so the server takes
    back what the client holds while nobody else has it."""
    office = build_office(lab, stock=False)
    before = addresses(office)
    assert before["client1"] < before["client2"]  # client1 holds the lower one, which client2 would get
    leases_saved(office)
    assert office.server.stop() == 0
    (office.server.state_dir / "state.json").unlink()
    client1_host = office.client_hosts["client1"]
    client1_host.run(["nft", "-f", "-"], input="table inet away { chain out { type filter hook output priority 0; "
                                               "meta l4proto udp drop; }; }")  # client1 cannot reach the server
    office.server.start()
    wait_for_ping(office.client_hosts["client2"], SERVER_TUNNEL, timeout=RECOVERY_TIMEOUT)
    wait_until(lambda: addresses(office)["client2"] == before["client2"], RECOVERY_TIMEOUT,
               what="client2's push")
    client1_host.run(["nft", "delete", "table", "inet", "away"])
    same_addresses_again(office, before)


# Runs the daemon in a mount namespace of its own with its state directory on a small tmpfs
# (the saved state copied in first), so a test can fill it or make it read-only: the server runs
# as root, whom file modes do not stop, and the host's mounts stay untouched.
SMALL_STATE_DISK = r"""#!/bin/sh
exec unshare --mount --propagation private /bin/sh -c '
    cp -a "$0/." "$0.before" && mount -t tmpfs -o size=256k,mode=0700 tunvpn-test-state "$0" &&
    cp -a "$0.before/." "$0/" && rm -rf "$0.before" && exec "$@"' STATE_DIR PYTHON "$@"
"""


def in_daemon_mounts(office: Office, *command: str, check: bool = True) -> str:
    assert office.server.process is not None
    return office.server.host.run(["nsenter", "-t", str(office.server.process.pid), "-m", *command],
                                  check=check).stdout


@pytest.mark.parametrize("fault", ["disk full", "read-only"])
def test_a_state_directory_that_cannot_be_written_loses_no_lease_once_it_can(lab, tmp_path, fault):
    office = build_office(lab, clients=("client1",), stock=False)
    late_host = lab.add_host("client3")
    lab.connect(late_host, office.wan, ["192.0.2.23/24"])
    office.client_keys["client3"] = late_key = genkey()
    leases_saved(office)
    assert office.server.stop() == 0
    state_dir = office.server.state_dir
    wrapper = tmp_path / "small-state-disk"
    wrapper.write_text(SMALL_STATE_DISK.replace("STATE_DIR", str(state_dir)).replace("PYTHON", office.server.python))
    wrapper.chmod(0o755)
    office.server.python = str(wrapper)  # the daemon's command line starts with it
    office.server.write_config(office.server_config(["client1", "client3"]))
    office.server.start()
    all_pass_traffic(office)
    if fault == "disk full":
        in_daemon_mounts(office, "dd", "if=/dev/zero", f"of={state_dir}/filler", "bs=4k", check=False)
    else:
        in_daemon_mounts(office, "mount", "-o", "remount,ro", str(state_dir))
    mark = len(office.server.lines)
    late = Tunvpn(late_host, "client", client_config(late_key, office.server_key), name="client3").start()
    late.wait_log(r"applied config from the server", 10)
    office.server.wait_log(r"cannot save state in .*trying again", 10, after=mark)
    all_pass_traffic(office)
    if fault == "disk full":
        in_daemon_mounts(office, "rm", f"{state_dir}/filler")
    else:
        in_daemon_mounts(office, "mount", "-o", "remount,rw", str(state_dir))
    office.server.wait_log(r"saved state in .* again", 10, after=mark)
    saved = json.loads(in_daemon_mounts(office, "cat", f"{state_dir}/state.json"))
    assert pubkey(late_key) in saved["leases"] and len(saved["leases"]) == 2


@pytest.mark.parametrize("bad_config", [b"\xff\xfe not text \x00", b"", b"[Interface]\nPrivateKey = nonsense\n"],
                         ids=["binary", "empty", "bad-key"])
def test_an_invalid_config_before_sighup_is_refused_and_the_running_one_kept(lab, bad_config):
    office = build_office(lab, stock=False)
    before = addresses(office)
    office.server.config_path.write_bytes(bad_config)
    mark = len(office.server.lines)
    office.server.signal(signal.SIGHUP)
    office.server.wait_log(r"reload refused, keeping the running config: ", 5, after=mark)
    all_pass_traffic(office, timeout=5)
    assert addresses(office) == before
    assert "Traceback" not in office.server.log()


def test_a_tun_deleted_underneath_stops_the_server_clearly_and_a_restart_brings_every_client_back(lab):
    """The server cannot carry on without its device; it exits with a one-line reason (systemd's
    Restart=on-failure restarts it), and the clients, untouched, get their addresses back."""
    office = build_office(lab, stock=False)
    before = addresses(office)
    leases_saved(office)
    office.server.host.ip("link", "del", office.server.device)
    assert office.server.process is not None
    assert office.server.process.wait(timeout=10) == 1
    wait_until(lambda: "the device was deleted" in office.server.log(), 5, what="the reason in the log")
    assert re.search(r"^ERROR: cannot (read from|write to) tun device '[^']+': the device was deleted$",
                     office.server.log(), re.M), office.server.log()[-2000:]
    assert "Traceback" not in office.server.log()
    office.server.start()
    same_addresses_again(office, before)


def test_kill_9_of_a_client_and_its_restart_keep_its_address_and_disturb_no_other(lab):
    office = build_office(lab, stock=False)
    before = addresses(office)
    other = office.client_hosts["client2"]
    pinger = other.popen(["ping", "-n", "-q", "-i", "0.1", "-w", "20", SERVER_TUNNEL], stdout=subprocess.PIPE, text=True)
    try:
        office.clients["client1"].kill()  # no goodbye, its routes and tun left to the kernel
        office.clients["client1"].start().wait_log(r"applied config from the server", RECOVERY_TIMEOUT)
        same_addresses_again(office, before)
    finally:
        pinger.send_signal(signal.SIGINT)
        out, _ = pinger.communicate(timeout=10)
    summary = next(line for line in out.splitlines() if "packets transmitted" in line)
    transmitted, received = (int(part.split()[0]) for part in summary.split(",")[:2])
    assert transmitted >= 5 and received >= transmitted - 1, f"client2 suffered: {summary}"
