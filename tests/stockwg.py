"""The stock WireGuard peer for interop tests: wireguard-go configured with wg, in a lab host.

wireguard-go runs in the foreground (`-f`) inside the host's namespace; its control socket
/var/run/wireguard/IFNAME.sock is shared by every namespace, so IFNAME must be unique per run
(`Lab.unique_ifname`).  Keys go to 0600 files in a private temporary directory.  The whole
configuration is remembered, so `restart()` brings back the same peer with the same port.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from netlab import Host, LabError, stop_process, wait_until

SOCKET_DIR = Path("/var/run/wireguard")
START_TIMEOUT_SECONDS = 5.0


class StockWireGuardError(LabError):
    """wireguard-go or wg is missing or misbehaved."""


def require_tools() -> None:
    """Fail loudly: an interop test without the stock peer must not pass or skip."""
    missing = [tool for tool in ("wireguard-go", "wg") if shutil.which(tool) is None]
    if missing:
        raise StockWireGuardError(f"{' and '.join(missing)} not found: install the Debian packages "
                                  f"wireguard-go and wireguard-tools (make deps)")


def _wg(*args: str, input: str | None = None) -> str:
    require_tools()
    result = subprocess.run(["wg", *args], input=input, capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise StockWireGuardError(f"wg {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def genkey() -> str:
    return _wg("genkey")


def pubkey(private_key_b64: str) -> str:
    return _wg("pubkey", input=private_key_b64 + "\n")


def genpsk() -> str:
    return _wg("genpsk")


@dataclass(frozen=True)
class PeerStatus:
    """One peer line of `wg show IFNAME dump`."""

    public_key: str
    preshared_key: str | None
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None


@dataclass(frozen=True)
class Dump:
    """`wg show IFNAME dump`, parsed (the private key is left out on purpose)."""

    public_key: str
    listen_port: int
    fwmark: int | None
    peers: dict[str, PeerStatus]


def _none_if(value: str, *empty: str) -> str | None:
    return None if value in empty else value


def parse_dump(text: str) -> Dump:
    lines = [line.split("\t") for line in text.strip().splitlines()]
    if not lines or len(lines[0]) != 4:
        raise StockWireGuardError(f"unexpected `wg show dump` output: {text!r}")
    _private, public, port, fwmark = lines[0]
    peers = {}
    for fields in lines[1:]:
        if len(fields) != 8:
            raise StockWireGuardError(f"unexpected peer line in `wg show dump`: {fields!r}")
        key, psk, endpoint, allowed, handshake, rx, tx, keepalive = fields
        peers[key] = PeerStatus(
            public_key=key,
            preshared_key=_none_if(psk, "(none)"),
            endpoint=_none_if(endpoint, "(none)"),
            allowed_ips=tuple(allowed.split(",")) if allowed != "(none)" else (),
            latest_handshake=int(handshake),
            rx_bytes=int(rx),
            tx_bytes=int(tx),
            persistent_keepalive=None if keepalive == "off" else int(keepalive),
        )
    return Dump(public, int(port), None if fwmark == "off" else int(fwmark, 0), peers)


@dataclass
class _PeerConfig:
    public_key: str
    allowed_ips: tuple[str, ...]
    endpoint: str | None
    preshared_key: str | None
    persistent_keepalive: int | None


@dataclass
class _LinkConfig:
    addresses: list[str] = field(default_factory=list)
    mtu: int | None = None
    up: bool = False
    routes: list[str] = field(default_factory=list)


class StockWireGuard:
    """One wireguard-go interface in `host`, started at construction."""

    def __init__(self, host: Host, ifname: str, private_key_b64: str, listen_port: int | None = None) -> None:
        require_tools()
        self.host = host
        self.ifname = ifname
        self.public_key = pubkey(private_key_b64)
        self.listen_port = listen_port
        self._peers: dict[str, _PeerConfig] = {}
        self._link = _LinkConfig()
        self._process: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="tunvpn-stockwg-"))  # mode 0700
        self._secret_files = 0
        self._private_key_file = self._secret_file("private.key", private_key_b64)
        host.lab.add_cleanup(self.close)
        self._start()

    def __repr__(self) -> str:
        return f"StockWireGuard({self.host.role}/{self.ifname}, port={self.listen_port})"

    @property
    def socket_path(self) -> Path:
        return SOCKET_DIR / f"{self.ifname}.sock"

    @property
    def log_path(self) -> Path:
        return self._dir / "wireguard-go.log"

    def log(self) -> str:
        """What wireguard-go printed (verbose level), for failure messages."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def endpoint(self, address: str) -> str:
        """`address:port` (brackets for IPv6) for the other side's `endpoint`."""
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        return f"{host}:{self.listen_port}"

    def _secret_file(self, name: str, content: str) -> Path:
        path = self._dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(content + "\n")
        return path

    def _start(self) -> None:
        if self.socket_path.exists():
            raise StockWireGuardError(f"{self.socket_path} already exists: is another wireguard-go using "
                                      f"{self.ifname}? (use Lab.unique_ifname)")
        env = dict(os.environ, LOG_LEVEL="verbose")
        with open(self.log_path, "ab") as log:
            self._process = self.host.popen(["wireguard-go", "-f", self.ifname], stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
        wait_until(self._control_socket_ready, START_TIMEOUT_SECONDS, interval=0.01,
                   what=f"wireguard-go's control socket {self.socket_path}")
        self._apply_all()

    def _control_socket_ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise StockWireGuardError(f"wireguard-go -f {self.ifname} exited with {self._process.returncode}: "
                                      f"{self.log().strip()[-500:]}")
        return self.socket_path.is_socket()

    def _wg_set(self, *args: str) -> None:
        result = self.host.run(["wg", "set", self.ifname, *args], check=False)
        if result.returncode != 0:
            raise StockWireGuardError(f"wg set {self.ifname} {' '.join(args)} failed: {result.stderr.strip()}")

    def _apply_all(self) -> None:
        """Push the whole remembered configuration (used at start and after a restart)."""
        args = ["private-key", str(self._private_key_file)]
        if self.listen_port is not None:
            args += ["listen-port", str(self.listen_port)]
        for peer in self._peers.values():
            args += self._peer_args(peer)
        self._wg_set(*args)
        self.listen_port = self.show_dump().listen_port
        for address in self._link.addresses:
            self.host.add_address(self.ifname, address)
        if self._link.mtu is not None:
            self.host.ip("link", "set", self.ifname, "mtu", str(self._link.mtu))
        if self._link.up:
            self.host.ip("link", "set", self.ifname, "up")
        for network in self._link.routes:
            self.host.ip("route", "add", network, "dev", self.ifname)

    def _peer_args(self, peer: _PeerConfig) -> list[str]:
        args = ["peer", peer.public_key, "allowed-ips", ",".join(peer.allowed_ips)]
        if peer.preshared_key is not None:
            self._secret_files += 1
            args += ["preshared-key", str(self._secret_file(f"psk{self._secret_files}.key", peer.preshared_key))]
        if peer.endpoint is not None:
            args += ["endpoint", peer.endpoint]
        if peer.persistent_keepalive is not None:
            args += ["persistent-keepalive", str(peer.persistent_keepalive)]
        return args

    def set_peer(self, public_key: str, *, allowed_ips: Sequence[str] = (), endpoint: str | None = None,
                 preshared_key: str | None = None, persistent_keepalive: int | None = None) -> None:
        """Add or replace a peer (allowed IPs are replaced, as `wg set` does)."""
        peer = _PeerConfig(public_key, tuple(allowed_ips), endpoint, preshared_key, persistent_keepalive)
        self._wg_set(*self._peer_args(peer))
        self._peers[public_key] = peer

    def remove_peer(self, public_key: str) -> None:
        self._wg_set("peer", public_key, "remove")
        self._peers.pop(public_key, None)

    def add_address(self, address: str) -> None:
        """An address on the WireGuard interface, e.g. "203.0.113.1/24" (IPv6 without DAD)."""
        self.host.add_address(self.ifname, address)
        self._link.addresses.append(address)

    def set_up(self, mtu: int | None = None) -> None:
        if mtu is not None:
            self.host.ip("link", "set", self.ifname, "mtu", str(mtu))
            self._link.mtu = mtu
        self.host.ip("link", "set", self.ifname, "up")
        self._link.up = True

    def add_route(self, network: str) -> None:
        self.host.ip("route", "add", network, "dev", self.ifname)
        self._link.routes.append(network)

    def show_dump(self) -> Dump:
        result = self.host.run(["wg", "show", self.ifname, "dump"], check=False)
        if result.returncode != 0:
            raise StockWireGuardError(f"wg show {self.ifname} dump failed: {result.stderr.strip()}")
        return parse_dump(result.stdout)

    def wait_for_handshake(self, peer_public_key: str, timeout: float = 5.0) -> PeerStatus:
        """Poll until wg reports a completed handshake with that peer."""
        def handshaken() -> PeerStatus | None:
            peer = self.show_dump().peers.get(peer_public_key)
            return peer if peer is not None and peer.latest_handshake > 0 else None
        return wait_until(handshaken, timeout, interval=0.05, what=f"a handshake on {self.ifname}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop wireguard-go by PID (SIGTERM, bounded wait, SIGKILL); its interface vanishes."""
        if self._process is not None:
            process, self._process = self._process, None
            stop_process(process)
        if self.socket_path.exists():  # left behind only when SIGKILL was needed
            self.socket_path.unlink()

    def restart(self) -> None:
        self.stop()
        self._start()

    def close(self) -> None:
        """Stop and forget the key files; idempotent."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
