"""`tunvpn show`: wg-like text from a status document, and the command against real control sockets."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from test_controlsocket import serving, stale_socket
from tunvpn.show import (
    DEFAULT_RUN_DIR,
    format_bytes,
    format_handshake,
    format_status,
    register_show_parser,
    run_show,
    sorted_peers,
)

NOW = 1_790_000_000
SERVER_KEY = "SSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSSA="
ALICE = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
BOB = "BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBA="
CAROL = "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCA="


def peer(key: str, **fields: object) -> dict:
    document = {"public_key": key, "endpoint": None, "allowed_ips": [], "address": None, "addresses": [],
                "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0,
                "persistent_keepalive": None, "tunvpn": False, "dropped": {}}
    document.update(fields)
    return document


def server_status() -> dict:
    return {
        "interface": "tv-office", "name": "office", "role": "server", "public_key": SERVER_KEY,
        "listen_port": 51820, "addresses": ["203.0.113.1/24", "2001:db8:100::1/64"], "mtu": 1420,
        "client_to_client": False, "pushed": None, "dropped": {"no_route": 2, "bad_mac1": 7},
        "peers": [
            peer(BOB, allowed_ips=["203.0.113.9/32"], address="203.0.113.9", addresses=["203.0.113.9"],
                 persistent_keepalive=None),
            peer(ALICE, endpoint="192.0.2.2:40000", allowed_ips=["203.0.113.2/32", "2001:db8:100::2/128"],
                 address="203.0.113.2", addresses=["203.0.113.2", "2001:db8:100::2"],
                 latest_handshake=NOW - 65, rx_bytes=1536, tx_bytes=5 * 2**20 + 2**19, tunvpn=True,
                 persistent_keepalive=25, dropped={"not_allowed_source": 3}),
            peer(CAROL, endpoint="[2001:db8::3]:51000", allowed_ips=["203.0.113.3/32"], address="203.0.113.3",
                 addresses=["203.0.113.3"], latest_handshake=NOW - 7, rx_bytes=100, tx_bytes=92),
        ],
    }


SERVER_TEXT = f"""\
interface: tv-office
  role: server (config office)
  public key: {SERVER_KEY}
  listening port: 51820
  addresses: 203.0.113.1/24, 2001:db8:100::1/64
  mtu: 1420
  client-to-client: no
  dropped: bad_mac1 7, no_route 2

peer: {CAROL}
  endpoint: [2001:db8::3]:51000
  allowed ips: 203.0.113.3/32
  address: 203.0.113.3
  latest handshake: 7 seconds ago
  transfer: 100 B received, 92 B sent
  control extension: not seen

peer: {ALICE}
  endpoint: 192.0.2.2:40000
  allowed ips: 203.0.113.2/32, 2001:db8:100::2/128
  addresses: 203.0.113.2, 2001:db8:100::2
  latest handshake: 1 minute, 5 seconds ago
  transfer: 1.50 KiB received, 5.50 MiB sent
  persistent keepalive: every 25 seconds
  control extension: yes
  dropped: not_allowed_source 3

peer: {BOB}
  allowed ips: 203.0.113.9/32
  address: 203.0.113.9
  latest handshake: never
  transfer: 0 B received, 0 B sent
  control extension: not seen
