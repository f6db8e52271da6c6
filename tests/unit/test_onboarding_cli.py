"""`tunvpn join` and `tunvpn invite` without a server: what they refuse before anything is spent,
and the files and text they produce."""

from __future__ import annotations

import os
import time

import pytest

from tunvpn.cli import main
from tunvpn.config import parse_config
from tunvpn.invite import wg_quick_config
from tunvpn.invitetoken import InviteToken, decode_token, encode_token
from tunvpn.join import client_config
from tunvpn.keys import derive_public_key, encode_key, generate_preshared_key, generate_private_key

SERVER = derive_public_key(generate_private_key())


def token(expires: float | None = None) -> str:
    return encode_token(InviteToken(SERVER, generate_private_key(), generate_preshared_key(),
                                    int(expires or time.time() + 3600), "office", ("192.0.2.1:51820",)))


def test_a_damaged_token_is_refused_with_what_is_wrong(tmp_path, capsys):
    assert main(["join", token()[:-10], "--config-dir", str(tmp_path)]) == 2
    assert "the invite is truncated" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_an_expired_token_is_refused_locally(tmp_path, capsys):
    assert main(["join", token(time.time() - 1), "--config-dir", str(tmp_path)]) == 1
    assert "expired" in capsys.readouterr().err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["two words", "office\nPostUp = evil", ".hidden", "a/b", "_x"])
def test_a_name_that_is_no_config_name_is_refused_before_the_invite_is_spent(name, tmp_path, capsys):
    assert main(["join", token(), "--name", name, "--config-dir", str(tmp_path), "--timeout", "0.1"]) == 2
    assert "invalid --name" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_an_existing_config_is_kept_without_force(tmp_path, capsys):
    (tmp_path / "office.conf").write_text("mine\n")
    assert main(["join", token(), "--config-dir", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "office.conf").read_text() == "mine\n"


def test_a_directory_it_cannot_write_is_found_before_the_invite_is_spent(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tunvpn.join.os.access", lambda path, mode: False)  # root may write anywhere here
    assert main(["join", token(), "--config-dir", str(tmp_path)]) == 2
    assert "cannot write" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_the_joined_config_is_a_client_config_pointing_at_its_key_files(tmp_path):
    own, psk = generate_private_key(), generate_preshared_key()
    for suffix, key in (("key", own), ("psk", psk)):
        path = tmp_path / f"office.{suffix}"
        path.write_text(encode_key(key) + "\n")
        os.chmod(path, 0o600)
    parsed = InviteToken(SERVER, generate_private_key(), generate_preshared_key(), 0, "office",
                         ("192.0.2.1:51820", "[2001:db8::1]:51820"))
    config = parse_config(client_config(parsed, "office", "laptop"), str(tmp_path / "office.conf"),
                          role="client", resolve=False)
    assert config.interface.private_key == own
    [server] = config.peers
    assert (server.public_key, server.preshared_key, server.endpoint) == (SERVER, psk, ("192.0.2.1", 51820))


def test_the_stock_config_is_what_wg_quick_reads():
    private, psk = generate_private_key(), generate_preshared_key()
    answer = {"public_key": encode_key(SERVER), "addresses": ["203.0.113.2/32"], "routes": ["203.0.113.0/24"],
              "dns": ["198.51.100.53"], "mtu": 1420, "keepalive": 25}
    text = wg_quick_config(answer, private, psk, "vpn.example.org:51820")
    assert f"PrivateKey = {encode_key(private)}\n" in text and f"PresharedKey = {encode_key(psk)}\n" in text
    assert "Address = 203.0.113.2/32\nDNS = 198.51.100.53\nMTU = 1420\n" in text
    assert "AllowedIPs = 203.0.113.0/24\nPersistentKeepalive = 25\n" in text


@pytest.mark.parametrize("args, message", [
    (["--name", "../x", "--endpoint", "192.0.2.1:51820"], "--name"),
    (["--name", "laptop", "--endpoint", "vpn.example.org"], "--endpoint vpn.example.org: missing :port"),
    (["--name", "laptop", *[a for n in range(1, 10) for a in ("--endpoint", f"192.0.2.{n}:1")]], "at most 8"),
])
def test_invite_refuses_bad_arguments_before_asking_the_server(args, message, capsys, tmp_path):
    assert main(["invite", "--control-socket", str(tmp_path / "none.sock"), *args]) == 1
    assert message in capsys.readouterr().err


def test_invite_without_endpoint_takes_the_servers_and_puts_it_in_the_line(monkeypatch, capsys):
    asked = []

    def query(path, request):
        asked.append(request)
        return {"name": "office", "public_key": encode_key(SERVER), "endpoints": ["vpn.example.net:51820"],
                "invite": {"expires": int(time.time()) + 60}}

    monkeypatch.setattr("tunvpn.invite.query", query)
    assert main(["invite", "--control-socket", "/run/x.sock", "--name", "laptop"]) == 0
    line = capsys.readouterr().out.strip()
    assert asked[0]["endpoints"] == [] and line.startswith("tunvpn join ")
    assert decode_token(line.split()[2]).endpoints == ("vpn.example.net:51820",)


def test_check_config_counts_the_enrolled_peers_and_warns_of_skipped_files(tmp_path, capsys):
    state = tmp_path / "state"
    peers = state / "peers.d"
    peers.mkdir(parents=True)
    for name, text in (("laptop", f"[Peer]\nName = laptop\nPublicKey = {encode_key(SERVER)}\n"),
                       ("broken", "[Peer]\nPublicKey = nope\n")):
        (peers / f"{name}.conf").write_text(text)
        os.chmod(peers / f"{name}.conf", 0o600)
    config = tmp_path / "office.conf"
    config.write_text(f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\nListenPort = 51820\n"
                      f"Address = 203.0.113.1/24\nStateDirectory = {state}\n")
    os.chmod(config, 0o600)
    assert main(["check-config", "--role", "server", str(config)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"{config}: OK (server, 0 peers, 1 enrolled in {peers})"
    assert "broken.conf:2: PublicKey" in err and err.startswith("warning: ")
