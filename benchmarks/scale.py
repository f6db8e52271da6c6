#!/usr/bin/env python3
"""`sudo make bench`, scale part: one tunvpn server against 100, 1000 and 5000 simulated clients.

    sudo /usr/bin/python3 benchmarks/scale.py [--out build/bench] [--peers 100 1000 5000]

Each size runs in a fresh lab (tests/scalelab.py: a server namespace and a load generator
namespace joined by a veth; tests/loadgen.py simulates the clients, one sans-I/O Device and
one UDP port each), with cookies off. Per size and interpreter it reports the sustained
handshake rate, the time until every client had its address, the server's RSS before the
clients came and with all of them connected (total and per peer), and the wall time of
`tunvpn show` and `tunvpn show --json` at that many peers. Output: scale.md and scale.json in
--out, beside throughput.py's results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from netlab import Lab, LabError  # noqa: E402
from scalelab import run_scale  # noqa: E402

DEFAULT_PEERS = (100, 1000, 5000)
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
COLUMNS = (
    ("peers", "peers"), ("connected", "connected"), ("handshakes/s", "handshakes_per_second"),
    ("s to all connected", "seconds_to_all_connected"), ("RSS before MiB", "rss_before_mib"),
    ("RSS at N MiB", "rss_after_mib"), ("KiB per peer (delta)", "rss_per_peer_kib"),
    ("KiB per peer (total)", "rss_total_per_peer_kib"), ("server CPU ms per client", "server_cpu_ms_per_client"),
    ("loadgen CPU ms per client", "loadgen_cpu_ms_per_client"), ("show ms", "show_ms"), ("show --json ms", "show_json_ms"),
    ("server start s", "server_start_seconds"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "bench")
    parser.add_argument("--peers", type=int, nargs="+", default=list(DEFAULT_PEERS))
    parser.add_argument("--pythons", nargs="+", default=None,
                        help="interpreters to run server and generator under (default: the venv's, if any, and this one)")
    parser.add_argument("--workers", type=int, default=2, help="load generator processes")
    parser.add_argument("--in-flight", type=int, default=32, help="clients connecting at once, per worker")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for every client to connect")
    args = parser.parse_args(argv)
    if not all(10 <= n <= 20000 for n in args.peers) or not 1 <= args.workers <= 8 or not 1 <= args.in_flight <= 512:
        parser.error("keep --peers in 10..20000, --workers in 1..8 and --in-flight in 1..512")
    if args.pythons is None:
        args.pythons = [str(VENV_PYTHON)] * VENV_PYTHON.exists() + [sys.executable]
    return args


def library_versions(python: str) -> str:
    code = "import sys, cryptography; print(sys.version.split()[0], cryptography.__version__)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=30, check=True).stdout.split()
    return f"python {out[0]}, cryptography {out[1]}"


def markdown(results: dict) -> str:
    lines = [f"# tunvpn at scale ({results['machine']['date']})", "",
             f"One server, N simulated clients ({results['settings']['workers']} generator processes, "
             f"{results['settings']['in_flight']} clients connecting at once per process), cookies off; "
             f"{results['machine']['cpus']} CPUs, {results['machine']['cpu']}, kernel {results['machine']['kernel']}; "
             f"load average {results['machine']['loadavg_before']} before, {results['machine']['loadavg_after']} after.", ""]
    for python, runs in results["runs"].items():
        lines += [f"## {results['interpreters'][python]} ({python})", "",
                  "| " + " | ".join(title for title, _ in COLUMNS) + " |",
                  "|" + "---:|" * len(COLUMNS)]
        for figures in runs:
            lines.append("| " + " | ".join(_cell(figures.get(key)) for _, key in COLUMNS) + " |")
        lines += ["", _growth(runs), ""]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _growth(runs: list[dict]) -> str:
    """How each figure grows from the smallest run to each larger one."""
    if len(runs) < 2:
        return ""
    base = runs[0]
    parts = []
    for figures in runs[1:]:
        ratios = ", ".join(f"{title} x{figures[key] / base[key]:.2f}" for title, key in COLUMNS[2:]
                           if figures.get(key) and base.get(key))
        parts.append(f"{base['peers']} -> {figures['peers']} peers: {ratios}")
    return "Growth: " + "; ".join(parts) + "."


def machine_facts() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(), "cpu": cpu,
            "kernel": platform.release(), "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = {"machine": machine_facts(), "settings": {"workers": args.workers, "in_flight": args.in_flight},
               "interpreters": {}, "runs": {}}
    try:
        for python in args.pythons:
            results["interpreters"][python] = library_versions(python)
            results["runs"][python] = []
            for peers in args.peers:
                with Lab() as lab:
                    run = run_scale(lab, peers, workers=args.workers, in_flight=args.in_flight,
                                    connect_timeout=args.timeout, python=python)
                figures = run.figures() | {"duplicate_addresses": len(run.duplicate_addresses())}
                results["runs"][python].append(figures)
                print(f"{python}: {figures}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    except LabError as exc:
        print(f"scale benchmark failed: {exc}", file=sys.stderr)
        return 1
    results["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "scale.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
