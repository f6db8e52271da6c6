"""Run one fuzz target under atheris (libFuzzer, coverage-guided) for a bounded number of inputs.

    python tests/fuzz/campaign.py TARGET --runs N --seconds S [--work DIR]

Starts from the target's seeds (made by the core now) and its corpus in tests/fuzz/corpus/TARGET;
new inputs that reach new code go to --work (a scratch directory, not the repository).  A crash
(an exception out of the target) is written to --work as crash-*, and the exit status is not 0.
The last line says how many inputs ran: `fuzzed TARGET: N inputs in S s`.

`--seeds-only` writes the seeds into the repository's corpus instead (to refresh it).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")


def write_seeds(name: str, directory: Path) -> int:
    from targets import target

    directory.mkdir(parents=True, exist_ok=True)
    seeds = target(name).seeds()
    for seed in seeds:
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
    return len(seeds)


def fuzz_in_process(name: str, runs: int, seconds: int, work: Path) -> None:
    """Never returns: libFuzzer exits when done (status 0) or on a crash (not 0)."""
    import atheris

    with atheris.instrument_imports(include=["tunvpn", "targets"]):  # targets too: the canary needs coverage
        from targets import MAX_INPUT, target

    logging.disable(logging.CRITICAL)  # fuzzed inputs make the daemons log a lot; only exceptions count
    fuzz_target = target(name)
    seeds = work / "seeds"
    write_seeds(name, seeds)
    corpus = [str(work / "new"), str(seeds)] + ([str(CORPUS / name)] if (CORPUS / name).is_dir() else [])
    (work / "new").mkdir(exist_ok=True)
    argv = [sys.argv[0], f"-runs={runs}", f"-max_total_time={seconds}", f"-max_len={MAX_INPUT}",
            "-timeout=20", "-rss_limit_mb=1024", f"-artifact_prefix={work}/", "-print_final_stats=1", *corpus]
    atheris.Setup(argv, fuzz_target.run)
    atheris.Fuzz()


def campaign(name: str, runs: int, seconds: int, work: Path) -> tuple[int, float, str]:
    """Run the target in a child (libFuzzer exits the process); (inputs, seconds, output)."""
    child = subprocess.run([sys.executable, __file__, name, "--runs", str(runs), "--seconds", str(seconds),
                            "--work", str(work), "--in-process"],
                           capture_output=True, timeout=seconds * 3 + 120)
    output = child.stdout + child.stderr
    done = _DONE.search(output)
    if child.returncode != 0 or done is None:
        raise RuntimeError(f"fuzz target {name} failed (exit {child.returncode}); artifacts in {work}:\n"
                           + output.decode(errors="replace")[-6000:])
    return int(done.group(1)), float(done.group(2)), output.decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target")
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seeds-only", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.seeds_only:
        print(f"{args.target}: {write_seeds(args.target, CORPUS / args.target)} seeds in {CORPUS / args.target}")
        return
    work = args.work or Path(tempfile.mkdtemp(prefix=f"tunvpn-fuzz-{args.target}-"))
    if args.in_process:
        fuzz_in_process(args.target, args.runs, args.seconds, work)
    inputs, seconds, _ = campaign(args.target, args.runs, args.seconds, work)
    print(f"fuzzed {args.target}: {inputs} inputs in {seconds:.0f} s")


if __name__ == "__main__":
    main()
