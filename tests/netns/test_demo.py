"""`make demo` keeps working, and shows what an admin should copy: key files, never keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from netlab import python_env

DEMO = Path(__file__).resolve().parents[2] / "tools/demo"


def test_the_demo_runs_and_prints_no_private_key():
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=120,
                            env=python_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("done")
    assert "PrivateKeyFile = " in result.stdout and "PrivateKey = " not in result.stdout
    assert result.stdout.count("-> LAN host 198.51.100.2: rtt") == 2
