"""DnsManager for real, inside a lab namespace and a private mount namespace, never touching the host.

The code under test runs in a lab network namespace, under `unshare --mount` with a temporary
file bind-mounted over /etc/resolv.conf.  The resolvconf it is given is a fake that
records each call and rewrites /etc/resolv.conf the way the real one does: so a bind mount that
leaked would show in the host's file, which must stay byte-identical (and unwritten).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from netlab import Host, Lab, python_env, wait_until

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
BASE = "# lab resolv.conf\nnameserver 192.0.2.53\n"
DEBIAN_INTERFACE_ORDER = "lo.inet6\nlo.inet\nlo\ntun*\ntap*\nhso*\nvpn*\n@(br|eth)*\n*\n"

_FAKE_RESOLVCONF = """#!{python}
# A stand-in for resolvconf: records the call, keeps one record per name, rewrites /etc/resolv.conf.
import json, sys
from pathlib import Path
state = Path({state!r})
args = sys.argv[1:]
stdin = sys.stdin.read()
with open(state / "calls.jsonl", "a") as log:
    log.write(json.dumps({{"args": args, "stdin": stdin}}) + "\\n")
records = state / "records"
if args[0] == "-a":
    (records / args[1]).write_text(stdin)
elif args[0] == "-d":
    (records / args[1]).unlink(missing_ok=True)
Path("/etc/resolv.conf").write_text((state / "base.conf").read_text()
                                    + "".join(record.read_text() for record in sorted(records.iterdir())))
"""

_DRIVER = r"""
import json, sys
from pathlib import Path
from tunvpn.io.dns import DnsManager, detect_backend

interface_order, expected_tool = Path(sys.argv[1]), sys.argv[2]
backend = detect_backend(search_path=str(Path(expected_tool).parent), interface_order=interface_order)
if backend.tool != expected_tool:  # never let a real resolvconf or resolved be reached from a test
    print(json.dumps({"refused": repr(backend)}))
    sys.exit(3)

def view():
    return Path("/etc/resolv.conf").read_text()

manager = DnsManager("tvdns0", detect=lambda: backend)
steps = [{"view": view()}]
steps.append({"did": manager.apply(["203.0.113.53", "2001:db8:100::53"], ["office.example"]), "view": view()})
steps.append({"did": manager.apply(["203.0.113.54"], [], exclusive=True), "view": view()})
manager.revert()
steps.append({"view": view()})
manager.revert()  # nothing left: runs nothing
print(json.dumps({"backend": [backend.kind, backend.tool, backend.record_prefix], "steps": steps}))
"""


def _fingerprint(path: Path) -> tuple[bytes, int, int, int]:
    """Content and identity: a rewrite with the very same bytes still changes the mtime."""
    status = path.stat()
    return path.read_bytes(), status.st_ino, status.st_mtime_ns, status.st_size


@pytest.fixture
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tunvpn-dns-") as directory:
        root = Path(directory)
        (root / "bin").mkdir()
        (root / "records").mkdir()
        (root / "base.conf").write_text(BASE)
        (root / "resolv.conf").write_text(BASE)  # what /etc/resolv.conf shows inside
        (root / "interface-order").write_text(DEBIAN_INTERFACE_ORDER)
        fake = root / "bin" / "resolvconf"
        fake.write_text(_FAKE_RESOLVCONF.format(python=sys.executable, state=str(root)))
        fake.chmod(0o755)
        yield root


def _run_isolated(host: Host, workspace: Path) -> subprocess.CompletedProcess[str]:
    """The driver in `host`'s network namespace and a private mount namespace of its own."""
    env = python_env()
    bind_then_run = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
    return host.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", bind_then_run, "sh",
                     str(workspace / "resolv.conf"), sys.executable, "-c", _DRIVER,
                     str(workspace / "interface-order"), str(workspace / "bin" / "resolvconf")],
                    env=env, timeout=30, check=False)


def test_resolvconf_gets_the_servers_and_the_host_resolv_conf_is_untouched(lab: Lab, workspace: Path) -> None:
    host_before = _fingerprint(HOST_RESOLV_CONF)
    client = lab.add_host("client")

    result = _run_isolated(client, workspace)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout)

    assert _fingerprint(HOST_RESOLV_CONF) == host_before
    assert report["backend"] == ["resolvconf", str(workspace / "bin" / "resolvconf"), "tun."]
    first, second = ("nameserver 203.0.113.53\nnameserver 2001:db8:100::53\nsearch office.example\n",
                     "nameserver 203.0.113.54\n")
    calls = [json.loads(line) for line in (workspace / "calls.jsonl").read_text().splitlines()]
    assert calls == [
        {"args": ["-a", "tun.tvdns0", "-m", "0"], "stdin": first},
        {"args": ["-a", "tun.tvdns0", "-m", "0", "-x"], "stdin": second},
        {"args": ["-d", "tun.tvdns0", "-f"], "stdin": ""},
    ]
    # What programs inside saw in /etc/resolv.conf at each step: the private file, rewritten.
    assert report["steps"] == [
        {"view": BASE},
        {"did": "DNS servers 203.0.113.53, 2001:db8:100::53 (search office.example) "
                "registered with resolvconf as tun.tvdns0", "view": BASE + first},
        {"did": "DNS servers 203.0.113.54 registered with resolvconf as tun.tvdns0", "view": BASE + second},
        {"view": BASE},
    ]
    assert (workspace / "resolv.conf").read_text() == BASE
    assert list((workspace / "records").iterdir()) == []


def test_a_lab_namespace_is_told_apart_from_ours(lab: Lab) -> None:
    """The check that keeps a host's systemd-resolved from being configured from a lab namespace."""
    from tunvpn.io.dns import _shares_network_namespace_with

    sleeper = lab.add_host("client").popen(["sleep", "30"])
    assert _shares_network_namespace_with(os.getpid()) is True
    # `ip netns exec` enters the namespace, then execs sleep under the same pid.
    wait_until(lambda: Path(f"/proc/{sleeper.pid}/exe").resolve().name == "sleep", 5, interval=0.01,
               what="ip netns exec to start sleep")
    assert _shares_network_namespace_with(sleeper.pid) is False
