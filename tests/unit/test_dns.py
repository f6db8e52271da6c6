"""DnsManager with a fake runner (what it asks resolvectl/resolvconf to do), and backend detection."""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from tunvpn.io import dns
from tunvpn.io.dns import NO_BACKEND, RESOLVCONF, RESOLVED, DnsBackend, DnsError, DnsManager, detect_backend

RESOLVECTL_PATH = "/usr/bin/resolvectl"
RESOLVCONF_PATH = "/usr/sbin/resolvconf"
SERVERS = ["203.0.113.53", "2001:db8:100::53"]
DEBIAN_INTERFACE_ORDER = "# interface-order(5)\nlo.inet6\nlo.inet\nlo\ntun*\ntap*\nvpn*\n@(br|eth)*\n*\n"


@dataclass
class FakeRunner:
    """Records every command; `fail(word, ...)` makes commands containing `word` fail or raise."""

    calls: list[tuple[list[str], str]] = field(default_factory=list)
    failures: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def fail(self, word: str, returncode: int = 1, stderr: str = "", raises: BaseException | None = None) -> None:
        def outcome() -> Any:
            if raises is not None:
                raise raises
            return returncode, stderr
        self.failures[word] = outcome

    def __call__(self, command: list[str], *, input: str, capture_output: bool, text: bool, timeout: float,
                 check: bool) -> subprocess.CompletedProcess[str]:
        assert capture_output and text and not check and timeout > 0
        self.calls.append((list(command), input))
        for word, outcome in self.failures.items():
            if word in command:
                returncode, stderr = outcome()
                return subprocess.CompletedProcess(command, returncode, "", stderr)
        return subprocess.CompletedProcess(command, 0, "", "")

    @property
    def commands(self) -> list[list[str]]:
        return [command for command, _ in self.calls]


def manager(backend: DnsBackend, runner: FakeRunner) -> DnsManager:
    detections: list[DnsBackend] = []

    def detect() -> DnsBackend:
        assert not detections, "the backend is detected once, then kept for revert and re-apply"
        detections.append(backend)
        return backend
    return DnsManager("tv-office", runner=runner, detect=detect)


RESOLVED_BACKEND = DnsBackend(RESOLVED, RESOLVECTL_PATH)
DEBIAN_RESOLVCONF = DnsBackend(RESOLVCONF, RESOLVCONF_PATH, "tun.")


# --- systemd-resolved --------------------------------------------------------------------------

def test_resolved_sets_servers_and_domains_on_the_link_and_revert_reverts_the_link() -> None:
    runner = FakeRunner()
    dns_manager = manager(RESOLVED_BACKEND, runner)
    description = dns_manager.apply(SERVERS, ["office.example", "corp.example"])
    assert description == ("DNS servers 203.0.113.53, 2001:db8:100::53 (search office.example corp.example) "
                           "set on tv-office through systemd-resolved")
    assert runner.commands == [
        [RESOLVECTL_PATH, "dns", "tv-office", "203.0.113.53", "2001:db8:100::53"],
        [RESOLVECTL_PATH, "domain", "tv-office", "office.example", "corp.example"],
    ]
    runner.calls.clear()
    dns_manager.revert()
    assert runner.commands == [[RESOLVECTL_PATH, "revert", "tv-office"]]
    dns_manager.revert()
    assert len(runner.calls) == 1  # nothing left to revert


def test_resolved_exclusive_routes_all_queries_and_a_new_apply_replaces_both_lists() -> None:
    runner = FakeRunner()
    dns_manager = manager(RESOLVED_BACKEND, runner)
    assert dns_manager.apply(["203.0.113.53"], [], exclusive=True).endswith(
        "set on tv-office through systemd-resolved, for all queries")
    dns_manager.apply(["2001:db8:100::53"], [])
    assert runner.commands == [
        [RESOLVECTL_PATH, "dns", "tv-office", "203.0.113.53"],
        [RESOLVECTL_PATH, "domain", "tv-office", "~."],
        [RESOLVECTL_PATH, "dns", "tv-office", "2001:db8:100::53"],
        [RESOLVECTL_PATH, "domain", "tv-office", ""],  # clears the earlier "~."
    ]


