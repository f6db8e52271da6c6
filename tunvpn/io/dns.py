"""DNS servers and search domains for the tun interface: applied at start, removed on exit.

Through systemd-resolved when it serves this network namespace, else through resolvconf
(Debian's resolvconf or openresolv), else not at all.  /etc/resolv.conf is never edited here:
whatever owns that file would overwrite the edit, or keep a stale copy after a crash.

systemd-resolved and the resolvconf shim it ships (a symlink to resolvectl) identify a link by
its index.  A resolved running in another network namespace (the host's, seen from a namespace
made by `ip netns exec`) would apply our settings to whichever of its links has that index, so
it only counts when it serves ours.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

Runner = Callable[..., "subprocess.CompletedProcess[str]"]
IPAddress = IPv4Address | IPv6Address

RESOLVED = "systemd-resolved"
RESOLVCONF = "resolvconf"
NO_BACKEND = "none"

RESOLVED_VARLINK_SOCKET = Path("/run/systemd/resolve/io.systemd.Resolve")
RESOLVED_STUB_ADDRESS = "127.0.0.53"
RESOLVED_STUB_PORT = 53
# Debian's resolvconf ranks records by the patterns in this file; openresolv reads it too when
# it has no /etc/resolvconf.conf.
INTERFACE_ORDER = Path("/etc/resolvconf/interface-order")
# Where the distribution installs resolvconf and resolvectl, and the only places they are looked
# for: the daemon runs them with its privileges, so $PATH (maybe a user's, through sudo) must not
# choose them.
SYSTEM_DIRECTORIES = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
TOOL_TIMEOUT_SECONDS = 10.0
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_VPN_PATTERN = re.compile(r"([A-Za-z0-9-]+)\*")


class DnsError(Exception):
    """DNS settings could not be applied or removed; the message is one line naming the command."""


@dataclass(frozen=True)
class DnsBackend:
    """How DNS settings reach this namespace's resolver."""

    kind: str  # RESOLVED, RESOLVCONF or NO_BACKEND
    tool: str | None = None  # absolute path of resolvectl or resolvconf
    record_prefix: str = ""  # resolvconf: "tun." when interface-order ranks tun* records first


# --- detection -------------------------------------------------------------------------------

