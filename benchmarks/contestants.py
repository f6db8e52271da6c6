"""The systems `throughput.py` puts side by side, and how each one's two ends come up in a lab.

Every system gets its own pair of namespaces joined by one veth (underlay 192.0.2.0/24, tunnel
203.0.113.0/24, tunnel MTU 1420), so the tunnels never share a device, a socket or a route.
A setup returns once a ping crossed the tunnel; the processes then running in the two namespaces
are the system's VPN processes, whose CPU time the measurements read.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from netlab import Host, Lab, LabError, python_env, wait_until  # noqa: E402
from stockwg import StockWireGuard, genkey, pubkey  # noqa: E402
from tunvpnd import Tunvpn, wait_for_ping  # noqa: E402

import trixie  # noqa: E402

SERVER_UNDERLAY, CLIENT_UNDERLAY = "192.0.2.1", "192.0.2.2"
SERVER_TUNNEL, CLIENT_TUNNEL = "203.0.113.1", "203.0.113.2"
TUNNEL_MTU = 1420  # wireguard-go's default and tunvpn's; OpenVPN and fastd are set to it
VPN_PORT = 51820
HANDSHAKE_TIMEOUT = 15.0
START_TIMEOUT = 15.0


class BenchError(LabError):
    """A prerequisite is missing or a measurement went wrong; the message says which."""


@dataclass
class System:
    """One side-by-side contestant: where iperf3 and ping run, what to aim at, what to clock."""

    key: str
    label: str
    server: Host
    client: Host
    target: str
    vpn_pids: list[int] = field(default_factory=list)
    server_pids: list[int] = field(default_factory=list)  # those of vpn_pids in the server's namespace
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Interpreter:
    """A Python that runs tunvpn daemons, and the libraries it really imports."""

    path: str
    python_version: str
    cryptography_version: str
    cryptography_dir: str
    pyroute2_version: str


# --- common ------------------------------------------------------------------------------------

def cable(lab: Lab, tag: str) -> tuple[Host, Host]:
    """A server and a client namespace joined by one veth carrying the underlay."""
    server, client = lab.add_host(f"{tag}_server"), lab.add_host(f"{tag}_client")
    lab.link(server, client, [f"{SERVER_UNDERLAY}/24"], [f"{CLIENT_UNDERLAY}/24"])
    return server, client


def namespace_pids(host: Host) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True, timeout=10)
    return [int(word) for word in result.stdout.split()]


def finish(key: str, label: str, server: Host, client: Host, logs: Callable[[], str],
           details: dict[str, Any] | None = None) -> System:
    """Wait for the tunnel to carry a ping, then record which processes make it."""
    try:
        wait_for_ping(client, SERVER_TUNNEL, HANDSHAKE_TIMEOUT)
    except LabError as exc:
        raise BenchError(f"{key}: no tunnel: {exc}\n{logs()}") from None
    server_pids = namespace_pids(server)
    pids = server_pids + namespace_pids(client)
    if not pids:
        raise BenchError(f"{key}: the tunnel works but no process runs in its namespaces")
    return System(key, label, server, client, SERVER_TUNNEL, pids, server_pids, details or {})


def private_dir(lab: Lab, prefix: str) -> Path:
    """A 0700 directory for keys and logs, removed when the lab closes."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    lab.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    return directory


