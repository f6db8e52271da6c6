"""Real systemd hosts for tests: systemd-nspawn containers over a cached debootstrapped rootfs.

The package tests (tests/package/) and the Ansible role tests install and run things the way an
admin does, so they need machines that boot systemd, not bare network namespaces.  This module
makes such machines on one host in about a second each:

    with SystemdLab("trixie") as lab:
        server = lab.add_host("server")       # boots; 192.0.2.1 and 2001:db8:1::1 on eth0
        client = lab.add_host("client")
        server.put_file("/root/tunvpn.deb", deb_bytes)
        server.run("apt-get install -y /root/tunvpn.deb", timeout=120)
        client.reboot()

- Root file systems: one per Debian suite, built once with debootstrap and cached outside the
  checkout in CACHE_ROOT, keyed on a hash of the suite, its package list and the preparation
  steps (change any of them and a new one is built).  The hosts have no package mirror, so
  everything a test installs on them must be in that list or come as a local .deb.
- Each host: an overlay mount (the shared rootfs read-only below, its own upper layer), its own
  network namespace (a netlab Host) plugged into the lab's switch namespace, and its own cgroup,
  so that several containers' systemds never clobber each other's cgroups (~10% of boots fail
  with status=219/CGROUP otherwise).  A shell loop restarts systemd-nspawn when the container
  reboots (exit code 133), as a real machine comes back.
- Commands run inside through nsenter into the container's PID 1 (there is no machined on the
  build machine, so machinectl and systemd-run -M do not work).  For SSH-based tools, every host
  runs sshd and the switch namespace reaches all hosts' addresses.
- Teardown stops the containers (SIGTERM: an orderly halt, then SIGKILL of the cgroup), unmounts,
  removes cgroups, network namespaces and the run directory, also when a test fails or the run is
  interrupted (netlab's atexit and SIGTERM handling); the next run sweeps what a killed run left.

`python3 tests/systemdhosts.py build-rootfs SUITE...` builds the caches ahead of a test run.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netlab  # noqa: E402  (tests/ is not a package; netlab is its sibling module)
from netlab import LabError, LabTimeout, wait_until  # noqa: E402

CACHE_ROOT = Path(os.environ.get("TUNVPN_TEST_CACHE", "/var/cache/tunvpn-tests"))
RUN_ROOT = Path("/var/tmp/tunvpn-hosts")
CGROUP_ROOT = Path("/sys/fs/cgroup")
NSPAWN_PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REBOOT_EXIT_CODE = 133  # systemd-nspawn's exit code when the container rebooted
MAX_REBOOTS = 50  # bounds the restart loop of one host
DEBOOTSTRAP_TIMEOUT = 1200.0
BOOT_TIMEOUT = 60.0
HALT_TIMEOUT = 20.0

# Everything the hosts need: systemd and D-Bus to boot, the .deb's runtime dependencies (the
# hosts have no mirror), tools the tests call, and sshd, python3-apt and sudo for Ansible.
# python3-cffi-backend must be named or python3-cryptography fails to configure under debootstrap.
HOST_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "iproute2", "iputils-ping", "procps", "nftables",
    "python3", "python3-cffi-backend", "python3-cryptography", "python3-pyroute2",
    "openssh-server", "python3-apt", "sudo",
)
# Trixie hosts also resolve through systemd-resolved, with polkit deciding who may change its
# settings: the package's polkit rule lets the unprivileged daemon push DNS there.
SUITE_PACKAGES = {
    "trixie": (*HOST_PACKAGES, "systemd-resolved", "polkitd", "libpam-systemd"),  # the last: polkitd's logind
    "bookworm": HOST_PACKAGES,
}
SUPPORTED_SUITES = tuple(SUITE_PACKAGES)
# Timers that would make a test host reach for the network or the disk for nothing.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer")
# Part of the cache key: bump it when `_prepare_rootfs` changes what it does.
PREPARATION_VERSION = "2"

_HOST_ROLE = re.compile(r"^[a-z][a-z0-9]{0,14}$")


class HostError(LabError):
    """A host could not be built, booted, reached or removed; the message says which and why."""


def _run(cmd: Sequence[str], *, timeout: float = 30.0, check: bool = True,
         input: str | bytes | None = None) -> subprocess.CompletedProcess:
    text = not isinstance(input, bytes)
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=text, timeout=timeout, input=input,
                                stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LabTimeout(f"`{shlex.join(cmd)}` did not finish within {timeout:g} s") from exc
    if check and result.returncode != 0:
        output = result.stderr if text else result.stderr.decode(errors="replace")
        raise HostError(f"`{shlex.join(cmd)}` failed with exit code {result.returncode}: {output.strip()[-2000:]}")
    return result


# --- root file systems ---------------------------------------------------------------------------

def debian_mirror(sources: Sequence[Path] = ()) -> str:
    """The Debian mirror this machine's apt already uses (the hosts are built from it).

    TUNVPN_DEBIAN_MIRROR overrides; otherwise the first `deb` source carrying a plain release
    suite (not -security or -updates) with the main component.
    """
    if os.environ.get("TUNVPN_DEBIAN_MIRROR"):
        return os.environ["TUNVPN_DEBIAN_MIRROR"]
    files = list(sources) or [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for file in files:
        try:
            text = file.read_text()
        except OSError:
            continue
        for uri, suites, components in _apt_sources(text, deb822=file.suffix == ".sources"):
            if "main" in components and any("-" not in suite for suite in suites) and "/debian" in uri:
                return uri
    raise HostError("no Debian mirror found in /etc/apt/sources.list*; set TUNVPN_DEBIAN_MIRROR")


def _apt_sources(text: str, deb822: bool) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of each binary source in a sources.list or deb822 .sources file."""
    found = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
                found += [(uri, fields.get("suites", []), fields.get("components", [])) for uri in fields.get("uris", [])]
        return found
    for line in text.splitlines():
        words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            found.append((words[1], [words[2]], words[3:]))
    return found


