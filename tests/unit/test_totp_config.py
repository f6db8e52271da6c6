"""TOTP, TOTPSecretFile and TOTPSession: where the secret is, who may read it, how long a code lasts."""

from __future__ import annotations

import os

import pytest

from configfiles import conf, write
from tunvpn.config import DEFAULT_TOTP_SESSION, ConfigError, default_totp_secret_file, load_config
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.totp import encode_secret, generate_secret

SERVER = encode_key(generate_private_key())
PEER = derive_public_key(generate_private_key())


def server(*peer_lines: str, interface: tuple[str, ...] = ()) -> str:
    return conf("[Interface]", f"PrivateKey = {SERVER}", "Address = 203.0.113.1/24", *interface,
                "", "[Peer]", f"PublicKey = {encode_key(PEER)}", *peer_lines)


def secret_file(path, mode: int = 0o600):
    path.parent.mkdir(mode=0o700, exist_ok=True)
    secret = generate_secret()
    write(path, encode_secret(secret) + "\n", mode)
    return secret


def test_the_default_file_is_name_totp_slash_key_beside_the_config(tmp_path):
    path = default_totp_secret_file(str(tmp_path), "office", PEER)
    assert os.path.dirname(path) == str(tmp_path / "office.totp") and "/" not in os.path.basename(path)
    secret = secret_file(tmp_path / "office.totp" / os.path.basename(path))
    config = load_config(write(tmp_path / "office.conf", server("TOTP = yes")), "server", resolve=False)
    peer = config.peers[0]
    assert (peer.totp, peer.totp_secret, peer.totp_secret_file) == (True, secret, path)
    assert peer.totp_session is None and config.interface.totp_session == DEFAULT_TOTP_SESSION


def test_a_named_file_relative_to_the_config_and_sessions_of_both_sections(tmp_path):
    secret = secret_file(tmp_path / "secrets" / "alice.totp")
    text = server("TOTP = yes", "TOTPSecretFile = secrets/alice.totp", "TOTPSession = 1d12h",
                  interface=("TOTPSession = 90m",))
    config = load_config(write(tmp_path / "office.conf", text), "server", resolve=False)
    assert config.peers[0].totp_secret == secret and config.peers[0].totp_session == 36 * 3600
    assert config.interface.totp_session == 90 * 60


@pytest.mark.parametrize("mode, exposure", [(0o644, "readable by others"), (0o604, "readable by others"),
                                            (0o620, "writable by group")])
def test_a_secret_others_can_read_is_refused_naming_file_line_and_key(tmp_path, mode, exposure):
    path = tmp_path / "alice.totp"
    secret_file(path, mode)
    config = write(tmp_path / "office.conf", server("TOTP = yes", "TOTPSecretFile = alice.totp"))
    with pytest.raises(ConfigError) as caught:
        load_config(config, "server", resolve=False)
    assert (caught.value.path, caught.value.line, caught.value.key) == (str(config), 8, "TOTPSecretFile")
    assert exposure in caught.value.reason and f"chmod {mode & 0o640 & ~0o020:o} {path}" in caught.value.reason


def test_a_missing_default_file_names_the_totp_line_and_how_to_make_one(tmp_path):
    config = write(tmp_path / "office.conf", server("AllowedIPs = 203.0.113.9/32", "TOTP = yes"))
    with pytest.raises(ConfigError) as caught:
        load_config(config, "server", resolve=False)
    assert (caught.value.line, caught.value.key) == (8, "TOTP")
    assert "cannot open" in caught.value.reason and "tunvpn totp-secret office --peer" in caught.value.reason
    located = load_config(config, "server", resolve=False, totp_secrets=False).peers[0]
    assert located.totp_secret is None and located.totp_secret_file.endswith(os.path.basename(
        default_totp_secret_file("", "office", PEER)))


@pytest.mark.parametrize("content", ["not base32!", encode_secret(b"80 bits..."), ""])
def test_a_file_without_a_usable_secret_is_refused(tmp_path, content):
    write(tmp_path / "alice.totp", content, 0o600)
    config = write(tmp_path / "office.conf", server("TOTP = yes", "TOTPSecretFile = alice.totp"))
    with pytest.raises(ConfigError, match=r"office.conf:8: TOTPSecretFile: .*alice.totp"):
        load_config(config, "server", resolve=False)


@pytest.mark.parametrize("line", ["TOTPSecretFile = alice.totp", "TOTPSession = 1h"])
def test_totp_settings_without_totp_are_refused(tmp_path, line):
    config = write(tmp_path / "office.conf", server(line))
    with pytest.raises(ConfigError, match=rf"office.conf:7: {line.split()[0]}: has no effect without TOTP = yes"):
        load_config(config, "server", resolve=False)


@pytest.mark.parametrize("value, seconds", [("12h", 43200), ("90m", 5400), ("1d12h", 129600), ("3", 3),
                                            ("45s", 45), ("1D", 86400)])
def test_durations(tmp_path, value, seconds):
    text = server(interface=(f"TOTPSession = {value}",))
    assert load_config(write(tmp_path / "office.conf", text), "server", resolve=False).interface.totp_session == seconds


@pytest.mark.parametrize("value", ["0", "12 hours", "h", "-5m", "367d", "1.5h", ""])
def test_bad_durations_name_their_line(tmp_path, value):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "office.conf", server(interface=(f"TOTPSession = {value}",))), "server",
                    resolve=False)
    assert (caught.value.line, caught.value.key) == (4, "TOTPSession")


def test_totp_is_a_server_setting(tmp_path):
    text = conf("[Interface]", f"PrivateKey = {SERVER}", "", "[Peer]", f"PublicKey = {encode_key(PEER)}",
                "Endpoint = 192.0.2.1:51820", "TOTP = yes")
    with pytest.raises(ConfigError, match="office.conf:7: TOTP: is a server setting.*tunvpn login"):
        load_config(write(tmp_path / "office.conf", text), "client", resolve=False)
