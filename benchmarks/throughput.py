#!/usr/bin/env python3
"""`sudo make bench`: TCP throughput and ping RTT through each tunnel, side by side, on this machine.

Every system gets its own pair of network namespaces joined by one veth (underlay 192.0.2.0/24,
tunnel 203.0.113.0/24):

    veth             the bare cable: the ceiling for everything else
    wireguard-go     Debian's wireguard-go on both ends, configured with wg
    tunvpn-venv      tunvpn server <-> tunvpn client under the dev venv (current PyPI cryptography)
    tunvpn-debian    the same under Debian's /usr/bin/python3 (what the .deb runs on)

All systems are up at once and the runs are interleaved (round r measures every system, the order
rotated by r), so load from other work on a shared machine falls on all of them alike rather than
on whichever happened to run during it.  Each measurement is a ping series on the idle tunnel,
then one single-stream iperf3 TCP test from the client to the server; the table gives the median
and the spread of the rounds.  Nothing outside the namespaces is touched; Ctrl-C cleans up too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from netlab import Host, Lab, LabError, python_env, stop_process, wait_until  # noqa: E402
from stockwg import StockWireGuard, genkey, pubkey  # noqa: E402
from tunvpnd import Tunvpn, wait_for_ping  # noqa: E402

SERVER_UNDERLAY, CLIENT_UNDERLAY = "192.0.2.1", "192.0.2.2"
SERVER_TUNNEL, CLIENT_TUNNEL = "203.0.113.1", "203.0.113.2"
TUNNEL_MTU = 1420  # wireguard-go's default and tunvpn's: both tunnels carry the same segment size
IPERF_PORT = 5201
HANDSHAKE_TIMEOUT = 15.0
IPERF_GRACE_SECONDS = 15.0  # on top of the test length: connect, settle, JSON out
SYSTEMS = ("veth", "wireguard-go", "tunvpn-venv", "tunvpn-debian")
REFERENCE_SYSTEM = "wireguard-go"


class BenchError(LabError):
    """A prerequisite is missing or a measurement went wrong; the message says which."""


@dataclass(frozen=True)
class Interpreter:
    """A Python that runs tunvpn daemons, and the libraries it really imports."""

    path: str
    python_version: str
    cryptography_version: str
    cryptography_dir: str
    pyroute2_version: str


@dataclass
class Round:
    mbps: float
    retransmits: int
    ping_sent: int
    ping_received: int
    rtt_min_ms: float
    rtt_avg_ms: float
    rtt_max_ms: float


@dataclass
class System:
    """One side-by-side contestant: where iperf3 and ping run, and what to aim at."""

    key: str
    label: str
    server: Host
    client: Host
    target: str
    details: dict[str, Any] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)


# --- prerequisites and machine facts ----------------------------------------------------------

def require_prerequisites() -> None:
    """Fail loudly: a benchmark that silently drops a contestant compares nothing."""
    if os.geteuid() != 0:
        raise BenchError("this needs root (network namespaces, tun devices): sudo make bench")
    for tool, package in (("iperf3", "iperf3"), ("ping", "iputils-ping"), ("ss", "iproute2")):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: install it with `tools/ensure-deps {package}`")


_PROBE = ("import json, sys, os, cryptography, pyroute2; "
          "print(json.dumps([sys.version.split()[0], cryptography.__version__, "
          "os.path.dirname(cryptography.__file__), getattr(pyroute2, '__version__', '?')]))")


def probe_interpreter(path: str) -> Interpreter:
    if not os.access(path, os.X_OK):
        raise BenchError(f"interpreter {path} not found (the venv comes from `make venv`)")
    result = subprocess.run([path, "-c", _PROBE], capture_output=True, text=True, timeout=30, env=python_env())
    if result.returncode != 0:
        raise BenchError(f"{path} cannot import tunvpn's libraries: {result.stderr.strip()[-300:]}")
    python_version, crypto_version, crypto_dir, pyroute2_version = json.loads(result.stdout)
    return Interpreter(path, python_version, crypto_version, crypto_dir, pyroute2_version)


def first_line(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (result.stdout.strip() or result.stderr.strip() or "unknown").splitlines()[0]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "iperf3": first_line(["iperf3", "--version"]),
        "wireguard_go": first_line(["wireguard-go", "--version"]),
        "tunvpn_commit": first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
    }


# --- the contestants ---------------------------------------------------------------------------

def cable(lab: Lab, tag: str) -> tuple[Host, Host]:
    """A server and a client namespace joined by one veth carrying the underlay."""
    server, client = lab.add_host(f"{tag}_server"), lab.add_host(f"{tag}_client")
    lab.link(server, client, [f"{SERVER_UNDERLAY}/24"], [f"{CLIENT_UNDERLAY}/24"])
    return server, client


def setup_veth(lab: Lab) -> System:
    server, client = cable(lab, "veth")
    return System("veth", "raw veth (ceiling)", server, client, SERVER_UNDERLAY)


def setup_wireguard_go(lab: Lab) -> System:
    server_host, client_host = cable(lab, "wg")
    server_key, client_key = genkey(), genkey()
    server = StockWireGuard(server_host, lab.unique_ifname("wg"), server_key, listen_port=51820)
    client = StockWireGuard(client_host, lab.unique_ifname("wg"), client_key)
    server.set_peer(pubkey(client_key), allowed_ips=[f"{CLIENT_TUNNEL}/32"])
    client.set_peer(pubkey(server_key), allowed_ips=["203.0.113.0/24"], endpoint=server.endpoint(SERVER_UNDERLAY))
    for end, address in ((server, SERVER_TUNNEL), (client, CLIENT_TUNNEL)):
        end.add_address(f"{address}/24")
        end.set_up(mtu=TUNNEL_MTU)
    wait_for_ping(client_host, SERVER_TUNNEL, HANDSHAKE_TIMEOUT)
    return System("wireguard-go", "wireguard-go <-> wireguard-go", server_host, client_host, SERVER_TUNNEL)


def tunvpn_configs(server_key: str, client_key: str) -> tuple[str, str]:
    server = (f"[Interface]\nPrivateKey = {server_key}\nListenPort = 51820\nAddress = {SERVER_TUNNEL}/24\n"
              f"MTU = {TUNNEL_MTU}\n\n[Peer]\nPublicKey = {pubkey(client_key)}\nAllowedIPs = {CLIENT_TUNNEL}/32\n")
    client = (f"[Interface]\nPrivateKey = {client_key}\nAddress = {CLIENT_TUNNEL}/24\nMTU = {TUNNEL_MTU}\n\n"
              f"[Peer]\nPublicKey = {pubkey(server_key)}\nEndpoint = {SERVER_UNDERLAY}:51820\n"
              f"AllowedIPs = 203.0.113.0/24\n")
    return server, client


def require_own_cryptography(pid: int, interpreter: Interpreter) -> None:
    """Prove the daemon runs on the interpreter's own cryptography (not one leaking in via a path)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    if interpreter.cryptography_dir + "/" not in maps:
        raise BenchError(f"the tunvpn daemon (pid {pid}) under {interpreter.path} has not loaded "
                         f"{interpreter.cryptography_dir}")


