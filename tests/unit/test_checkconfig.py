"""`tunvpn check-config`: exit 0 with one OK line, or exit 2 with one `FILE:LINE: KEY: reason` line.

Each command runs two ways: as `python -m tunvpn check-config ...` in a subprocess (the real
command), and in-process through argparse (the subcommand registered on a fresh top-level
parser) and the function the parser selects, which is what lets a test fake a parser bug.
"""

from __future__ import annotations

import argparse
import os
import pwd
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from configfiles import conf, group_name, own_group, write
from tunvpn import checkconfig
from tunvpn.checkconfig import register_check_config_parser
from tunvpn.keys import derive_public_key, encode_key, generate_private_key


REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def check_config_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    parser = argparse.ArgumentParser(prog="tunvpn")
    register_check_config_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["check-config", *argv])
    code = args.func(args)
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def check_config_command(*argv: str) -> Outcome:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "tunvpn", "check-config", *argv], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env, cwd=REPO_ROOT, check=False)
    return Outcome(result.returncode, result.stdout, result.stderr)


CheckConfig = Callable[..., Outcome]


@pytest.fixture(params=["command", "in-process"])
def check_config(request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]) -> CheckConfig:
    if request.param == "command":
        return check_config_command
    return lambda *argv: check_config_in_process(capsys, *argv)


@pytest.fixture
def placeholders() -> dict[str, str]:
    private = generate_private_key()
    return {
        "priv": encode_key(private),
        "own": encode_key(derive_public_key(private)),
        "pub1": encode_key(derive_public_key(generate_private_key())),
        "pub2": encode_key(derive_public_key(generate_private_key())),
        "short_key": encode_key(bytes(16)),
    }


# --- files that pass ----------------------------------------------------------------------------

def test_server_passes_with_one_ok_line(tmp_path: Path, check_config: CheckConfig,
                                        placeholders: dict[str, str]) -> None:
    path = write(tmp_path / "office.conf", conf(
        "[Interface]", "PrivateKey = {priv}", "Address = 203.0.113.1/24", "Pool = 203.0.113.100-203.0.113.199",
        "[Peer]", "PublicKey = {pub1}",
        "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 203.0.113.5/32", "Endpoint = 192.0.2.5:51820",
    ).format(**placeholders))

    outcome = check_config(str(path))

    assert outcome == Outcome(0, f"{path}: OK (server, 2 peers)\n", "")


def test_client_passes_and_one_peer_is_singular(tmp_path: Path, check_config: CheckConfig,
                                               placeholders: dict[str, str]) -> None:
    path = write(tmp_path / "home.conf", conf(
        "[Interface]", "PrivateKey = {priv}", "DNS = 198.51.100.53, office.example",
        "[Peer]", "PublicKey = {pub1}", "Endpoint = [2001:db8::1]:51820",
    ).format(**placeholders))

    assert check_config(str(path)) == Outcome(0, f"{path}: OK (client, 1 peer)\n", "")


def test_role_option_overrides_the_guess(tmp_path: Path, check_config: CheckConfig,
                                         placeholders: dict[str, str]) -> None:
    """A client with a fixed ListenPort reads as a server; --role client says what it is."""
    path = write(tmp_path / "home.conf", conf(
        "[Interface]", "PrivateKey = {priv}", "ListenPort = 40000", "Address = 203.0.113.2/24",
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.0/24", "Endpoint = 192.0.2.1:51820",
    ).format(**placeholders))

    guessed = check_config(str(path))
    assert (guessed.code, guessed.stdout) == (2, "")
    assert guessed.stderr == f"{path}:7: AllowedIPs: 203.0.113.0/24 covers the server's own address 203.0.113.2 " \
                             "(Address on line 4)\n"
    assert check_config("--role", "client", str(path)) == Outcome(0, f"{path}: OK (client, 1 peer)\n", "")
    assert check_config(str(path), "--role=client").code == 0


