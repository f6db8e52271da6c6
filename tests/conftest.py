"""Suite-wide checks: say which libraries run, and never let a missing prerequisite pass as a skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

ROOT_DIRS = ("netns", "interop", "package", "ansible")


def _libraries() -> dict[str, str]:
    import cryptography
    import pyroute2

    return {
        "cryptography": f"{cryptography.__version__} ({Path(cryptography.__file__).parent})",
        "pyroute2": f"{getattr(pyroute2, '__version__', '?')} ({Path(pyroute2.__file__).parent})",
    }


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"python {sys.version.split()[0]} ({sys.executable})"] + [f"{k} {v}" for k, v in _libraries().items()]


def pytest_sessionstart(session: pytest.Session) -> None:
    """The Debian run must really use Debian's python3-cryptography and python3-pyroute2."""
    if os.environ.get("TUNVPN_EXPECT_DEBIAN_LIBS") == "1":
        for name, where in _libraries().items():
            if "/usr/lib/python3/dist-packages" not in where:
                raise pytest.UsageError(f"expected Debian's {name}, got {where}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).parent
    for item in items:
        if Path(item.fspath).relative_to(tests_dir).parts[0] in ROOT_DIRS:
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _require_root(request: pytest.FixtureRequest) -> None:
    """Root tests fail, not skip, without root: a skipped interop test proves nothing."""
    if request.node.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, tun); run `sudo make test`")


@pytest.fixture
def lab() -> Iterator[object]:
    """A fresh lab of network namespaces (netlab.Lab), removed after the test whatever happens."""
    from netlab import Lab

    with Lab() as new_lab:
        yield new_lab


@pytest.fixture(scope="session")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tunvpn_VERSION_all.deb of the working tree, built once per run (so never a stale one)."""
    from debpackage import build_deb

    return build_deb(tmp_path_factory.mktemp("deb"))