"""


def client_status(pushed: dict | None) -> dict:
    return {
        "interface": "tv-home", "name": "home", "role": "client", "public_key": ALICE, "listen_port": 40000,
        "addresses": ["203.0.113.2/24"], "mtu": 1420, "client_to_client": None, "pushed": pushed, "dropped": {},
        "peers": [peer(SERVER_KEY, endpoint="192.0.2.1:51820", allowed_ips=["203.0.113.0/24", "198.51.100.0/24"],
                       latest_handshake=NOW - 3600 * 2 - 1, rx_bytes=3 * 2**30, tx_bytes=2**40, tunvpn=True)],
    }


# --- text ---------------------------------------------------------------------------------------


def test_server_text_like_wg_show() -> None:
    assert format_status(server_status(), now=NOW) == SERVER_TEXT


def test_client_with_pushed_config() -> None:
    pushed = {"from_server": True, "addresses": ["203.0.113.2/24"], "routes": ["203.0.113.0/24", "198.51.100.0/24"],
              "dns": ["198.51.100.53"], "mtu": 1380, "keepalive": 25}
    text = format_status(client_status(pushed), now=NOW)
    assert ("  config: pushed by the server (addresses 203.0.113.2/24, routes 203.0.113.0/24, 198.51.100.0/24, "
            "dns 198.51.100.53, mtu 1380, keepalive every 25 seconds)\n") in text
    assert "client-to-client" not in text
    assert "  role: client (config home)\n" in text
    assert "  latest handshake: 2 hours, 1 second ago\n" in text
    assert "  transfer: 3.00 GiB received, 1.00 TiB sent\n" in text
    assert "dropped" not in text


def test_client_without_push() -> None:
    text = format_status(client_status(None), now=NOW)
    assert "  config: local (no push received)\n" in text
    pushed_nothing = {"from_server": True, "addresses": ["203.0.113.2/24"], "routes": [], "dns": []}
    assert "(addresses 203.0.113.2/24, routes (none), dns (none))" in format_status(client_status(pushed_nothing),
                                                                                  now=NOW)


def test_minimal_document_still_prints() -> None:
    """The issue's minimum: interface, public_key, listen_port, peers with the counters."""
    text = format_status({"interface": "tv-x", "public_key": SERVER_KEY, "listen_port": 1,
                          "peers": [{"public_key": ALICE, "endpoint": None, "allowed_ips": [], "address": None,
                                     "latest_handshake": None, "rx_bytes": 0, "tx_bytes": 0}]}, now=NOW)
    assert text.startswith("interface: tv-x\n")
    assert f"peer: {ALICE}\n  allowed ips: (none)\n  latest handshake: never\n" in text


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (1536, "1.50 KiB"), (2**20 - 1, "1024.00 KiB"),
     (2**20, "1.00 MiB"), (3 * 2**30 + 2**29, "3.50 GiB"), (2**40, "1.00 TiB"), (2**50, "1024.00 TiB")],
)
def test_bytes_in_wg_units(count: int, expected: str) -> None:
    assert format_bytes(count) == expected


@pytest.mark.parametrize(
    ("age", "expected"),
    [(None, "never"), (0, "now"), (1, "1 second ago"), (59, "59 seconds ago"), (60, "1 minute ago"),
     (65, "1 minute, 5 seconds ago"), (125, "2 minutes, 5 seconds ago"), (3600, "1 hour ago"),
     (86400 + 3661, "1 day, 1 hour, 1 minute, 1 second ago"), (-30, "in the future (has the clock been set back?)")],
)
def test_handshake_age(age: int | None, expected: str) -> None:
    latest = None if age is None else NOW - age
    assert format_handshake(latest, NOW + 0.9) == expected  # fractions of a second do not count


def test_peers_in_wg_order() -> None:
    peers = [peer("never-1"), peer("old", latest_handshake=100), peer("never-2"), peer("newest", latest_handshake=300),
             peer("middle", latest_handshake=200)]
    assert [p["public_key"] for p in sorted_peers(peers)] == ["newest", "middle", "old", "never-1", "never-2"]


# --- the command against real control sockets ---------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tunvpn")
    register_show_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["show", *argv])


def status_handler(status: dict):
    def handler(request: dict) -> dict:
        assert request == {"command": "show"}
        return status
    return handler


def test_parser() -> None:
    args = parse("office", "--json")
    assert (args.name, args.control_socket, args.json, args.func) == ("office", None, True, run_show)
    args = parse("--control-socket", "/tmp/x.sock")
    assert (args.name, args.control_socket, args.json) == (None, "/tmp/x.sock", False)
    assert DEFAULT_RUN_DIR == "/run/tunvpn"


