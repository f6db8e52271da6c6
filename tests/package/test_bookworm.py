"""The same .deb on Debian bookworm (oldstable, still supported): install, connect, ping, purge.

Bookworm has python3 3.11, python3-cryptography 38 and python3-pyroute2 0.7.2, the oldest
versions the package's Depends allow, and systemd 252.
"""

from __future__ import annotations

from pathlib import Path

from deployment import (
    SERVER_TUNNEL_V4, client_config, exposure, file_digests, install, make_key, purge_and_check_nothing_left,
    server_config, show, tunnel_address, wait_for_ping, write_config,
)
from systemdhosts import SystemdLab


def test_install_connect_ping_purge_on_bookworm(deb: Path) -> None:
    with SystemdLab("bookworm") as lab:
        server, client = lab.add_hosts(["server", "client"])
        for host in (server, client):
            install(host, deb)
        server_key = make_key(server, "office")
        client_key = make_key(client, "office")
        write_config(server, "office", server_config("office", [client_key]))
        write_config(client, "office", client_config("office", server_key, server))
        server.run(["systemctl", "enable", "--now", "tunvpn-server@office.service"])
        client.run(["systemctl", "enable", "--now", "tunvpn-client@office.service"])
        address = tunnel_address(client, "office")
        wait_for_ping(client, SERVER_TUNNEL_V4)
        wait_for_ping(server, address)
        assert show(server, "office")["peers"][0]["address"] == address
        print("systemd-analyze security on bookworm (systemd 252, not asserted): server "
              f"{exposure(server, 'tunvpn-server@office.service')}, client {exposure(client, 'tunvpn-client@office.service')}")
        for host in (server, client):
            purge_and_check_nothing_left(host, set(file_digests(host)))


def test_purge_keeps_the_user_and_state_directory_an_admin_made_before(deb: Path) -> None:
    with SystemdLab("bookworm") as lab:
        host = lab.add_host("server")
        host.run("useradd --system --home-dir /var/lib/tunvpn --shell /usr/sbin/nologin tunvpn"
                 " && mkdir /var/lib/tunvpn && echo kept > /var/lib/tunvpn/notes")
        install(host, deb)
        purge_and_check_nothing_left(host, admin_files=set(),
                                     made_by_admin={"the user", "the group", "the state directory"})
        assert host.read_file("/var/lib/tunvpn/notes") == "kept\n"
