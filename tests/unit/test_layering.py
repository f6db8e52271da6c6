"""Imports flow one way: protocol core <- I/O shell <- daemons <- CLI.

The core must stay sans-I/O: no sockets, no tun, no netlink, no clock, no threads; the rest of
tunvpn sees only the core's public face (the Device facade, never a Peer or a `device._name`).
This reads the source (AST), so it checks what our modules import, not what the stdlib pulls in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tunvpn"
CORE_FORBIDDEN = {"socket", "time", "datetime", "select", "selectors", "asyncio", "fcntl", "signal",
                  "subprocess", "threading", "pyroute2", "logging"}
LATER_LAYERS = {"daemon", "server", "client", "cli", "checkconfig", "show", "__main__"}


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(absolute top-level modules, tunvpn-internal modules) imported by one file."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.parent.relative_to(PACKAGE.parent).parts
    absolute, internal = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                absolute.add(alias.name.split(".")[0])
                if alias.name.startswith("tunvpn."):
                    internal.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                internal.add(".".join([*base, *(node.module.split(".") if node.module else [])]))
            elif node.module:
                absolute.add(node.module.split(".")[0])
                if node.module.startswith("tunvpn"):
                    internal.add(node.module)
    return absolute, internal


CORE_FILES = sorted((PACKAGE / "protocol").glob("*.py"))
IO_FILES = sorted((PACKAGE / "io").glob("*.py"))


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_the_core_does_no_io_and_reads_no_clock(path):
    absolute, internal = imports_of(path)
    assert not absolute & CORE_FORBIDDEN, f"{path.name} imports {absolute & CORE_FORBIDDEN}"
    outside = {name for name in internal if not name.startswith("tunvpn.protocol")}
    assert not outside, f"{path.name} imports {outside} from outside the core"


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: p.name)
def test_the_core_uses_os_only_for_randomness(path):
    tree = ast.parse(path.read_text())
    uses = {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"}
    assert uses <= {"urandom"}, f"{path.name} uses os.{uses - {'urandom'}}"


@pytest.mark.parametrize("path", IO_FILES, ids=lambda p: p.name)
def test_the_io_shell_does_not_import_the_daemons(path):
    _, internal = imports_of(path)
    later = {name for name in internal if name.split(".")[1] in LATER_LAYERS}
    assert not later, f"{path.name} imports {later}"


DAEMON_FILES = [PACKAGE / f"{name}.py" for name in ("daemon", "server", "client")]
CLI_MODULES = {"cli", "checkconfig", "show", "__main__"}


@pytest.mark.parametrize("path", DAEMON_FILES, ids=lambda p: p.name)
def test_the_daemons_do_not_import_the_cli(path):
    _, internal = imports_of(path)
    cli = {name for name in internal if name.split(".")[1] in CLI_MODULES}
    assert not cli, f"{path.name} imports {cli}"


# What the rest of tunvpn may import from the core: the Device facade (with its events), the
# control codec, key handling and the protocol's timing constants.  Peer, DeviceState and the
# send/receive/handshake/timer modules are the core's own business.
CORE_PUBLIC = {"device", "events", "control", "crypto", "timers"}
OUTSIDE_FILES = sorted(set(PACKAGE.glob("*.py")) | set(IO_FILES))


@pytest.mark.parametrize("path", OUTSIDE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_outside_the_core_only_its_public_modules_are_imported(path):
    _, internal = imports_of(path)
    core = {name.split(".")[2] for name in internal if name.startswith("tunvpn.protocol.")}
    assert core <= CORE_PUBLIC, f"{path.name} imports tunvpn.protocol.{core - CORE_PUBLIC}"


def private_device_uses(source: str) -> list[str]:
    """`x._name` where x is a device (`device`, `self.device`, ...): reaching past the facade."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and ast.unparse(node.value).split(".")[-1].endswith("device")):
            found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("path", OUTSIDE_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_outside_the_core_nothing_private_of_a_device_is_used(path):
    assert private_device_uses(path.read_text()) == []


def test_the_private_use_check_sees_private_uses():
    assert sorted(private_device_uses("self.device._state.peers\nx = device._heap\nself.device.peer_keys()")) == [
        "device._heap", "self.device._state"]


def test_the_layering_check_sees_imports():
    """Guard against a check that cannot fail: known imports must be found."""
    absolute, internal = imports_of(PACKAGE / "io" / "loop.py")
    assert "selectors" in absolute and "tunvpn.protocol.device" in internal
    absolute, internal = imports_of(PACKAGE / "daemon.py")
    assert "tunvpn.io.tun" in internal