def test_show_by_name_prints_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(tmp_path / "office.sock", status_handler(server_status())):
        assert run_show(parse("office"), run_dir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.startswith("interface: tv-office\n")
    assert f"peer: {ALICE}\n" in out and "  transfer: 1.50 KiB received, 5.50 MiB sent\n" in out


def test_show_json_by_socket_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "elsewhere.sock"
    with serving(path, status_handler(server_status())):
        assert run_show(parse("--control-socket", str(path), "--json")) == 0
    assert json.loads(capsys.readouterr().out) == server_status()


def test_show_every_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = client_status(None)
    with serving(tmp_path / "office.sock", status_handler(server_status())), \
            serving(tmp_path / "home.sock", status_handler(home)):
        (tmp_path / "notes.txt").write_text("not a socket name")
        assert run_show(parse("--json"), run_dir=str(tmp_path)) == 0
        assert json.loads(capsys.readouterr().out) == [home, server_status()]  # sorted by name
        assert run_show(parse(), run_dir=str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert out.index("interface: tv-home\n") < out.index("\n\ninterface: tv-office\n")


def test_show_every_daemon_with_one_dead(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale_socket(tmp_path / "crashed.sock")
    with serving(tmp_path / "office.sock", status_handler(server_status())):
        assert run_show(parse("--json"), run_dir=str(tmp_path)) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == [server_status()]
    assert captured.err == f"tunvpn show: no daemon is running on {tmp_path / 'crashed.sock'}\n"


def test_show_single_daemon_with_one_element_list_only_when_discovering(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(tmp_path / "office.sock", status_handler(server_status())):
        assert run_show(parse("--json"), run_dir=str(tmp_path)) == 0
        assert json.loads(capsys.readouterr().out) == [server_status()]
        assert run_show(parse("office", "--json"), run_dir=str(tmp_path)) == 0
        assert json.loads(capsys.readouterr().out) == server_status()


def test_named_daemon_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_show(parse("office"), run_dir=str(tmp_path)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"tunvpn show: no daemon is running on {tmp_path / 'office.sock'}\n"


@pytest.mark.parametrize("run_dir_exists", [True, False])
def test_no_daemon_at_all(tmp_path: Path, capsys: pytest.CaptureFixture[str], run_dir_exists: bool) -> None:
    run_dir = tmp_path / "run"
    if run_dir_exists:
        run_dir.mkdir()
    assert run_show(parse("--json"), run_dir=str(run_dir)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"tunvpn show: no tunvpn daemon is running (no control socket in {run_dir})\n"


def test_daemon_error_answer_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(request: dict) -> dict:
        raise KeyError("peers")

    with serving(tmp_path / "office.sock", broken):
        assert run_show(parse("office"), run_dir=str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("tunvpn show: the daemon on ") and "KeyError" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [(("office", "--control-socket", "/tmp/x.sock"), "give NAME or --control-socket, not both"),
     (("../etc/passwd",), "invalid NAME"), ((".hidden",), "invalid NAME"), (("",), "invalid NAME")],
)
def test_usage_errors(argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_show(parse(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunvpn show: ") and message in err and err.count("\n") == 1


def test_refused_settings_and_internal_errors_are_shown() -> None:
    status = client_status(None) | {
        "refused": {"pushed address 2001:db8:100::2/64": "cannot add address ...: Permission denied (EACCES)"},
        "internal_errors": {"the EndpointChanged handler: ValueError": 2},
    }
    text = format_status(status, now=NOW)
    assert ("  refused by the kernel: pushed address 2001:db8:100::2/64: cannot add address ...: "
            "Permission denied (EACCES)\n") in text
    assert "  internal errors (see the log): the EndpointChanged handler: ValueError 2\n" in text
    assert "refused" not in format_status(client_status(None) | {"refused": {}, "internal_errors": {}}, now=NOW)


def test_a_named_peer_shows_its_name() -> None:
    status = {"interface": "tv-x", "public_key": SERVER_KEY, "peers": [
        {"public_key": ALICE, "name": "alice-laptop", "allowed_ips": [], "latest_handshake": None}]}
    assert f"peer: {ALICE}\n  name: alice-laptop\n" in format_status(status, now=NOW)


def test_invites_and_enrolled_peers_are_shown():
    now = time.time()
    invite = {"name": "laptop", "uses": 2, "uses_left": 1, "expires": now + 7200 + 30}
    text = format_status({"role": "server", "interface": "tv-office", "enrolled": ["phone", "laptop"],
                          "invites": [invite], "peers": [{"public_key": "K", "invite": invite}]}, now=now)
    assert "  enrolled peers: phone, laptop\n" in text
    assert "  open invites: laptop (1 of 2 use(s) left, expires in 2 hours" in text
    assert "  invite: laptop (1 of 2 use(s) left, expires in 2 hours" in text and "(may only enroll)" in text