def secret_file(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(content.encode() if isinstance(content, str) else content)
    return path


def tail(path: Path, characters: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-characters:]
    except OSError:
        return "(no log)"


def first_line(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (result.stdout.strip() or result.stderr.strip() or "unknown").splitlines()[0]


def debian_version(package: str) -> str:
    return first_line(["dpkg-query", "-W", "-f", "${Version}", package])


# --- raw veth ----------------------------------------------------------------------------------

def setup_veth(lab: Lab) -> System:
    server, client = cable(lab, "veth")
    return System("veth", "raw veth (ceiling)", server, client, SERVER_UNDERLAY)


# --- wireguard-go ------------------------------------------------------------------------------

@contextlib.contextmanager
def first_on_path(directory: Path) -> Iterator[None]:
    """StockWireGuard starts `wireguard-go` from PATH: put another build first while it starts."""
    saved = os.environ["PATH"]
    os.environ["PATH"] = f"{directory}{os.pathsep}{saved}"
    try:
        yield
    finally:
        os.environ["PATH"] = saved


def setup_wireguard_go(lab: Lab, key: str, label: str, binary: Path) -> System:
    """wireguard-go `binary` at both ends, configured with wg; checked to be what really runs."""
    server_host, client_host = cable(lab, key.replace("-", "_"))
    server_key, client_key = genkey(), genkey()
    with first_on_path(binary.parent):
        server = StockWireGuard(server_host, lab.unique_ifname("wg"), server_key, listen_port=VPN_PORT)
        client = StockWireGuard(client_host, lab.unique_ifname("wg"), client_key)
    server.set_peer(pubkey(client_key), allowed_ips=[f"{CLIENT_TUNNEL}/32"])
    client.set_peer(pubkey(server_key), allowed_ips=["203.0.113.0/24"], endpoint=server.endpoint(SERVER_UNDERLAY))
    for end, address in ((server, SERVER_TUNNEL), (client, CLIENT_TUNNEL)):
        end.add_address(f"{address}/24")
        end.set_up(mtu=TUNNEL_MTU)
    system = finish(key, label, server_host, client_host, lambda: server.log()[-2000:] + client.log()[-2000:])
    running = {os.path.realpath(f"/proc/{pid}/exe") for pid in system.vpn_pids}
    if running != {os.path.realpath(binary)}:
        raise BenchError(f"{key}: expected {binary} at both ends, found {sorted(running)}")
    system.details["binary"] = {"path": str(binary), "version_output": first_line([str(binary), "--version"])}
    return system


def setup_wireguard_go_bookworm(lab: Lab) -> System:
    binary = shutil.which("wireguard-go")
    if binary is None:
        raise BenchError("wireguard-go not found: install it with `tools/ensure-deps wireguard-go`")
    return setup_wireguard_go(lab, "wireguard-go-bookworm",
                              f"wireguard-go {debian_version('wireguard-go')} (bookworm)", Path(binary))


def setup_wireguard_go_trixie(lab: Lab, build: trixie.UnpackedBinary) -> System:
    system = setup_wireguard_go(lab, "wireguard-go-trixie", f"wireguard-go {build.package_version} (trixie)",
                                build.path)
    system.details["binary"]["package_version"] = build.package_version
    return system


# --- tunvpn ------------------------------------------------------------------------------------

_PROBE = ("import json, sys, os, importlib.metadata, cryptography, pyroute2; "
          "print(json.dumps([sys.version.split()[0], cryptography.__version__, "
          "os.path.dirname(cryptography.__file__), importlib.metadata.version('pyroute2')]))")


def probe_interpreter(path: str) -> Interpreter:
    if not os.access(path, os.X_OK):
        raise BenchError(f"interpreter {path} not found (the venv comes from `make venv`)")
    result = subprocess.run([path, "-c", _PROBE], capture_output=True, text=True, timeout=60, env=python_env())
    if result.returncode != 0:
        raise BenchError(f"{path} cannot import tunvpn's libraries: {result.stderr.strip()[-300:]}")
    python_version, crypto_version, crypto_dir, pyroute2_version = json.loads(result.stdout)
    return Interpreter(path, python_version, crypto_version, crypto_dir, pyroute2_version)


def tunvpn_configs(server_key: str, client_key: str) -> tuple[str, str]:
    server = (f"[Interface]\nPrivateKey = {server_key}\nListenPort = {VPN_PORT}\nAddress = {SERVER_TUNNEL}/24\n"
              f"MTU = {TUNNEL_MTU}\n\n[Peer]\nPublicKey = {pubkey(client_key)}\nAllowedIPs = {CLIENT_TUNNEL}/32\n")
    client = (f"[Interface]\nPrivateKey = {client_key}\nAddress = {CLIENT_TUNNEL}/24\nMTU = {TUNNEL_MTU}\n\n"
              f"[Peer]\nPublicKey = {pubkey(server_key)}\nEndpoint = {SERVER_UNDERLAY}:{VPN_PORT}\n"
              f"AllowedIPs = 203.0.113.0/24\n")
    return server, client


def require_own_cryptography(pid: int, interpreter: Interpreter) -> None:
    """Prove the daemon runs on the interpreter's own cryptography (not one leaking in via a path).

    /proc/PID/maps names files as seen from here, so a chrooted daemon's carry its root in front.
    """
    root = os.readlink(f"/proc/{pid}/root").rstrip("/")
    maps = Path(f"/proc/{pid}/maps").read_text()
    if f"{root}{interpreter.cryptography_dir}/" not in maps:
        raise BenchError(f"the tunvpn daemon (pid {pid}) under {interpreter.path} has not loaded "
                         f"{root}{interpreter.cryptography_dir}")


def stop_daemon(daemon: Tunvpn) -> None:
    """Stop a daemon while its files still exist: the lab removes them first and then stops the
    processes, and a server saves state.json on its way out, which would bring its directory back."""
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.stop()


def setup_tunvpn(lab: Lab, key: str, label: str, interpreter: Interpreter, offloads: str = "all") -> System:
    """`offloads` is the daemons' --offloads: the lever variants switch some off."""
    server_host, client_host = cable(lab, key.replace("-", "_"))
    server_key, client_key = genkey(), genkey()
    server_conf, client_conf = tunvpn_configs(server_key, client_key)
    # What the units run with (not the harness's debug logging), and the offloads asked for.
    args = ("--log-level", "info", "--offloads", offloads)
    daemons = [Tunvpn(server_host, "server", server_conf, extra_args=args, python=interpreter.path),
               Tunvpn(client_host, "client", client_conf, extra_args=args, python=interpreter.path)]
    for daemon in daemons:
        lab.add_cleanup(lambda daemon=daemon: stop_daemon(daemon))
        daemon.start()

    def logs() -> str:
        return "\n".join(f"--- tunvpn {d.role} (exit code {d.process and d.process.poll()}) ---\n"
                         f"{d.log()[-3000:]}" for d in daemons)

    system = finish(key, f"{label}: python {interpreter.python_version}, cryptography "
                    f"{interpreter.cryptography_version}", server_host, client_host, logs,
                    {"interpreter": asdict(interpreter)})
    for daemon in daemons:
        assert daemon.process is not None
        require_own_cryptography(daemon.process.pid, interpreter)
    return system


# --- OpenVPN -----------------------------------------------------------------------------------

def openvpn_certificates(directory: Path) -> None:
    """A throwaway CA with one server and one client certificate (P-256), for TLS in p2p mode."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunvpn bench CA")])

    def certificate(name: x509.Name, public_key: Any, extensions: list[tuple[Any, bool]]) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_name).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    ca = certificate(ca_name, ca_key.public_key(), [(x509.BasicConstraints(ca=True, path_length=0), True)])
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]), key.public_key(), [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, key_agreement=True, content_commitment=False,
                           key_encipherment=False, data_encipherment=False, key_cert_sign=False, crl_sign=False,
                           encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([usage]), False)])
        (directory / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        secret_file(directory, f"{role}.key", key.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))


def openvpn_command(directory: Path, role: str) -> list[str]:
    """Userspace OpenVPN, TLS in p2p mode, AES-256-GCM only, no DCO, otherwise its defaults."""
    local, remote = (SERVER_TUNNEL, CLIENT_TUNNEL) if role == "server" else (CLIENT_TUNNEL, SERVER_TUNNEL)
    command = ["openvpn", "--dev", "tun0", "--proto", "udp", "--ifconfig", local, remote,
               "--ca", str(directory / "ca.crt"), "--cert", str(directory / f"{role}.crt"),
               "--key", str(directory / f"{role}.key"), "--data-ciphers", "AES-256-GCM", "--disable-dco",
               "--tun-mtu", str(TUNNEL_MTU), "--verb", "3"]
    if role == "server":
        return command + ["--tls-server", "--dh", "none", "--local", SERVER_UNDERLAY, "--lport", str(VPN_PORT),
                          "--remote-cert-tls", "client"]
    return command + ["--tls-client", "--nobind", "--remote", SERVER_UNDERLAY, str(VPN_PORT),
                      "--remote-cert-tls", "server"]


def setup_openvpn(lab: Lab) -> System:
    server_host, client_host = cable(lab, "openvpn")
    directory = private_dir(lab, "tunvpn-bench-openvpn-")
    openvpn_certificates(directory)
    ends = []
    for host, role in ((server_host, "server"), (client_host, "client")):
        with open(directory / f"{role}.log", "ab") as log:
            host.popen(openvpn_command(directory, role), stdout=log, stderr=subprocess.STDOUT)
        ends.append(directory / f"{role}.log")

    def logs() -> str:
        return "\n".join(f"--- openvpn {path.stem} ---\n{tail(path)}" for path in ends)

    def data_channel_ready() -> bool:
        return all("Initialization Sequence Completed" in tail(path, 10**6) for path in ends)

    try:
        wait_until(data_channel_ready, START_TIMEOUT, interval=0.1, what="both OpenVPN ends to complete")
    except LabError as exc:
        raise BenchError(f"openvpn: {exc}\n{logs()}") from None
    for path in ends:
        if "Data Channel: cipher 'AES-256-GCM'" not in tail(path, 10**6):
            raise BenchError(f"openvpn: the {path.stem} did not settle on AES-256-GCM:\n{logs()}")
    return finish("openvpn", f"OpenVPN {openvpn_version()}, TLS p2p, AES-256-GCM, DCO off",
                  server_host, client_host, logs)


def openvpn_version() -> str:
    return first_line(["openvpn", "--version"]).split()[1]


# --- fastd -------------------------------------------------------------------------------------

def fastd_keys() -> tuple[str, str]:
    """(secret, public) hex keys from fastd itself."""
    secret = first_line(["fastd", "--generate-key", "--machine-readable"])
    result = subprocess.run(["fastd", "--config", "-", "--show-key", "--machine-readable"],
                            input=f'secret "{secret}";\n', capture_output=True, text=True, timeout=10)
    if result.returncode != 0 or not re.fullmatch(r"[0-9a-f]{64}", result.stdout.strip()):
        raise BenchError(f"fastd --show-key failed: {result.stderr.strip() or result.stdout.strip()}")
    return secret, result.stdout.strip()


def fastd_config(secret: str, bind: str, peer_key: str, peer_remote: str | None) -> str:
    remote = f" remote {peer_remote}:{VPN_PORT};" if peer_remote else ""
    return (f'log level info;\nmode tun;\ninterface "fastd0";\nmethod "salsa2012+umac";\n'
            f'bind {bind}:{VPN_PORT};\nmtu {TUNNEL_MTU};\nsecret "{secret}";\n'
            f'peer "other" {{ key "{peer_key}";{remote} }}\n')


def link_exists(host: Host, ifname: str) -> bool:
    return host.ip("link", "show", "dev", ifname, check=False).returncode == 0


def setup_fastd(lab: Lab) -> System:
    server_host, client_host = cable(lab, "fastd")
    directory = private_dir(lab, "tunvpn-bench-fastd-")
    (server_secret, server_public), (client_secret, client_public) = fastd_keys(), fastd_keys()
    configs = {"server": fastd_config(server_secret, SERVER_UNDERLAY, client_public, None),
               "client": fastd_config(client_secret, CLIENT_UNDERLAY, server_public, SERVER_UNDERLAY)}
    ends = ((server_host, "server", SERVER_TUNNEL), (client_host, "client", CLIENT_TUNNEL))

    def logs() -> str:
        return "\n".join(f"--- fastd {role} ---\n{tail(directory / f'{role}.log')}" for _, role, _ in ends)

    # The server first, up and bound before the client's first handshake: fastd waits long
    # before it retries a lost one, longer than the setup's timeout.
    for host, role, address in ends:
        config = secret_file(directory, f"{role}.conf", configs[role])
        with open(directory / f"{role}.log", "ab") as log:
            host.popen(["fastd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda host=host: link_exists(host, "fastd0"), START_TIMEOUT, interval=0.05,
                       what=f"fastd's interface on the {role}")
        except LabError as exc:
            raise BenchError(f"fastd: {exc}\n{logs()}") from None
        host.add_address("fastd0", f"{address}/24")
        host.ip("link", "set", "fastd0", "up")
    return finish("fastd", f"fastd {first_line(['fastd', '--version']).split()[-1]}, salsa2012+umac",
                  server_host, client_host, logs)