@dataclass(frozen=True)
class RootfsSpec:
    """What goes into one cached root file system."""

    suite: str
    packages: tuple[str, ...]

    @classmethod
    def for_suite(cls, suite: str) -> RootfsSpec:
        """The standard hosts of `suite`."""
        if suite not in SUITE_PACKAGES:
            raise HostError(f"unsupported suite {suite!r}; known: {', '.join(SUPPORTED_SUITES)}")
        return cls(suite, SUITE_PACKAGES[suite])

    @property
    def key(self) -> str:
        recipe = "\n".join([self.suite, PREPARATION_VERSION, *sorted(set(self.packages)), *MASKED_UNITS])
        return hashlib.sha256(recipe.encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        return CACHE_ROOT / f"rootfs-{self.suite}-{self.key}"


def ensure_rootfs(spec: RootfsSpec, log=print) -> Path:
    """The cached rootfs for `spec`, debootstrapped first if it is not there yet.

    Concurrent runs wait for one another on a lock file; a build appears under its final name
    only when complete (rename), so a crashed build never passes for a cache.
    """
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f".lock-{spec.suite}-{spec.key}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if spec.path.is_dir():
            return spec.path
        building = CACHE_ROOT / f".building-{spec.suite}-{spec.key}"
        shutil.rmtree(building, ignore_errors=True)  # a crashed build's leftovers
        mirror = debian_mirror()
        log(f"systemdhosts: debootstrapping {spec.suite} from {mirror} into {spec.path} (once; cached)")
        started = time.monotonic()
        try:
            _debootstrap(spec, building, mirror)
            _prepare_rootfs(building)
            building.rename(spec.path)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        log(f"systemdhosts: {spec.suite} rootfs built in {time.monotonic() - started:.0f} s")
    return spec.path


def _debootstrap(spec: RootfsSpec, target: Path, mirror: str) -> None:
    command = ["debootstrap", "--variant=minbase", f"--include={','.join(spec.packages)}", spec.suite,
               str(target), mirror]
    result = _run(command, timeout=DEBOOTSTRAP_TIMEOUT, check=False)
    if result.returncode != 0:
        try:  # debootstrap says little on stdout; its log in the target has dpkg's reasons
            details = (target / "debootstrap/debootstrap.log").read_text(errors="replace")
        except OSError:
            details = result.stdout + result.stderr
        raise HostError(f"`{shlex.join(command)}` failed with exit code {result.returncode}:\n"
                        + "\n".join(details.strip().splitlines()[-15:]))


def _prepare_rootfs(root: Path) -> None:
    """Make one rootfs fit for many hosts at once: no shared identity, no reaching out."""
    (root / "etc/machine-id").write_text("")  # systemd makes a fresh id per boot of each host
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    (root / "etc/hostname").unlink(missing_ok=True)  # nspawn's --hostname names each host
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("nameserver 127.0.0.1\n")  # no DNS here; fail fast instead of waiting
    # On a real machine udev makes /dev/net/tun 0666; nspawn copies this machine's node, which no
    # udev touched (0600), and an unprivileged daemon with CAP_NET_ADMIN could not open it.
    (root / "etc/tmpfiles.d/dev-net-tun.conf").write_text("z /dev/net/tun 0666 - - -\n")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    _run(["chroot", str(root), "apt-get", "clean"])


# --- hosts ---------------------------------------------------------------------------------------

def _cgroup_dirs(name: str) -> list[Path]:
    """The cgroup directories one host gets: both hierarchies on a hybrid machine, one on pure v2."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT / name]
    return [CGROUP_ROOT / "systemd" / name, CGROUP_ROOT / "unified" / name]


def _children(pid: int) -> list[int]:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    children = []
    for task in tasks:
        try:
            children += [int(word) for word in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class SystemdHost:
    """One booted container: run commands in it, put files into it, reboot it."""

    def __init__(self, lab: SystemdLab, role: str, index: int) -> None:
        self.lab = lab
        self.role = role
        self.index = index
        self.machine = f"{lab.short_id}-{role}"
        self.addresses = [f"192.0.2.{index}", f"2001:db8:1::{index}"]
        self.run_dir = lab.run_dir / role
        self.root = self.run_dir / "merged"
        self.log_path = self.run_dir / "nspawn.log"
        self.cgroups = _cgroup_dirs(f"{lab.netlab.prefix}-{role}")
        self.namespace = lab.netlab.add_host(role)
        self._wrapper: subprocess.Popen | None = None
        self._mounted = False

    def __repr__(self) -> str:
        return f"SystemdHost({self.role!r}, {self.lab.spec.suite}, {self.addresses[0]})"

    @property
    def address(self) -> str:
        """The host's IPv4 address on the lab's switch."""
        return self.addresses[0]

    # --- bring-up ---

    def create(self) -> None:
        """Overlay, identity, network and cgroup; `start()` then boots it."""
        for part in ("upper", "work", "merged"):
            (self.run_dir / part).mkdir(parents=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={self.lab.rootfs},upperdir={self.run_dir / 'upper'},workdir={self.run_dir / 'work'}",
              str(self.root)])
        self._mounted = True
        (self.root / "etc/hostname").write_text(f"{self.role}\n")
        # Its own name resolves without DNS (there is none): sudo and Ansible's facts look it up.
        (self.root / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {self.role}\n::1 localhost ip6-localhost\n")
        self.lab.netlab.connect(self.namespace, self.lab.switch,
                                addrs=[f"{self.addresses[0]}/24", f"{self.addresses[1]}/64"])
        for cgroup in self.cgroups:
            cgroup.mkdir()

    def _nspawn_command(self) -> list[str]:
        # --keep-unit --register=no: no machined here ("Failed to open system bus" otherwise).
        # --private-network with --network-namespace-path: only the pair lets sysctl and
        # /dev/net/tun work inside (nspawn 252's man page says they cannot be combined; they can).
        return ["systemd-nspawn", "--boot", "--directory", str(self.root), "--machine", self.machine,
                "--hostname", self.role, "--keep-unit", "--register=no", "--private-network",
                f"--network-namespace-path={netlab.NETNS_DIR / self.namespace.name}",
                "--capability=CAP_NET_ADMIN,CAP_NET_RAW", "--console=passive"]

    def start(self) -> None:
        """Start the container in its own cgroup, restarting it whenever it reboots (bounded)."""
        join_cgroups = "".join(f"echo $$ > {shlex.quote(str(cgroup / 'cgroup.procs'))}; " for cgroup in self.cgroups)
        loop = (f"{join_cgroups}n=0; while [ $n -le {MAX_REBOOTS} ]; do {shlex.join(self._nspawn_command())}; "
                f"rc=$?; [ $rc -eq {REBOOT_EXIT_CODE} ] || exit $rc; n=$((n+1)); done; exit 1")
        with open(self.log_path, "ab") as log:
            self._wrapper = subprocess.Popen(["sh", "-c", loop], stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def init_pid(self) -> int | None:
        """PID (in our namespace) of the container's systemd, None while it is not running."""
        if self._wrapper is None or self._wrapper.poll() is not None:
            return None
        for nspawn in _children(self._wrapper.pid):
            for child in _children(nspawn):
                if _comm(child) == "systemd":
                    return child
        return None

    def wait_booted(self, timeout: float = BOOT_TIMEOUT, previous_init: int | None = None) -> None:
        """Wait for `systemctl is-system-running` to say running; a degraded boot fails with its units."""
        deadline = time.monotonic() + timeout

        def new_init() -> int | None:
            if self._wrapper is not None and self._wrapper.poll() is not None:
                raise HostError(f"{self.role}: systemd-nspawn exited with {self._wrapper.returncode}: {self._log_tail()}")
            pid = self.init_pid()
            return pid if pid != previous_init else None

        def settled_state() -> str | None:
            # Empty while PID 1's bus is not up yet, which `is-system-running --wait` does not wait for.
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            return None if state in ("", "offline", "initializing", "starting") else state

        wait_until(new_init, timeout, interval=0.05, what=f"{self.role}'s systemd to start")
        state = wait_until(settled_state, max(1.0, deadline - time.monotonic()), interval=0.1,
                           what=f"{self.role} to finish booting")
        if state != "running":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout.strip()
            raise HostError(f"{self.role} booted into state {state!r}; failed units: {failed or 'none'}")

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-5:])
        except OSError:
            return "(no log)"

    # --- use ---

    def command(self, cmd: str | Sequence[str]) -> list[str]:
        """`cmd` (a shell line, or an argument list) wrapped to run inside the container with nsenter."""
        pid = self.init_pid()
        if pid is None:
            raise HostError(f"{self.role} is not running")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "--",
                "env", "-i", f"PATH={SEARCH_PATH}", "LANG=C.UTF-8", "HOME=/root", *argv]

    def run(self, cmd: str | Sequence[str], *, timeout: float = 30.0, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command as root inside the host; `check` raises HostError with its output."""
        result = _run(self.command(cmd), timeout=timeout, check=False, input=input)
        if check and result.returncode != 0:
            shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
            output = (result.stderr.strip() + "\n" + result.stdout.strip()).strip()[-3000:]
            raise HostError(f"{self.role}: `{shown}` failed with exit code {result.returncode}:\n{output}")
        return result

    def put_file(self, path: str, content: str | bytes, mode: int = 0o644, owner: str = "root:root") -> None:
        """Write a file inside the host (written through the overlay, then owned and moded inside)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        self.run(["chown", owner, path])
        self.run(["chmod", format(mode, "o"), path])

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def ping(self, address: str, count: int = 1, timeout: float = 10.0) -> None:
        """Ping from inside until `count` replies came (returns early) or `timeout` passed (HostError)."""
        self.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", str(int(timeout)), address],
                 timeout=timeout + 5)

    def reboot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """`systemctl reboot` inside, then wait for the new boot to be running."""
        previous = self.init_pid()
        self.run(["systemctl", "reboot"], check=False, timeout=15)
        self.wait_booted(timeout, previous_init=previous)

    # --- teardown ---

    def destroy(self) -> None:
        """Halt, then remove every trace of the host; safe to call again."""
        if self._wrapper is not None:
            self._halt()
            self._wrapper = None
        _kill_cgroup_members(self.cgroups, self.role)
        if self._mounted:
            _run(["umount", str(self.root)], check=False)
            if os.path.ismount(self.root):
                _run(["umount", "--lazy", str(self.root)])
            self._mounted = False
        for cgroup in self.cgroups:
            _remove_cgroup_tree(cgroup)
        shutil.rmtree(NSPAWN_PROPAGATE_DIR / self.machine, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def _halt(self) -> None:
        assert self._wrapper is not None
        for nspawn in _children(self._wrapper.pid):
            try:
                os.kill(nspawn, signal.SIGTERM)  # nspawn turns it into an orderly poweroff
            except ProcessLookupError:
                pass
        try:
            self._wrapper.wait(timeout=HALT_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self._wrapper.pid, signal.SIGKILL)
            self._wrapper.wait(timeout=5)

def _kill_cgroup_members(cgroups: Sequence[Path], what: str) -> None:
    """SIGKILL whatever is left in a host's cgroups (bounded wait for them to go)."""
    def members() -> list[int]:
        pids = []
        for cgroup in cgroups:
            for procs in cgroup.rglob("cgroup.procs") if cgroup.exists() else []:
                try:
                    pids += [int(word) for word in procs.read_text().split()]
                except OSError:
                    pass
        return pids

    for pid in members():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: not members(), 10.0, what=f"{what}'s processes to exit")


