#!/usr/bin/env python3
"""`sudo make bench`: tunvpn next to raw veth, wireguard-go, OpenVPN and fastd, side by side, on this machine.

Every system gets its own pair of network namespaces joined by one veth (contestants.py):

    veth                    the bare cable: the ceiling for everything else
    tunvpn-venv             tunvpn <-> tunvpn under the dev venv (current PyPI cryptography)
    tunvpn-bookworm         the same under this machine's Debian /usr/bin/python3 (bookworm's .deb)
    tunvpn-trixie           the same under trixie's python3 and python3-cryptography, chrooted into
                            the cached rootfs of tests/systemdhosts.py (trixie's .deb)
    wireguard-go-bookworm   Debian bookworm's wireguard-go on both ends, configured with wg
    wireguard-go-trixie     trixie's build of it (batched I/O, tun offloads), unpacked into a cache
    openvpn                 OpenVPN 2.6 in userspace: TLS p2p, AES-256-GCM, DCO off
    fastd                   fastd, salsa2012+umac, tun mode
    tunvpn-venv-no-offloads tunvpn-venv with --offloads none: one datagram and one tun write per packet
    tunvpn-venv-coalesce    ... with merged tun writes only (--offloads coalesce)
    tunvpn-venv-gso-gro     ... with UDP GSO and GRO only (--offloads gso,gro)

The last three price each data-path lever against tunvpn-venv, which has all of them.

All systems are up at once and the runs are interleaved (round r measures every system, the order
rotated by r), so load from other work on a shared machine falls on all of them alike rather than
on whichever happened to run during it.  Each measurement is a ping series on the idle tunnel;
one iperf3 TCP stream client -> server with pings running through the same tunnel (RTT under
load); then four streams.  During each iperf3 test the CPU time of the VPN processes of both ends
is read from /proc/PID/stat (user + system, which on this tick-accounted kernel includes the
softirq work done in their context), and the machine's own counters say how much else ran.
Nothing outside the namespaces is touched; Ctrl-C cleans up too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from netlab import Lab, LabError, stop_process, wait_until  # noqa: E402

import contestants  # noqa: E402
import report  # noqa: E402
import trixie  # noqa: E402
from contestants import BenchError, System  # noqa: E402

IPERF_PORT = 5201
IPERF_GRACE_SECONDS = 15.0  # on top of the test length: connect, settle, JSON out
MULTI_STREAMS = 4
# tunvpn-venv with some offloads off: key -> (--offloads, what the label adds)
LEVER_VARIANTS = {"tunvpn-venv-no-offloads": ("none", "no offloads"),
                  "tunvpn-venv-coalesce": ("coalesce", "merged tun writes only"),
                  "tunvpn-venv-gso-gro": ("gso,gro", "UDP GSO/GRO only")}
SYSTEMS = ("veth", "tunvpn-venv", "tunvpn-bookworm", "tunvpn-trixie", "wireguard-go-bookworm",
           "wireguard-go-trixie", "openvpn", "fastd", *LEVER_VARIANTS)
APT_PACKAGES = ("iperf3", "iputils-ping", "iproute2", "procps", "wireguard-go", "wireguard-tools",
                "openvpn", "fastd", "debootstrap", "python3-venv", "python3-cryptography")
BENCH_VENV = REPO_ROOT / "build" / "bench-venv"
BENCH_REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PIP_TIMEOUT = 600.0


# --- measurements ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PingSeries:
    sent: int
    received: int
    rtt_min_ms: float | None  # None when no reply came back
    rtt_avg_ms: float | None
    rtt_max_ms: float | None


@dataclass(frozen=True)
class Transfer:
    """One iperf3 test and what the machine did meanwhile (CPU figures in seconds, all cores summed)."""

    streams: int
    mbps: float
    bytes_received: int
    seconds: float
    retransmits: int
    vpn_cpu_seconds: float | None  # None for the bare veth: no VPN process to clock
    # The same split by end (sending: the client's namespace; receiving: the server's) and by
    # user and system time: {"sending_user": s, "sending_system": s, "receiving_user": ..., ...}
    vpn_cpu_split: dict[str, float] | None
    iperf_cpu_seconds: float
    machine_busy_seconds: float
    steal_seconds: float
    wall_seconds: float
    load1_before: float


@dataclass(frozen=True)
class Round:
    idle_ping: PingSeries
    single: Transfer
    loaded_ping: PingSeries
    multi: Transfer


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) received")
_PING_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/[\d.]+ ms")


def parse_ping(system: System, output: str) -> PingSeries:
    counts, rtt = _PING_COUNTS.search(output), _PING_RTT.search(output)
    if counts is None:
        raise BenchError(f"{system.key}: cannot read ping's summary: {output!r}")
    if rtt is None:
        return PingSeries(int(counts[1]), int(counts[2]), None, None, None)
    return PingSeries(int(counts[1]), int(counts[2]), float(rtt[1]), float(rtt[2]), float(rtt[3]))


def ping_command(target: str, count: int, interval: float) -> list[str]:
    return ["ping", "-n", "-q", "-c", str(count), "-i", f"{interval:g}",
            "-w", str(max(2, round(2 * count * interval) + 1)), target]


def measure_idle_ping(system: System, count: int, interval: float) -> PingSeries:
    """Echo requests through the idle tunnel; losing all of them is a broken tunnel."""
    result = system.client.run(ping_command(system.target, count, interval),
                               timeout=2 * count * interval + 10, check=False)
    series = parse_ping(system, result.stdout)
    if series.rtt_avg_ms is None:
        raise BenchError(f"{system.key}: no ping came back through the idle tunnel")
    return series


def process_cpu_times(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of `pids` (whole processes: all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            raise BenchError(f"VPN process {pid} is gone") from None
        user += int(fields[11])
        system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(word) for word in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


@dataclass(frozen=True)
class Counters:
    """What the CPU counters and the clock said at one instant."""

    vpn_cpu: dict[str, float]  # the ends' user and system seconds, keyed as Transfer.vpn_cpu_split
    machine_busy: float
    steal: float
    monotonic: float


def read_counters(system: System) -> Counters:
    busy, steal = machine_cpu_seconds()
    client_pids = [pid for pid in system.vpn_pids if pid not in system.server_pids]
    vpn_cpu = {}
    for end, pids in (("sending", client_pids), ("receiving", system.server_pids)):
        vpn_cpu[f"{end}_user"], vpn_cpu[f"{end}_system"] = process_cpu_times(pids)
    return Counters(vpn_cpu, busy, steal, time.monotonic())


def iperf_listening(system: System, server: subprocess.Popen[Any]) -> bool:
    if server.poll() is not None:
        raise BenchError(f"{system.key}: the iperf3 server exited early with {server.returncode}")
    return bool(system.server.run(["ss", "-Hltn", "sport", "=", f":{IPERF_PORT}"]).stdout.strip())


def finish_process(process: subprocess.Popen[str], timeout: float, what: str) -> tuple[str, str]:
    """Its stdout and stderr, once it exited by itself within `timeout`."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} did not finish within {timeout:g} s") from None