def stop_daemon(daemon: Tunvpn) -> None:
    """Stop a daemon while its files still exist: the lab removes them first and then stops the
    processes, and a server saves state.json on its way out, which would bring its directory back."""
    if daemon.process is not None and daemon.process.poll() is None:
        daemon.stop()


def setup_tunvpn(lab: Lab, key: str, interpreter: Interpreter) -> System:
    server_host, client_host = cable(lab, key.replace("-", "_"))
    server_key, client_key = genkey(), genkey()
    server_conf, client_conf = tunvpn_configs(server_key, client_key)
    production_logging = ("--log-level", "info")  # what the units run with, not the harness's debug
    daemons = [Tunvpn(server_host, "server", server_conf, extra_args=production_logging, python=interpreter.path),
               Tunvpn(client_host, "client", client_conf, extra_args=production_logging, python=interpreter.path)]
    for daemon in daemons:
        lab.add_cleanup(lambda daemon=daemon: stop_daemon(daemon))
        daemon.start()
    try:
        wait_for_ping(client_host, SERVER_TUNNEL, HANDSHAKE_TIMEOUT)
    except LabError as exc:
        logs = "\n".join(f"--- tunvpn {d.role} (exit code {d.process and d.process.poll()}) ---\n"
                         f"{d.log()[-3000:]}" for d in daemons)
        raise BenchError(f"{key}: no tunnel: {exc}\n{logs}") from None
    for daemon in daemons:
        assert daemon.process is not None
        require_own_cryptography(daemon.process.pid, interpreter)
    label = (f"tunvpn <-> tunvpn, python {interpreter.python_version}, "
             f"cryptography {interpreter.cryptography_version}")
    return System(key, label, server_host, client_host, SERVER_TUNNEL, details={"interpreter": asdict(interpreter)})


