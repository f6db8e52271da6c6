"""A network lab for tests: hosts are network namespaces, cables are veth pairs, switches are bridges.

Every namespace name starts with this run's prefix, which says who made it:

    tvlab-<pid namespace inode, hex>-<pid>-<process start time>-<6 random hex>-<role>

so parallel runs never collide, and a later run can tell the leftovers of a *dead* run of this
suite (creator gone, or its pid now reused by another process) from a live run's and from
namespaces that are not ours at all (which it never touches).

Cleanup happens however a run ends: `Lab` is a context manager (the `lab` fixture uses it),
open labs are closed at interpreter exit, SIGTERM is turned into KeyboardInterrupt (so Ctrl-C
and `kill` take the same unwinding path), and the first lab of a process sweeps what dead
runs left behind.  Nothing is ever created in the caller's own namespace: veth pairs are born
directly inside the two namespaces they connect.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent
NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "tvlab"
BRIDGE = "br0"
IFNAMSIZ = 16
TERM_GRACE_SECONDS = 3.0
KILL_GRACE_SECONDS = 2.0

_OUR_NAMESPACE = re.compile(rf"^{NAME_PREFIX}-([0-9a-f]+)-(\d+)-(\d+)-[0-9a-f]{{6}}-")
_ROLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]{0,31}$")

T = TypeVar("T")


class LabError(Exception):
    """A lab operation failed; the message says which command and what it printed."""


class LabTimeout(LabError, TimeoutError):
    """A bounded wait ran out."""


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    """Poll `predicate` until it returns something truthy (returned), or raise LabTimeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LabTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


# --- who made a namespace --------------------------------------------------------------------

def _process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace_id() -> str:
    return format(os.stat("/proc/self/ns/pid").st_ino, "x")


def _run_prefix() -> str:
    pid = os.getpid()
    return f"{NAME_PREFIX}-{_pid_namespace_id()}-{pid}-{_process_start_ticks(pid)}-{secrets.token_hex(3)}"


def _creator_is_dead(name: str) -> bool:
    """True only for our own naming scheme, in our pid namespace, with the creator gone."""
    match = _OUR_NAMESPACE.match(name)
    if not match or match.group(1) != _pid_namespace_id():
        return False
    pid, start = int(match.group(2)), int(match.group(3))
    return _process_start_ticks(pid) != start


# --- processes -------------------------------------------------------------------------------

def _run(cmd: Sequence[str], *, timeout: float = 10.0, check: bool = True, input: str | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input, env=env,
                                stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise LabTimeout(f"`{' '.join(cmd)}` did not finish within {timeout:g} s") from exc
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip()).replace("\n", " | ")
        raise LabError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}: {output}")
    return result


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie: a killed orphan may stay a zombie if PID 1 is slow to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def stop_process(process: subprocess.Popen[Any], term_grace: float = TERM_GRACE_SECONDS) -> None:
    """SIGTERM, wait at most `term_grace`, then SIGKILL and reap; close its pipes."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=term_grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=KILL_GRACE_SECONDS)
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def _kill_namespace_processes(namespace: str) -> None:
    """SIGTERM whatever still runs inside `namespace`, then SIGKILL what is left (bounded)."""
    pids = _namespace_pids(namespace)
    for sig, grace in ((signal.SIGTERM, TERM_GRACE_SECONDS), (signal.SIGKILL, KILL_GRACE_SECONDS)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _pid_alive(pid)]
            time.sleep(0.02)
        pids = [pid for pid in pids if _pid_alive(pid)]
        if not pids:
            return
    raise LabError(f"processes {pids} in namespace {namespace} survived SIGKILL")


def _namespace_pids(namespace: str) -> list[int]:
    result = _run(["ip", "netns", "pids", namespace], check=False)
    return [int(word) for word in result.stdout.split()]


def _delete_namespace(namespace: str) -> None:
    """Stop what runs inside, then delete; fine if it is (or meanwhile went) away."""
    path = NETNS_DIR / namespace
    if not path.exists():
        return
    _kill_namespace_processes(namespace)
    result = _run(["ip", "netns", "delete", namespace], check=False)
    if result.returncode != 0 and path.exists():
        raise LabError(f"`ip netns delete {namespace}` failed: {result.stderr.strip()}")


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (`ip netns list`)."""
    result = _run(["ip", "netns", "list"])
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def sweep_dead_runs() -> list[str]:
    """Delete namespaces left by dead runs of this suite; return their names."""
    swept = []
    for namespace in list_namespaces():
        if _creator_is_dead(namespace):
            _delete_namespace(namespace)
            swept.append(namespace)
    return swept


# --- hosts -----------------------------------------------------------------------------------

