"""Server and client decisions that need no tun or socket: leases, reloads, pushes.

Server() and Client() build their protocol device, pool and state without touching the system
until run(); the few I/O objects a reload or a push uses (the netlink setup, the tun's name)
are replaced by recorders here.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import types
from contextlib import ExitStack
from pathlib import Path

import pytest


from tunvpn import client as client_module
from tunvpn import daemon as daemon_module
from tunvpn.client import Client
from tunvpn.config import parse_config
from tunvpn.daemon import Options
from tunvpn.io.netlink import NetlinkError
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.protocol import control
from tunvpn.protocol.device import ControlReceived
from tunvpn.server import Server
from tunvpn.state import StateStore

SERVER_KEY = generate_private_key()
PEERS = {name: generate_private_key() for name in "abcdefg"}
PUB = {name: derive_public_key(key) for name, key in PEERS.items()}


class RecordingLink:
    """Stands in for io.netlink.LinkSetup: remembers what the daemon asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str):
        def record(*args, **kwargs):
            self.calls.append((name, " ".join(map(str, args))))
            return True
        return record


def server_text(peers: str, extra: str = "", address: str = "203.0.113.1/29, 2001:db8:100::1/64") -> str:
    text = (f"[Interface]\nPrivateKey = {encode_key(SERVER_KEY)}\nAddress = {address}\n{extra}\n")
    for name in peers:
        text += f"\n[Peer]\nPublicKey = {encode_key(PUB[name])}\n"
    return text


def make_server(tmp_path: Path, text: str) -> Server:
    path = tmp_path / "office.conf"
    path.write_text(text)
    path.chmod(0o600)
    server = Server(parse_config(text, str(path), role="server", resolve=False),
                    Options(state_dir=tmp_path / "state"))
    server.link = RecordingLink()
    return server


def ask(server: Server, name: str, now: float = 0.0, held: tuple[str, ...] = ()) -> control.ConfigPush | control.ConfigRefused:
    """A client's config request (naming the addresses it `held`), answered; returns the server's answer."""
    sent = []
    server.device.send_to_peer = lambda key, payloads, when: sent.extend(payloads)
    request = control.ConfigRequest(7, [ipaddress.ip_interface(a) for a in held])
    server.handle_event(ControlReceived(PUB[name], control.encode(request)), now)
    del server.device.send_to_peer
    return control.decode(sent[0])


def v4(push: control.ConfigPush) -> str:
    return next(str(a.ip) for a in push.addresses if a.version == 4)


def reload(server: Server, text: str) -> None:
    Path(server.config.path).write_text(text)
    server.loop = types.SimpleNamespace(flush=lambda: None)
    server.reload()


def test_leases_are_stable_and_distinct_and_survive_a_restart(tmp_path):
    server = make_server(tmp_path, server_text("abc"))
    first = {name: v4(ask(server, name, now=float(i))) for i, name in enumerate("abc")}
    assert len(set(first.values())) == 3
    assert ask(server, "a", now=10.0) == ask(server, "a", now=20.0)  # idempotent
    server._save()
    again = make_server(tmp_path, server_text("abc"))
    assert {name: v4(ask(again, name, now=float(i))) for i, name in enumerate("abc")} == first


def test_after_a_lost_state_file_each_client_gets_back_the_address_it_holds_whoever_asks_first(tmp_path):
    server = make_server(tmp_path, server_text("abc"))
    assert v4(ask(server, "b", held=("203.0.113.3/29", "2001:db8:100::3/64"))) == "203.0.113.3"
    assert v4(ask(server, "a", now=1.0, held=("203.0.113.2/29",))) == "203.0.113.2"
    assert v4(ask(server, "c", now=2.0, held=("203.0.113.2/29",))) == "203.0.113.4"  # a's: taken, so the lowest free
    assert v4(ask(server, "b", now=3.0, held=("203.0.113.6/29",))) == "203.0.113.3"  # a lease here wins over a claim
    assert v4(ask(server, "b", now=4.0)) == "203.0.113.3"


def test_a_failed_state_save_is_retried_until_it_works_and_said_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, "tunvpn")
    server = make_server(tmp_path, server_text("a"))
    real_save, failures = server.store.save, []

    def disk_full(state):
        if len(failures) < 3:
            failures.append(state)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state)

    server.store.save = disk_full
    v4(ask(server, "a"))
    for _ in range(4):  # the loop runs tick at each deadline tick returns
        server.tick(server._save_at)
    assert len(failures) == 3 and server._save_at is None
    assert PUB["a"] in StateStore(tmp_path / "state").load().leases
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot save state" in m for m in messages) == 1 and any("saved state" in m for m in messages)