def test_resolved_search_domains_without_servers() -> None:
    runner = FakeRunner()
    assert manager(RESOLVED_BACKEND, runner).apply([], ["office.example"]) == (
        "DNS servers (none) (search office.example) set on tv-office through systemd-resolved")
    assert runner.commands == [[RESOLVECTL_PATH, "dns", "tv-office", ""],
                               [RESOLVECTL_PATH, "domain", "tv-office", "office.example"]]


# --- resolvconf --------------------------------------------------------------------------------

def test_resolvconf_gets_a_resolv_conf_snippet_under_the_prefixed_record_name() -> None:
    runner = FakeRunner()
    dns_manager = manager(DEBIAN_RESOLVCONF, runner)
    description = dns_manager.apply(SERVERS, ["office.example"])
    assert description == ("DNS servers 203.0.113.53, 2001:db8:100::53 (search office.example) "
                           "registered with resolvconf as tun.tv-office")
    assert runner.calls == [([RESOLVCONF_PATH, "-a", "tun.tv-office", "-m", "0"],
                             "nameserver 203.0.113.53\nnameserver 2001:db8:100::53\nsearch office.example\n")]
    runner.calls.clear()
    dns_manager.revert()
    assert runner.commands == [[RESOLVCONF_PATH, "-d", "tun.tv-office", "-f"]]


def test_resolvconf_without_prefix_and_exclusive() -> None:
    runner = FakeRunner()
    dns_manager = manager(DnsBackend(RESOLVCONF, RESOLVCONF_PATH), runner)
    dns_manager.apply(["203.0.113.53"], exclusive=True)
    dns_manager.revert()
    assert runner.calls == [([RESOLVCONF_PATH, "-a", "tv-office", "-m", "0", "-x"], "nameserver 203.0.113.53\n"),
                            ([RESOLVCONF_PATH, "-d", "tv-office", "-f"], "")]


# --- neither -----------------------------------------------------------------------------------

def test_without_resolved_or_resolvconf_nothing_runs_and_the_description_says_so() -> None:
    runner = FakeRunner()
    dns_manager = manager(DnsBackend(NO_BACKEND), runner)
    assert dns_manager.apply(SERVERS, ["office.example"]) == (
        "DNS servers 203.0.113.53, 2001:db8:100::53 (search office.example) not applied: "
        "neither systemd-resolved nor resolvconf is available")
    dns_manager.revert()
    assert runner.calls == []


def test_nothing_to_apply_reverts_what_an_earlier_apply_set() -> None:
    runner = FakeRunner()
    dns_manager = manager(DEBIAN_RESOLVCONF, runner)
    dns_manager.apply(SERVERS)
    assert dns_manager.apply([], []) == "no DNS servers or search domains for tv-office"
    assert runner.commands[-1] == [RESOLVCONF_PATH, "-d", "tun.tv-office", "-f"]
    assert len(runner.calls) == 2


# --- failures ----------------------------------------------------------------------------------

def test_a_failing_tool_is_a_one_line_error_naming_the_command_and_what_was_set_is_reverted() -> None:
    runner = FakeRunner()
    runner.fail("domain", returncode=1, stderr="Failed to set domain configuration: Access denied\nmore\n")
    dns_manager = manager(RESOLVED_BACKEND, runner)
    with pytest.raises(DnsError) as failure:
        dns_manager.apply(SERVERS, ["office.example"])
    assert str(failure.value) == (f"`{RESOLVECTL_PATH} domain tv-office office.example` failed with exit code 1: "
                                  "Failed to set domain configuration: Access denied")
    assert runner.commands[-1] == [RESOLVECTL_PATH, "revert", "tv-office"]
    calls = len(runner.calls)
    dns_manager.revert()
    assert len(runner.calls) == calls  # the failed apply left nothing applied


