"""Imports flow one way: protocol core <- I/O shell <- daemons <- CLI.

The core must stay sans-I/O: no sockets, no tun, no netlink, no clock, no threads. This reads
the source (AST), so it checks what our modules import, not what the stdlib pulls in.
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


def test_the_layering_check_sees_imports():
    """Guard against a check that cannot fail: known imports must be found."""
    absolute, internal = imports_of(PACKAGE / "io" / "loop.py")
    assert "selectors" in absolute and "tunvpn.protocol.device" in internal
    absolute, internal = imports_of(PACKAGE / "daemon.py")
    assert "tunvpn.io.tun" in internal