def test_a_full_pool_takes_back_the_address_of_a_removed_peer(tmp_path):
    """/29: five addresses for clients. Peer a leaves the config; the sixth newcomer gets its address."""
    server = make_server(tmp_path, server_text("abcde"))
    leased = {name: v4(ask(server, name, now=float(i))) for i, name in enumerate("abcde")}
    reload(server, server_text("bcdef"))
    assert v4(ask(server, "f", now=10.0)) == leased["a"]
    assert PUB["a"] not in server.pool.leases()
    reload(server, server_text("bcdefg"))
    refused = ask(server, "g", now=11.0)
    assert isinstance(refused, control.ConfigRefused) and "exhausted" in refused.reason


def test_a_removed_peer_added_back_keeps_its_address_while_the_pool_has_room(tmp_path):
    server = make_server(tmp_path, server_text("ab"))
    address = v4(ask(server, "a"))
    reload(server, server_text("b"))
    reload(server, server_text("ab"))
    assert v4(ask(server, "a", now=5.0)) == address


def test_a_fixed_ipv4_address_frees_the_pool_ipv4_lease_and_keeps_the_ipv6_one(tmp_path):
    server = make_server(tmp_path, server_text("a"))
    push = ask(server, "a")
    leased_v6 = next(a for a in push.addresses if a.version == 6)
    fixed = server_text("a").replace(f"PublicKey = {encode_key(PUB['a'])}\n",
                                     f"PublicKey = {encode_key(PUB['a'])}\nAllowedIPs = 203.0.113.6/32\n")
    reload(server, fixed)
    lease = server.pool.leases()[PUB["a"]]
    assert lease.ipv4 is None and lease.ipv6 == leased_v6
    again = ask(server, "a", now=5.0)
    assert [str(a) for a in again.addresses] == ["203.0.113.6/29", str(leased_v6)]
    allowed = {str(n) for n in server.device.allowed_ips_of(PUB["a"])}
    assert allowed == {"203.0.113.6/32", f"{leased_v6.ip}/128"}


def test_reload_routes_for_added_and_removed_sites_and_repushes_changed_settings(tmp_path):
    site = "AllowedIPs = 198.51.100.0/25\n"
    text = server_text("ab").replace(f"PublicKey = {encode_key(PUB['b'])}\n", f"PublicKey = {encode_key(PUB['b'])}\n{site}")
    server = make_server(tmp_path, text)
    server.configure_link()  # as at start-up: the site's route goes in
    assert ("add_route", "198.51.100.0/25") in server.link.calls
    ask(server, "a")
    pushed = []
    server.device.send_to_peer = lambda key, payloads, now: pushed.append((key, control.decode(payloads[0])))
    reload(server, server_text("a", extra="PushRoute = 198.51.100.128/25"))
    assert ("remove_route", "198.51.100.0/25") in server.link.calls
    assert [key for key, _ in pushed] == [PUB["a"]]
    assert ipaddress.ip_network("198.51.100.128/25") in pushed[0][1].routes


def test_reload_keeps_the_running_mtu_and_refuses_a_new_address(tmp_path, caplog):
    server = make_server(tmp_path, server_text("a"))
    reload(server, server_text("ab", extra="MTU = 1380"))
    assert server.config.interface.mtu == 1420
    assert "MTU changed; that needs a restart" in caplog.text
    assert server.device.has_peer(PUB["b"])  # the rest of the file applies
    reload(server, server_text("abc", address="203.0.113.1/28"))
    assert "reload refused: Address changed" in caplog.text
    assert not server.device.has_peer(PUB["c"]) and str(server.config.interface.addresses[0]) == "203.0.113.1/29"


def test_a_client_moved_by_a_reload_is_told_at_once(tmp_path):
    server = make_server(tmp_path, server_text("ab", extra="Pool = 203.0.113.2-203.0.113.3"))
    ask(server, "a")
    ask(server, "b", now=1.0)
    pushed = []
    server.device.send_to_peer = lambda key, payloads, now: pushed.append((key, control.decode(payloads[0])))
    moved = server_text("ab", extra="Pool = 203.0.113.2-203.0.113.3").replace(
        f"PublicKey = {encode_key(PUB['b'])}\n", f"PublicKey = {encode_key(PUB['b'])}\nAllowedIPs = 203.0.113.6/32\n")
    reload(server, moved)
    assert [key for key, _ in pushed] == [PUB["b"]]  # a keeps its address: nothing to tell it
    assert v4(pushed[0][1]) == "203.0.113.6" and pushed[0][1].request_id == 0


# --- client -------------------------------------------------------------------------------------

