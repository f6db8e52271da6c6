#!/usr/bin/env python3
"""Draw results.json as a PNG: throughput (1 and 4 streams) and CPU s/GB per system.

Run by throughput.py under the bench venv (matplotlib), so the measuring side needs only
Debian's python3:  build/bench-venv/bin/python benchmarks/chart.py RESULTS.json OUT.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: root in a terminal
import matplotlib.pyplot as plt  # noqa: E402


def bars(axis: Any, labels: list[str], series: list[tuple[str, list[dict[str, float] | None]]],
         title: str, digits: int) -> None:
    """Grouped horizontal bars at the medians, whiskers from min to max."""
    height = 0.8 / len(series)
    for index, (name, values) in enumerate(series):
        positions = [row + (index - (len(series) - 1) / 2) * height for row in range(len(labels))]
        medians = [v["median"] if v else 0.0 for v in values]
        errors = [[v["median"] - v["min"] if v else 0.0 for v in values],
                  [v["max"] - v["median"] if v else 0.0 for v in values]]
        axis.barh(positions, medians, height, xerr=errors, capsize=2, label=name)
        for position, median, value in zip(positions, medians, values):
            axis.text(median, position, f" {median:.{digits}f}" if value else " -", va="center", fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_title(title, fontsize=10)
    axis.grid(axis="x", alpha=0.3)


def draw(results: dict[str, Any], out: Path) -> None:
    tunnels = [s for key, s in results["systems"].items() if key != "veth"]  # the ceiling dwarfs the rest
    streams = results["settings"]["multi_streams"]
    figure, (throughput, cpu) = plt.subplots(1, 2, figsize=(13, 0.5 * len(tunnels) + 2))
    bars(throughput, [s["label"] for s in tunnels],
         [("1 stream", [s["summary"]["single_mbps"] for s in tunnels]),
          (f"{streams} streams", [s["summary"]["multi_mbps"] for s in tunnels])],
         "TCP throughput, Mbit/s (higher is better)", digits=0)
    throughput.legend(fontsize=8, loc="lower right")
    bars(cpu, [s["label"] for s in tunnels],
         [("1 stream", [s["summary"]["single_cpu_s_per_gb"] for s in tunnels]),
          (f"{streams} streams", [s["summary"]["multi_cpu_s_per_gb"] for s in tunnels])],
         "CPU seconds per GB, both ends (lower is better)", digits=1)
    cpu.set_yticklabels([])
    machine = results["machine"]
    veth = results["systems"].get("veth", {}).get("summary", {}).get("single_mbps")
    rounds = results["settings"]["rounds"]
    ceiling = f"; raw veth {veth['median']:.0f} Mbit/s" if veth else ""
    figure.suptitle(f"tunvpn bench {machine['date_utc']}: {machine['cpus']} x {machine['cpu']}, "
                    f"load {machine['loadavg_before'][0]:.1f} before{ceiling}; median, whiskers min-max "
                    f"of {rounds} round{'s' if rounds != 1 else ''}", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    draw(json.loads(Path(argv[0]).read_text()), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