def test_resolvconf_refusing_the_record_is_reported_with_its_own_words() -> None:
    runner = FakeRunner()
    runner.fail("-a", returncode=1, stderr="resolvconf: Error: Initial hyphen not allowed in interface record name")
    with pytest.raises(DnsError, match=r"^`/usr/sbin/resolvconf -a tun.tv-office -m 0` failed with exit code 1: "
                                       r"resolvconf: Error: Initial hyphen not allowed"):
        manager(DEBIAN_RESOLVCONF, runner).apply(SERVERS)


def test_a_missing_tool_and_a_hanging_tool_are_errors() -> None:
    runner = FakeRunner()
    runner.fail("-a", raises=FileNotFoundError(2, "No such file or directory"))
    with pytest.raises(DnsError, match=r"^cannot run /usr/sbin/resolvconf: No such file or directory$"):
        manager(DEBIAN_RESOLVCONF, runner).apply(SERVERS)

    runner = FakeRunner()
    runner.fail("dns", raises=subprocess.TimeoutExpired(RESOLVECTL_PATH, 10))
    hung = r"^`/usr/bin/resolvectl dns tv-office 203.0.113.53` did not finish within 10 s$"
    with pytest.raises(DnsError, match=hung):
        manager(RESOLVED_BACKEND, runner).apply(["203.0.113.53"])


def test_a_failing_revert_is_reported_once() -> None:
    runner = FakeRunner()
    dns_manager = manager(DEBIAN_RESOLVCONF, runner)
    dns_manager.apply(SERVERS)
    runner.fail("-d", returncode=2, stderr="flock: timeout")
    with pytest.raises(DnsError, match=r"-d tun.tv-office -f` failed with exit code 2: flock: timeout$"):
        dns_manager.revert()
    dns_manager.revert()
    assert len(runner.calls) == 2


@pytest.mark.parametrize("servers, search, message", [
    (["203.0.113.300"], [], "invalid DNS server address '203.0.113.300'"),
    (["ns.example"], [], "invalid DNS server address 'ns.example'"),
    (SERVERS, ["office.example\nnameserver 192.0.2.66"], "invalid DNS search domain 'office.example\\nnameserver"),
    (SERVERS, ["office example"], "invalid DNS search domain 'office example'"),
    (SERVERS, ["~."], "invalid DNS search domain '~.'"),
    (SERVERS, ["-office.example"], "invalid DNS search domain '-office.example'"),
    (SERVERS, ["a" * 64 + ".example"], "invalid DNS search domain"),
])
def test_bad_input_is_refused_before_any_tool_runs(servers: list[str], search: list[str], message: str) -> None:
    runner = FakeRunner()
    with pytest.raises(DnsError) as failure:
        manager(DEBIAN_RESOLVCONF, runner).apply(servers, search)
    assert str(failure.value).startswith(message)
    assert runner.calls == []


# --- detection ---------------------------------------------------------------------------------