def make_client(monkeypatch, local: str = "", peer_extra: str = "") -> Client:
    text = (f"[Interface]\nPrivateKey = {encode_key(PEERS['a'])}\n{local}\n"
            f"[Peer]\nPublicKey = {encode_key(derive_public_key(SERVER_KEY))}\nEndpoint = 192.0.2.1:51820\n{peer_extra}")
    client = Client(parse_config(text, "/etc/tunvpn/office.conf", role="client", resolve=False), Options())
    client.link = RecordingLink()
    client.tun = types.SimpleNamespace(name="tv-office")
    client.udp = types.SimpleNamespace(set_fwmark=lambda mark: None)
    client.cleanup = ExitStack()
    applied = []

    class FakeDns:
        def __init__(self, ifname):
            self.ifname = ifname

        def apply(self, servers, search, exclusive=False):
            applied.append(("apply", tuple(servers), tuple(search)))
            return "recorded"

        def revert(self):
            applied.append(("revert",))

    monkeypatch.setattr(client_module, "DnsManager", FakeDns)
    client.dns_calls = applied
    return client


def push(routes: list[str], dns: list[str] = (), addresses=("203.0.113.2/24", "2001:db8:100::2/64"), keepalive=25):
    return control.ConfigPush(1, addresses=[ipaddress.ip_interface(a) for a in addresses],
                              routes=[ipaddress.ip_network(r) for r in routes],
                              dns=[ipaddress.ip_address(d) for d in dns], mtu=1420, keepalive=keepalive)


def test_a_changed_push_takes_back_what_it_no_longer_has(monkeypatch):
    client = make_client(monkeypatch)
    client._apply_push(push(["203.0.113.0/24", "198.51.100.0/24"], dns=["198.51.100.53"]))
    client.link.calls.clear()
    client._apply_push(push(["203.0.113.0/24", "198.51.100.128/25"], dns=["198.51.100.54"],
                            addresses=("203.0.113.2/24",)))
    assert ("remove_route", "198.51.100.0/24") in client.link.calls
    assert ("add_route", "198.51.100.128/25") in client.link.calls
    assert ("remove_address", "2001:db8:100::2/64") in client.link.calls
    assert client.dns_calls == [("apply", ("198.51.100.53",), ()), ("apply", ("198.51.100.54",), ())]  # apply replaces
    allowed = {str(n) for n in client.device.allowed_ips_of(client.server.public_key)}
    assert allowed == {"203.0.113.0/24", "198.51.100.128/25"}


def test_a_late_answer_to_an_older_request_is_ignored(monkeypatch):
    client = make_client(monkeypatch)
    client._request_id = 3

    def answer(request_id: int) -> ControlReceived:
        message = control.ConfigPush(request_id, addresses=[ipaddress.ip_interface("203.0.113.2/24")],
                                     routes=[ipaddress.ip_network("203.0.113.0/24")])
        return ControlReceived(client.server.public_key, control.encode(message))

    client.handle_event(answer(2), now=0.0)
    assert client.pushed is None
    assert client.device.peer_stats(client.server.public_key).dropped["stale_config_push"] == 1
    client.handle_event(answer(3), now=0.0)
    assert client.pushed is not None
    client.handle_event(answer(0), now=0.0)  # unasked pushes (after a server reload) always apply
    assert client.mode == "pushed"


def test_local_settings_win_over_the_push(monkeypatch):
    client = make_client(monkeypatch, local="Address = 203.0.113.9/24\nDNS = 198.51.100.1\nMTU = 1300",
                         peer_extra="AllowedIPs = 198.51.100.0/24\nPersistentKeepalive = 5\n")
    client._apply_push(push(["203.0.113.0/24", "198.51.100.0/24"], dns=["198.51.100.53"]))
    assert ("add_address", "203.0.113.2/24") not in client.link.calls  # IPv4 is configured locally
    assert ("add_address", "2001:db8:100::2/64") in client.link.calls  # IPv6 was left open
    assert client.dns_calls == []  # the local DNS line stays
    assert client.device.mtu == 1300 and not any(call[0] == "set_mtu" for call in client.link.calls)
    assert client.device.peer_stats(client.server.public_key).persistent_keepalive == 5
    client._apply_push(push(["203.0.113.0/24"]))
    assert ("remove_route", "198.51.100.0/24") not in client.link.calls  # the config still wants it


def test_pushed_keepalive_survives_a_reload_of_the_server_peer(monkeypatch, tmp_path):
    client = make_client(monkeypatch)
    client._apply_push(push(["203.0.113.0/24"], keepalive=25))
    path = tmp_path / "office.conf"
    text = (f"[Interface]\nPrivateKey = {encode_key(PEERS['a'])}\n\n[Peer]\n"
            f"PublicKey = {encode_key(derive_public_key(SERVER_KEY))}\nEndpoint = 192.0.2.1:51820\n"
            f"AllowedIPs = 198.51.100.0/24\n")
    path.write_text(text)
    path.chmod(0o600)
    client.config = parse_config(text, str(path), role="client", resolve=False)
    client.loop = types.SimpleNamespace(flush=lambda: None)
    client.apply_reload(parse_config(text.replace("198.51.100.0/24", "198.51.100.0/25"), str(path),
                                     role="client", resolve=False), now=0.0)
    peer = client.device.peer_stats(client.server.public_key)
    assert peer.persistent_keepalive == 25
    assert {str(n) for n in client.device.allowed_ips_of(peer.public_key)} == {"198.51.100.0/25", "203.0.113.0/24"}


