"""The bounded fuzz campaign `make test` runs: every target under atheris, >= 1M inputs in all.

Each target runs in its own process (libFuzzer exits when done) for FUZZ_RUNS inputs, or
FUZZ_SECONDS if that comes first.  The campaign is bounded by count, not time, so a slower or
busier machine takes longer instead of failing; the time limit only catches a hang; an exception out of tunvpn fails the test with the
crashing input's path and traceback.  The figures go to the terminal and build/fuzz.json.
Runs under the venv only: atheris is a venv package (tools/test-requirements.txt).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from campaign import campaign
from targets import NAMES

SECONDS_PER_TARGET = int(os.environ.get("FUZZ_SECONDS", "240"))
RUNS_PER_TARGET = int(os.environ.get("FUZZ_RUNS", "80000"))  # 13 targets: just over 1M
MIN_TOTAL_INPUTS = 1_000_000
FIGURES = Path(__file__).resolve().parents[2] / "build" / "fuzz.json"


def test_every_target_survives_a_bounded_campaign(tmp_path, capsys):
    figures: dict[str, dict[str, float]] = {}
    started = time.monotonic()
    for name in NAMES:
        inputs, seconds, _ = campaign(name, RUNS_PER_TARGET, SECONDS_PER_TARGET, tmp_path / name)
        figures[name] = {"inputs": inputs, "seconds": seconds}
        with capsys.disabled():  # the figures belong in every run's output, not only a failure's
            print(f"\nfuzzed {name:15} {inputs:>9} inputs in {seconds:.0f} s", end="")
    total = sum(f["inputs"] for f in figures.values())
    with capsys.disabled():
        print(f"\nfuzzed {len(NAMES)} targets: {total} inputs in {time.monotonic() - started:.0f} s")
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps({"targets": figures, "total_inputs": total}, indent=2) + "\n")
    assert total >= MIN_TOTAL_INPUTS, f"only {total} inputs in all"
    slow = {name: f["inputs"] for name, f in figures.items() if f["inputs"] < 10_000}
    assert not slow, f"targets that ran too few inputs to mean much: {slow}"


def test_a_campaign_reports_the_bug_it_finds(tmp_path):
    """The canary target raises one byte away from its seed: the campaign must fail and keep the input."""
    with pytest.raises(RuntimeError, match="the canary sang"):
        campaign("canary", 1_000_000, 30, tmp_path)
    crashes = list(tmp_path.glob("crash-*"))
    assert crashes and crashes[0].read_bytes()[:4] == b"FUZZ"