def test_files_are_judged_for_the_user_given(tmp_path: Path, check_config: CheckConfig,
                                             placeholders: dict[str, str]) -> None:
    """Root checks what a daemon running as another user will load (Ansible's validate, say).

    Root builds the packaged layout, root:GROUP 0640 for a daemon running as nobody (whose group
    GROUP is); anyone else checks his own files for himself, and for root, who trusts only root's.
    """
    key = write(tmp_path / "office.key", placeholders["priv"] + "\n", mode=0o640)
    path = write(tmp_path / "office.conf", conf("[Interface]", "PrivateKeyFile = office.key", "ListenPort = 51820"),
                 mode=0o640)
    if os.geteuid() == 0:
        daemon = pwd.getpwnam("nobody")
        for file in (key, path):
            os.chown(file, 0, daemon.pw_gid)
        refused = (f"{path}:2: PrivateKeyFile: {key} is readable by group {group_name(daemon.pw_gid)}, which this "
                   f"daemon does not run as (mode 0640); chmod 600 {key}\n")
        assert check_config(str(path)) == Outcome(2, "", refused)
    else:
        daemon = pwd.getpwuid(os.geteuid())
        refused = f"{path}: is owned by {daemon.pw_name}, not by root; chown root {path}\n"
        assert check_config("--user", "root", str(path)) == Outcome(2, "", refused)

    assert check_config("--user", daemon.pw_name, str(path)) == Outcome(0, f"{path}: OK (server, 0 peers)\n", "")


def test_an_unknown_user_is_a_usage_error(tmp_path: Path) -> None:
    outcome = check_config_command("--user", "no-such-user-for-tunvpn", str(tmp_path / "office.conf"))
    assert outcome.code == 2 and "no user 'no-such-user-for-tunvpn'" in outcome.stderr


def test_endpoint_names_are_resolved(tmp_path: Path, check_config: CheckConfig,
                                     placeholders: dict[str, str]) -> None:
    """.invalid never resolves (RFC 6761): check-config finds what the daemon would fail on."""
    path = write(tmp_path / "home.conf", conf(
        "[Interface]", "PrivateKey = {priv}", "[Peer]", "PublicKey = {pub1}", "Endpoint = vpn.tunvpn-test.invalid:51820",
    ).format(**placeholders))

    outcome = check_config("--role", "client", str(path))

    assert (outcome.code, outcome.stdout) == (2, "")
    assert re.fullmatch(re.escape(f"{path}:5: Endpoint: cannot resolve vpn.tunvpn-test.invalid: ") + r"\S[^\n]*\n",
                        outcome.stderr)