def test_goodbyes_from_one_peer_are_logged_a_few_times_then_summed_up(tmp_path, caplog):
    """A client may say goodbye in every packet of a session (128 seen): the log keeps a few."""
    server = make_server(tmp_path, server_text("a"))
    goodbye = ControlReceived(PUB["a"], control.encode(control.Goodbye("bye")))
    with caplog.at_level(logging.INFO, logger="tunvpn"):
        for step in range(128):
            server.handle_event(goodbye, now=step / 100)
        assert caplog.text.count("said goodbye") == server.peer_log.burst
        server.handle_event(goodbye, now=server.peer_log.window + 1.0)
    assert f"{128 - server.peer_log.burst} more goodbye line(s) held back" in caplog.text
    assert caplog.text.count("said goodbye") == server.peer_log.burst + 1


def test_a_reload_applies_without_the_routes_the_kernel_refuses(tmp_path, caplog):
    server = make_server(tmp_path, server_text("a"))
    server.configure_link()

    def add_route(network, metric=None):
        raise NetlinkError(f"cannot add route {network} via tv-office: File exists (EEXIST)") from OSError(
            errno.EEXIST, "File exists")

    server.link.add_route = add_route
    site = f"\n[Peer]\nPublicKey = {encode_key(PUB['b'])}\nAllowedIPs = 198.51.100.0/25\n"
    with caplog.at_level(logging.INFO, logger="tunvpn"):
        reload(server, server_text("a") + site)
    assert server.device.has_peer(PUB["b"])
    assert list(server.refused) == ["route 198.51.100.0/25"]
    assert "another device already routes 198.51.100.0/25" in server.refused["route 198.51.100.0/25"]
    assert "not in force, refused by the kernel: route 198.51.100.0/25" in caplog.text
    assert "refused by the kernel" in server.summary()
    reload(server, server_text("a"))  # the site goes again: so does its refusal
    assert server.refused == {}


def test_status_lines_are_coalesced_to_one_a_second(tmp_path, monkeypatch):
    """Thousands of rekeys must not each walk every peer for systemd's STATUS=."""
    server = make_server(tmp_path, server_text("ab"))
    sent = []
    server.notifier = types.SimpleNamespace(status=sent.append, watchdog=lambda: None)
    clock = [1000.0]
    monkeypatch.setattr(daemon_module.time, "monotonic", lambda: clock[0])
    for _ in range(100):
        server.status_changed()
    server._on_tick(clock[0])  # due now: one line for all hundred changes
    assert sent == ["0 of 2 peers connected"]
    server.status_changed()
    clock[0] += 0.3
    deadline = server._on_tick(clock[0])
    assert len(sent) == 1 and deadline == pytest.approx(1001.0)  # not before a second has passed
    clock[0] = 1001.0
    server._on_tick(clock[0])
    assert len(sent) == 2
    server._on_tick(1005.0)
    assert len(sent) == 2  # nothing new to say


def test_rate_limits_and_access_come_from_the_peer_or_the_defaults_and_follow_reloads(tmp_path):
    own = f"PublicKey = {encode_key(PUB['b'])}\nRateLimit = 5mbit\nAccess = 198.51.100.0/25\n"
    off = f"PublicKey = {encode_key(PUB['c'])}\nRateLimit = off\n"
    text = (server_text("abc", extra="DefaultRateLimit = 20mbit\nDefaultAccess = 198.51.100.128/25")
            .replace(f"PublicKey = {encode_key(PUB['b'])}\n", own).replace(f"PublicKey = {encode_key(PUB['c'])}\n", off))
    server = make_server(tmp_path, text)

    def policy(name):
        stats = server.device.peer_stats(PUB[name])
        return stats.rate_limit, None if stats.access is None else [str(net) for net in stats.access]

    assert policy("a") == (20_000_000, ["198.51.100.128/25"])
    assert policy("b") == (5_000_000, ["198.51.100.0/25"])
    assert policy("c") == (None, ["198.51.100.128/25"])
    reload(server, text.replace("DefaultRateLimit = 20mbit", "DefaultRateLimit = 30mbit"))
    assert policy("a") == (30_000_000, ["198.51.100.128/25"]) and policy("b")[0] == 5_000_000
