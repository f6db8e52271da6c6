"""tests/systemdhosts.py itself: what the package and Ansible tests rely on about their hosts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import netlab
from systemdhosts import CGROUP_ROOT, RUN_ROOT, SystemdLab, sweep_dead_runs

TESTS_DIR = Path(__file__).resolve().parent.parent


def leftovers(prefix: str) -> list[str]:
    """Everything on this machine that still carries a run's prefix."""
    found = [f"run directory {RUN_ROOT / prefix}"] if (RUN_ROOT / prefix).exists() else []
    found += [f"mount {line.split()[1]}" for line in Path("/proc/mounts").read_text().splitlines() if prefix in line]
    found += [f"cgroup {path}" for path in CGROUP_ROOT.glob(f"*/{prefix}-*")] + \
             [f"cgroup {path}" for path in CGROUP_ROOT.glob(f"{prefix}-*")]
    found += [f"network namespace {name}" for name in netlab.list_namespaces() if name.startswith(prefix)]
    processes = subprocess.run(["pgrep", "-a", "-f", prefix], capture_output=True, text=True).stdout
    found += [f"process {line}" for line in processes.splitlines()]
    return found


def test_hosts_are_separate_machines_that_reboot_and_leave_nothing() -> None:
    with SystemdLab("trixie") as lab:
        alpha, beta = lab.add_hosts(["alpha", "beta"])
        prefix = lab.netlab.prefix
        assert alpha.run("hostname").stdout.strip() == "alpha"
        assert alpha.read_file("/etc/machine-id") != beta.read_file("/etc/machine-id")
        alpha.ping(beta.address)
        beta.ping(alpha.addresses[1])
        lab.switch.ping(alpha.address)  # where SSH-driven tools (Ansible) run from
        # What a VPN needs inside: a tun device node and the namespace's own sysctls.  Only
        # --private-network with --network-namespace-path gives both (nspawn 252's manual says
        # the two cannot be combined): this fails loudly should a newer nspawn change that.
        alpha.run("test -c /dev/net/tun && sysctl -q -w net.ipv4.ip_forward=1")
        assert beta.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
        for host in (alpha, beta):  # each container in a cgroup of its own, seen from outside
            assert f"/{prefix}-{host.role}" in Path(f"/proc/{host.init_pid()}/cgroup").read_text()
        alpha.put_file("/root/marker", "kept across the reboot")
        started = time.monotonic()
        alpha.reboot()
        print(f"reboot of a trixie host: {time.monotonic() - started:.1f} s")
        assert alpha.read_file("/root/marker") == "kept across the reboot"
        alpha.ping(beta.address)
    assert leftovers(prefix) == []


def test_the_next_run_sweeps_what_a_killed_run_left() -> None:
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from systemdhosts import SystemdLab; "
              "lab = SystemdLab('trixie'); lab.add_host('orphan'); print(lab.netlab.prefix, flush=True); time.sleep(300)")
    orphaned = subprocess.Popen([sys.executable, "-c", script, str(TESTS_DIR)], stdout=subprocess.PIPE)
    try:
        prefix = netlab.read_line(orphaned, time.monotonic() + 60, "the orphaned run's prefix")
    finally:
        orphaned.kill()  # no cleanup of its own: as a test run killed with SIGKILL
        orphaned.wait(timeout=10)
        orphaned.stdout.close()
    assert leftovers(prefix), "the killed run left nothing to sweep: the test proves nothing"
    sweep_dead_runs()
    assert leftovers(prefix) == []
