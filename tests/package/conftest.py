"""Fixtures of the package tests: the .deb rebuilt as a higher version, to upgrade to."""

from __future__ import annotations

from pathlib import Path

import pytest

from debpackage import build_deb

UPGRADE_SUFFIX = "+upgrade1"  # sorts above the plain version, in dpkg's order as in PEP 440


@pytest.fixture(scope="session")
def upgrade_deb(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tree rebuilt as a higher version, to upgrade to."""
    version = deb.name.split("_")[1]
    return build_deb(tmp_path_factory.mktemp("upgrade-deb"), version + UPGRADE_SUFFIX)

