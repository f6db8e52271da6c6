"""One tunvpn server against N simulated clients (loadgen.py) in a lab: the scale test's and benchmark's run.

Topology (namespaces of this run):  loadgen 192.0.2.2 --- veth --- server 192.0.2.1
The tunnel is IPv6 only (2001:db8:100::1/112): the IPv4 documentation ranges hold 253 clients,
a scale run needs thousands of addresses. Cookies are off (`--handshake-load-threshold`), so
every initiation gets a full handshake: the figure is the server's handshake rate, not its
cookie rate.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from netlab import Host, Lab, LabError, LabTimeout, python_env, wait_until
from tunvpnd import Tunvpn

from tunvpn.keys import derive_public_key, encode_key, generate_private_key

SERVER_UNDERLAY = "192.0.2.1"
LOADGEN_UNDERLAY = "192.0.2.2"
SERVER_TUNNEL = "2001:db8:100::1"
PORT = 51820
NO_COOKIES = 1_000_000  # handshake messages a second before the server demands cookies
LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
PUSH_KEEPALIVE = 2  # seconds: short, so keepalives flow while the run measures
SHOW_REPEATS = 3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class ScaleRun:
    """What one run measured and what the clients and the server said (for the checks)."""

    peers: int
    workers: int
    in_flight: int
    handshakes_per_second: float  # sustained: the middle 80% of the completions
    seconds_to_all_connected: float | None  # from `go` to the last push (None: not all connected)
    rss_before_kib: int  # the server with N peers configured, none connected
    rss_after_kib: int  # every client connected
    server_cpu_seconds: float  # the server's user + system time from `go` until all were connected
    loadgen_cpu_seconds: float  # the generator processes', over the same time
    show_seconds: float  # `tunvpn show`, median wall time of the command
    show_json_seconds: float
    server_start_seconds: float
    clients: list[dict] = field(repr=False, default_factory=list)
    server_peers: list[dict] = field(repr=False, default_factory=list)
    leases: dict[str, list[str]] = field(repr=False, default_factory=dict)
    server_log: str = field(repr=False, default="")

    @property
    def connected(self) -> int:
        return sum(1 for c in self.clients if c["connected"] is not None)

    @property
    def rss_per_peer_kib(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.peers

    def duplicate_addresses(self) -> list[str]:
        """Addresses that more than one client received."""
        counts = Counter(a for c in self.clients for a in c["addresses"] or ())
        return sorted(address for address, count in counts.items() if count > 1)

    def figures(self) -> dict:
        return {
            "peers": self.peers, "workers": self.workers, "in_flight": self.in_flight,
            "connected": self.connected, "handshakes_per_second": round(self.handshakes_per_second, 1),
            "seconds_to_all_connected": None if self.seconds_to_all_connected is None else round(self.seconds_to_all_connected, 2),
            "rss_before_mib": round(self.rss_before_kib / 1024, 1), "rss_after_mib": round(self.rss_after_kib / 1024, 1),
            "rss_per_peer_kib": round(self.rss_per_peer_kib, 2),
            "rss_total_per_peer_kib": round(self.rss_after_kib / self.peers, 2),
            "server_cpu_ms_per_client": round(self.server_cpu_seconds * 1000 / self.peers, 3),
            "loadgen_cpu_ms_per_client": round(self.loadgen_cpu_seconds * 1000 / self.peers, 3),
            "show_ms": round(self.show_seconds * 1000, 1), "show_json_ms": round(self.show_json_seconds * 1000, 1),
            "server_start_seconds": round(self.server_start_seconds, 2),
        }


def server_config(private_key: bytes, public_keys: list[bytes]) -> str:
    peers = "".join(f"\n[Peer]\nPublicKey = {encode_key(key)}\n" for key in public_keys)
    return (f"[Interface]\nPrivateKey = {encode_key(private_key)}\nListenPort = {PORT}\n"
            f"Address = {SERVER_TUNNEL}/112\nPushKeepalive = {PUSH_KEEPALIVE}\n{peers}")


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LabError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def sustained_rate(times: list[float]) -> float:
    """Completions a second between the 10th and the 90th percentile: ramp-up and tail left out."""
    times = sorted(times)
    if len(times) < 10:
        raise LabError(f"too few handshakes to rate: {len(times)}")
    low, high = times[len(times) // 10], times[len(times) * 9 // 10]
    return (len(times) * 8 // 10) / max(high - low, 1e-6)


class _WorkerProcess:
    """One loadgen.py process in the loadgen host, spoken to in JSON lines."""

    def __init__(self, host: Host, python: str, spec: dict) -> None:
        with tempfile.NamedTemporaryFile("w", prefix="tunvpn-loadgen-", suffix=".json", delete=False) as file:
            json.dump(spec, file)  # 0600 by tempfile; the worker deletes it once read
        self.process = host.popen([python, str(LOADGEN), file.name], env=python_env(), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self._buffer = ""

    def tell(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()

    def read(self, key: str, deadline: float) -> object:
        """The value of the next message carrying `key`, waiting at most until `deadline`."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while "\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise LabTimeout(f"loadgen: no {key!r} message in time")
            chunk = self.process.stdout.readline()
            if not chunk:
                raise LabError(f"loadgen exited with {self.process.wait(timeout=5)} before saying {key!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split("\n", 1)
        message = json.loads(line)
        if key not in message:
            raise LabError(f"loadgen said {message!r}, expected {key!r}")
        return message[key]


def _timed(run) -> float:
    start = time.monotonic()
    run()
    return time.monotonic() - start


def measure_show(server: Tunvpn) -> tuple[float, float]:
    """Median wall time of `tunvpn show` and `tunvpn show --json` as an admin runs them."""
    base = [server.python, "-m", "tunvpn", "show", "--control-socket", str(server.control_socket)]
    text = [_timed(lambda: server.host.run(base, env=python_env(), timeout=60)) for _ in range(SHOW_REPEATS)]
    as_json = [_timed(lambda: server.host.run([*base, "--json"], env=python_env(), timeout=60))
               for _ in range(SHOW_REPEATS)]
    return statistics.median(text), statistics.median(as_json)


def run_scale(lab: Lab, peers: int, *, workers: int = 2, in_flight: int = 32, pings: int = 3,
              connect_timeout: float = 120.0, python: str | None = None) -> ScaleRun:
    """Start a server with `peers` configured, connect that many simulated clients, measure, stop."""
    python = python or sys.executable
    server_host, loadgen_host = lab.add_host("server"), lab.add_host("loadgen")
    lab.link(server_host, loadgen_host, [f"{SERVER_UNDERLAY}/24"], [f"{LOADGEN_UNDERLAY}/24"])
    server_key = generate_private_key()
    client_keys = [generate_private_key() for _ in range(peers)]
    server = Tunvpn(server_host, "server", server_config(server_key, [derive_public_key(k) for k in client_keys]),
                    extra_args=("--log-level", "info", "--handshake-load-threshold", str(NO_COOKIES)), python=python)
    started = time.monotonic()
    server.start(wait=False).wait_log(r" up: device ", timeout=120)
    server_start = time.monotonic() - started
    assert server.process is not None
    pid = server.process.pid
    if "tunvpn" not in Path(f"/proc/{pid}/cmdline").read_text():
        raise LabError(f"pid {pid} is not the tunvpn server")
    rss_before = vm_rss_kib(pid)
    slices = [client_keys[i::workers] for i in range(workers)]
    common = {"server": [SERVER_UNDERLAY, PORT], "server_key": encode_key(derive_public_key(server_key)),
              "local": LOADGEN_UNDERLAY, "target": SERVER_TUNNEL, "pings": pings, "in_flight": in_flight,
              "connect_deadline": connect_timeout, "deadline": connect_timeout + 300}
    processes = [_WorkerProcess(loadgen_host, python, common | {
        "keys": [encode_key(k) for k in keys], "first_index": sum(len(s) for s in slices[:n]) + 1})
        for n, keys in enumerate(slices)]
    setup_deadline = time.monotonic() + 60 + peers / 50
    for process in processes:
        process.read("ready", setup_deadline)
    cpu_at_go = cpu_seconds(pid)
    loadgen_at_go = sum(cpu_seconds(process.process.pid) for process in processes)
    for process in processes:
        process.tell("go")
    connect_deadline = time.monotonic() + connect_timeout + 10
    for process in processes:
        process.read("connected", connect_deadline)
    server_cpu = cpu_seconds(pid) - cpu_at_go
    loadgen_cpu = sum(cpu_seconds(process.process.pid) for process in processes) - loadgen_at_go
    rss_after = vm_rss_kib(pid)
    show, show_json = measure_show(server)
    time.sleep(PUSH_KEEPALIVE + 0.5)  # every client sends at least one keepalive
    clients: list[dict] = []
    for process in processes:
        process.tell("stop")
    for process in processes:
        clients += process.read("clients", time.monotonic() + 60)  # type: ignore[arg-type]
        process.process.wait(timeout=30)
    status = server.show()
    leases = _saved_leases(server, peers)
    done = [c["connected"] for c in clients]
    return ScaleRun(
        peers=peers, workers=workers, in_flight=in_flight,
        handshakes_per_second=sustained_rate([c["handshake"] for c in clients if c["handshake"] is not None]),
        seconds_to_all_connected=max(done) if None not in done else None,
        rss_before_kib=rss_before, rss_after_kib=rss_after, server_cpu_seconds=server_cpu,
        loadgen_cpu_seconds=loadgen_cpu, show_seconds=show, show_json_seconds=show_json,
        server_start_seconds=server_start, clients=clients, server_peers=status["peers"], leases=leases,
        server_log=server.log())


def _saved_leases(server: Tunvpn, expected: int) -> dict[str, list[str]]:
    """The leases in the server's state file ({key: [addresses]}), once it holds `expected` of
    them or 15 s passed (saves run beside the loop, batched)."""
    state_file = server.state_dir / "state.json"
    leases: dict[str, list[str]] = {}

    def complete() -> bool:
        nonlocal leases
        try:
            leases = {key: list(lease.values()) for key, lease in json.loads(state_file.read_text())["leases"].items()}
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False
        return len(leases) >= expected

    try:
        wait_until(complete, 15, interval=0.2, what="every lease in the server's state file")
    except LabTimeout:
        pass  # the caller compares what is there with what the clients got
    return leases