def transfer_from(iperf_report: dict[str, Any], system: System, streams: int, seconds: int, load1: float,
                  before: Counters, after: Counters) -> Transfer:
    end = iperf_report["end"]
    received, cpu = end["sum_received"], end.get("cpu_utilization_percent", {})
    return Transfer(
        streams=streams, mbps=received["bits_per_second"] / 1e6, bytes_received=int(received["bytes"]),
        seconds=float(received["seconds"]), retransmits=int(end["sum_sent"].get("retransmits", 0)),
        vpn_cpu_seconds=sum(after.vpn_cpu.values()) - sum(before.vpn_cpu.values()) if system.vpn_pids else None,
        vpn_cpu_split={key: after.vpn_cpu[key] - before.vpn_cpu[key] for key in before.vpn_cpu}
        if system.vpn_pids else None,
        iperf_cpu_seconds=(cpu.get("host_total", 0.0) + cpu.get("remote_total", 0.0)) / 100 * seconds,
        machine_busy_seconds=after.machine_busy - before.machine_busy, steal_seconds=after.steal - before.steal,
        wall_seconds=after.monotonic - before.monotonic, load1_before=load1)


def measure_transfer(system: System, seconds: int, streams: int,
                     loaded_ping_interval: float | None = None) -> tuple[Transfer, PingSeries | None]:
    """One iperf3 client -> server test of `streams` TCP streams, clocked; pings alongside if asked."""
    server = system.server.popen(["iperf3", "-s", "-1", "-B", system.target, "-p", str(IPERF_PORT),
                                  "--rcv-timeout", "10000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = [server]
    try:
        wait_until(lambda: iperf_listening(system, server), 5.0, interval=0.02,
                   what=f"iperf3 to listen in {system.key}")
        load1 = os.getloadavg()[0]
        before = read_counters(system)
        client = system.client.popen(["iperf3", "-c", system.target, "-p", str(IPERF_PORT), "-t", str(seconds),
                                      "-P", str(streams), "-J", "--connect-timeout", "3000"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(client)
        pinger = None
        if loaded_ping_interval is not None:
            count = max(1, int((seconds - 1) / loaded_ping_interval))
            pinger = system.client.popen(ping_command(system.target, count, loaded_ping_interval),
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            processes.append(pinger)
        output, errors = finish_process(client, seconds + IPERF_GRACE_SECONDS, f"{system.key}: iperf3")
        after = read_counters(system)
        try:
            iperf_report = json.loads(output)
        except ValueError:
            iperf_report = {"error": (errors.strip() or output.strip())[-500:]}
        if client.returncode != 0 or "error" in iperf_report:
            raise BenchError(f"{system.key}: iperf3 failed ({client.returncode}): {iperf_report.get('error')}")
        loaded = None
        if pinger is not None:
            loaded = parse_ping(system, finish_process(pinger, 2 * seconds + 5, f"{system.key}: ping")[0])
        server.wait(timeout=5.0)  # a one-off server leaves once the test is over
    finally:
        for process in processes:
            stop_process(process, term_grace=1.0)
    return transfer_from(iperf_report, system, streams, seconds, load1, before, after), loaded


def measure_round(system: System, args: argparse.Namespace) -> Round:
    idle = measure_idle_ping(system, args.pings, args.ping_interval)
    single, loaded = measure_transfer(system, args.seconds, 1, args.loaded_ping_interval)
    multi, _ = measure_transfer(system, args.seconds, MULTI_STREAMS)
    assert loaded is not None
    return Round(idle, single, loaded, multi)


# --- prerequisites and machine facts ----------------------------------------------------------

def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def install_prerequisites() -> None:
    """Debian packages via tools/ensure-deps (only what is missing, no recommends); matplotlib in
    a venv of its own under build/, so the chart never needs anything in the system's Python."""
    if os.geteuid() != 0:
        raise BenchError("this needs root (network namespaces, tun devices): sudo make bench")
    result = subprocess.run([str(REPO_ROOT / "tools" / "ensure-deps"), *APT_PACKAGES], timeout=PIP_TIMEOUT)
    if result.returncode != 0:
        raise BenchError(f"tools/ensure-deps failed with exit code {result.returncode}")
    stamp = BENCH_VENV / ".stamp"
    if stamp.exists() and stamp.read_text() == BENCH_REQUIREMENTS.read_text():
        return
    progress(f"creating {BENCH_VENV} for the chart")
    venv_python = str(BENCH_VENV / "bin" / "python")
    for command in (["/usr/bin/python3", "-m", "venv", "--clear", str(BENCH_VENV)],
                    [venv_python, "-m", "pip", "install", "-q", "-r", str(BENCH_REQUIREMENTS)]):
        if subprocess.run(command, timeout=PIP_TIMEOUT).returncode != 0:
            raise BenchError(f"`{' '.join(command)}` failed")
    stamp.write_text(BENCH_REQUIREMENTS.read_text())


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": platform.release(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "iperf3": contestants.first_line(["iperf3", "--version"]),
        "tunvpn_commit": contestants.first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
                         + (" + uncommitted changes" if dirty else ""),
    }


# --- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench",
                        help="results.json, results.md and throughput.png go here")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=10, help="length of each iperf3 test")
    parser.add_argument("--pings", type=int, default=20, help="echo requests on the idle tunnel")
    parser.add_argument("--ping-interval", type=float, default=0.05)
    parser.add_argument("--loaded-ping-interval", type=float, default=0.2,
                        help="echo requests during the single-stream test, this far apart")
    parser.add_argument("--venv-python", default=str(REPO_ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--bookworm-python", default="/usr/bin/python3")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 2 <= args.seconds <= 60 or not 1 <= args.pings <= 1000:
        parser.error("keep --rounds in 1..20, --seconds in 2..60 and --pings in 1..1000")
    if not 0.01 <= args.ping_interval <= 1 or not 0.01 <= args.loaded_ping_interval <= 1:
        parser.error("keep the ping intervals in 0.01..1 s")
    return args


def interleaved(systems: list[System], number: int) -> list[System]:
    """Round `number`'s order: rotated, so no system always follows the same one."""
    shift = number % len(systems)
    return systems[shift:] + systems[:shift]


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    install_prerequisites()
    interpreter_paths = {"tunvpn-venv": args.venv_python, "tunvpn-bookworm": args.bookworm_python,
                         **{key: args.venv_python for key in LEVER_VARIANTS}}
    if "tunvpn-trixie" in args.systems:
        shim, rootfs = trixie.python_shim(workdir)
        interpreter_paths["tunvpn-trixie"] = str(shim)
    interpreters = {key: contestants.probe_interpreter(path)
                    for key, path in interpreter_paths.items() if key in args.systems}
    wireguard_go_trixie = trixie.wireguard_go() if "wireguard-go-trixie" in args.systems else None
    facts = machine_facts()
    if "tunvpn-trixie" in args.systems:
        facts["trixie_rootfs"] = str(rootfs)
    labels = {"tunvpn-venv": "tunvpn, venv", "tunvpn-bookworm": "tunvpn, bookworm's python3",
              "tunvpn-trixie": "tunvpn, trixie's python3"}
    setups: dict[str, Callable[[Lab], System]] = {
        "veth": contestants.setup_veth,
        "wireguard-go-bookworm": contestants.setup_wireguard_go_bookworm,
        "openvpn": contestants.setup_openvpn,
        "fastd": contestants.setup_fastd,
        **{key: (lambda lab, key=key, interp=interp: contestants.setup_tunvpn(lab, key, labels[key], interp))
           for key, interp in interpreters.items() if key not in LEVER_VARIANTS},
        **{key: (lambda lab, key=key, offloads=offloads, what=what: contestants.setup_tunvpn(
               lab, key, f"tunvpn, venv, {what}", interpreters[key], offloads))
           for key, (offloads, what) in LEVER_VARIANTS.items() if key in interpreters},
    }
    if wireguard_go_trixie is not None:
        setups["wireguard-go-trixie"] = lambda lab: contestants.setup_wireguard_go_trixie(lab, wireguard_go_trixie)
    rounds: dict[str, list[Round]] = {}
    with Lab() as lab:
        systems = []
        for key in args.systems:
            progress(f"setting up {key}")
            systems.append(setups[key](lab))
            rounds[key] = []
        for number in range(args.rounds):
            for system in interleaved(systems, number):
                result = measure_round(system, args)
                rounds[system.key].append(result)
                progress(f"round {number + 1}/{args.rounds} {system.key}: {result.single.mbps:.0f} Mbit/s "
                         f"1 stream, {result.multi.mbps:.0f} Mbit/s {MULTI_STREAMS} streams, "
                         f"load {result.single.load1_before:.2f}")
        progress("cleaning up")
    facts["loadavg_after"] = os.getloadavg()
    return {
        "machine": facts,
        "settings": {"rounds": args.rounds, "seconds": args.seconds, "multi_streams": MULTI_STREAMS,
                     "pings": args.pings, "ping_interval": args.ping_interval,
                     "loaded_ping_interval": args.loaded_ping_interval, "tunnel_mtu": contestants.TUNNEL_MTU},
        "interpreters": {key: asdict(interp) for key, interp in interpreters.items()},
        "systems": {system.key: system_results(system, [asdict(r) for r in rounds[system.key]], facts["cpus"])
                    for system in systems},
    }


def system_results(system: System, rows: list[dict[str, Any]], cpus: int) -> dict[str, Any]:
    return {"label": system.label, **system.details, "summary": report.summarize(rows, cpus), "rounds": rows}


def write_results(results: dict[str, Any], out: Path) -> None:
    """results.json (every round), results.md (the tables and facts) and the chart, side by side."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    markdown = report.markdown(results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    chart = subprocess.run([str(BENCH_VENV / "bin" / "python"), str(Path(__file__).resolve().parent / "chart.py"),
                            str(out / "results.json"), str(out / "throughput.png")], timeout=120)
    if chart.returncode != 0:
        raise BenchError(f"drawing the chart failed with exit code {chart.returncode}")
    progress(f"results: {out}/results.md, results.json, throughput.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="tunvpn-bench-"))
    try:
        results = run(args, workdir)
        results["machine"]["runtime_seconds"] = round(time.monotonic() - started, 1)
        write_results(results, args.out)
    except KeyboardInterrupt:
        progress("\ninterrupted; cleaned up")
        return 130
    except LabError as exc:
        progress(f"benchmark failed: {exc}")
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
