"""`tunvpn totp-secret` writes the secret the server then reads; `tunvpn login` hands a code on and
waits for the server's verdict."""

from __future__ import annotations

import io
import os
import stat

import pytest

from configfiles import conf, write
from tunvpn import login as login_module
from tunvpn.cli import main
from tunvpn.io.controlsocket import ControlSocketError, find_socket
from tunvpn.config import load_config
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.totp import decode_secret

PEER = derive_public_key(generate_private_key())


def server_config(tmp_path, totp: bool = True, mode: int = 0o600):
    text = conf("[Interface]", f"PrivateKey = {encode_key(generate_private_key())}", "Address = 203.0.113.1/24", "",
                "[Peer]", "Name = alice", f"PublicKey = {encode_key(PEER)}", *(["TOTP = yes"] if totp else []))
    return write(tmp_path / "office.conf", text, mode)


def test_totp_secret_writes_what_the_server_reads_and_prints_the_uri(tmp_path, capsys):
    config = server_config(tmp_path)
    assert main(["totp-secret", "office", "-c", str(config), "--peer", "alice"]) == 0
    out, err = capsys.readouterr()
    peer = load_config(config, "server", resolve=False).peers[0]
    assert out.startswith("otpauth://totp/tunvpn%20office:alice?secret=")
    assert decode_secret(out.split("secret=")[1].split("&")[0]) == peer.totp_secret
    assert stat.S_IMODE(os.stat(peer.totp_secret_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(peer.totp_secret_file)).st_mode) == 0o700
    assert "wrote" in err


def test_an_existing_secret_is_kept_unless_forced(tmp_path, capsys):
    config = server_config(tmp_path)
    assert main(["totp-secret", "office", "-c", str(config), "--peer", encode_key(PEER)]) == 0
    first = load_config(config, "server", resolve=False).peers[0].totp_secret
    assert main(["totp-secret", "office", "-c", str(config), "--peer", "alice"]) == 1
    assert "--force replaces it" in capsys.readouterr().err
    assert load_config(config, "server", resolve=False).peers[0].totp_secret == first
    assert main(["totp-secret", "office", "-c", str(config), "--peer", "alice", "--force"]) == 0
    assert load_config(config, "server", resolve=False).peers[0].totp_secret != first


def test_a_config_its_group_reads_gets_a_secret_that_group_reads(tmp_path):
    config = server_config(tmp_path, mode=0o640)
    assert main(["totp-secret", "office", "-c", str(config), "--peer", "alice"]) == 0
    path = load_config(config, "server", resolve=False).peers[0].totp_secret_file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


@pytest.mark.parametrize("peer, totp, message", [("bob", True, "no [Peer]"), ("alice", False, "has no TOTP = yes")])
def test_totp_secret_needs_a_totp_peer(tmp_path, capsys, peer, totp, message):
    config = server_config(tmp_path, totp=totp)
    assert main(["totp-secret", "office", "-c", str(config), "--peer", peer]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "office.totp").exists()


class FakeClient:
    """A client daemon's control socket: the login request, then `polls` statuses before the answer."""

    def __init__(self, verdict: dict, polls: int = 2) -> None:
        self.verdict = verdict
        self.polls = polls
        self.requests: list[dict] = []

    def query(self, path, request, timeout=5.0):
        self.requests.append(request)
        if request["command"] == "login":
            return {"attempt": 3}
        self.polls -= 1
        return {"second_factor": self.verdict if self.polls < 0 else {"state": "checking", "answered": 2}}


@pytest.mark.parametrize("state, code", [("authorized", 0), ("refused", 1), ("rate_limited", 1)])
def test_login_sends_the_code_and_waits_for_its_answer(monkeypatch, capsys, state, code):
    fake = FakeClient({"state": state, "answered": 3, "until": 1_700_000_000, "retry_after": 20})
    monkeypatch.setattr(login_module, "query", fake.query)
    monkeypatch.setattr(login_module, "POLL_INTERVAL", 0.0)
    monkeypatch.setattr("sys.stdin", io.StringIO("123456\n"))
    assert main(["login", "--control-socket", "/run/x.sock"]) == code
    assert fake.requests[0] == {"command": "login", "code": "123456"}
    out, err = capsys.readouterr()
    assert ("second factor accepted; authorized until" in out) == (state == "authorized")
    assert ("20 s" in err) == (state == "rate_limited")


def test_login_without_an_answer_says_so(monkeypatch, capsys):
    fake = FakeClient({}, polls=10**9)
    monkeypatch.setattr(login_module, "query", fake.query)
    monkeypatch.setattr(login_module, "ANSWER_TIMEOUT", 0.05)
    assert main(["login", "--control-socket", "/run/x.sock", "--code", "123456"]) == 2
    assert "no answer from the server" in capsys.readouterr().err


def test_login_and_invite_find_the_only_daemon_or_ask_for_a_name(tmp_path):
    for what in ("client", "server"):
        with pytest.raises(ControlSocketError, match=f"name the {what}: no tunvpn daemon"):
            find_socket(None, None, what, str(tmp_path))
    (tmp_path / "office.sock").touch()
    assert find_socket(None, None, "client", str(tmp_path)) == str(tmp_path / "office.sock")
    assert find_socket("home", None, "client", str(tmp_path)) == str(tmp_path / "home.sock")
    assert find_socket("home", "/x.sock", "client", str(tmp_path)) == "/x.sock"
    with pytest.raises(ControlSocketError, match="invalid NAME"):
        find_socket("../etc", None, "server", str(tmp_path))
    (tmp_path / "home.sock").touch()
    with pytest.raises(ControlSocketError, match="2 daemons"):
        find_socket(None, None, "server", str(tmp_path))