def _socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _shares_network_namespace_with(pid: int) -> bool | None:
    """Whether we are in `pid`'s network namespace; None if we may not look (no CAP_SYS_PTRACE,
    as in a hardened systemd unit)."""
    try:
        ours, theirs = os.stat("/proc/self/ns/net"), os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def _stub_listener_here() -> bool:
    """Whether something listens on resolved's stub address 127.0.0.53:53 in this namespace."""
    packed = int.from_bytes(socket.inet_aton(RESOLVED_STUB_ADDRESS), sys.byteorder)
    wanted = f"{packed:08X}:{RESOLVED_STUB_PORT:04X}"
    try:
        # /proc/self/net, not the /proc/net link: a unit with ProcSubset=pid hides the link.
        lines = Path("/proc/self/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == wanted for line in lines if len(line.split()) > 1)


def resolved_serves_this_namespace() -> bool:
    """Whether a running systemd-resolved manages the links of this network namespace.

    It runs in PID 1's namespace (the host's, or a container's own).  When we may not look
    there, its stub listener in our namespace is the evidence.
    """
    if not _socket_answers(RESOLVED_VARLINK_SOCKET):
        return False
    same = _shares_network_namespace_with(1)
    return same if same is not None else _stub_listener_here()


def _find_tool(name: str, search_path: str | None) -> str | None:
    return shutil.which(name, path=os.pathsep.join(SYSTEM_DIRECTORIES) if search_path is None else search_path)


def _is_resolvectl_shim(tool: str) -> bool:
    return Path(tool).resolve().name == "resolvectl"


def _record_prefix(interface_order: Path) -> str:
    """wg-quick's trick for Debian's resolvconf: name the record after the first `NAME*` pattern.

    The file ranks record names by pattern and lists VPN patterns (tun*) ahead of LAN ones;
    a record named after our device (say tv-office) would only match the final `*`, so the
    LAN's nameservers would come first and the tunnel's would be tried last, if at all (the C
    library uses the first three).  "tun.tv-office" ranks as a VPN.
    """
    try:
        lines = interface_order.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        if match := _VPN_PATTERN.fullmatch(line.strip()):
            return match.group(1) + "."
    return ""


def detect_backend(search_path: str | None = None, interface_order: Path = INTERFACE_ORDER,
                   resolved_here: Callable[[], bool] = resolved_serves_this_namespace) -> DnsBackend:
    """Pick how to apply DNS settings here: systemd-resolved, else resolvconf, else nothing.

    `search_path` replaces the system directories when given (tests).
    """
    resolvectl = _find_tool("resolvectl", search_path)
    resolvconf = _find_tool("resolvconf", search_path)
    if resolvconf and _is_resolvectl_shim(resolvconf):  # systemd's resolvconf: resolved in disguise
        resolvectl = resolvectl or str(Path(resolvconf).resolve())
        resolvconf = None
    if resolvectl and resolved_here():
        return DnsBackend(RESOLVED, resolvectl)
    if resolvconf:
        return DnsBackend(RESOLVCONF, resolvconf, _record_prefix(interface_order))
    return DnsBackend(NO_BACKEND)


# --- applying --------------------------------------------------------------------------------

def _parse_servers(servers: Iterable[IPAddress | str]) -> list[IPAddress]:
    parsed = []
    for server in servers:
        try:
            parsed.append(ip_address(str(server)))
        except ValueError as exc:
            raise DnsError(f"invalid DNS server address {str(server)!r}") from exc
    return parsed


def _is_domain_name(name: str) -> bool:
    """DNS labels and dots only: nothing that could end a resolv.conf line or mean something to resolved."""
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


def _check_domains(domains: Iterable[str]) -> list[str]:
    checked = list(domains)
    for domain in checked:
        if not isinstance(domain, str) or not _is_domain_name(domain):
            raise DnsError(f"invalid DNS search domain {domain!r}")
    return checked


def _summary(servers: Sequence[IPAddress], domains: Sequence[str]) -> str:
    text = ", ".join(map(str, servers)) or "(none)"
    return f"{text} (search {' '.join(domains)})" if domains else text


class DnsManager:
    """DNS settings of one interface: `apply()` them (again, to change them), `revert()` on exit."""

    def __init__(self, ifname: str, runner: Runner = subprocess.run,
                 detect: Callable[[], DnsBackend] = detect_backend) -> None:
        self.ifname = ifname
        self._runner = runner
        self._detect = detect
        self._applied: DnsBackend | None = None

    def apply(self, servers: Iterable[IPAddress | str], search: Iterable[str] = (), *,
              exclusive: bool = False) -> str:
        """Make `servers` and `search` domains this interface's DNS; return what was done, in one line.

        `exclusive` asks for all queries to go to these servers (a full tunnel that must not
        leak lookups): resolved gets the routing domain "~.", openresolv the -x flag (Debian's
        resolvconf has no such notion and ignores it).  Raises DnsError when a tool fails, after
        reverting the interface's DNS settings (an earlier apply's too: nothing half-set stays).
        """
        addresses, domains = _parse_servers(servers), _check_domains(search)
        if not addresses and not domains:
            self.revert()
            return f"no DNS servers or search domains for {self.ifname}"
        backend = self._applied or self._detect()
        summary = _summary(addresses, domains)
        if backend.kind == NO_BACKEND:
            return f"DNS servers {summary} not applied: neither systemd-resolved nor resolvconf is available"
        try:
            if backend.kind == RESOLVED:
                description = self._apply_resolved(backend, addresses, domains, exclusive, summary)
            else:
                description = self._apply_resolvconf(backend, addresses, domains, exclusive, summary)
        except DnsError:
            self._revert_quietly(backend)
            self._applied = None
            raise
        self._applied = backend
        return description

    def revert(self) -> None:
        """Remove what `apply()` set; nothing to do when nothing was applied."""
        backend, self._applied = self._applied, None
        if backend is not None:
            self._run(self._revert_command(backend))

    # --- per backend ---

    def _apply_resolved(self, backend: DnsBackend, servers: Sequence[IPAddress], domains: Sequence[str],
                        exclusive: bool, summary: str) -> str:
        assert backend.tool is not None
        # A single empty argument clears a list (it may hold an earlier apply's entries).
        self._run([backend.tool, "dns", self.ifname, *(map(str, servers) if servers else [""])])
        routing = [*domains, *(["~."] if exclusive else [])]
        self._run([backend.tool, "domain", self.ifname, *(routing or [""])])
        return f"DNS servers {summary} set on {self.ifname} through systemd-resolved" + (
            ", for all queries" if exclusive else "")

    def _apply_resolvconf(self, backend: DnsBackend, servers: Sequence[IPAddress], domains: Sequence[str],
                          exclusive: bool, summary: str) -> str:
        assert backend.tool is not None
        record = backend.record_prefix + self.ifname
        lines = [f"nameserver {server}" for server in servers]
        if domains:
            lines.append("search " + " ".join(domains))
        # -m 0: openresolv's metric, ahead of DHCP-configured interfaces; Debian's ignores it.
        command = [backend.tool, "-a", record, "-m", "0", *(["-x"] if exclusive else [])]
        self._run(command, input="\n".join(lines) + "\n")
        return f"DNS servers {summary} registered with resolvconf as {record}"

    def _revert_command(self, backend: DnsBackend) -> list[str]:
        assert backend.tool is not None
        if backend.kind == RESOLVED:
            return [backend.tool, "revert", self.ifname]
        return [backend.tool, "-d", backend.record_prefix + self.ifname, "-f"]

    def _revert_quietly(self, backend: DnsBackend) -> None:
        """After a failed apply: undo what part of it succeeded; the apply's error is the one to report."""
        try:
            self._run(self._revert_command(backend))
        except DnsError:
            pass

    def _run(self, command: list[str], input: str = "") -> None:
        shown = " ".join(arg or "''" for arg in command)
        try:
            result: Any = self._runner(command, input=input, capture_output=True, text=True,
                                       timeout=TOOL_TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DnsError(f"`{shown}` did not finish within {TOOL_TIMEOUT_SECONDS:g} s") from exc
        except OSError as exc:
            raise DnsError(f"cannot run {command[0]}: {exc.strerror or exc}") from exc
        if result.returncode != 0:
            output = (result.stderr or result.stdout or "").strip().splitlines()
            reason = output[0] if output else "no output"
            raise DnsError(f"`{shown}` failed with exit code {result.returncode}: {reason}")
