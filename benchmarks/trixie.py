"""What the benchmark takes from Debian trixie without installing anything of it on this machine.

- wireguard-go's trixie build (batched I/O and tun offloads, which bookworm's lacks): its .deb is
  fetched once with a throwaway apt source list, lists and cache, then unpacked into CACHE_ROOT
  with `dpkg-deb -x`; the system's wireguard-go and apt state stay as they are.
- trixie's python3 and python3-cryptography: the cached rootfs of tests/systemdhosts.py (built
  through it if missing), entered through `rootfs-exec` (a private overlay and chroot per process).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from netlab import LabError  # noqa: E402
from systemdhosts import RootfsSpec, debian_mirror, ensure_rootfs  # noqa: E402

CACHE_ROOT = Path(os.environ.get("TUNVPN_BENCH_CACHE", "/var/cache/tunvpn-bench"))
SUITE = "trixie"
ROOTFS_EXEC = Path(__file__).resolve().parent / "rootfs-exec"
APT_TIMEOUT = 300.0


class TrixieError(LabError):
    """Fetching or unpacking a trixie build failed; the message has apt's or dpkg's words."""


@dataclass(frozen=True)
class UnpackedBinary:
    """A program unpacked from a .deb, and the package version it came from."""

    path: Path
    package_version: str


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise TrixieError(f"`{' '.join(cmd)}` did not finish within {APT_TIMEOUT:g} s") from exc
    if result.returncode != 0:
        raise TrixieError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}: "
                          f"{(result.stderr.strip() or result.stdout.strip())[-1500:]}")
    return result.stdout


def _apt_options(apt_dir: Path) -> list[str]:
    """apt reading only our trixie source list and keeping its lists and caches in `apt_dir`."""
    return ["-o", f"Dir::Etc::SourceList={apt_dir / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={apt_dir / 'sources.list.d'}",
            "-o", f"Dir::Etc::Preferences={apt_dir / 'preferences'}",
            "-o", f"Dir::Etc::PreferencesParts={apt_dir / 'preferences.d'}",
            "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
            "-o", f"Dir::Cache={apt_dir / 'cache'}",
            "-o", "APT::Sandbox::User=root",  # the download lands in a root-only directory
            "-q"]


def _download_deb(package: str, into: Path) -> Path:
    """`apt-get download` from trixie with a throwaway source list, lists and cache under `into`."""
    apt_dir = into / "apt"
    for directory in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
        (apt_dir / directory).mkdir(parents=True)
    (apt_dir / "sources.list").write_text(
        f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {debian_mirror()} {SUITE} main\n")
    options = _apt_options(apt_dir)
    _run(["apt-get", *options, "update"])
    _run(["apt-get", *options, "download", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise TrixieError(f"apt-get download {package} left {[d.name for d in debs]} in {into}")
    return debs[0]


def wireguard_go() -> UnpackedBinary:
    """trixie's wireguard-go binary, fetched and unpacked into the cache the first time."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    unpacked = CACHE_ROOT / f"wireguard-go-{SUITE}"
    with open(CACHE_ROOT / f".lock-wireguard-go-{SUITE}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent runs fetch once
        if not (unpacked / "usr/bin/wireguard-go").is_file():
            building = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE_ROOT))
            try:
                deb = _download_deb("wireguard-go", building)
                version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
                _run(["dpkg-deb", "-x", str(deb), str(building / "tree")])
                (building / "tree/VERSION").write_text(version + "\n")
                shutil.rmtree(unpacked, ignore_errors=True)
                (building / "tree").rename(unpacked)  # appears only when complete
            finally:
                shutil.rmtree(building, ignore_errors=True)
    return UnpackedBinary(unpacked / "usr/bin/wireguard-go", (unpacked / "VERSION").read_text().strip())


def python_shim(workdir: Path) -> tuple[Path, Path]:
    """An executable that runs trixie's /usr/bin/python3 with the arguments it is given, and its rootfs.

    tunvpn's harness starts daemons as `PYTHON -m tunvpn ...`, so a single path has to stand for
    "trixie's python3 in its rootfs".  Every process gets its own private overlay on `workdir/scratch`.
    """
    rootfs = ensure_rootfs(RootfsSpec.for_suite(SUITE), log=lambda text: print(text, file=sys.stderr))
    scratch = workdir / "scratch"
    scratch.mkdir(mode=0o700)
    shim = workdir / "python3"
    command = shlex.join([str(ROOTFS_EXEC), str(rootfs), str(scratch), "/usr/bin/python3"])
    shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    shim.chmod(0o700)
    return shim, rootfs