def _address_args(address: str) -> list[str]:
    """`ip addr add` arguments; IPv6 with nodad so the address is usable at once."""
    iface = ipaddress.ip_interface(address)
    return [str(iface), *(["nodad"] if iface.version == 6 else [])]


class Host:
    """A network namespace seen as a machine: run commands in it, give it addresses and routes."""

    def __init__(self, lab: Lab, role: str, name: str) -> None:
        self.lab = lab
        self.role = role
        self.name = name
        self._interfaces = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def command(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], *, timeout: float = 10.0, check: bool = True, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return _run(self.command(cmd), timeout=timeout, check=check, input=input, env=env)

    def popen(self, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `cmd` inside the namespace; the lab stops it on close if it still runs."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return self.lab._track(subprocess.Popen(self.command(cmd), **kwargs))

    def python(self, code: str, *args: str, timeout: float = 10.0, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run Python `code` inside the namespace with this interpreter and the repo importable."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout, check=check, input=input,
                        env=python_env())

    def popen_python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("env", python_env())
        return self.popen([sys.executable, "-c", code, *args], **kwargs)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n NS ARGS...`: cheaper than `ip netns exec` for plain configuration."""
        return _run(["ip", "-n", self.name, *args], check=check)

    def ip_json(self, *args: str) -> list[dict[str, Any]]:
        """`ip -j -n NS ARGS...`, parsed."""
        output = _run(["ip", "-j", "-n", self.name, *args]).stdout
        return json.loads(output) if output.strip() else []

    def add_address(self, ifname: str, address: str) -> None:
        self.ip("addr", "add", *_address_args(address), "dev", ifname)

    def add_route(self, destination: str, *, via: str | None = None, dev: str | None = None,
                  metric: int | None = None) -> None:
        args = ["route", "add", destination]
        if via is not None:
            args += ["via", via]
        if dev is not None:
            args += ["dev", dev]
        if metric is not None:
            args += ["metric", str(metric)]
        self.ip(*args)

    def set_sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl inside this namespace only (net.* sysctls are per namespace)."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def ping(self, address: str, *, count: int = 1, timeout: float = 5.0, interval: float = 0.2,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """Send echo requests every `interval` until `count` replies came or `timeout` passed.

        Returns as soon as the replies arrived, so a tunnel that needs a handshake first costs
        one interval, not a fixed sleep.
        """
        cmd = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-w", str(max(1, round(timeout))), address]
        result = self.run(cmd, timeout=timeout + 5, check=False)
        if check and result.returncode != 0:
            summary = " | ".join(line for line in result.stdout.splitlines() if line.strip())
            raise LabError(f"{self.role}: ping {address} failed: {summary} {result.stderr.strip()}")
        return result

    def _next_ifname(self, stem: str) -> str:
        name = f"{stem}{self._interfaces}"
        self._interfaces += 1
        return name

    def _configure_interface(self, ifname: str, addrs: Sequence[str], mtu: int | None) -> None:
        for address in addrs:
            self.add_address(ifname, address)
        self.ip("link", "set", ifname, *(["mtu", str(mtu)] if mtu else []), "up")

    def wait_link_up(self, ifname: str, timeout: float = 5.0) -> None:
        """Wait for the kernel to report the link operationally up.

        IPv6 installs its routes on a link only then; a ping sent earlier loses its neighbour
        solicitation and waits a whole 1 s retransmission.  (Asking is also what makes this
        kernel process the pending link event at once.)
        """
        def is_up() -> bool:
            return self.ip_json("link", "show", "dev", ifname)[0].get("operstate") == "UP"
        wait_until(is_up, timeout, interval=0.01, what=f"{ifname} on {self.role} to come up")


class Switch(Host):
    """A namespace holding one Linux bridge; hosts plug into it with `Lab.connect`."""

    bridge = BRIDGE


H = TypeVar("H", bound=Host)


def python_env() -> dict[str, str]:
    """The environment for Python run inside a namespace: this repo first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# --- the lab ---------------------------------------------------------------------------------

_open_labs: set[Lab] = set()
_process_hooks_installed = False
_swept = False
_closing = 0
_interrupted_while_closing = False


def _close_open_labs_at_exit() -> None:
    for lab in list(_open_labs):
        try:
            lab.close()
        except Exception as exc:  # at exit there is nobody left to raise to
            print(f"netlab: cleanup at exit failed: {exc}", file=sys.stderr)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    """Unwind like Ctrl-C does, so `with` blocks, fixtures and atexit clean up.

    During a lab's close the interrupt waits until the close is done, so cleanup is never cut short.
    """
    global _interrupted_while_closing
    if _closing:
        _interrupted_while_closing = True
        return
    raise KeyboardInterrupt(f"signal {signum}")


def _install_process_hooks() -> None:
    global _process_hooks_installed
    if _process_hooks_installed:
        return
    _process_hooks_installed = True
    atexit.register(_close_open_labs_at_exit)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def _sweep_once() -> None:
    global _swept
    if _swept:
        return
    _swept = True
    try:
        swept = sweep_dead_runs()
    except LabError as exc:
        print(f"netlab: sweeping dead runs failed: {exc}", file=sys.stderr)
        return
    if swept:
        print(f"netlab: removed {len(swept)} namespaces of dead runs", file=sys.stderr)


def _raise_deferred_interrupt(cause: Exception | None) -> None:
    """Deliver a SIGTERM that arrived during cleanup; otherwise raise `cause`, if any."""
    global _interrupted_while_closing
    if _interrupted_while_closing and not _closing:
        _interrupted_while_closing = False
        raise KeyboardInterrupt("SIGTERM during lab cleanup") from cause
    if cause is not None:
        raise cause


class Lab:
    """Hosts, switches and cables for one test; `close()` removes all of it."""

    def __init__(self) -> None:
        _install_process_hooks()
        _sweep_once()
        self.prefix = _run_prefix()
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Callable[[], None]] = []
        self._ifnames = 0
        self._closed = False
        _open_labs.add(self)

    def __repr__(self) -> str:
        return f"Lab({self.prefix!r}, hosts={list(self.hosts)})"

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def _require_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    def _add_namespace(self, role: str, kind: type[H]) -> H:
        self._require_open()
        if not _ROLE.match(role):
            raise LabError(f"bad role {role!r}: letters, digits, '_' and '.', at most 32")
        if role in self.hosts:
            raise LabError(f"role {role!r} already exists in this lab")
        name = f"{self.prefix}-{role}"
        self._namespaces.append(name)  # first, so a half-made namespace is still removed
        _run(["ip", "netns", "add", name])
        host = kind(self, role, name)
        self.hosts[role] = host
        host.ip("link", "set", "lo", "up")
        return host

    def add_host(self, role: str) -> Host:
        return self._add_namespace(role, Host)

    def add_switch(self, role: str) -> Switch:
        switch = self._add_namespace(role, Switch)
        switch.ip("link", "add", BRIDGE, "type", "bridge")
        switch.ip("link", "set", BRIDGE, "up")
        return switch

    def link(self, a: Host, b: Host, a_addrs: Sequence[str] = (), b_addrs: Sequence[str] = (),
             mtu: int | None = None) -> tuple[str, str]:
        """A veth cable between two hosts; returns the interface names (ethN on each side)."""
        self._require_open()
        ifname_a, ifname_b = a._next_ifname("eth"), b._next_ifname("eth")
        a.ip("link", "add", ifname_a, "type", "veth", "peer", "name", ifname_b, "netns", b.name)
        a._configure_interface(ifname_a, a_addrs, mtu)
        b._configure_interface(ifname_b, b_addrs, mtu)
        a.wait_link_up(ifname_a)
        b.wait_link_up(ifname_b)
        return ifname_a, ifname_b

    def connect(self, host: Host, switch: Switch, addrs: Sequence[str] = (), mtu: int | None = None) -> str:
        """Plug `host` into `switch`; returns the host's interface name."""
        self._require_open()
        ifname, port = host._next_ifname("eth"), switch._next_ifname("port")
        host.ip("link", "add", ifname, "type", "veth", "peer", "name", port, "netns", switch.name)
        switch.ip("link", "set", port, "master", BRIDGE, *(["mtu", str(mtu)] if mtu else []), "up")
        host._configure_interface(ifname, addrs, mtu)
        switch.wait_link_up(port)
        host.wait_link_up(ifname)
        return ifname

    def unique_ifname(self, tag: str) -> str:
        """An interface name unique across namespaces and runs (wireguard-go's control socket
        /var/run/wireguard/NAME.sock is shared by all namespaces)."""
        self._ifnames += 1
        name = f"{tag}{self.prefix[-6:]}{self._ifnames}"
        if len(name.encode()) >= IFNAMSIZ:
            raise LabError(f"interface name {name!r} too long: use a shorter tag than {tag!r}")
        return name

    def add_cleanup(self, callback: Callable[[], None]) -> None:
        """Run `callback` on close, before processes are stopped (last added runs first)."""
        self._cleanups.append(callback)

    def _track(self, process: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        self._processes.append(process)
        return process

    def close(self) -> None:
        """Remove everything; safe to call again (it retries what a failed close left)."""
        global _closing
        self._closed = True
        _closing += 1
        failures: list[str] = []
        try:
            while self._cleanups:
                callback = self._cleanups.pop()
                try:
                    callback()
                except Exception as exc:
                    failures.append(f"cleanup {callback!r}: {exc}")
            while self._processes:
                process = self._processes.pop()
                try:
                    stop_process(process)
                except Exception as exc:
                    failures.append(f"stopping pid {process.pid}: {exc}")
            for namespace in list(reversed(self._namespaces)):
                try:
                    _delete_namespace(namespace)
                    self._namespaces.remove(namespace)
                except Exception as exc:
                    failures.append(f"deleting {namespace}: {exc}")
        finally:
            _closing -= 1
        if not self._namespaces:
            _open_labs.discard(self)
        _raise_deferred_interrupt(LabError("lab cleanup incomplete: " + "; ".join(failures)) if failures else None)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- traffic ---------------------------------------------------------------------------------

class TransferResult(NamedTuple):
    sent_sha256: str
    received_sha256: str
    seconds: float  # from the receiver's accept to the sender's end of stream
    source: str  # the sender's address as the receiver saw it (after any NAT)


_RECEIVER = r"""
import hashlib, socket, sys, time
address, timeout = sys.argv[1], float(sys.argv[2])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as server:
    server.bind((address, 0))
    server.listen(1)
    server.settimeout(timeout)
    print(server.getsockname()[1], flush=True)
    connection, peer = server.accept()
    with connection:
        connection.settimeout(timeout)
        start = time.monotonic()
        digest = hashlib.sha256()
        while chunk := connection.recv(1 << 20):
            digest.update(chunk)
        seconds = time.monotonic() - start
print(digest.hexdigest(), seconds, peer[0], flush=True)
"""

_SENDER = r"""
import hashlib, os, socket, sys
address, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
digest = hashlib.sha256()
with socket.create_connection((address, port), timeout=timeout) as connection:
    remaining = size
    while remaining:
        chunk = os.urandom(min(remaining, 1 << 18))
        digest.update(chunk)
        connection.sendall(chunk)
        remaining -= len(chunk)
    connection.shutdown(socket.SHUT_WR)
    connection.recv(1)  # the receiver closes once it has read everything
print(digest.hexdigest(), flush=True)
"""


def read_line(process: subprocess.Popen[bytes], deadline: float, what: str) -> str:
    """One line from `process`'s stdout, waiting no later than `deadline`."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise LabTimeout(f"timed out waiting for {what}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise LabError(f"{what}: the process exited with {process.wait(timeout=KILL_GRACE_SECONDS)}")
            data += chunk
    return data.decode().strip()


def transfer(src: Host, dst: Host, dst_addr: str, size_bytes: int, timeout: float = 30.0) -> TransferResult:
    """Send `size_bytes` of random data over TCP from `src` to `dst_addr` (on `dst`); both ends hash it."""
    deadline = time.monotonic() + timeout
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    receiver = dst.popen_python(_RECEIVER, dst_addr, str(timeout), **pipes)
    sender = None
    try:
        port = read_line(receiver, deadline, f"the receiver on {dst.role} to listen")
        sender = src.popen_python(_SENDER, dst_addr, port, str(size_bytes), str(timeout), **pipes)
        sent = _finish(sender, deadline, f"the sender on {src.role}")
        received_sha, seconds, source = _finish(receiver, deadline, f"the receiver on {dst.role}").split()
        return TransferResult(sent, received_sha, float(seconds), source)
    finally:
        for process in (sender, receiver):
            if process is not None:
                stop_process(process, term_grace=0.5)


def _finish(process: subprocess.Popen[bytes], deadline: float, what: str) -> str:
    try:
        out, err = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as exc:
        raise LabTimeout(f"{what} did not finish in time") from exc
    if process.returncode != 0:
        last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise LabError(f"{what} failed with exit code {process.returncode}: {last}")
    return out.decode().strip()


# --- code under test in a namespace -----------------------------------------------------------

AGENT_REPLY_TIMEOUT = 10.0


class PythonAgent:
    """A Python process in a namespace answering one JSON request per line with one JSON reply.

    Devices and netlink are per namespace, so tests drive the code under test from inside one.
    `script` reads requests from stdin and prints replies; `call` returns a reply, `ok` insists
    on success.
    """

    def __init__(self, host: Host, script: str, wrapper: Sequence[str] = ()) -> None:
        self.process = host.popen([*wrapper, sys.executable, "-c", script], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=python_env())

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        self.process.stdin.flush()
        try:
            return json.loads(read_line(self.process, time.monotonic() + AGENT_REPLY_TIMEOUT, f"the reply to {op}"))
        except Exception as exc:
            self.process.kill()
            _, err = self.process.communicate(timeout=5)
            raise AssertionError(f"agent failed on {op}: {exc}\n{err.decode(errors='replace')}") from exc

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        reply = self.call(op, **args)
        assert "error" not in reply, reply
        return reply