# --- measurements ------------------------------------------------------------------------------

_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PING_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/[\d.]+ ms")


def measure_ping(system: System, count: int, interval: float) -> tuple[int, int, float, float, float]:
    """(sent, received, min, avg, max ms) of `count` echo requests through the idle tunnel."""
    output = system.client.ping(system.target, count=count, interval=interval,
                                timeout=max(5.0, 3 * count * interval), check=False).stdout  # loss is reported
    counts, rtt = _PING_COUNTS.search(output), _PING_RTT.search(output)
    if counts is None or rtt is None:
        raise BenchError(f"{system.key}: cannot read ping's summary: {output!r}")
    return int(counts[1]), int(counts[2]), float(rtt[1]), float(rtt[2]), float(rtt[3])


def iperf_listening(host: Host, server: subprocess.Popen[Any]) -> bool:
    if server.poll() is not None:
        raise BenchError(f"iperf3 server on {host.role} exited early with {server.returncode}")
    listening = host.run(["ss", "-Hltn", "sport", "=", f":{IPERF_PORT}"]).stdout
    return bool(listening.strip())


def measure_iperf(system: System, seconds: int) -> tuple[float, int]:
    """(Mbit/s the server received, TCP retransmits) of one single-stream client -> server test."""
    server = system.server.popen(["iperf3", "-s", "-1", "-B", system.target, "-p", str(IPERF_PORT),
                                  "--rcv-timeout", "10000"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: iperf_listening(system.server, server), 5.0, interval=0.02,
                   what=f"iperf3 to listen on {system.server.role}")
        result = system.client.run(["iperf3", "-c", system.target, "-p", str(IPERF_PORT), "-t", str(seconds),
                                    "-J", "--connect-timeout", "3000"],
                                   timeout=seconds + IPERF_GRACE_SECONDS, check=False)
        report = json.loads(result.stdout) if result.stdout.strip() else {"error": result.stderr.strip()}
        if result.returncode != 0 or "error" in report:
            raise BenchError(f"{system.key}: iperf3 failed ({result.returncode}): {report.get('error')}")
        server.wait(timeout=5.0)  # a one-off server leaves once the test is over
    finally:
        stop_process(server, term_grace=1.0)
    end = report["end"]
    return end["sum_received"]["bits_per_second"] / 1e6, int(end["sum_sent"].get("retransmits", 0))


def measure_round(system: System, seconds: int, pings: int, ping_interval: float) -> Round:
    sent, received, rtt_min, rtt_avg, rtt_max = measure_ping(system, pings, ping_interval)
    mbps, retransmits = measure_iperf(system, seconds)
    return Round(mbps, retransmits, sent, received, rtt_min, rtt_avg, rtt_max)


# --- report ------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(system: System) -> dict[str, Any]:
    return {
        "mbps": spread([r.mbps for r in system.rounds]),
        "rtt_avg_ms": spread([r.rtt_avg_ms for r in system.rounds]),
        "rtt_min_ms": min(r.rtt_min_ms for r in system.rounds),
        "rtt_max_ms": max(r.rtt_max_ms for r in system.rounds),
        "retransmits_median": statistics.median(r.retransmits for r in system.rounds),
        "ping_lost": sum(r.ping_sent - r.ping_received for r in system.rounds),
    }


def markdown_table(systems: list[System], summaries: dict[str, dict[str, Any]]) -> str:
    reference = summaries.get(REFERENCE_SYSTEM, {}).get("mbps", {}).get("median")
    lines = ["| system | TCP Mbit/s, median [min-max] | % of wireguard-go | RTT avg ms, median [min-max] "
             "| RTT min / max ms | retransmits (median) |",
             "|---|---:|---:|---:|---:|---:|"]
    for system in systems:
        s = summaries[system.key]
        mbps, rtt = s["mbps"], s["rtt_avg_ms"]
        share = f"{100 * mbps['median'] / reference:.0f} %" if reference else "-"
        lost = f", {s['ping_lost']} lost" if s["ping_lost"] else ""
        lines.append(f"| {system.label} | {mbps['median']:.0f} [{mbps['min']:.0f}-{mbps['max']:.0f}] | {share} "
                     f"| {rtt['median']:.3f} [{rtt['min']:.3f}-{rtt['max']:.3f}] "
                     f"| {s['rtt_min_ms']:.3f} / {s['rtt_max_ms']:.3f}{lost} | {s['retransmits_median']:g} |")
    return "\n".join(lines)


def facts_text(facts: dict[str, Any], interpreters: dict[str, Interpreter], args: argparse.Namespace) -> str:
    lines = [f"- kernel {facts['kernel']}, CPU {facts['cpu']} x {facts['cpus']}, "
             f"load average before {facts['loadavg_before'][0]:.2f} / after {facts['loadavg_after'][0]:.2f} (1 min)",
             f"- {facts['iperf3']}; {facts['wireguard_go']}; tunvpn at {facts['tunvpn_commit']} (working tree as run)"]
    for key, interp in interpreters.items():
        lines.append(f"- {key}: {interp.path}: python {interp.python_version}, cryptography "
                     f"{interp.cryptography_version} ({interp.cryptography_dir}), pyroute2 {interp.pyroute2_version}")
    lines.append(f"- interleaved rounds per system: {args.rounds}; each round: {args.pings} pings every "
                 f"{args.ping_interval:g} s on the idle tunnel, then iperf3 -t {args.seconds}, one TCP stream, "
                 f"client -> server; tunnel MTU {TUNNEL_MTU}")
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="length of each iperf3 test")
    parser.add_argument("--pings", type=int, default=20)
    parser.add_argument("--ping-interval", type=float, default=0.05)
    parser.add_argument("--venv-python", default=str(REPO_ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--debian-python", default="/usr/bin/python3")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60 or not 1 <= args.pings <= 1000:
        parser.error("keep --rounds in 1..20, --seconds in 1..60 and --pings in 1..1000")
    return args


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    require_prerequisites()
    interpreters = {key: probe_interpreter(path) for key, path in
                    (("tunvpn-venv", args.venv_python), ("tunvpn-debian", args.debian_python))
                    if key in args.systems}
    facts = machine_facts()
    setups: dict[str, Callable[[Lab], System]] = {
        "veth": setup_veth,
        "wireguard-go": setup_wireguard_go,
        **{key: (lambda lab, key=key, interp=interp: setup_tunvpn(lab, key, interp))
           for key, interp in interpreters.items()},
    }
    with Lab() as lab:
        systems = []
        for key in args.systems:
            progress(f"setting up {key}")
            systems.append(setups[key](lab))
        for number in range(args.rounds):
            for system in systems[number % len(systems):] + systems[:number % len(systems)]:
                system.rounds.append(measure_round(system, args.seconds, args.pings, args.ping_interval))
                progress(f"round {number + 1}/{args.rounds} {system.key}: {system.rounds[-1].mbps:.0f} Mbit/s, "
                         f"RTT avg {system.rounds[-1].rtt_avg_ms:.3f} ms")
        progress("cleaning up")
    facts["loadavg_after"] = os.getloadavg()
    summaries = {system.key: summarize(system) for system in systems}
    print("## tunvpn benchmark: single TCP stream and ping through the tunnel\n")
    print(markdown_table(systems, summaries))
    print()
    print(facts_text(facts, interpreters, args))
    return {
        "machine": facts,
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "pings": args.pings,
                     "ping_interval": args.ping_interval, "tunnel_mtu": TUNNEL_MTU},
        "systems": {system.key: {"label": system.label, **system.details, "summary": summaries[system.key],
                                 "rounds": [asdict(r) for r in system.rounds]} for system in systems},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        results = run(args)
    except KeyboardInterrupt:
        progress("\ninterrupted; cleaned up")
        return 130
    except LabError as exc:
        progress(f"benchmark failed: {exc}")
        return 1
    results["machine"]["runtime_seconds"] = round(time.monotonic() - started, 1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        progress(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
