"""The .deb on Debian trixie hosts: a server and two clients through their whole life.

One office for the whole module, in the order an installation lives through: install and
connect, show, pushed DNS, the daemons' user and capabilities, a refused key, exposure, reload,
restart, reboot, crash, upgrade, purge.  Each test leaves the office working for the next one;
a failure in one makes the later ones fail loudly, not skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from deployment import (
    CAP_NET_ADMIN_ONLY, MAX_EXPOSURE, PUSHED_DNS_DOMAIN, PUSHED_DNS_SERVER, SERVER_TUNNEL_V4, SERVER_TUNNEL_V6,
    background_ping, capability_masks, client_config, exposure, file_digests, install, installed_version,
    SERVER_PORT, main_pid, make_key, ping_result, process_user, purge_and_check_nothing_left, server_config, show,
    tunnel_address, wait_active, wait_for_ping, write_config,
)
from systemdhosts import SystemdHost, SystemdLab

SERVER_UNIT = "tunvpn-server@office.service"
# Each client host runs one instance; its name is just its config's name.
CLIENT_INSTANCES = {"alice": "office", "bob": "laptop"}


@dataclass
class Office:
    """The hosts and what the tests learn about them as they go (keys, addresses)."""

    lab: SystemdLab
    server: SystemdHost
    clients: dict[str, SystemdHost]
    client_keys: list[str]
    server_key: str
    instances: dict[str, str] = field(default_factory=lambda: dict(CLIENT_INSTANCES))  # host -> config name
    addresses: dict[str, str] = field(default_factory=dict)  # client host -> tunnel IPv4 address

    def client_unit(self, role: str) -> str:
        return f"tunvpn-client@{self.instances[role]}.service"

    def hosts(self) -> list[SystemdHost]:
        return [self.server, *self.clients.values()]


@pytest.fixture(scope="module")
def office(deb: Path) -> Iterator[Office]:
    """Server and two clients on trixie with the package installed and configured, not started."""
    with SystemdLab("trixie") as lab:
        server, alice, bob = lab.add_hosts(["server", "alice", "bob"])
        clients = {"alice": alice, "bob": bob}
        for host in (server, alice, bob):
            install(host, deb)
        server_key = make_key(server, "office")
        client_keys = []
        for role, host in clients.items():
            name = CLIENT_INSTANCES[role]
            client_keys.append(make_key(host, name))
            write_config(host, name, client_config(name, server_key, server))
        write_config(server, "office", server_config("office", client_keys))
        yield Office(lab, server, clients, client_keys, server_key)


def test_install_creates_the_user_and_starts_nothing(office: Office) -> None:
    for host in office.hosts():
        assert host.run("stat -c '%U:%G %a' /etc/tunvpn").stdout.split() == ["root:tunvpn", "750"]
        assert host.run("getent passwd tunvpn | cut -d: -f7").stdout.strip() == "/usr/sbin/nologin"
        running = host.run("systemctl list-units --no-legend --state=active 'tunvpn-*'").stdout.strip()
        assert running == "", f"{host.role}: the package started {running} with no config enabled"


def test_enable_now_connects_clients_with_pool_addresses(office: Office) -> None:
    office.server.run(["systemctl", "enable", "--now", SERVER_UNIT])
    for role, host in office.clients.items():
        host.run(["systemctl", "enable", "--now", office.client_unit(role)])
    for role, host in office.clients.items():
        office.addresses[role] = tunnel_address(host, office.instances[role])
        wait_for_ping(host, SERVER_TUNNEL_V4)
        wait_for_ping(host, SERVER_TUNNEL_V6)
    assert sorted(office.addresses.values()) == ["203.0.113.2", "203.0.113.3"]  # the pool's first two
    wait_for_ping(office.clients["alice"], office.addresses["bob"])  # ClientToClient = yes
    wait_for_ping(office.clients["bob"], office.addresses["alice"])


def test_show_works_for_root_on_both_sides(office: Office) -> None:
    server_view = show(office.server, "office")
    assert server_view["role"] == "server"
    assert {peer["address"] for peer in server_view["peers"]} == set(office.addresses.values())
    assert all(peer["latest_handshake"] for peer in server_view["peers"])
    for role, host in office.clients.items():
        client_view = show(host, office.instances[role])
        assert client_view["role"] == "client"
        assert client_view["peers"][0]["public_key"] == office.server_key
    text = office.server.run(["tunvpn", "show", "office"]).stdout
    assert "role: server" in text
    refused = office.server.run(["runuser", "-u", "nobody", "--", "tunvpn", "show", "office"], check=False)
    assert refused.returncode != 0 and "permission denied" in refused.stderr, refused


def test_pushed_dns_reaches_resolved_through_the_polkit_rule(office: Office) -> None:
    """The daemon is not root: resolved takes its DNS settings only because polkit says yes."""
    for role, host in office.clients.items():
        device = show(host, office.instances[role])["interface"]
        assert host.run(["resolvectl", "dns", device]).stdout.split()[-1] == PUSHED_DNS_SERVER
        assert host.run(["resolvectl", "domain", device]).stdout.split()[-1] == PUSHED_DNS_DOMAIN
        # Another unprivileged user, whom the rule does not name, is refused the same call.
        refused = host.run(["runuser", "-u", "nobody", "--", "resolvectl", "dns", device, "192.0.2.99"], check=False)
        assert refused.returncode != 0, refused


def test_full_tunnel_works_with_src_valid_mark_set_beforehand(office: Office, deb: Path) -> None:
    """The unit may not write kernel settings; with the sysctl the docs prescribe, no need to."""
    dave = office.lab.add_host("dave")
    install(dave, deb)
    dave.put_file("/etc/sysctl.d/60-tunvpn.conf", "net.ipv4.conf.all.src_valid_mark = 1\n")
    dave.run(["sysctl", "-q", "-p", "/etc/sysctl.d/60-tunvpn.conf"])  # systemd-sysctl does it at boot
    office.client_keys.append(make_key(dave, "office"))
    full_tunnel = client_config("office", office.server_key, office.server) + "AllowedIPs = 0.0.0.0/0, ::/0\n"
    write_config(dave, "office", full_tunnel)
    write_config(office.server, "office", server_config("office", office.client_keys))
    office.server.run(["systemctl", "reload", SERVER_UNIT])
    dave.run(["systemctl", "enable", "--now", "tunvpn-client@office.service"])
    tunnel_address(dave, "office")
    wait_for_ping(dave, SERVER_TUNNEL_V4)
    assert "lookup 51820" in dave.run(["ip", "-4", "rule"]).stdout
    assert "lookup 51820" in dave.run(["ip", "-6", "rule"]).stdout
    journal = dave.run(["journalctl", "-u", "tunvpn-client@office", "-o", "cat", "--no-pager"]).stdout
    assert "full tunnel: IPv4 and IPv6 default route" in journal, journal


def test_daemons_run_as_tunvpn_with_cap_net_admin_only(office: Office) -> None:
    for host, unit in [(office.server, SERVER_UNIT), *((h, office.client_unit(r)) for r, h in office.clients.items())]:
        pid = main_pid(host, unit)
        assert process_user(host, pid) == "tunvpn"
        masks = capability_masks(host, pid)
        assert (masks["CapEff"], masks["CapPrm"], masks["CapBnd"]) == (CAP_NET_ADMIN_ONLY,) * 3, masks


def test_the_hardened_server_unit_keeps_a_receive_queue_per_source_group(office: Office) -> None:
    journal = office.server.run(["journalctl", "-u", SERVER_UNIT, "-o", "cat", "--no-pager"]).stdout
    assert re.search(r"UDP port \d+ \(8 receive queue\(s\)\)", journal), journal
    assert "receive queues per source address unavailable" not in journal, journal


def test_a_key_others_can_read_is_refused_with_the_fix(office: Office) -> None:
    bob, unit = office.clients["bob"], office.client_unit("bob")
    key = f"/etc/tunvpn/{office.instances['bob']}.key"
    bob.run(["chmod", "644", key])
    try:
        assert bob.run(["systemctl", "restart", unit], check=False).returncode != 0
        assert bob.run(["systemctl", "is-failed", unit], check=False).stdout.strip() == "failed"
        journal = bob.run(["journalctl", "-u", unit, "-n", "5", "--no-pager", "-o", "cat"]).stdout
        assert f"chmod 640 {key}" in journal, journal
    finally:
        bob.run(["chmod", "640", key])
    bob.run(["systemctl", "restart", unit])
    assert tunnel_address(bob, office.instances["bob"]) == office.addresses["bob"]


def test_exposure_of_both_units(office: Office) -> None:
    server = exposure(office.server, SERVER_UNIT)
    client = exposure(office.clients["alice"], office.client_unit("alice"))
    print(f"systemd-analyze security on trixie: {SERVER_UNIT} {server}, {office.client_unit('alice')} {client}")
    assert server <= MAX_EXPOSURE
    assert client <= MAX_EXPOSURE


def test_reload_adds_a_peer_while_traffic_flows(office: Office, deb: Path) -> None:
    alice = office.clients["alice"]
    carol = office.lab.add_host("carol")
    install(carol, deb)
    carol_key = make_key(carol, "office")
    write_config(carol, "office", client_config("office", office.server_key, office.server))
    background_ping(alice, SERVER_TUNNEL_V4, count=60, log="/root/reload-ping.log")
    server_pid = main_pid(office.server, SERVER_UNIT)
    office.client_keys.append(carol_key)
    write_config(office.server, "office", server_config("office", office.client_keys))
    office.server.run(["systemctl", "reload", SERVER_UNIT])
    carol.run(["systemctl", "enable", "--now", "tunvpn-client@office.service"])
    office.clients["carol"] = carol
    office.instances["carol"] = "office"
    office.addresses["carol"] = tunnel_address(carol, "office")
    wait_for_ping(carol, SERVER_TUNNEL_V4)
    wait_for_ping(carol, office.addresses["alice"])
    transmitted, received = ping_result(alice, "/root/reload-ping.log")
    assert (transmitted, received) == (60, 60), "traffic of a connected client was interrupted by the reload"
    assert main_pid(office.server, SERVER_UNIT) == server_pid, "reload restarted the server"


def test_invite_and_join_under_the_packaged_units(office: Office, deb: Path) -> None:
    """One command on each side: the server (user tunvpn, /etc read-only) writes the enrolled peer
    into its StateDirectory, and the joined client's files are what the packaged client unit reads.
    erin stays a client, so the restart, reboot, crash and upgrade tests below include that host."""
    erin = office.lab.add_host("erin")
    install(erin, deb)
    line = office.server.run(["tunvpn", "invite", "office", "--name", "erin",
                              "--endpoint", f"{office.server.address}:{SERVER_PORT}"]).stdout.strip()
    assert line.startswith("tunvpn join tunvpn://join/")
    erin.run(f"{line} && systemctl enable --now tunvpn-client@office.service", timeout=60)
    files = "/etc/tunvpn/office.conf /etc/tunvpn/office.key /etc/tunvpn/office.psk"
    assert erin.run(f"stat -c '%U:%G %a' {files}").stdout.split() == ["root:tunvpn", "640"] * 3
    enrolled = "/var/lib/tunvpn/office/peers.d/erin.conf"
    assert office.server.run(f"stat -c '%U:%G %a' {enrolled}").stdout.split() == ["tunvpn:tunvpn", "600"]
    office.clients["erin"] = erin
    office.instances["erin"] = "office"
    office.addresses["erin"] = tunnel_address(erin, "office")
    wait_for_ping(erin, SERVER_TUNNEL_V4)
    wait_for_ping(erin, office.addresses["alice"])
    assert "erin" in office.server.run(["tunvpn", "peers", "office"]).stdout


def _all_connected(office: Office) -> None:
    """Every client has its old tunnel address again and reaches the server and another client."""
    for role, host in office.clients.items():
        assert tunnel_address(host, office.instances[role]) == office.addresses[role], f"{role} got a new address"
        wait_for_ping(host, SERVER_TUNNEL_V4)
    wait_for_ping(office.clients["alice"], office.addresses["bob"])


def test_server_restart_is_survived(office: Office) -> None:
    before = main_pid(office.server, SERVER_UNIT)
    office.server.run(["systemctl", "restart", SERVER_UNIT])
    wait_active(office.server, SERVER_UNIT, other_than_pid=before)
    _all_connected(office)


def test_client_host_reboot_is_survived(office: Office) -> None:
    bob = office.clients["bob"]
    bob.reboot()
    wait_active(bob, office.client_unit("bob"))
    _all_connected(office)


def test_killed_server_is_restarted_and_recovers(office: Office) -> None:
    before = main_pid(office.server, SERVER_UNIT)
    office.server.run(["systemctl", "kill", "-s", "KILL", SERVER_UNIT])
    wait_active(office.server, SERVER_UNIT, other_than_pid=before)
    _all_connected(office)


def test_upgrade_keeps_configs_and_reconnects(office: Office, upgrade_deb: Path) -> None:
    hosts = office.hosts()
    configs = {host.role: file_digests(host) for host in hosts}
    units = {office.server.role: SERVER_UNIT} | {role: office.client_unit(role) for role in office.clients}
    pids = {host.role: main_pid(host, units[host.role]) for host in hosts}
    new_version = upgrade_deb.name.split("_")[1]
    for host in hosts:
        install(host, upgrade_deb)
        assert installed_version(host) == new_version
        assert file_digests(host) == configs[host.role], f"{host.role}: the upgrade changed /etc/tunvpn"
        wait_active(host, units[host.role], other_than_pid=pids[host.role])  # restarted, on the new code
        assert host.run(["tunvpn", "--version"]).stdout.split() == ["tunvpn", new_version]
    _all_connected(office)


def test_purge_leaves_nothing_behind(office: Office) -> None:
    for host in office.hosts():
        admin_files = set(file_digests(host))
        purge_and_check_nothing_left(host, admin_files)