def test_a_parser_bug_is_one_line_and_not_success(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_loader(path: str, role: str, resolve: bool, identity: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(checkconfig, "load_config", broken_loader)
    path = tmp_path / "office.conf"

    outcome = check_config_in_process(capsys, "--role", "server", str(path))

    assert outcome == Outcome(1, "", f"tunvpn check-config: {path}: internal error: RuntimeError: boom\\nsecond line\n")


def test_a_parser_bug_does_not_print_a_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch, placeholders: dict[str, str]) -> None:
    def broken_loader(path: str, role: str, resolve: bool, identity: object) -> None:
        raise KeyError(placeholders["priv"])

    monkeypatch.setattr(checkconfig, "load_config", broken_loader)
    path = tmp_path / "office.conf"

    outcome = check_config_in_process(capsys, "--role", "server", str(path))

    assert outcome == Outcome(1, "", f"tunvpn check-config: {path}: internal error: KeyError: '(redacted)'\n")


# --- broken files: exit 2, one line naming file, line, key and reason ---------------------------

@dataclass(frozen=True)
class Broken:
    lines: tuple[str, ...]
    line: int
    key: str | None
    reason: str
    role: str | None = None  # None: let check-config guess
    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (text, mode)
    config_mode: int = 0o600


def broken(case_id: str, lines: tuple[str, ...], line: int, key: str | None, reason: str, **options: object):
    return pytest.param(Broken(lines, line, key, reason, **options), id=case_id)


INTERFACE = ("[Interface]", "PrivateKey = {priv}")
SERVER = INTERFACE + ("Address = 203.0.113.1/24", "ListenPort = 51820")  # lines 1-4; guessed as a server
CLIENT_PEER = ("[Peer]", "PublicKey = {pub1}", "Endpoint = 192.0.2.1:51820")

BROKEN = [
    broken("unknown-key", SERVER + ("Colour = blue",), 5, "Colour", "unknown key in [Interface]"),
    broken("wg-quick-post-up", SERVER + ("PostUp = iptables -A FORWARD -i %i -j ACCEPT",), 5, "PostUp",
           "tunvpn does not support this wg-quick key; remove it"),
    broken("bad-key-length", SERVER + ("[Peer]", "PublicKey = {short_key}"), 6, "PublicKey",
           "a key is 32 bytes (44 base64 characters), this one is 16 bytes"),
    broken("missing-private-key", ("[Interface]", "ListenPort = 51820"), 1, "PrivateKey",
           "missing; [Interface] needs PrivateKey or PrivateKeyFile"),
    broken("duplicate-peer", SERVER + ("[Peer]", "PublicKey = {pub1}", "[Peer]", "PublicKey = {pub1}"), 8,
           "PublicKey", "same peer as the PublicKey on line 6"),
    broken("overlapping-allowed-ips", SERVER + (
        "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 198.51.100.0/24",
        "[Peer]", "PublicKey = {pub2}", "AllowedIPs = 198.51.100.128/25"),
        10, "AllowedIPs", "198.51.100.128/25 overlaps 198.51.100.0/24 of another peer on line 7"),
    broken("pool-outside-the-subnet", SERVER + ("Pool = 198.51.100.10-198.51.100.20",), 5, "Pool",
           "198.51.100.10-198.51.100.20 is not inside the subnet of an IPv4 Address (203.0.113.0/24)"),
    broken("pool-first-above-last", SERVER + ("Pool = 203.0.113.200-203.0.113.100",), 5, "Pool",
           "'203.0.113.200-203.0.113.100': FIRST is above LAST"),
    broken("pool-without-address", INTERFACE + ("Pool = 203.0.113.10-203.0.113.20",), 3, "Pool",
           "an IPv4 Pool needs an IPv4 Address whose subnet holds it"),
    broken("pool-with-broadcast", SERVER + ("Pool = 203.0.113.128-203.0.113.255",), 5, "Pool",
           "203.0.113.128-203.0.113.255 includes 203.0.113.255, the broadcast address of 203.0.113.0/24"),
    broken("second-ipv4-pool", SERVER + ("Pool = 203.0.113.10-203.0.113.20", "Pool = 203.0.113.30-203.0.113.40"), 6,
           "Pool", "a second IPv4 Pool; the first is on line 5"),
    broken("bad-endpoint", SERVER + ("[Peer]", "PublicKey = {pub1}", "Endpoint = 2001:db8::1:51820"), 7, "Endpoint",
           "2001:db8::1:51820: an IPv6 address needs brackets, like [2001:db8::1]:51820"),
    broken("client-peer-without-endpoint", INTERFACE + ("[Peer]", "PublicKey = {pub1}"), 3, "Endpoint",
           "missing; a client initiates, so every [Peer] needs one"),
    broken("secrets-file-readable-by-others", ("[Interface]", "PrivateKeyFile = office.key", "ListenPort = 51820"), 2,
           "PrivateKeyFile", "{dir}/office.key is readable by others (mode 0644); chmod 640 {dir}/office.key",
           files={"office.key": ("{priv}\n", 0o644)}),
    broken("inline-key-in-world-readable-config", SERVER, 2, "PrivateKey",
           "{config} is readable by others (mode 0644); chmod 640 {config}", config_mode=0o644),
    broken("group-writable-config", ("[Interface]", "PrivateKeyFile = office.key", "ListenPort = 51820"), 0, None,
           "is writable by group {group}, who could add peers and routes (mode 0664); chmod 644 {config}",
           config_mode=0o664, files={"office.key": ("{priv}\n", 0o600)}),
    broken("dns-on-a-server", SERVER + ("DNS = 198.51.100.53",), 5, "DNS",
           "is a client setting, not for a server; use PushDNS to give clients DNS servers", role="server"),
    broken("dns-on-a-guessed-server", INTERFACE + ("PushRoute = 198.51.100.0/24", "DNS = 198.51.100.53"), 4, "DNS",
           "is a client setting, not for a server; use PushDNS to give clients DNS servers"),
    broken("pool-on-a-client", INTERFACE + ("Pool = 203.0.113.10-203.0.113.20",) + CLIENT_PEER, 3, "Pool",
           "is a server setting, not for a client; a client takes its address from the server, or from Address",
           role="client"),
    broken("push-dns-on-a-client", INTERFACE + ("DNS = office.example", "PushDNS = 198.51.100.53"), 4, "PushDNS",
           "is a server setting, not for a client; use DNS", role="client"),
    broken("push-route-with-host-bits", SERVER + ("PushRoute = 198.51.100.0/24, 2001:db8:50::1/64",), 5, "PushRoute",
           "2001:db8:50::1/64 has host bits set (the network is 2001:db8:50::/64)"),
    broken("bad-client-to-client", SERVER + ("ClientToClient = sometimes",), 5, "ClientToClient",
           "'sometimes' is not yes or no (true/false, on/off and 1/0 work too)"),
    broken("relative-state-directory", SERVER + ("StateDirectory = var/lib/tunvpn",), 5, "StateDirectory",
           "'var/lib/tunvpn' is not an absolute path"),
    broken("bad-push-keepalive", SERVER + ("PushKeepalive = -1",), 5, "PushKeepalive",
           "'-1' is neither off nor 0-65535 seconds"),
    broken("fixed-address-is-the-servers", SERVER + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 203.0.113.1/32"),
           7, "AllowedIPs", "203.0.113.1 is the server's own address (Address on line 3)"),
    broken("peer-covers-the-server", SERVER + ("[Peer]", "PublicKey = {pub1}", "AllowedIPs = 0.0.0.0/0"),
           7, "AllowedIPs", "0.0.0.0/0 covers the server's own address 203.0.113.1 (Address on line 3)"),
    broken("bad-client-dns", INTERFACE + ("DNS = 198.51.100.53, -office.example",) + CLIENT_PEER, 3, "DNS",
           "'-office.example' is neither an IP address nor a DNS search domain"),
    broken("mtu-too-small", SERVER + ("MTU = 500",), 5, "MTU", "'500' is not a number in 576-65535"),
    broken("missing-interface", ("[Peer]", "PublicKey = {pub1}"), 0, None, "no [Interface] section"),
    broken("not-key-equals-value", SERVER + ("Pool 203.0.113.10-203.0.113.20",), 5, None,
           "expected 'Key = Value' or a [Section] header"),
    broken("private-key-without-equals", ("[Interface]", "PrivateKey {priv}", "ListenPort = 51820"), 2, "PrivateKey",
           "expected 'PrivateKey = KEY'; the rest of the line is not shown, as it may be the key"),
    broken("key-alone-on-a-line", SERVER + ("{priv}",), 5, "(redacted)", "unknown key in [Interface]"),
]


def test_at_least_20_broken_configs() -> None:
    assert len(BROKEN) >= 20


@pytest.mark.parametrize("case", BROKEN)
def test_broken_config_exits_2_with_one_line(case: Broken, tmp_path: Path, check_config: CheckConfig,
                                             placeholders: dict[str, str]) -> None:
    for name, (text, mode) in case.files.items():
        write(tmp_path / name, text.format(**placeholders), mode)
    path = write(tmp_path / "office.conf", conf(*case.lines).format(**placeholders), case.config_mode)
    reason = case.reason.format(dir=tmp_path, config=path, group=own_group())
    where = f"{path}:{case.line}" if case.line else f"{path}"
    expected = f"{where}: {case.key}: {reason}" if case.key else f"{where}: {reason}"

    outcome = check_config(*(["--role", case.role] if case.role else []), str(path))

    assert outcome == Outcome(2, "", expected + "\n")
    assert placeholders["priv"].rstrip("=") not in outcome.stderr


def test_missing_file_exits_2(tmp_path: Path, check_config: CheckConfig) -> None:
    path = tmp_path / "absent.conf"
    assert check_config(str(path)) == Outcome(2, "", f"{path}: cannot read: No such file or directory\n")


def test_undecodable_file_exits_2_with_its_line(tmp_path: Path, check_config: CheckConfig,
                                                placeholders: dict[str, str]) -> None:
    path = tmp_path / "office.conf"
    path.write_bytes(conf(*SERVER).format(**placeholders).encode() + b"Device = tv-\xff\n")
    os.chmod(path, 0o600)
    assert check_config(str(path)) == Outcome(2, "", f"{path}:5: not UTF-8 text\n")


def test_every_error_is_printed_on_a_line_of_its_own(tmp_path: Path, check_config: CheckConfig,
                                                     placeholders: dict[str, str]) -> None:
    """As compilers do: fix them all in one go, not one per run."""
    text = conf("[Interface]", "PrivateKey = {priv}", "ListenPort = 0", "MTU = 9", "PostUp = iptables -F",
                "[Peer]", "PublicKey = {pub1}", "AllowedIPs = 198.51.100.0/33").format(**placeholders)
    path = write(tmp_path / "office.conf", text, 0o600)
    outcome = check_config("--role", "server", str(path))
    assert outcome.code == 2 and outcome.stdout == ""
    assert [line.split(": ")[0:2] for line in outcome.stderr.splitlines()] == [
        [f"{path}:3", "ListenPort"], [f"{path}:4", "MTU"], [f"{path}:5", "PostUp"], [f"{path}:8", "AllowedIPs"]]
    assert placeholders["priv"].rstrip("=") not in outcome.stderr
