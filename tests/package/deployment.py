"""tunvpn deployed from its .deb onto systemd test hosts, step by step as an admin does it.

The hosts come from systemdhosts; everything here runs inside them as root through the
package's own commands: apt, systemctl, tunvpn genkey/pubkey/show.  Key files and configs get
the ownership and mode the docs prescribe (root:tunvpn 0640), so the tests prove that advice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from systemdhosts import HostError, SystemdHost, wait_until

SERVER_TUNNEL_V4 = "203.0.113.1"
SERVER_TUNNEL_V6 = "2001:db8:100::1"
SERVER_PORT = 51820
PUSHED_DNS_SERVER = "198.51.100.53"
PUSHED_DNS_DOMAIN = "office.example"
APT_INSTALL = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"
CONNECT_TIMEOUT = 30.0
CAP_NET_ADMIN_ONLY = 1 << 12  # CapEff/CapPrm/CapBnd of a daemon holding CAP_NET_ADMIN and nothing else
MAX_EXPOSURE = 1.7


def install(host: SystemdHost, deb: Path) -> None:
    """`apt install ./tunvpn_*.deb`, as the README says (the hosts have every dependency baked in)."""
    host.put_file(f"/root/{deb.name}", deb.read_bytes())
    host.run(f"{APT_INSTALL} /root/{deb.name}", timeout=180)


def installed_version(host: SystemdHost) -> str:
    return host.run(["dpkg-query", "-W", "-f", "${Version}", "tunvpn"]).stdout.strip()


def make_key(host: SystemdHost, name: str) -> str:
    """Generate /etc/tunvpn/NAME.key as the docs say (root:tunvpn 0640); return its public key."""
    path = f"/etc/tunvpn/{name}.key"
    host.run(f"umask 077 && tunvpn genkey > {path} && chown root:tunvpn {path} && chmod 640 {path}")
    return host.run(f"tunvpn pubkey < {path}").stdout.strip()


def write_config(host: SystemdHost, name: str, text: str) -> None:
    host.put_file(f"/etc/tunvpn/{name}.conf", text, mode=0o640, owner="root:tunvpn")


def server_config(key_name: str, client_keys: list[str]) -> str:
    peers = "".join(f"\n[Peer]\nPublicKey = {key}\n" for key in client_keys)
    return (f"[Interface]\nPrivateKeyFile = {key_name}.key\nListenPort = {SERVER_PORT}\n"
            f"Address = {SERVER_TUNNEL_V4}/24, {SERVER_TUNNEL_V6}/64\nClientToClient = yes\n"
            f"PushDNS = {PUSHED_DNS_SERVER}, {PUSHED_DNS_DOMAIN}\n{peers}")


def client_config(key_name: str, server_key: str, server: SystemdHost) -> str:
    return (f"[Interface]\nPrivateKeyFile = {key_name}.key\n\n"
            f"[Peer]\nPublicKey = {server_key}\nEndpoint = {server.address}:{SERVER_PORT}\n")


def show(host: SystemdHost, name: str) -> dict:
    """`tunvpn show NAME --json` run by root while the daemon runs as user tunvpn."""
    return json.loads(host.run(["tunvpn", "show", name, "--json"]).stdout)


def tunnel_address(host: SystemdHost, name: str, timeout: float = CONNECT_TIMEOUT) -> str:
    """The IPv4 tunnel address a client got from its server, once it has one."""
    def pushed() -> str | None:
        try:
            addresses = show(host, name)["addresses"]
        except HostError:  # the daemon is (re)starting: no control socket yet
            return None
        v4 = [address.split("/")[0] for address in addresses if "." in address]
        return v4[0] if v4 else None

    return wait_until(pushed, timeout, interval=0.2, what=f"{host.role}'s {name} to get a tunnel address")


def wait_for_ping(host: SystemdHost, address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Ping until one reply comes back: tunnels need a handshake, restarted daemons a moment."""
    def answered() -> bool:
        return host.run(["ping", "-n", "-q", "-c", "1", "-W", "1", address], check=False, timeout=10).returncode == 0

    wait_until(answered, timeout, interval=0.2, what=f"{host.role} to reach {address}")


def main_pid(host: SystemdHost, unit: str) -> int:
    return int(host.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).stdout.strip() or 0)