def _tool(directory: Path, name: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def _never_asked() -> bool:
    raise AssertionError("resolved's presence does not matter here")


def test_detection_prefers_resolved_when_it_serves_this_namespace(tmp_path: Path) -> None:
    resolvectl, resolvconf = _tool(tmp_path, "resolvectl"), _tool(tmp_path, "resolvconf")
    order = tmp_path / "interface-order"
    order.write_text(DEBIAN_INTERFACE_ORDER)
    found = detect_backend(search_path=str(tmp_path), interface_order=order, resolved_here=lambda: True)
    assert found == DnsBackend(RESOLVED, str(resolvectl))
    found = detect_backend(search_path=str(tmp_path), interface_order=order, resolved_here=lambda: False)
    assert found == DnsBackend(RESOLVCONF, str(resolvconf), "tun.")


def test_detection_of_resolvconf_and_its_record_prefix(tmp_path: Path) -> None:
    resolvconf = _tool(tmp_path, "resolvconf")
    order = tmp_path / "interface-order"
    assert detect_backend(str(tmp_path), order, _never_asked) == DnsBackend(RESOLVCONF, str(resolvconf), "")
    order.write_text("lo\n@(br|eth)*\n*\n")  # no plain NAME* pattern
    assert detect_backend(str(tmp_path), order, _never_asked).record_prefix == ""
    order.write_text("lo\n  vpn*  \ntun*\n")
    assert detect_backend(str(tmp_path), order, _never_asked).record_prefix == "vpn."


def test_systemds_resolvconf_shim_counts_as_resolved(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "sbin").mkdir()
    resolvectl = _tool(tmp_path / "bin", "resolvectl")
    (tmp_path / "sbin" / "resolvconf").symlink_to("../bin/resolvectl")
    search_path = str(tmp_path / "sbin")  # the shim is found, resolvectl itself is not on the path
    order = tmp_path / "interface-order"
    assert detect_backend(search_path, order, lambda: True) == DnsBackend(RESOLVED, str(resolvectl))
    # A resolved serving another namespace must not be reached through its shim either.
    assert detect_backend(search_path, order, lambda: False) == DnsBackend(NO_BACKEND)


def test_tools_are_taken_from_the_system_directories_never_from_path(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon runs them as root: a resolvconf planted first on $PATH must not be the one run."""
    planted, system = tmp_path / "planted", tmp_path / "system"
    planted.mkdir()
    system.mkdir()
    _tool(planted, "resolvconf")
    _tool(planted, "resolvectl")
    monkeypatch.setenv("PATH", str(planted))
    order = tmp_path / "interface-order"
    for resolved_here in (True, False):
        tool = detect_backend(interface_order=order, resolved_here=lambda: resolved_here).tool
        assert tool is None or Path(tool).parent.as_posix() in dns.SYSTEM_DIRECTORIES
    monkeypatch.setattr(dns, "SYSTEM_DIRECTORIES", (str(system),))
    resolvconf = _tool(system, "resolvconf")
    assert detect_backend(interface_order=order, resolved_here=lambda: False) == DnsBackend(RESOLVCONF, str(resolvconf))


def test_detection_without_tools(tmp_path: Path) -> None:
    assert detect_backend(str(tmp_path), tmp_path / "interface-order", _never_asked) == DnsBackend(NO_BACKEND)
    _tool(tmp_path, "resolvectl")  # installed, but resolved is not running here
    assert detect_backend(str(tmp_path), tmp_path / "interface-order", lambda: False) == DnsBackend(NO_BACKEND)


def test_a_socket_answers_only_while_someone_listens(tmp_path: Path) -> None:
    path = tmp_path / "varlink"
    assert not dns._socket_answers(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        assert dns._socket_answers(path)
    assert path.exists() and not dns._socket_answers(path)  # a stale socket file of a stopped resolved


@pytest.mark.parametrize("same_namespace, stub, expected", [
    (True, False, True), (False, True, False), (None, True, True), (None, False, False)])
def test_resolved_counts_only_in_its_own_namespace(monkeypatch: pytest.MonkeyPatch, same_namespace: bool | None,
                                                   stub: bool, expected: bool) -> None:
    monkeypatch.setattr(dns, "_socket_answers", lambda path: path == dns.RESOLVED_VARLINK_SOCKET)
    monkeypatch.setattr(dns, "_shares_network_namespace_with", lambda pid: same_namespace if pid == 1 else None)
    monkeypatch.setattr(dns, "_stub_listener_here", lambda: stub)
    assert dns.resolved_serves_this_namespace() is expected
    monkeypatch.setattr(dns, "_socket_answers", lambda path: False)
    assert dns.resolved_serves_this_namespace() is False


def test_the_stub_listener_is_found_in_proc_net_udp(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.53", 0))  # any 127/8 address is local; port 53 would need root
        port = listener.getsockname()[1]
        monkeypatch.setattr(dns, "RESOLVED_STUB_PORT", port)
        assert dns._stub_listener_here()
    assert not dns._stub_listener_here()


def test_namespace_comparison() -> None:
    assert dns._shares_network_namespace_with(os.getpid()) is True
    assert dns._shares_network_namespace_with(2**22 + 1) is None  # above pid_max: no such process