def _remove_cgroup_tree(cgroup: Path) -> None:
    """rmdir depth first (cgroup directories cannot be removed recursively)."""
    if not cgroup.exists():
        return
    for directory in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        directory.rmdir()
    cgroup.rmdir()


class SystemdLab:
    """Booted systemd hosts of one Debian suite on one switch; `close()` removes all of it."""

    def __init__(self, suite: str, packages: tuple[str, ...] | None = None) -> None:
        """Hosts of `suite` with its standard packages, or with `packages` (another cached rootfs)."""
        self.spec = RootfsSpec.for_suite(suite) if packages is None else RootfsSpec(suite, packages)
        self.rootfs = ensure_rootfs(self.spec)
        sweep_dead_runs()
        self.netlab = netlab.Lab()
        self.short_id = self.netlab.prefix[-6:]
        self.run_dir = RUN_ROOT / self.netlab.prefix
        self.hosts: dict[str, SystemdHost] = {}
        try:
            self.run_dir.mkdir(parents=True)
            self.switch = self.netlab.add_switch("switch")
            self.switch.add_address(netlab.BRIDGE, "192.0.2.254/24")
            self.switch.add_address(netlab.BRIDGE, "2001:db8:1::fe/64")
        except BaseException:
            self.close()
            raise
        self.netlab.add_cleanup(self._destroy_hosts)

    def add_host(self, role: str, boot: bool = True) -> SystemdHost:
        """A new host named `role` (also its hostname), booted unless `boot` is False."""
        return self.add_hosts([role], boot)[0]

    def add_hosts(self, roles: Sequence[str], boot: bool = True) -> list[SystemdHost]:
        """Several hosts, booted in parallel (each boot takes about a second)."""
        created = []
        for role in roles:
            if not _HOST_ROLE.match(role) or role in self.hosts:
                raise HostError(f"bad or duplicate host name {role!r}: a-z then a-z0-9, at most 15")
            host = SystemdHost(self, role, len(self.hosts) + 1)
            self.hosts[role] = host
            host.create()
            created.append(host)
        if boot:
            for host in created:
                host.start()
            for host in created:
                host.wait_booted()
        return created

    def _destroy_hosts(self) -> None:
        failures = []
        for host in reversed(list(self.hosts.values())):
            try:
                host.destroy()
            except Exception as exc:
                failures.append(f"{host.role}: {exc}")
        if not failures:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if failures:
            raise HostError("; ".join(failures))

    def close(self) -> None:
        """Hosts first, then their namespaces (netlab runs our cleanup before deleting them)."""
        self.netlab.close()

    def __enter__(self) -> SystemdLab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def sweep_dead_runs() -> None:
    """Remove what runs that died without cleaning up left: containers, mounts, cgroups, files.

    A killed test process leaves its containers running (each in a session of its own); they go
    first, then their network namespaces (netlab's sweep).
    """
    if not RUN_ROOT.is_dir():
        return
    for run_dir in RUN_ROOT.iterdir():
        if not netlab._creator_is_dead(f"{run_dir.name}-x"):
            continue
        for host_dir in run_dir.iterdir():
            cgroups = _cgroup_dirs(f"{run_dir.name}-{host_dir.name}")
            try:
                _kill_cgroup_members(cgroups, f"dead run {run_dir.name}'s {host_dir.name}")
                _run(["umount", "--lazy", str(host_dir / "merged")], check=False)
                for cgroup in cgroups:
                    _remove_cgroup_tree(cgroup)
            except (OSError, LabError) as exc:
                print(f"systemdhosts: cannot clean up {host_dir} of a dead run: {exc}", file=sys.stderr)
                continue
            shutil.rmtree(NSPAWN_PROPAGATE_DIR / f"{run_dir.name[-6:]}-{host_dir.name}", ignore_errors=True)
            shutil.rmtree(host_dir, ignore_errors=True)
        try:
            run_dir.rmdir()
        except OSError as exc:
            print(f"systemdhosts: cannot remove {run_dir} of a dead run: {exc}", file=sys.stderr)
    netlab.sweep_dead_runs()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the cached root file systems of the systemd test hosts.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build-rootfs", help="debootstrap SUITE's rootfs into the cache unless it is there")
    build.add_argument("suites", nargs="+", choices=SUPPORTED_SUITES)
    args = parser.parse_args(argv)
    for suite in args.suites:
        print(ensure_rootfs(RootfsSpec.for_suite(suite)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
