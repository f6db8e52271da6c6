"""The config parser: stock wg-quick files load, and every bad input is one ConfigError line."""

from __future__ import annotations

import ipaddress
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from configfiles import conf, own_group, user_name, write
from tunvpn.config import (
    Config,
    ConfigError,
    WG_QUICK_ONLY_KEYS,
    guess_role,
    load_config,
    parse_config,
    resolve_endpoint,
)
from tunvpn.keys import derive_public_key, encode_key, generate_preshared_key, generate_private_key


@dataclass(frozen=True)
class Keys:
    private: bytes
    public: bytes
    peer1: bytes
    peer2: bytes
    psk: bytes

    def placeholders(self) -> dict[str, str]:
        return {
            "priv": encode_key(self.private),
            "own": encode_key(self.public),
            "pub1": encode_key(self.peer1),
            "pub2": encode_key(self.peer2),
            "psk": encode_key(self.psk),
            "short_key": encode_key(bytes(range(16))),
        }


@pytest.fixture
def keys() -> Keys:
    private = generate_private_key()
    return Keys(
        private=private,
        public=derive_public_key(private),
        peer1=derive_public_key(generate_private_key()),
        peer2=derive_public_key(generate_private_key()),
        psk=generate_preshared_key(),
    )


# --- files that load ----------------------------------------------------------------------------

STOCK_SERVER = """\
# /etc/wireguard/wg0.conf as wg-quick(8) and wg(8) read it
[Interface]
Address = 203.0.113.1/24
Address = 2001:db8:100::1/64
ListenPort = 51820
PrivateKey = {priv}

[Peer]
# laptop
PublicKey = {pub1}
PresharedKey = {psk}
AllowedIPs = 203.0.113.2/32, 2001:db8:100::2/128

[Peer]
PublicKey = {pub2}
AllowedIPs = 203.0.113.3/32
AllowedIPs = 198.51.100.0/24
Endpoint = 192.0.2.3:51820
PersistentKeepalive = 25
"""

STOCK_CLIENT = """\
[Interface]
PrivateKey = {priv}
Address = 203.0.113.2/32, 2001:db8:100::2/128

[Peer]
PublicKey = {pub1}
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = [2001:db8:1::1]:51820
PersistentKeepalive = 25
"""


def test_stock_wg_quick_server_file_loads_unchanged(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path / "wg0.conf", STOCK_SERVER.format(**keys.placeholders()))
    config = load_config(path, role="server")

    assert (config.path, config.name, config.role) == (str(path), "wg0", "server")
    assert config.interface.private_key == keys.private
    assert config.interface.listen_port == 51820
    assert config.interface.addresses == [
        ipaddress.ip_interface("203.0.113.1/24"), ipaddress.ip_interface("2001:db8:100::1/64")]
    assert (config.interface.mtu, config.interface.device) == (1420, "tv-wg0")

    laptop, gateway = config.peers
    assert (laptop.public_key, laptop.preshared_key, laptop.line) == (keys.peer1, keys.psk, 8)
    assert laptop.allowed_ips == [ipaddress.ip_network("203.0.113.2/32"), ipaddress.ip_network("2001:db8:100::2/128")]
    assert (laptop.endpoint, laptop.endpoint_address, laptop.persistent_keepalive) == (None, None, 0)
    assert (gateway.public_key, gateway.preshared_key, gateway.line) == (keys.peer2, None, 14)
    assert gateway.allowed_ips == [ipaddress.ip_network("203.0.113.3/32"), ipaddress.ip_network("198.51.100.0/24")]
    assert gateway.endpoint == ("192.0.2.3", 51820)
    assert gateway.endpoint_address == ("192.0.2.3", 51820)
    assert gateway.persistent_keepalive == 25


def test_stock_wg_quick_client_file_loads_unchanged(tmp_path: Path, keys: Keys) -> None:
    path = write(tmp_path / "home.conf", STOCK_CLIENT.format(**keys.placeholders()))
    config = load_config(path, role="client")

    assert config.interface.listen_port is None  # a client takes an ephemeral port
    assert config.interface.device == "tv-home"
    (server,) = config.peers
    assert server.allowed_ips == [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    assert server.endpoint == ("2001:db8:1::1", 51820)
    assert server.endpoint_address == ("2001:db8:1::1", 51820, 0, 0)


def test_comments_blank_lines_case_and_spacing(tmp_path: Path, keys: Keys) -> None:
    text = conf(
        "  # a whole-line comment",
        "",
        "[interface]   # trailing comment on a header",
        "privatekey={priv}#no space before the comment",
        "LISTENPORT   =   4500   # spaces everywhere",
        "\taddress = 203.0.113.1/24 2001:db8:100::1/64\t",
        "[ PEER ]",
        "publickey = {pub1}",
        "allowedIPs = 203.0.113.2/32,2001:db8:100::2/128",
        "endpoint = 192.0.2.2:4500",
        "persistentkeepalive = OFF",
    ).format(**keys.placeholders())
    config = parse_config(text, str(tmp_path / "wg0.conf"), role="client")

    assert config.interface.private_key == keys.private
    assert config.interface.listen_port == 4500
    assert [str(a) for a in config.interface.addresses] == ["203.0.113.1/24", "2001:db8:100::1/64"]
    (peer,) = config.peers
    assert [str(n) for n in peer.allowed_ips] == ["203.0.113.2/32", "2001:db8:100::2/128"]
    assert (peer.endpoint, peer.persistent_keepalive, peer.line) == (("192.0.2.2", 4500), 0, 7)


def test_crlf_line_endings_and_byte_order_mark(tmp_path: Path, keys: Keys) -> None:
    text = "\ufeff" + STOCK_SERVER.format(**keys.placeholders()).replace("\n", "\r\n")
    path = tmp_path / "wg0.conf"
    path.write_bytes(text.encode("utf-8"))
    os.chmod(path, 0o600)

    config = load_config(path, role="server")

    assert config.interface.private_key == keys.private
    assert [peer.line for peer in config.peers] == [8, 14]


def test_defaults_per_role(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}").format(**keys.placeholders())
    server = parse_config(text, str(tmp_path / "office.conf"), role="server")
    with_server = conf("[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}",
                       "Endpoint = 192.0.2.1:51820").format(**keys.placeholders())
    client = parse_config(with_server, str(tmp_path / "office.conf"), role="client")

    assert (server.interface.listen_port, client.interface.listen_port) == (51820, None)
    assert server.interface.mtu == client.interface.mtu == 1420
    assert server.interface.device == client.interface.device == "tv-office"
    assert server.interface.addresses == [] and server.peers == []


def test_default_device_is_cut_to_fifteen_characters(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}").format(**keys.placeholders())
    config = parse_config(text, str(tmp_path / "headquarters-berlin.conf"), role="server")
    assert config.name == "headquarters-berlin"
    assert config.interface.device == "tv-headquarters"


def test_explicit_values_override_defaults(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}", "ListenPort = 1194", "MTU = 1280",
                "Device = vpn0", "Address = 2001:db8:100::1",
                "[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.1:51820").format(**keys.placeholders())
    interface = parse_config(text, str(tmp_path / "wg0.conf"), role="client").interface
    assert (interface.listen_port, interface.mtu, interface.device) == (1194, 1280, "vpn0")
    assert interface.addresses == [ipaddress.ip_interface("2001:db8:100::1/128")]


def test_bare_addresses_are_host_prefixes(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}", "Address = 203.0.113.1, 2001:db8:100::1",
                "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.9, 2001:db8:100::9").format(**keys.placeholders())
    config = parse_config(text, str(tmp_path / "wg0.conf"), role="server")
    assert [a.network.prefixlen for a in config.interface.addresses] == [32, 128]
    assert [str(n) for n in config.peers[0].allowed_ips] == ["203.0.113.9/32", "2001:db8:100::9/128"]


def test_ipv4_mtu_below_1280_is_fine_without_ipv6(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}", "Address = 203.0.113.1/24", "MTU = 576").format(**keys.placeholders())
    assert parse_config(text, str(tmp_path / "wg0.conf"), role="server").interface.mtu == 576


def test_key_files_relative_to_the_config(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    ph = keys.placeholders()
    (tmp_path / "keys").mkdir()
    write(tmp_path / "keys" / "server.key", ph["priv"] + "\n")
    write(tmp_path / "psk", "  " + ph["psk"] + "\n\n")  # whitespace around the key is trimmed
    path = write(tmp_path / "wg0.conf", conf(
        "[Interface]", "PrivateKeyFile = keys/server.key",
        "[Peer]", "PublicKey = {pub1}", f"PresharedKeyFile = {tmp_path / 'psk'}").format(**ph),
        mode=0o644)  # no inline secret: the config itself may be world-readable
    monkeypatch.chdir("/")

    config = load_config(path, role="server")

    assert config.interface.private_key == keys.private
    assert config.peers[0].preshared_key == keys.psk


def test_symlinked_key_file_is_judged_by_its_target(tmp_path: Path, keys: Keys) -> None:
    ph = keys.placeholders()
    target = write(tmp_path / "real.key", ph["priv"] + "\n", mode=0o600)
    (tmp_path / "link.key").symlink_to(target)
    text = conf("[Interface]", "PrivateKeyFile = link.key")
    path = str(tmp_path / "wg0.conf")

    assert parse_config(text, path, role="server").interface.private_key == keys.private
    os.chmod(target, 0o604)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path, role="server")
    link = tmp_path / "link.key"  # chmod follows the link, so naming it is enough
    assert str(caught.value) == f"{path}:2: PrivateKeyFile: {link} is readable by others (mode 0604); chmod 600 {link}"


