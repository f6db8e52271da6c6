"""The .deb of the working tree, built fresh for the tests that install it (package, Ansible)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300.0


class DebBuildError(Exception):
    pass


def build_deb(output: Path, version: str | None = None) -> Path:
    """tunvpn_VERSION_all.deb of this tree (optionally as another version) in `output`, via tools/build-deb."""
    command = [sys.executable, str(REPO_ROOT / "tools/build-deb"), "--output", str(output), "--no-lintian"]
    if version:
        command += ["--version", version]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if result.returncode != 0:
        raise DebBuildError(f"tools/build-deb failed: {result.stderr.strip()[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])
