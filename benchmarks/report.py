"""The benchmark's summaries and its markdown: medians with [min-max] of the interleaved rounds.

Kept apart from the measuring so the tables can be redrawn from a results.json alone.
"""

from __future__ import annotations

import statistics
from typing import Any

RATIO_REFERENCES = {"fastd": "x fastd", "wireguard-go-trixie": "x wireguard-go trixie"}


def spread(values: list[float | None]) -> dict[str, float] | None:
    present = [value for value in values if value is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


def cpu_seconds_per_gb(transfer: dict[str, Any]) -> float | None:
    if transfer["vpn_cpu_seconds"] is None or not transfer["bytes_received"]:
        return None
    return transfer["vpn_cpu_seconds"] / (transfer["bytes_received"] / 1e9)


CPU_SPLIT_KEYS = ("sending_user", "sending_system", "receiving_user", "receiving_system")


def cpu_split_per_gb(transfer: dict[str, Any]) -> dict[str, float] | None:
    """Each end's user and system seconds per 10^9 bytes (results.json from before the split: None)."""
    split = transfer.get("vpn_cpu_split")
    if not split or not transfer["bytes_received"]:
        return None
    return {key: split[key] / (transfer["bytes_received"] / 1e9) for key in CPU_SPLIT_KEYS}


def other_cpu_percent(transfer: dict[str, Any], cpus: int) -> float:
    """The machine's busy time not charged to the VPN processes or iperf3, as a share of all cores:
    other people's work, plus kernel work that ran outside these processes (softirqs, kthreads)."""
    measured = (transfer["vpn_cpu_seconds"] or 0.0) + transfer["iperf_cpu_seconds"]
    other = max(0.0, transfer["machine_busy_seconds"] - measured)
    return 100 * other / (transfer["wall_seconds"] * cpus)


def summarize(rows: list[dict[str, Any]], cpus: int) -> dict[str, Any]:
    """Medians and spreads of one system's rounds (as in results.json)."""
    windows = [row[kind] for row in rows for kind in ("single", "multi")]
    return {
        "single_mbps": spread([row["single"]["mbps"] for row in rows]),
        "multi_mbps": spread([row["multi"]["mbps"] for row in rows]),
        "rtt_idle_ms": spread([row["idle_ping"]["rtt_avg_ms"] for row in rows]),
        "rtt_loaded_ms": spread([row["loaded_ping"]["rtt_avg_ms"] for row in rows]),
        "loaded_ping_lost": sum(row["loaded_ping"]["sent"] - row["loaded_ping"]["received"] for row in rows),
        "single_cpu_s_per_gb": spread([cpu_seconds_per_gb(row["single"]) for row in rows]),
        "multi_cpu_s_per_gb": spread([cpu_seconds_per_gb(row["multi"]) for row in rows]),
        "single_cpu_split_s_per_gb": _split_spreads([cpu_split_per_gb(row["single"]) for row in rows]),
        "single_retransmits": statistics.median(row["single"]["retransmits"] for row in rows),
        "load1": spread([window["load1_before"] for window in windows]),
        "other_cpu_percent": spread([other_cpu_percent(window, cpus) for window in windows]),
        "steal_percent": spread([100 * window["steal_seconds"] / (window["wall_seconds"] * cpus)
                                 for window in windows]),
    }


def _split_spreads(splits: list[dict[str, float] | None]) -> dict[str, dict[str, float] | None] | None:
    present = [split for split in splits if split is not None]
    if not present:
        return None
    return {key: spread([split[key] for split in present]) for key in CPU_SPLIT_KEYS}


def cell(values: dict[str, float] | None, digits: int = 0) -> str:
    if values is None:
        return "-"
    return f"{values['median']:.{digits}f} [{values['min']:.{digits}f}-{values['max']:.{digits}f}]"


def ratio(summary: dict[str, Any], reference: dict[str, Any] | None) -> str:
    if reference is None or summary["single_mbps"] is None or reference["single_mbps"] is None:
        return "-"
    return f"{summary['single_mbps']['median'] / reference['single_mbps']['median']:.2f}"


def results_table(results: dict[str, Any]) -> str:
    systems = results["systems"]
    references = {key: systems[key]["summary"] if key in systems else None for key in RATIO_REFERENCES}
    streams = results["settings"]["multi_streams"]
    lines = [f"| system | 1 stream Mbit/s | {' | '.join(RATIO_REFERENCES.values())} | {streams} streams Mbit/s "
             f"| RTT idle ms | RTT loaded ms | CPU s/GB, 1 stream | CPU s/GB, {streams} streams |",
             "|---|---:|" + "---:|" * len(RATIO_REFERENCES) + "---:|---:|---:|---:|---:|"]
    for system in systems.values():
        s = system["summary"]
        lost = f" ({s['loaded_ping_lost']} lost)" if s["loaded_ping_lost"] else ""
        lines.append(f"| {system['label']} | {cell(s['single_mbps'])} | "
                     + " | ".join(ratio(s, reference) for reference in references.values())
                     + f" | {cell(s['multi_mbps'])} | {cell(s['rtt_idle_ms'], 3)} | {cell(s['rtt_loaded_ms'], 2)}{lost}"
                     f" | {cell(s['single_cpu_s_per_gb'], 1)} | {cell(s['multi_cpu_s_per_gb'], 1)} |")
    return "\n".join(lines)


def noise_table(results: dict[str, Any]) -> str:
    lines = ["| system | load average (1 min) at test start | other CPU % of the machine | steal % "
             "| 1-stream max/min |",
             "|---|---:|---:|---:|---:|"]
    for system in results["systems"].values():
        s = system["summary"]
        single = s["single_mbps"]
        swing = f"{single['max'] / single['min']:.2f}" if single and single["min"] else "-"
        lines.append(f"| {system['label']} | {cell(s['load1'], 2)} | {cell(s['other_cpu_percent'])} "
                     f"| {cell(s['steal_percent'], 1)} | {swing} |")
    return "\n".join(lines)


def cpu_split_table(results: dict[str, Any]) -> str:
    """Where each system's CPU goes in the 1-stream test: which end, in user code or the kernel."""
    lines = ["| system | sending end, user | sending end, system | receiving end, user | receiving end, system |",
             "|---|---:|---:|---:|---:|"]
    for system in results["systems"].values():
        split = system["summary"].get("single_cpu_split_s_per_gb")
        if split:
            lines.append(f"| {system['label']} | " + " | ".join(cell(split[key], 1) for key in CPU_SPLIT_KEYS) + " |")
    return "\n".join(lines)


def facts_text(results: dict[str, Any]) -> str:
    facts, settings = results["machine"], results["settings"]
    lines = [f"- {facts['date_utc']}, kernel {facts['kernel']}, CPU {facts['cpu']} x {facts['cpus']}, "
             f"load average before {facts['loadavg_before'][0]:.2f} / after {facts['loadavg_after'][0]:.2f} (1 min)",
             f"- {facts['iperf3']}; tunvpn at {facts['tunvpn_commit']}"]
    for key, interp in results["interpreters"].items():
        where = (f"/usr/bin/python3 chrooted into {facts['trixie_rootfs']} (benchmarks/rootfs-exec)"
                 if key == "tunvpn-trixie" else interp["path"])
        lines.append(f"- {key}: {where}: python {interp['python_version']}, cryptography "
                     f"{interp['cryptography_version']} ({interp['cryptography_dir']}), "
                     f"pyroute2 {interp['pyroute2_version']}")
    for key, system in results["systems"].items():
        if "binary" in system:
            package = f"package {system['binary']['package_version']}, " if "package_version" in system["binary"] else ""
            lines.append(f"- {key}: {package}{system['binary']['path']}, which calls itself "
                         f"`{system['binary']['version_output']}`")
    lines.append(f"- {settings['rounds']} interleaved rounds per system; each: {settings['pings']} pings every "
                 f"{settings['ping_interval']:g} s on the idle tunnel, iperf3 -t {settings['seconds']} with one "
                 f"TCP stream client -> server and pings every {settings['loaded_ping_interval']:g} s alongside "
                 f"(RTT loaded), then iperf3 -P {settings['multi_streams']}; tunnel MTU {settings['tunnel_mtu']}; "
                 f"runtime {facts.get('runtime_seconds', '?')} s")
    lines.append("- ratios: median 1-stream throughput over the reference's; CPU s/GB: utime + stime of the "
                 "VPN processes of both ends per 10^9 bytes received")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    return (f"## tunvpn benchmark: median [min-max] of the rounds\n\n{results_table(results)}\n\n"
            f"Where the CPU goes, 1 stream (CPU s/GB; the sending end is the iperf3 client's, whose "
            f"VPN encrypts; system time includes kernel work done in the process's context):\n\n"
            f"{cpu_split_table(results)}\n\n"
            f"How noisy the windows were (each system's iperf3 tests):\n\n{noise_table(results)}\n\n"
            f"{facts_text(results)}\n")