STRANGER = 65534  # nobody and nogroup on Debian: a user and a group the daemon does not run as


def owned_by_a_stranger(paths: list[Path], monkeypatch: pytest.MonkeyPatch) -> str:
    """Give `paths` an owner the daemon does not run as, and return how the refusal names him.

    Root chowns them; anyone else makes the daemon run as another user instead.
    """
    if os.geteuid() == 0:
        for path in paths:
            os.chown(path, STRANGER, -1)
        return f"is owned by {user_name(STRANGER)}, not by root"
    owner = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    return f"is owned by {user_name(owner)}, not by root or {user_name(owner + 1)}, the user this daemon runs as"


def test_key_files_and_configs_of_another_owner_are_refused(tmp_path: Path, keys: Keys,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Their owner could rewrite them: put in his own key, add peers or routes."""
    key = write(tmp_path / "server.key", encode_key(keys.private) + "\n")
    text = conf("[Interface]", "PrivateKeyFile = server.key")
    path = write(tmp_path / "wg0.conf", text, mode=0o644)
    assert load_config(path, role="server").interface.private_key == keys.private

    owned = owned_by_a_stranger([key, path], monkeypatch)

    with pytest.raises(ConfigError) as caught:
        load_config(path, role="server")
    assert str(caught.value) == f"{path}: {owned}; chown root {path}"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, str(path), role="server")
    assert str(caught.value) == f"{path}:2: PrivateKeyFile: {key} {owned}; chown root {key}"


def test_group_may_read_secrets_only_when_the_daemon_runs_as_that_group(tmp_path: Path, keys: Keys,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ph = keys.placeholders()
    key = write(tmp_path / "server.key", ph["priv"] + "\n", mode=0o640)
    path = write(tmp_path / "wg0.conf", conf("[Interface]", "PrivateKeyFile = server.key",
                                             "[Peer]", "PublicKey = {pub1}", "PresharedKey = {psk}").format(**ph),
                 mode=0o640)
    assert load_config(path, role="server").peers[0].preshared_key == keys.psk

    group = own_group()
    daemon_group = os.getegid() + 1
    monkeypatch.setattr(os, "getegid", lambda: daemon_group)

    with pytest.raises(ConfigError) as caught:
        load_config(path, role="server")
    first, second = caught.value.errors  # the key file, and the inline key in a group-readable file
    assert str(first) == (f"{path}:2: PrivateKeyFile: {key} is readable by group {group}, which this daemon "
                          f"does not run as (mode 0640); chmod 600 {key}")
    assert second.line == 5 and second.key == "PresharedKey"
    os.chmod(key, 0o600)
    with pytest.raises(ConfigError) as caught:
        load_config(path, role="server")
    assert str(caught.value) == (f"{path}:5: PresharedKey: {path} is readable by group {group}, which this daemon "
                                 f"does not run as (mode 0640); chmod 600 {path}")


def test_packaged_layout_loads_for_a_daemon_running_as_its_own_user(tmp_path: Path, keys: Keys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """/etc/tunvpn as the package ships it: keys and configs root:tunvpn 0640, the daemon runs as tunvpn.

    Root builds exactly that (with nobody:nogroup for tunvpn); anyone else gets the same rule with
    files of his own, which the daemon running as him may also read.
    """
    ph = keys.placeholders()
    key = write(tmp_path / "office.key", ph["priv"] + "\n", mode=0o640)
    path = write(tmp_path / "office.conf", conf("[Interface]", "PrivateKeyFile = office.key",
                                                "[Peer]", "PublicKey = {pub1}", "PresharedKey = {psk}").format(**ph),
                 mode=0o640)
    if os.geteuid() == 0:
        for file in (key, path):
            os.chown(file, 0, STRANGER)
        monkeypatch.setattr(os, "geteuid", lambda: STRANGER)
        monkeypatch.setattr(os, "getegid", lambda: STRANGER)

    config = load_config(path, role="server")

    assert (config.interface.private_key, config.peers[0].preshared_key) == (keys.private, keys.psk)


def test_overlapping_allowed_ips_within_one_peer_are_allowed(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}",
                "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 198.51.100.0/24, 198.51.100.0/25",
                "AllowedIPs = 198.51.100.0/24",
                "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 203.0.113.0/24, 198.51.101.0/24").format(**keys.placeholders())
    config = parse_config(text, str(tmp_path / "wg0.conf"), role="server")
    assert [len(peer.allowed_ips) for peer in config.peers] == [3, 2]


def test_many_disjoint_peers_pass_the_overlap_check(tmp_path: Path, keys: Keys) -> None:
    ph = keys.placeholders()
    lines = ["[Interface]", f"PrivateKey = {ph['priv']}"]
    for host in range(1, 200):
        lines += ["[Peer]", f"PublicKey = {encode_key(derive_public_key(generate_private_key()))}",
                  f"AllowedIPs = 203.0.113.{host}/32, 2001:db8:100::{host:x}/128"]
    config = parse_config(conf(*lines), str(tmp_path / "wg0.conf"), role="server")
    assert len(config.peers) == 199


def test_empty_allowed_ips_line_adds_nothing(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}",
                "AllowedIPs =", "AllowedIPs = 203.0.113.2/32").format(**keys.placeholders())
    peer = parse_config(text, str(tmp_path / "wg0.conf"), role="server").peers[0]
    assert peer.allowed_ips == [ipaddress.ip_network("203.0.113.2/32")]


def test_dns_name_endpoint_is_kept_unresolved_without_resolve(tmp_path: Path, keys: Keys) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}",
                "Endpoint = vpn.example.com.:51820").format(**keys.placeholders())
    peer = parse_config(text, str(tmp_path / "wg0.conf"), role="client", resolve=False).peers[0]
    assert (peer.endpoint, peer.endpoint_address) == (("vpn.example.com.", 51820), None)


def test_resolve_endpoint_literals() -> None:
    assert resolve_endpoint("192.0.2.7", 51820) == ("192.0.2.7", 51820)
    assert resolve_endpoint("2001:db8::7", 1) == ("2001:db8::7", 1, 0, 0)


def test_secrets_stay_out_of_repr(tmp_path: Path, keys: Keys) -> None:
    config = parse_config(STOCK_SERVER.format(**keys.placeholders()), str(tmp_path / "wg0.conf"), role="server")
    text = repr(config)
    assert repr(keys.private) not in text and repr(keys.psk) not in text
    assert repr(keys.peer1) in text  # public keys are fine to log


def test_error_format() -> None:
    assert str(ConfigError("a.conf", 7, "MTU", "too small")) == "a.conf:7: MTU: too small"
    assert str(ConfigError("a.conf", 7, None, "bad line")) == "a.conf:7: bad line"
    assert str(ConfigError("a.conf", 0, None, "no [Interface] section")) == "a.conf: no [Interface] section"
    assert str(ConfigError("a.conf", 3, "Key", "bad\nvalue\u2028x")) == "a.conf:3: Key: bad\\nvalue\\u2028x"
    err = ConfigError("a.conf", 7, "MTU", "too small")
    assert (err.path, err.line, err.key, err.reason) == ("a.conf", 7, "MTU", "too small")


# --- server and client daemon keys --------------------------------------------------------------

def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


OFFICE_SERVER = """\
[Interface]
PrivateKey = {priv}
Address = 203.0.113.1/24, 2001:db8:100::1/64
Pool = 203.0.113.100 - 203.0.113.199
Pool = 2001:db8:100::1000-2001:db8:100::1fff
PushRoute = 198.51.100.0/25, 2001:db8:50::/64
PushRoute = 198.51.100.128/25
PushDNS = 198.51.100.53, 2001:db8:50::53, office.example
PushDNS = lab.example.
ClientToClient = on
StateDirectory = /srv/tunvpn/office-state
PushKeepalive = off

[Peer]
# a stock WireGuard laptop with a fixed address outside the pool
PublicKey = {pub1}
AllowedIPs = 203.0.113.5/32, 2001:db8:100::5/128

[Peer]
# a site gateway: a network inside the tunnel subnet that leaves the server's address alone
PublicKey = {pub2}
AllowedIPs = 203.0.113.64/27, 198.51.101.0/24
"""


def test_server_daemon_keys(tmp_path: Path, keys: Keys) -> None:
    config = parse_config(OFFICE_SERVER.format(**keys.placeholders()), str(tmp_path / "office.conf"), role="server")
    interface = config.interface

    assert interface.pools == {4: (ip("203.0.113.100"), ip("203.0.113.199")),
                               6: (ip("2001:db8:100::1000"), ip("2001:db8:100::1fff"))}
    assert interface.pool_subnet(4) == ipaddress.ip_interface("203.0.113.1/24")
    assert interface.pool_subnet(6) == ipaddress.ip_interface("2001:db8:100::1/64")
    assert interface.push_routes == [net("198.51.100.0/25"), net("2001:db8:50::/64"), net("198.51.100.128/25")]
    assert interface.push_dns == [ip("198.51.100.53"), ip("2001:db8:50::53")]
    assert interface.push_dns_search == ["office.example", "lab.example."]
    assert interface.client_to_client is True
    assert interface.state_directory == "/srv/tunvpn/office-state"
    assert interface.push_keepalive == 0
    assert (interface.dns, interface.dns_search) == ([], [])
    assert [peer.allowed_ips for peer in config.peers] == [
        [net("203.0.113.5/32"), net("2001:db8:100::5/128")], [net("203.0.113.64/27"), net("198.51.101.0/24")]]


def test_server_defaults_without_daemon_keys(tmp_path: Path, keys: Keys) -> None:
    """A stock wg-quick server file: the pool is its Address subnet, clients stay apart, keepalive 25."""
    config = parse_config(STOCK_SERVER.format(**keys.placeholders()), str(tmp_path / "office.conf"), role="server")
    interface = config.interface

    assert interface.pools == {4: (ip("203.0.113.1"), ip("203.0.113.254")),
                               6: (ip("2001:db8:100::1"), ip("2001:db8:100::ffff:ffff:ffff:ffff"))}
    assert (interface.push_routes, interface.push_dns, interface.push_dns_search) == ([], [], [])
    assert interface.client_to_client is False
    assert interface.state_directory == "/var/lib/tunvpn/office"
    assert interface.push_keepalive == 25


def test_client_leaves_server_fields_empty_and_takes_dns(tmp_path: Path, keys: Keys) -> None:
    text = STOCK_CLIENT.replace("[Peer]", "DNS = 2001:db8:50::53,198.51.100.53 office.example, corp.example\n[Peer]")
    interface = parse_config(text.format(**keys.placeholders()), str(tmp_path / "home.conf"), role="client").interface

    assert interface.dns == [ip("2001:db8:50::53"), ip("198.51.100.53")]
    assert interface.dns_search == ["office.example", "corp.example"]
    assert interface.pools == {} and interface.pool_subnet(4) is None
    assert (interface.push_routes, interface.push_dns, interface.push_dns_search) == ([], [], [])
    assert (interface.client_to_client, interface.state_directory, interface.push_keepalive) == (None, None, None)


def test_minimal_client_needs_neither_address_nor_allowed_ips(tmp_path: Path, keys: Keys) -> None:
    text = conf(*INTERFACE, "[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.1:51820").format(**keys.placeholders())
    config = parse_config(text, str(tmp_path / "office.conf"), role="client")
    assert config.interface.addresses == [] and config.interface.dns == []
    assert config.peers[0].allowed_ips == []


def test_client_peer_may_cover_the_clients_own_address(tmp_path: Path, keys: Keys) -> None:
    """Only a server's address is protected: a client's server peer routes the whole subnet."""
    text = conf(*INTERFACE, "Address = 203.0.113.7/24", "[Peer]", "PublicKey = {pub1}",
                "AllowedIPs = 203.0.113.0/24", "Endpoint = 192.0.2.1:51820").format(**keys.placeholders())
    assert parse_config(text, str(tmp_path / "wg0.conf"), role="client").peers[0].allowed_ips == [net("203.0.113.0/24")]


@pytest.mark.parametrize("written, expected", [
    ("yes", True), ("YES", True), ("true", True), ("True", True), ("on", True), ("On", True), ("1", True),
    ("no", False), ("No", False), ("false", False), ("FALSE", False), ("off", False), ("oFF", False), ("0", False),
])
def test_client_to_client_spellings(written: str, expected: bool, tmp_path: Path, keys: Keys) -> None:
    text = conf(*INTERFACE, f"ClientToClient = {written}").format(**keys.placeholders())
    assert parse_config(text, str(tmp_path / "wg0.conf"), role="server").interface.client_to_client is expected


@pytest.mark.parametrize("written, expected", [("0", 0), ("off", 0), ("1", 1), ("65535", 65535)])
def test_push_keepalive_range(written: str, expected: int, tmp_path: Path, keys: Keys) -> None:
    text = conf(*INTERFACE, f"PushKeepalive = {written}").format(**keys.placeholders())
    assert parse_config(text, str(tmp_path / "wg0.conf"), role="server").interface.push_keepalive == expected


def test_server_endpoint_lists_where_clients_reach_it(tmp_path: Path, keys: Keys) -> None:
    lines = (*SERVER_V4, "Endpoint = vpn.example.net:51820, 192.0.2.1:51820", "endpoint = [2001:DB8::1]:443")
    interface = parse_config(conf(*lines).format(**keys.placeholders()), str(tmp_path / "wg0.conf"), role="server").interface
    assert interface.public_endpoints == ["vpn.example.net:51820", "192.0.2.1:51820", "[2001:DB8::1]:443"]
    plain = parse_config(conf(*SERVER_V4).format(**keys.placeholders()), str(tmp_path / "wg0.conf"), role="server")
    assert plain.interface.public_endpoints == []


@pytest.mark.parametrize("addresses, pool_line, expected", [
    # the server's own address may lie inside: the pool skips it
    ("203.0.113.1/24", "Pool = 203.0.113.1-203.0.113.10", {4: ("203.0.113.1", "203.0.113.10")}),
    ("203.0.113.1/24", "Pool = 203.0.113.1-203.0.113.254", {4: ("203.0.113.1", "203.0.113.254")}),
    ("203.0.113.1/24", "Pool = 203.0.113.9-203.0.113.9", {4: ("203.0.113.9", "203.0.113.9")}),
    # a point-to-point /31 has no network or broadcast address
    ("203.0.113.0/31", "Pool = 203.0.113.1-203.0.113.1", {4: ("203.0.113.1", "203.0.113.1")}),
    ("2001:db8:100::1/64", "Pool = 2001:db8:100::1-2001:db8:100::ffff:ffff:ffff:ffff",
     {6: ("2001:db8:100::1", "2001:db8:100::ffff:ffff:ffff:ffff")}),
    # the pool picks its Address; the other family keeps its default
    ("198.51.100.1/24, 203.0.113.1/24, 2001:db8:100::1/120", "Pool = 203.0.113.128-203.0.113.200",
     {4: ("203.0.113.128", "203.0.113.200"), 6: ("2001:db8:100::1", "2001:db8:100::ff")}),
    # defaults: the first Address of a family with room for clients
    ("203.0.113.1/32, 198.51.100.1/30", "", {4: ("198.51.100.1", "198.51.100.2")}),
    ("203.0.113.1/32, 2001:db8:100::1/128", "", {}),
    ("2001:db8:100::/127", "", {6: ("2001:db8:100::", "2001:db8:100::1")}),
])
def test_pools(addresses: str, pool_line: str, expected: dict, tmp_path: Path, keys: Keys) -> None:
    text = conf(*INTERFACE, f"Address = {addresses}", pool_line).format(**keys.placeholders())
    interface = parse_config(text, str(tmp_path / "wg0.conf"), role="server").interface
    assert interface.pools == {version: (ip(first), ip(last)) for version, (first, last) in expected.items()}
    for version, (first, _) in expected.items():
        assert ip(first) in interface.pool_subnet(version).network


def test_fixed_addresses_inside_the_subnet_and_outside_the_pool(tmp_path: Path, keys: Keys) -> None:
    text = conf(*SERVER_V4, "Pool = 203.0.113.100-203.0.113.199",
                "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.2/32",  # below the pool
                "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 203.0.113.150, 203.0.113.254").format(**keys.placeholders())
    config = parse_config(text, str(tmp_path / "wg0.conf"), role="server")
    assert [peer.allowed_ips for peer in config.peers] == [
        [net("203.0.113.2/32")], [net("203.0.113.150/32"), net("203.0.113.254/32")]]


def test_push_dns_at_the_limits(tmp_path: Path, keys: Keys) -> None:
    servers = ", ".join(f"192.0.2.{n}" for n in range(1, 9))
    domains = " ".join(f"d{n}.example" for n in range(8))
    text = conf(*INTERFACE, f"PushDNS = {servers}", f"PushDNS = {domains}").format(**keys.placeholders())
    interface = parse_config(text, str(tmp_path / "wg0.conf"), role="server").interface
    assert len(interface.push_dns) == 8 and len(interface.push_dns_search) == 8


def test_push_routes_at_the_limit(tmp_path: Path, keys: Keys) -> None:
    """64 routes per push: with two Address subnets, 62 are left for PushRoute."""
    routes = ", ".join(f"198.51.100.{4 * n}/30" for n in range(62))
    text = conf(*INTERFACE, "Address = 203.0.113.1/24, 2001:db8:100::1/64", f"PushRoute = {routes}")
    assert len(parse_config(text.format(**keys.placeholders()), str(tmp_path / "wg0.conf"),
                            role="server").interface.push_routes) == 62
    with pytest.raises(ConfigError) as caught:
        parse_config((text + "PushRoute = 198.51.101.0/24\n").format(**keys.placeholders()),
                     str(tmp_path / "wg0.conf"), role="server")
    assert (caught.value.line, caught.value.reason) == (
        5, "more than 62 PushRoute networks; a config push carries 64 routes and the server's Address subnets take 2")


def test_the_largest_push_that_fits(tmp_path: Path, keys: Keys) -> None:
    """50 IPv6 routes with both pools fill 1010 of 1016 body bytes; the 51st is refused (see BROKEN)."""
    lines = [*INTERFACE, "Address = 203.0.113.1/24, 2001:db8:100::1/64"]
    lines += [f"PushRoute = 2001:db8:50:{n:x}::/64" for n in range(50)]
    interface = parse_config(conf(*lines).format(**keys.placeholders()), str(tmp_path / "wg0.conf"), role="server").interface
    assert len(interface.push_routes) == 50


@pytest.mark.parametrize("lines, role", [
    (("[Interface]", "PrivateKey = x", "Pool = 203.0.113.10-203.0.113.20"), "server"),
    (("[Interface]", "pushroute = 198.51.100.0/24", "DNS = 192.0.2.53"), "server"),  # server-only keys win
    (("[Interface]", "ListenPort = 51820", "ClientToClient = no"), "server"),
    (("[Interface]", "StateDirectory = /x", "[Peer]", "Endpoint = 192.0.2.1:1"), "server"),
    (("[Interface]", "PushKeepalive = 25"), "server"),
    (("[Interface]", "Endpoint = vpn.example.net:51820"), "server"),
    (("[Interface]", "PushDNS = 192.0.2.53"), "server"),
    (("[Interface]", "ListenPort = 51820", "DNS = 192.0.2.53"), "client"),  # DNS beats ListenPort
    (("[Interface]", "ListenPort = 51820"), "server"),
    (("\ufeff[ interface ]", "  LISTENPORT=1  # fixed"), "server"),
    (("[Interface]", "Address = 203.0.113.2/32", "[Peer]", "Endpoint = 192.0.2.1:51820"), "client"),
    (("[Interface]", "# ListenPort = 51820", "# Pool = 203.0.113.10-203.0.113.20"), "client"),  # comments
    (("[Interface]", "[Peer]", "ListenPort = 51820", "Pool = x"), "client"),  # not in [Interface]
    (("Pool = 203.0.113.10-203.0.113.20", "garbage [[[", "=="), "client"),  # before any section
])
def test_guess_role(lines: tuple[str, ...], role: str) -> None:
    assert guess_role(conf(*lines)) == role


# --- broken configs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Broken:
    lines: tuple[str, ...]
    line: int
    key: str | None
    reason: str
    role: str = "server"
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (text, mode)
    config_mode: int = 0o600
    config_name: str = "wg0.conf"


def broken(case_id: str, lines: tuple[str, ...], line: int, key: str | None, reason: str, **options: object):
    return pytest.param(Broken(lines, line, key, reason, **options), id=case_id)


INTERFACE = ("[Interface]", "PrivateKey = {priv}")  # lines 1-2 of most cases
SERVER_V4 = INTERFACE + ("Address = 203.0.113.1/24",)  # line 3 is the server's own address
SERVER_V6 = INTERFACE + ("Address = 2001:db8:100::1/64",)
LONGEST_DOMAIN = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 bytes
MANGLED_PRIVATE_KEY = "expected 'PrivateKey = KEY'; the rest of the line is not shown, as it may be the key"

BROKEN = [
    broken("unknown-key", INTERFACE + ("Colour = blue",), 3, "Colour", "unknown key in [Interface]"),
    *(
        broken(f"wg-quick-{name}", INTERFACE + (f"{name} = something",), 3, name,
               "tunvpn does not support this wg-quick key; remove it")
        for name in WG_QUICK_ONLY_KEYS
    ),
    broken("wg-quick-key-lowercase", INTERFACE + ("postup = iptables -A FORWARD",), 3, "postup",
           "tunvpn does not support this wg-quick key; remove it"),
    broken("peer-key-in-interface", INTERFACE + ("PersistentKeepalive = 25",), 3, "PersistentKeepalive",
           "belongs in [Peer], not [Interface]"),
    broken("interface-key-in-peer", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "ListenPort = 1"), 5, "ListenPort",
           "belongs in [Interface], not [Peer]"),
    broken("bad-base64", ("[Interface]", "PrivateKey = not*base64*at*all"), 2, "PrivateKey", "not valid base64"),
    broken("wrong-key-length", INTERFACE + ("[Peer]", "PublicKey = {short_key}"), 4, "PublicKey",
           "a key is 32 bytes (44 base64 characters), this one is 16 bytes"),
    broken("bad-psk", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PresharedKey = {short_key}"), 5, "PresharedKey",
           "a key is 32 bytes (44 base64 characters), this one is 16 bytes"),
    broken("duplicate-peer", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "[Peer]", "PublicKey = {pub1}"), 6,
           "PublicKey", "same peer as the PublicKey on line 4"),
    broken("own-public-key", INTERFACE + ("[Peer]", "PublicKey = {own}"), 4, "PublicKey",
           "is this [Interface]'s own public key; a peer cannot be itself"),
    broken("missing-public-key", INTERFACE + ("[Peer]", "AllowedIPs = 203.0.113.2/32"), 3, "PublicKey",
           "missing; [Peer] needs PublicKey"),
    broken("overlap-contained", INTERFACE + (
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 198.51.100.0/24",
        "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 203.0.113.9/32", "AllowedIPs = 198.51.100.128/25"),
        9, "AllowedIPs", "198.51.100.128/25 overlaps 198.51.100.0/24 of another peer on line 5"),
    broken("overlap-containing-later", INTERFACE + (
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 2001:db8:100::5/128",
        "[Peer]", "PublicKey = {pub2}", "allowedips = 2001:db8:100::/64"),
        8, "allowedips", "2001:db8:100::/64 overlaps 2001:db8:100::5/128 of another peer on line 5"),
    broken("overlap-same-start-wider-later", INTERFACE + (
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 198.51.100.0/25",
        "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 198.51.100.0/24"),
        8, "AllowedIPs", "198.51.100.0/24 overlaps 198.51.100.0/25 of another peer on line 5"),
    broken("overlap-identical", INTERFACE + (
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.2/32",
        "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 203.0.113.2/32"),
        8, "AllowedIPs", "203.0.113.2/32 overlaps 203.0.113.2/32 of another peer on line 5"),
    broken("overlap-behind-own-nesting", INTERFACE + (
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 198.51.100.0/24, 198.51.100.0/26",
        "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 198.51.100.192/26"),
        8, "AllowedIPs", "198.51.100.192/26 overlaps 198.51.100.0/24 of another peer on line 5"),
    broken("host-bits-set", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.5/24"), 5,
           "AllowedIPs", "203.0.113.5/24 has host bits set (the network is 203.0.113.0/24)"),
    broken("allowed-ips-not-an-address", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113/24"), 5,
           "AllowedIPs", "203.0.113/24 is not an IPv4 or IPv6 address"),
    broken("allowed-ips-netmask", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.0/255.255.255.0"),
           5, "AllowedIPs", "203.0.113.0/255.255.255.0: prefix length must be 0-32"),
    broken("allowed-ips-prefix-too-long", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 2001:db8::/129"),
           5, "AllowedIPs", "2001:db8::/129: prefix length must be 0-128"),
    broken("allowed-ips-empty-entry", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.0/24,"), 5,
           "AllowedIPs", "'203.0.113.0/24,' has an empty entry"),
    broken("endpoint-missing-port", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.1"), 5,
           "Endpoint", "192.0.2.1: missing :port"),
    broken("endpoint-empty-port", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.1:"), 5,
           "Endpoint", "192.0.2.1:: missing port after ':'"),
    broken("endpoint-port-0", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.1:0"), 5,
           "Endpoint", "192.0.2.1:0: port must be 1-65535"),
    broken("endpoint-port-70000", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = [2001:db8::1]:70000"), 5,
           "Endpoint", "[2001:db8::1]:70000: port must be 1-65535"),
    broken("endpoint-port-name", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.1:https"), 5,
           "Endpoint", "192.0.2.1:https: port must be 1-65535"),
    broken("endpoint-unbracketed-ipv6", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = 2001:db8::1:51820"),
           5, "Endpoint", "2001:db8::1:51820: an IPv6 address needs brackets, like [2001:db8::1]:51820"),
    broken("endpoint-empty-host", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = :51820"), 5,
           "Endpoint", ":51820: empty host"),
    broken("endpoint-empty-brackets", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = []:51820"), 5,
           "Endpoint", "[]:51820: empty host"),
    broken("endpoint-unclosed-bracket", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = [2001:db8::1:51820"),
           5, "Endpoint", "[2001:db8::1:51820: missing ']' after the IPv6 address"),
    broken("endpoint-ipv4-in-brackets", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = [192.0.2.1]:51820"),
           5, "Endpoint", "[192.0.2.1]:51820: brackets hold an IPv6 address, '192.0.2.1' is not one"),
    broken("endpoint-bad-ipv4", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.300:51820"), 5,
           "Endpoint", "192.0.2.300:51820: '192.0.2.300' is neither an IPv4 address nor a DNS name"),
    broken("endpoint-bad-name", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = vpn..example.com:51820"), 5,
           "Endpoint", "vpn..example.com:51820: 'vpn..example.com' is neither an IPv4 address nor a DNS name"),
    broken("endpoint-empty", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint ="), 5,
           "Endpoint", "empty; expected host:port"),
    broken("client-without-peer", INTERFACE + ("Address = 203.0.113.9/24",), 0, None,
           "no [Peer] section: a client needs its server as its first [Peer]", role="client"),
    broken("client-peer-without-endpoint", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 0.0.0.0/0"), 3,
           "Endpoint", "missing; a client initiates, so every [Peer] needs one", role="client"),
    broken("mtu-too-small", INTERFACE + ("MTU = 575",), 3, "MTU", "'575' is not a number in 576-65535"),
    broken("mtu-too-large", INTERFACE + ("MTU = 65536",), 3, "MTU", "'65536' is not a number in 576-65535"),
    broken("mtu-not-a-number", INTERFACE + ("MTU = 1420bytes",), 3, "MTU", "'1420bytes' is not a number in 576-65535"),
    broken("mtu-too-small-for-ipv6", INTERFACE + ("MTU = 1279", "Address = 203.0.113.1/24, 2001:db8:100::1/64"), 3,
           "MTU", "1279 is below 1280, the minimum with an IPv6 Address"),
    broken("listen-port-0", INTERFACE + ("ListenPort = 0",), 3, "ListenPort", "'0' is not a number in 1-65535"),
    broken("listen-port-65536", INTERFACE + ("ListenPort = 65536",), 3, "ListenPort",
           "'65536' is not a number in 1-65535"),
    broken("listen-port-negative", INTERFACE + ("ListenPort = -1",), 3, "ListenPort", "'-1' is not a number in 1-65535"),
    broken("listen-port-unicode-digits", INTERFACE + ("ListenPort = \u0665\u0661\u0668\u0662\u0660",), 3, "ListenPort",
           "'\u0665\u0661\u0668\u0662\u0660' is not a number in 1-65535"),
    broken("address-garbage", INTERFACE + ("Address = 203.0.113.1/24, tunnel",), 3, "Address",
           "tunnel is not an IPv4 or IPv6 address"),
    broken("address-scoped", INTERFACE + ("Address = fe80::1%eth0/64",), 3, "Address",
           "fe80::1%eth0/64: scoped addresses are not supported"),
    broken("address-prefix-length-0", INTERFACE + ("Address = 203.0.113.1/0",), 3, "Address",
           "203.0.113.1/0: prefix length 0 would put every address on this link; give the tunnel subnet's length"),
    broken("address-ipv6-prefix-length-0", INTERFACE + ("Address = 203.0.113.1/24, 2001:db8::1/0",), 3, "Address",
           "2001:db8::1/0: prefix length 0 would put every address on this link; give the tunnel subnet's length"),
    broken("address-multicast", INTERFACE + ("Address = 224.0.0.5/24",), 3, "Address",
           "224.0.0.5 is a multicast address, not one an interface can have"),
    broken("address-ipv6-multicast", INTERFACE + ("Address = ff02::1/64",), 3, "Address",
           "ff02::1 is a multicast address, not one an interface can have"),
    broken("address-loopback", INTERFACE + ("Address = 127.0.0.2/8",), 3, "Address",
           "127.0.0.2 is a loopback address, not one an interface can have"),
    broken("address-unspecified", INTERFACE + ("Address = ::",), 3, "Address",
           ":: is the unspecified address, not one an interface can have"),
    broken("missing-private-key", ("[Interface]", "ListenPort = 51820"), 1, "PrivateKey",
           "missing; [Interface] needs PrivateKey or PrivateKeyFile"),
    broken("private-key-and-file", INTERFACE + ("PrivateKeyFile = server.key",), 3, "PrivateKeyFile",
           "conflicts with PrivateKey on line 2; set only one", files={"server.key": ("{priv}\n", 0o600)}),
    broken("psk-and-psk-file", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PresharedKeyFile = psk",
                                            "PresharedKey = {psk}"),
           6, "PresharedKey", "conflicts with PresharedKeyFile on line 5; set only one",
           files={"psk": ("{psk}\n", 0o600)}),
    broken("private-key-file-0644", ("[Interface]", "PrivateKeyFile = server.key"), 2, "PrivateKeyFile",
           "{dir}/server.key is readable by others (mode 0644); chmod 640 {dir}/server.key",
           files={"server.key": ("{priv}\n", 0o644)}),
    broken("psk-file-group-writable", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PresharedKeyFile = psk"), 5,
           "PresharedKeyFile", "{dir}/psk is writable by group {group} (mode 0620); chmod 600 {dir}/psk",
           files={"psk": ("{psk}\n", 0o620)}),
    broken("key-file-others-writable-group-writable", ("[Interface]", "PrivateKeyFile = server.key"), 2,
           "PrivateKeyFile", "{dir}/server.key is writable and executable by others, writable by group {group} "
                             "(mode 0663); chmod 640 {dir}/server.key", files={"server.key": ("{priv}\n", 0o663)}),
    broken("key-file-missing", ("[Interface]", "PrivateKeyFile = nowhere.key"), 2, "PrivateKeyFile",
           "cannot open {dir}/nowhere.key: No such file or directory"),
    broken("key-file-is-a-directory", ("[Interface]", "PrivateKeyFile = ."), 2, "PrivateKeyFile",
           "{dir}/. is not a regular file"),
    broken("key-file-garbage", ("[Interface]", "PrivateKeyFile = server.key"), 2, "PrivateKeyFile",
           "{dir}/server.key: not valid base64", files={"server.key": ("-----BEGIN PRIVATE KEY-----\n", 0o600)}),
    broken("key-file-empty", ("[Interface]", "PrivateKeyFile = server.key"), 2, "PrivateKeyFile",
           "{dir}/server.key: a key is 32 bytes (44 base64 characters), this one is 0 bytes",
           files={"server.key": ("", 0o600)}),
    broken("inline-private-key-in-0644-config", INTERFACE, 2, "PrivateKey",
           "{config} is readable by others (mode 0644); chmod 640 {config}", config_mode=0o644),
    broken("inline-psk-in-0604-config", ("[Interface]", "PrivateKeyFile = server.key",
                                         "[Peer]", "PublicKey = {pub1}", "PresharedKey = {psk}"),
           5, "PresharedKey", "{config} is readable by others (mode 0604); chmod 600 {config}",
           config_mode=0o604, files={"server.key": ("{priv}\n", 0o600)}),
    broken("config-group-writable-without-inline-keys", ("[Interface]", "PrivateKeyFile = server.key"), 0, None,
           "is writable by group {group}, who could add peers and routes (mode 0664); chmod 644 {config}",
           config_mode=0o664, files={"server.key": ("{priv}\n", 0o600)}),
    broken("config-world-writable-without-inline-keys", ("[Interface]", "PrivateKeyFile = server.key"), 0, None,
           "is writable by group {group} and others, who could add peers and routes (mode 0666); chmod 644 {config}",
           config_mode=0o666, files={"server.key": ("{priv}\n", 0o600)}),
    broken("config-writable-by-others-only", INTERFACE, 0, None,
           "is writable by others, who could add peers and routes (mode 0602); chmod 600 {config}", config_mode=0o602),
    broken("key-before-section", ("PrivateKey = {priv}", "[Interface]"), 1, "PrivateKey",
           "comes before any section; put it under [Interface] or [Peer]"),
    broken("unknown-section", INTERFACE + ("[Peers]", "PublicKey = {pub1}"), 3, None,
           "unknown section [Peers]; expected [Interface] or [Peer]"),
    broken("unclosed-section", INTERFACE + ("[Peer",), 3, None, "'[Peer': a section header is [Interface] or [Peer]"),
    broken("second-interface", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "[Interface]"), 5, None,
           "a second [Interface]; the first is on line 1"),
    broken("missing-interface", ("[Peer]", "PublicKey = {pub1}"), 0, None, "no [Interface] section"),
    broken("empty-file", ("",), 0, None, "no [Interface] section"),
    broken("line-without-equals", INTERFACE + ("ListenPort 51820",), 3, None,
           "expected 'Key = Value' or a [Section] header"),
    broken("line-without-key", INTERFACE + ("= 51820",), 3, None, "expected 'Key = Value' or a [Section] header"),
    broken("repeated-scalar", INTERFACE + ("ListenPort = 1", "listenport = 2"), 4, "listenport",
           "repeated; already set on line 3"),
    broken("repeated-public-key", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PublicKey = {pub2}"), 5, "PublicKey",
           "repeated; already set on line 4"),
    broken("device-with-slash", INTERFACE + ("Device = tv/0",), 3, "Device", "'tv/0': an interface name cannot contain '/'"),
    broken("device-too-long", INTERFACE + ("Device = tunvpn-0123456789",), 3, "Device",
           "'tunvpn-0123456789' is longer than 15 bytes"),
    broken("device-dotdot", INTERFACE + ("Device = ..",), 3, "Device", "'..' is not a valid interface name"),
    broken("device-space", INTERFACE + ("Device = tv 0",), 3, "Device", "'tv 0': an interface name cannot contain ' '"),
    broken("device-template", INTERFACE + ("Device = tv%d",), 3, "Device", "'tv%d': an interface name cannot contain '%'"),
    broken("device-default-from-bad-stem", INTERFACE, 1, "Device",
           "the default from the file name does not work ('tv-my vpn': an interface name cannot contain ' '); set Device",
           config_name="my vpn.conf"),
    broken("keepalive-negative", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PersistentKeepalive = -1"), 5,
           "PersistentKeepalive", "'-1' is neither off nor 0-65535 seconds"),
    broken("keepalive-too-large", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PersistentKeepalive = 65536"), 5,
           "PersistentKeepalive", "'65536' is neither off nor 0-65535 seconds"),
    broken("keepalive-word", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PersistentKeepalive = sometimes"), 5,
           "PersistentKeepalive", "'sometimes' is neither off nor 0-65535 seconds"),
    # -- keys of one role in the other role's config
    broken("pool-on-client", INTERFACE + ("Pool = 203.0.113.10-203.0.113.20",), 3, "Pool",
           "is a server setting, not for a client; a client takes its address from the server, or from Address",
           role="client"),
    broken("push-route-on-client", INTERFACE + ("PushRoute = 198.51.100.0/24",), 3, "PushRoute",
           "is a server setting, not for a client; a client routes what its [Peer] lists in AllowedIPs", role="client"),
    broken("push-dns-on-client", INTERFACE + ("PushDNS = 192.0.2.53",), 3, "PushDNS",
           "is a server setting, not for a client; use DNS", role="client"),
    broken("client-to-client-on-client", INTERFACE + ("clienttoclient = yes",), 3, "clienttoclient",
           "is a server setting, not for a client", role="client"),
    broken("state-directory-on-client", INTERFACE + ("StateDirectory = /var/lib/tunvpn/x",), 3, "StateDirectory",
           "is a server setting, not for a client", role="client"),
    broken("push-keepalive-on-client", INTERFACE + ("PushKeepalive = 25",), 3, "PushKeepalive",
           "is a server setting, not for a client; set PersistentKeepalive in the [Peer]", role="client"),
    broken("dns-on-server", INTERFACE + ("DNS = 192.0.2.53",), 3, "DNS",
           "is a client setting, not for a server; use PushDNS to give clients DNS servers"),
    broken("dns-on-server-checked-before-its-value", INTERFACE + ("dns = not an address!",), 3, "dns",
           "is a client setting, not for a server; use PushDNS to give clients DNS servers"),
    # -- Pool
    broken("pool-single-address", SERVER_V4 + ("Pool = 203.0.113.10",), 4, "Pool",
           "'203.0.113.10': expected FIRST-LAST, like 203.0.113.10-203.0.113.200"),
    broken("pool-as-cidr", SERVER_V4 + ("Pool = 203.0.113.0/24",), 4, "Pool",
           "'203.0.113.0/24': expected FIRST-LAST, like 203.0.113.10-203.0.113.200"),
    broken("pool-three-ends", SERVER_V4 + ("Pool = 203.0.113.10-203.0.113.20-203.0.113.30",), 4, "Pool",
           "'203.0.113.10-203.0.113.20-203.0.113.30': expected FIRST-LAST, like 203.0.113.10-203.0.113.200"),
    broken("pool-open-end", SERVER_V4 + ("Pool = 203.0.113.10 -",), 4, "Pool",
           "'203.0.113.10 -': expected FIRST-LAST, like 203.0.113.10-203.0.113.200"),
    broken("pool-empty", SERVER_V4 + ("Pool =",), 4, "Pool", "'': expected FIRST-LAST, like 203.0.113.10-203.0.113.200"),
    broken("pool-words", SERVER_V4 + ("Pool = first-last",), 4, "Pool", "'first' is not an IPv4 or IPv6 address"),
    broken("pool-scoped", SERVER_V6 + ("Pool = fe80::1%eth0-fe80::9",), 4, "Pool",
           "fe80::1%eth0: scoped addresses are not supported"),
    broken("pool-mixed-families", SERVER_V4 + ("Pool = 203.0.113.10-2001:db8:100::10",), 4, "Pool",
           "'203.0.113.10-2001:db8:100::10': FIRST and LAST must both be IPv4 or both IPv6"),
    broken("pool-first-above-last", SERVER_V4 + ("Pool = 203.0.113.20 - 203.0.113.10",), 4, "Pool",
           "'203.0.113.20 - 203.0.113.10': FIRST is above LAST"),
    broken("pool-outside-subnet", SERVER_V4 + ("Pool = 198.51.100.10-198.51.100.20",), 4, "Pool",
           "198.51.100.10-198.51.100.20 is not inside the subnet of an IPv4 Address (203.0.113.0/24)"),
    broken("pool-straddles-subnet-end", SERVER_V4 + ("Address = 198.51.100.1/25", "Pool = 198.51.100.100-198.51.100.130"),
           5, "Pool", "198.51.100.100-198.51.100.130 is not inside the subnet of an IPv4 Address "
                      "(203.0.113.0/24, 198.51.100.0/25)"),
    broken("pool-outside-ipv6-subnet", SERVER_V6 + ("Pool = 2001:db8:101::1-2001:db8:101::ff",), 4, "Pool",
           "2001:db8:101::1-2001:db8:101::ff is not inside the subnet of an IPv6 Address (2001:db8:100::/64)"),
    broken("pool-without-address", INTERFACE + ("Pool = 203.0.113.10-203.0.113.20",), 3, "Pool",
           "an IPv4 Pool needs an IPv4 Address whose subnet holds it"),
    broken("ipv6-pool-with-ipv4-address-only", SERVER_V4 + ("Pool = 2001:db8:100::10-2001:db8:100::20",), 4, "Pool",
           "an IPv6 Pool needs an IPv6 Address whose subnet holds it"),
    broken("pool-before-its-address-still-needs-one", INTERFACE + ("Pool = 2001:db8:100::a-2001:db8:100::f",
                                                                   "Address = 203.0.113.1/24"),
           3, "Pool", "an IPv6 Pool needs an IPv6 Address whose subnet holds it"),
    broken("pool-includes-network-address", SERVER_V4 + ("Pool = 203.0.113.0-203.0.113.20",), 4, "Pool",
           "203.0.113.0-203.0.113.20 includes 203.0.113.0, the network address of 203.0.113.0/24"),
    broken("pool-includes-broadcast-address", SERVER_V4 + ("Pool = 203.0.113.200-203.0.113.255",), 4, "Pool",
           "203.0.113.200-203.0.113.255 includes 203.0.113.255, the broadcast address of 203.0.113.0/24"),
    broken("pool-includes-subnet-router-anycast", SERVER_V6 + ("Pool = 2001:db8:100::-2001:db8:100::ff",), 4, "Pool",
           "2001:db8:100::-2001:db8:100::ff includes 2001:db8:100::, the subnet-router anycast address of "
           "2001:db8:100::/64"),
    broken("pool-of-only-the-server", SERVER_V4 + ("Pool = 203.0.113.1-203.0.113.1",), 4, "Pool",
           "203.0.113.1-203.0.113.1 holds only the server's own address"),
    broken("pool-in-a-host-address", INTERFACE + ("Address = 203.0.113.1/32", "Pool = 203.0.113.1-203.0.113.1"), 4,
           "Pool", "203.0.113.1-203.0.113.1 holds only the server's own address"),
    broken("second-ipv4-pool", SERVER_V4 + ("Address = 198.51.100.1/24", "Pool = 203.0.113.10-203.0.113.20",
                                            "Pool = 198.51.100.10-198.51.100.20"),
           6, "Pool", "a second IPv4 Pool; the first is on line 5"),
    # -- PushRoute, PushDNS
    broken("push-route-host-bits", SERVER_V4 + ("PushRoute = 198.51.100.1/24",), 4, "PushRoute",
           "198.51.100.1/24 has host bits set (the network is 198.51.100.0/24)"),
    broken("push-route-ipv6-host-bits", SERVER_V4 + ("PushRoute = 2001:db8:50::1/64",), 4, "PushRoute",
           "2001:db8:50::1/64 has host bits set (the network is 2001:db8:50::/64)"),
    broken("push-route-word", SERVER_V4 + ("PushRoute = lan",), 4, "PushRoute", "lan is not an IPv4 or IPv6 address"),
    broken("push-route-trailing-comma", SERVER_V4 + ("PushRoute = 198.51.100.0/24,",), 4, "PushRoute",
           "'198.51.100.0/24,' has an empty entry"),
    broken("push-route-twice", SERVER_V4 + ("PushRoute = 198.51.100.0/24", "PushRoute = 198.51.100.0/24"), 5,
           "PushRoute", "198.51.100.0/24 is listed twice (first on line 4)"),
    broken("push-route-too-many", SERVER_V4 + (
        "PushRoute = " + ", ".join(f"198.51.100.{4 * n}/30" for n in range(32)),
        "PushRoute = " + ", ".join(f"2001:db8:50:{n:x}::/64" for n in range(32))), 5, "PushRoute",
        "more than 63 PushRoute networks; a config push carries 64 routes and the server's Address subnets take 1"),
    broken("push-routes-overflow-the-push-message", INTERFACE + ("Address = 203.0.113.1/24, 2001:db8:100::1/64",) + tuple(
        f"PushRoute = 2001:db8:50:{n:x}::/64" for n in range(51)), 54, "PushRoute",
        # 7 + 19 (addresses) + 7 + 19 (subnet routes) + 4 (MTU) + 4 (keepalive) + 51 * 19 (routes)
        "2001:db8:50:32::/64 does not fit in a config push (body is 1029 bytes > 1016)"),
    broken("push-search-domains-overflow-the-push-message", SERVER_V4 + tuple(
        f"PushDNS = {LONGEST_DOMAIN.replace('a', letter)}" for letter in "wxyz"), 7, "PushDNS",
        # 7 (address) + 7 (subnet route) + 4 (MTU) + 4 (keepalive) + 4 * (2 + 253) (search domains)
        f"{LONGEST_DOMAIN.replace('a', 'z')} does not fit in a config push (body is 1042 bytes > 1016)"),
    broken("push-dns-not-an-address", SERVER_V4 + ("PushDNS = 192.0.2.300",), 4, "PushDNS",
           "'192.0.2.300' is neither an IP address nor a DNS search domain"),
    broken("push-dns-unspecified", SERVER_V4 + ("PushDNS = ::",), 4, "PushDNS", ":: cannot be a DNS server"),
    broken("push-dns-twice", SERVER_V4 + ("PushDNS = 192.0.2.53", "PushDNS = 2001:db8::53, 192.0.2.53"), 5, "PushDNS",
           "192.0.2.53 is listed twice (first on line 4)"),
    broken("push-dns-nine-servers", SERVER_V4 + ("PushDNS = " + ", ".join(f"192.0.2.{n}" for n in range(1, 10)),), 4,
           "PushDNS", "more than 8 PushDNS servers; a config push carries that many"),
    broken("push-dns-nine-domains", SERVER_V4 + ("PushDNS = 192.0.2.53 " + " ".join(f"d{n}.example" for n in range(8)),
                                                 "PushDNS = d8.example"),
           5, "PushDNS", "more than 8 PushDNS search domains; a config push carries that many"),
    # -- ClientToClient, StateDirectory, PushKeepalive
    broken("client-to-client-maybe", SERVER_V4 + ("ClientToClient = maybe",), 4, "ClientToClient",
           "'maybe' is not yes or no (true/false, on/off and 1/0 work too)"),
    broken("client-to-client-empty", SERVER_V4 + ("ClientToClient =",), 4, "ClientToClient",
           "'' is not yes or no (true/false, on/off and 1/0 work too)"),
    broken("client-to-client-twice", SERVER_V4 + ("ClientToClient = yes", "ClientToClient = no"), 5, "ClientToClient",
           "repeated; already set on line 4"),
    broken("state-directory-relative", SERVER_V4 + ("StateDirectory = state/office",), 4, "StateDirectory",
           "'state/office' is not an absolute path"),
    broken("state-directory-empty", SERVER_V4 + ("StateDirectory =",), 4, "StateDirectory", "'' is not an absolute path"),
    broken("state-directory-nul", SERVER_V4 + ("StateDirectory = /var/lib/\0x",), 4, "StateDirectory",
           "a path cannot contain a NUL character"),
    broken("state-directory-default-from-bad-stem", SERVER_V4, 1, "StateDirectory",
           "the default from the file name does not work ('.'); set StateDirectory", config_name="..conf"),
    broken("push-keepalive-too-large", SERVER_V4 + ("PushKeepalive = 65536",), 4, "PushKeepalive",
           "'65536' is neither off nor 0-65535 seconds"),
    broken("push-keepalive-word", SERVER_V4 + ("PushKeepalive = often",), 4, "PushKeepalive",
           "'often' is neither off nor 0-65535 seconds"),
    # -- a server's Endpoint
    broken("server-endpoint-no-port", SERVER_V4 + ("Endpoint = vpn.example.net",), 4, "Endpoint",
           "vpn.example.net: missing :port"),
    broken("server-endpoint-bad-port", SERVER_V4 + ("Endpoint = 192.0.2.1:51820, 192.0.2.2:0",), 4, "Endpoint",
           "192.0.2.2:0: port must be 1-65535"),
    broken("server-endpoint-v6-unbracketed", SERVER_V4 + ("Endpoint = 2001:db8::1:51820",), 4, "Endpoint",
           "2001:db8::1:51820: an IPv6 address needs brackets, like [2001:db8::1]:51820"),
    broken("server-endpoint-twice", SERVER_V4 + ("Endpoint = vpn.example.net:1", "Endpoint = VPN.example.net:1"),
           5, "Endpoint", "VPN.example.net:1 is listed twice (first on line 4)"),
    broken("server-endpoint-nine", SERVER_V4 + ("Endpoint = " + " ".join(f"192.0.2.{n}:1" for n in range(1, 9)),
                                                 "Endpoint = 192.0.2.9:1"),
           5, "Endpoint", "more than 8 Endpoint entries; an invite carries that many"),
    broken("server-endpoint-on-client", INTERFACE + ("Endpoint = 192.0.2.1:51820",), 3, "Endpoint",
           "is a server setting, not for a client; a client's Endpoint goes in its [Peer]", role="client"),
    # -- client DNS
    broken("client-dns-bad-domain", INTERFACE + ("DNS = 192.0.2.53, bad_domain!",), 3, "DNS",
           "'bad_domain!' is neither an IP address nor a DNS search domain", role="client"),
    broken("client-dns-multicast", INTERFACE + ("DNS = ff02::1",), 3, "DNS", "ff02::1 cannot be a DNS server",
           role="client"),
    broken("client-dns-scoped", INTERFACE + ("DNS = fe80::53%eth0",), 3, "DNS",
           "fe80::53%eth0: scoped addresses are not supported", role="client"),
    broken("client-dns-domain-twice", INTERFACE + ("DNS = example.com", "DNS = EXAMPLE.com."), 4, "DNS",
           "EXAMPLE.com. is listed twice (first on line 3)", role="client"),
    # -- server peers and the server's own addresses
    broken("fixed-address-is-the-server", SERVER_V4 + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.1/32"),
           6, "AllowedIPs", "203.0.113.1 is the server's own address (Address on line 3)"),
    broken("fixed-ipv6-address-is-the-server", SERVER_V6 + (
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.9/32, 2001:db8:100::1"),
        6, "AllowedIPs", "2001:db8:100::1 is the server's own address (Address on line 3)"),
    broken("peer-network-covers-the-server", SERVER_V4 + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.0/25"),
           6, "AllowedIPs", "203.0.113.0/25 covers the server's own address 203.0.113.1 (Address on line 3)"),
    broken("peer-holds-the-whole-subnet", SERVER_V4 + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.0/24"),
           6, "AllowedIPs", "203.0.113.0/24 covers the server's own address 203.0.113.1 (Address on line 3)"),
    broken("peer-default-route-on-a-server", SERVER_V4 + ("Address = 2001:db8:100::1/64",
                                                          "[Peer]", "PublicKey = {pub1}", "AllowedIPs = ::/0"),
           7, "AllowedIPs", "::/0 covers the server's own address 2001:db8:100::1 (Address on line 4)"),
    broken("fixed-address-is-the-broadcast", SERVER_V4 + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.255"),
           6, "AllowedIPs", "203.0.113.255 is the broadcast address of 203.0.113.0/24, not a client address "
                            "(Address on line 3)"),
    broken("fixed-address-is-the-network", SERVER_V4 + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.0/32"),
           6, "AllowedIPs", "203.0.113.0 is the network address of 203.0.113.0/24, not a client address "
                            "(Address on line 3)"),
    # -- secrets: a key pasted where a message would quote it is shown as (redacted)
    broken("private-key-without-equals", ("[Interface]", "PrivateKey {priv}"), 2, "PrivateKey", MANGLED_PRIVATE_KEY),
    broken("private-key-with-colon", ("[Interface]", "privatekey: {priv}"), 2, "PrivateKey", MANGLED_PRIVATE_KEY),
    broken("private-key-not-base64-without-equals", ("[Interface]", "PrivateKey hunter=2"), 2, "PrivateKey",
           MANGLED_PRIVATE_KEY),
    broken("psk-without-equals", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "PresharedKey\t{psk}"), 5,
           "PresharedKey", "expected 'PresharedKey = KEY'; the rest of the line is not shown, as it may be the key"),
    broken("private-key-before-any-section", ("PrivateKey {priv}", "[Interface]"), 1, "PrivateKey",
           MANGLED_PRIVATE_KEY),
    broken("key-alone-on-a-line", INTERFACE + ("{psk}",), 3, "(redacted)", "unknown key in [Interface]"),
    broken("key-alone-in-a-peer", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "{psk}"), 5, "(redacted)",
           "unknown key in [Peer]"),
    broken("key-glued-to-a-key-name", INTERFACE + ("Colour{psk} = blue",), 3, "(redacted)",
           "unknown key in [Interface]"),
    broken("key-as-device", INTERFACE + ("Device = {psk}",), 3, "Device", "'(redacted)' is longer than 15 bytes"),
    broken("key-as-listen-port", INTERFACE + ("ListenPort = {psk}",), 3, "ListenPort",
           "'(redacted)' is not a number in 1-65535"),
    broken("key-as-endpoint", INTERFACE + ("[Peer]", "PublicKey = {pub1}", "Endpoint = {psk}"), 5, "Endpoint",
           "(redacted): missing :port"),
    broken("key-as-section", INTERFACE + ("[{psk}]",), 3, None, "unknown section [(redacted)]; expected [Interface] or [Peer]"),
]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_config_names_line_key_and_reason(case: Broken, tmp_path: Path, keys: Keys) -> None:
    ph = keys.placeholders()
    for name, (text, mode) in case.files.items():
        write(tmp_path / name, text.format(**ph), mode)
    path = write(tmp_path / case.config_name, conf(*case.lines).format(**ph), case.config_mode)
    reason = case.reason.format(dir=tmp_path, config=path, group=own_group())
    if case.line:
        expected = f"{path}:{case.line}: {case.key}: {reason}" if case.key else f"{path}:{case.line}: {reason}"
    else:
        expected = f"{path}: {reason}"

    with pytest.raises(ConfigError) as caught:
        load_config(path, role=case.role, resolve=False)

    first = getattr(caught.value, "errors", [caught.value])[0]  # a case may have a second error too
    assert str(first) == expected
    assert (first.path, first.line, first.key) == (str(path), case.line, case.key)
    assert "\n" not in str(caught.value)
    for error in getattr(caught.value, "errors", [caught.value]):
        assert_quotes_no_secret(error, ph["priv"], ph["psk"])


def assert_quotes_no_secret(error: ConfigError, *secrets: str) -> None:
    """Not the key, not the key without its '=', not even a 12-character piece of it, anywhere."""
    texts = (str(error), error.key or "", error.reason, repr(error), repr(error.args))
    for secret in secrets:
        pieces = {secret[start:start + 12] for start in range(len(secret) - 12)}
        leaked = [piece for piece in pieces for text in texts if piece in text]
        assert not leaked, f"{error} quotes {leaked} of a secret"


def _with_secret_pasted(lines: list[str], secret: str) -> Iterator[list[str]]:
    """`lines` with `secret` pasted into one line at a time, the ways a paste goes wrong."""
    for index, line in enumerate(lines):
        name, equals, _ = line.partition("=")
        pasted = [f"{line} {secret}", f"{secret} {line}", line[:len(line) // 2] + secret + line[len(line) // 2:]]
        if equals:
            pasted += [f"{name}= {secret}", f"{name}= {secret}, {secret}"]
        for replacement in pasted:
            yield [*lines[:index], replacement, *lines[index + 1:]]
        for added in (secret, f"PrivateKey {secret}", f"PresharedKey {secret}", f"[{secret}]"):
            yield [*lines[:index + 1], added, *lines[index + 1:]]


def test_no_error_quotes_a_key_pasted_into_any_broken_case(tmp_path: Path, keys: Keys) -> None:
    """Every error path BROKEN reaches, again with a fresh key pasted into each line of its file."""
    ph = keys.placeholders()
    secret = encode_key(random.Random(7).randbytes(32))
    errors = 0
    for number, param in enumerate(BROKEN):
        case: Broken = param.values[0]
        directory = tmp_path / str(number)
        directory.mkdir()
        for name, (text, mode) in case.files.items():
            write(directory / name, text.format(**ph), mode)
        lines = [line.format(**ph) for line in case.lines]
        for variant in _with_secret_pasted(lines, secret):
            try:
                parse_config(conf(*variant), str(directory / case.config_name), role=case.role, resolve=False)
            except ConfigError as exc:
                assert_quotes_no_secret(exc, secret, ph["priv"], ph["psk"])
                errors += 1
    assert errors > 5000


@pytest.mark.parametrize("lines", [
    ("[Interface]", "PrivateKey = {value}"),
    ("[Interface]", "PrivateKey = {priv}", "privatekey = {value}"),
    ("[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}", "PresharedKey = {value}"),
    ("[Interface]", "PrivateKey = {priv}", "PresharedKey = {value}"),
    ("[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}", "PrivateKey = {value}"),
    ("PresharedKey = {value}", "[Interface]"),
    ("[Interface]", "PrivateKey {value}"),
    ("[Interface]", "PrivateKey: {value}=x"),
    ("[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}", "presharedkey{value}=1"),
])
def test_no_error_quotes_the_value_of_a_secret_key_whatever_its_shape(lines: tuple[str, ...], tmp_path: Path,
                                                                      keys: Keys) -> None:
    """Not key-shaped, so not redacted as such: the value of a PrivateKey or PresharedKey line is never quoted."""
    text = conf(*lines).format(value="hunter2 correct horse", **keys.placeholders())
    with pytest.raises(ConfigError) as caught:
        parse_config(text, str(tmp_path / "wg0.conf"), role="server")
    assert_quotes_no_secret(caught.value, "hunter2 correct horse", encode_key(keys.private))
    assert not any(word in str(caught.value) for word in ("hunter", "correct", "horse"))


def test_no_error_quotes_a_key_pasted_at_random(tmp_path: Path, keys: Keys) -> None:
    """A key dropped anywhere into a valid file, amid random edits, is never quoted."""
    rng = random.Random(20261202)
    originals = [text.format(**keys.placeholders()) for text in (STOCK_SERVER, OFFICE_SERVER)]
    alphabet = "[]=#:/,. \t\n-_0123456789abcdefABCDEF+"
    path = str(tmp_path / "wg0.conf")
    errors = 0
    for _ in range(3000):
        secret = encode_key(rng.randbytes(32))
        text = list(rng.choice(originals))
        for _ in range(rng.randint(0, 3)):
            text.insert(rng.randrange(len(text)), rng.choice(alphabet))
        position = rng.randrange(len(text))
        text[position:position] = secret
        try:
            parse_config("".join(text), path, role="server", resolve=False)
        except ConfigError as exc:
            assert_quotes_no_secret(exc, secret, encode_key(keys.private), encode_key(keys.psk))
            errors += 1
    assert errors > 2000


def test_at_least_25_broken_cases() -> None:
    assert len(BROKEN) >= 25


def test_unresolvable_endpoint_names_its_line(tmp_path: Path, keys: Keys) -> None:
    """.invalid never resolves (RFC 6761), whatever the resolver or the network say."""
    path = write(tmp_path / "wg0.conf", conf(*INTERFACE, "[Peer]", "PublicKey = {pub1}",
                                             "Endpoint = tunvpn-test.invalid:51820").format(**keys.placeholders()))
    with pytest.raises(ConfigError) as caught:
        load_config(path, role="client")
    message = str(caught.value)
    assert re.fullmatch(re.escape(f"{path}:5: Endpoint: cannot resolve tunvpn-test.invalid: ") + r"\S[^\n]*", message)
    # Without resolve=True the same file loads: the name was never looked up.
    peer = load_config(path, role="client", resolve=False).peers[0]
    assert peer.endpoint == ("tunvpn-test.invalid", 51820)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.conf"
    with pytest.raises(ConfigError) as caught:
        load_config(path, role="server")
    assert str(caught.value) == f"{path}: cannot read: No such file or directory"


def test_config_that_is_not_utf8_names_the_line(tmp_path: Path, keys: Keys) -> None:
    path = tmp_path / "wg0.conf"
    path.write_bytes(conf(*INTERFACE).format(**keys.placeholders()).encode() + b"Device = tv-\xff\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as caught:
        load_config(path, role="server")
    assert str(caught.value) == f"{path}:3: not UTF-8 text"


def test_parse_config_does_not_check_the_config_mode(tmp_path: Path, keys: Keys) -> None:
    """parse_config has text, no file: inline keys are fine there; load_config is the gatekeeper."""
    path = write(tmp_path / "wg0.conf", conf(*INTERFACE).format(**keys.placeholders()), mode=0o644)
    assert parse_config(path.read_text(), str(path), role="server").interface.private_key == keys.private


def test_unknown_role_is_a_programming_error(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(ValueError, match="role"):
        parse_config(conf(*INTERFACE).format(**keys.placeholders()), str(tmp_path / "wg0.conf"), role="relay")


def test_mangled_configs_only_ever_raise_config_error(tmp_path: Path, keys: Keys) -> None:
    """Random edits of a valid file: any outcome but a ConfigError (or a Config) is a bug."""
    original = STOCK_SERVER.format(**keys.placeholders())
    alphabet = "[]=#:/,.% \t\n\r\x00\x0b\u2028\u00e9-_0123456789abcdefABCDEF+"
    path = str(tmp_path / "wg0.conf")
    rng = random.Random(20260127)
    outcomes = {"config": 0, "error": 0}
    for _ in range(3000):
        text = list(original)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(text))
            action = rng.randrange(3)
            if action == 0:
                del text[position]
            elif action == 1:
                text.insert(position, rng.choice(alphabet))
            else:
                text[position] = rng.choice(alphabet)
        try:
            result = parse_config("".join(text), path, role="server", resolve=False)
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(path) and "\n" not in message and "\r" not in message
            assert_quotes_no_secret(exc, encode_key(keys.private), encode_key(keys.psk))
            outcomes["error"] += 1
        else:
            assert isinstance(result, Config)
            outcomes["config"] += 1
    assert outcomes["error"] > 500 and outcomes["config"] > 100  # both paths were really exercised


def test_every_error_in_a_file_is_reported_in_order(tmp_path: Path, keys: Keys) -> None:
    ph = keys.placeholders()
    text = conf("[Interface]", "PrivateKey = {priv}", "ListenPort = 70000", "Table = off", "MTU = 9",
                "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.300/32",
                "[Bogus]", "Whatever = 1",
                "[Peer]", "PublicKey = {pub2}", "PersistentKeepalive = often").format(**ph)
    path = write(tmp_path / "wg0.conf", text, 0o600)
    with pytest.raises(ConfigError) as caught:
        load_config(path, role="server", resolve=False)
    found = [(error.line, error.key) for error in caught.value.errors]
    assert found == [(3, "ListenPort"), (4, "Table"), (5, "MTU"), (8, "AllowedIPs"), (9, None),
                     (13, "PersistentKeepalive")]  # line 10 belongs to the broken [Bogus]: no error of its own
    assert str(caught.value).startswith(f"{path}:3: ListenPort:") and "(and 5 more;" in str(caught.value)
    assert_quotes_no_secret(caught.value, ph["priv"])


def test_rules_across_sections_are_all_reported_once_each_section_is_sound(tmp_path: Path, keys: Keys) -> None:
    ph = keys.placeholders()
    text = conf("[Interface]", "PrivateKey = {priv}",
                "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.2/32",
                "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.2/32").format(**ph)
    path = write(tmp_path / "wg0.conf", text, 0o600)
    with pytest.raises(ConfigError) as caught:
        load_config(path, role="server", resolve=False)
    keys_blamed = [error.key for error in getattr(caught.value, "errors", [caught.value])]
    assert keys_blamed == ["PublicKey", "AllowedIPs"], keys_blamed  # the same peer twice, and its overlap


def test_metrics_keys_and_peer_names(tmp_path: Path, keys: Keys) -> None:
    ph = keys.placeholders()
    text = conf("[Interface]", "PrivateKey = {priv}", "MetricsListen = [::1]:9586",
                "MetricsFile = /var/lib/prometheus/node-exporter/tunvpn.prom",
                "[Peer]", "PublicKey = {pub1}", "Name = alice.laptop").format(**ph)
    config = load_config(write(tmp_path / "wg0.conf", text, 0o600), role="server", resolve=False)
    assert config.interface.metrics_listen == ("::1", 9586)
    assert config.interface.metrics_file == "/var/lib/prometheus/node-exporter/tunvpn.prom"
    assert config.peers[0].name == "alice.laptop"


@pytest.mark.parametrize("line, key, reason", [
    ("MetricsListen = localhost:9586", "MetricsListen", "give an IP address to listen on"),
    ("MetricsListen = 127.0.0.1", "MetricsListen", "missing :port"),
    ("MetricsFile = metrics.prom", "MetricsFile", "is not an absolute path"),
    ("MetricsFile = /var/lib/", "MetricsFile", "names a directory"),
])
def test_metrics_keys_are_checked(tmp_path: Path, keys: Keys, line: str, key: str, reason: str) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}", line).format(**keys.placeholders())
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "wg0.conf", text, 0o600), role="server", resolve=False)
    assert (caught.value.line, caught.value.key) == (3, key) and reason in caught.value.reason


@pytest.mark.parametrize("name", ["", "has space", '"quoted"', "-dash-first", "x" * 65, "ünïcode"])
def test_a_peer_name_is_a_plain_label(tmp_path: Path, keys: Keys, name: str) -> None:
    text = conf("[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}", f"Name = {name}")
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "wg0.conf", text.format(**keys.placeholders()), 0o600), role="server",
                    resolve=False)
    assert caught.value.key == "Name" and "is not a name" in caught.value.reason