def wait_active(host: SystemdHost, unit: str, other_than_pid: int | None = None, timeout: float = 30.0) -> int:
    """Wait until `unit` is active (with a main process other than `other_than_pid`); its MainPID."""
    def active_pid() -> int | None:
        state = host.run(["systemctl", "is-active", unit], check=False).stdout.strip()
        pid = main_pid(host, unit) if state == "active" else 0
        return pid if pid and pid != other_than_pid else None

    return wait_until(active_pid, timeout, interval=0.2, what=f"{unit} on {host.role} to be active")


def capability_masks(host: SystemdHost, pid: int) -> dict[str, int]:
    """The Cap* lines of /proc/PID/status, as numbers."""
    status = host.read_file(f"/proc/{pid}/status")
    return {name: int(value, 16) for name, value in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", status, re.MULTILINE)}


def process_user(host: SystemdHost, pid: int) -> str:
    return host.run(["ps", "-o", "user=", "-p", str(pid)]).stdout.strip()


def exposure(host: SystemdHost, unit: str) -> float:
    """The overall exposure level `systemd-analyze security` gives `unit` (0 best, 10 worst)."""
    output = host.run(["systemd-analyze", "security", "--no-pager", unit], check=False).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    if not match:
        raise HostError(f"no exposure level in systemd-analyze's output for {unit}: {output[-500:]}")
    return float(match.group(1))


def file_digests(host: SystemdHost, directory: str = "/etc/tunvpn") -> dict[str, str]:
    """sha256 of each file in `directory` with its owner and mode: what an upgrade must keep."""
    listing = host.run(f"cd {directory} && for f in *; do echo \"$f $(stat -c '%U:%G %a' \"$f\") "
                       f"$(sha256sum < \"$f\" | cut -d' ' -f1)\"; done").stdout
    return {line.split()[0]: line for line in listing.splitlines()}


def background_ping(host: SystemdHost, address: str, count: int, log: str) -> None:
    """Start `count` pings 0.1 s apart inside the host; `ping_result` reads how they went."""
    host.run(f"ping -n -q -i 0.1 -c {count} {address} > {log} 2>&1 &")


def ping_result(host: SystemdHost, log: str, timeout: float = 30.0) -> tuple[int, int]:
    """(transmitted, received) of a background ping, once it has finished."""
    def summary() -> tuple[int, int] | None:
        match = re.search(r"(\d+) packets transmitted, (\d+) received", host.read_file(log))
        return (int(match.group(1)), int(match.group(2))) if match else None

    return wait_until(summary, timeout, interval=0.2, what=f"the ping logged in {log} on {host.role} to end")


def purge_and_check_nothing_left(host: SystemdHost, admin_files: set[str], made_by_admin: Iterable[str] = ()) -> None:
    """`apt purge tunvpn`, then look for every kind of leftover; raise naming what is left.

    `made_by_admin` names checks below ("the user", "the state directory", ...) for things that
    existed before the package came: purge must leave exactly those.
    """
    host.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q tunvpn", timeout=120)
    checks = {
        "a tunvpn process": "pgrep -a -f 'tunvpn (server|client)'",
        "a tunvpn device": "ip -o link show | grep ' tv-'",
        "a loaded tunvpn unit": "systemctl list-units --all --no-legend 'tunvpn*' | grep .",
        "a tunvpn unit file": "systemctl list-unit-files --no-legend 'tunvpn*' | grep .",
        "a tunvpn unit link": "find /etc/systemd/system -name 'tunvpn*' | grep .",
        "the user": "getent passwd tunvpn",
        "the group": "getent group tunvpn",
        "the state directory": "ls -d /var/lib/tunvpn",
        "the runtime directory": "ls -d /run/tunvpn",
        "the statoverride": "dpkg-statoverride --list /etc/tunvpn",
        "the package": "dpkg-query -W -f '${Status}\\n' tunvpn | grep -v not-installed",
    }
    present = {what: result.stdout.strip() for what, command in checks.items()
               if (result := host.run(command, check=False)).returncode == 0}
    left = {what: shown for what, shown in present.items() if what not in made_by_admin}
    gone = set(made_by_admin) - set(present)
    if gone:
        raise AssertionError(f"{host.role}: purge removed what the admin made before the package: {', '.join(sorted(gone))}")
    remaining = set(host.run("ls -A /etc/tunvpn 2>/dev/null", check=False).stdout.split())
    if remaining - admin_files:
        left["files the package made in /etc/tunvpn"] = " ".join(sorted(remaining - admin_files))
    if left:
        raise AssertionError(f"{host.role}: purge left " + "; ".join(f"{what}: {shown}" for what, shown in left.items()))

