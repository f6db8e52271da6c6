"""The server's peers directory: one `NAME.conf` of [Peer] syntax per enrolled peer.

It lives in the state directory (`/var/lib/tunvpn/NAME/peers.d`), the only place the packaged
unit may write, so enrolling needs no looser sandbox; the main config stays the admin's (or
Ansible's) file, never rewritten.  The files are loaded after the main config; a peer the main
config already has (same key or Name, or an overlapping AllowedIPs) wins there, and the
enrolled copy is skipped with a warning, so hand-written config always has the last word.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import Config, ConfigError, Identity, PeerConfig, load_peer_file
from .io.atomicfile import fsync_directory, replace_file
from .keys import encode_key

PEERS_DIRECTORY = "peers.d"
SUFFIX = ".conf"
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600


def peers_directory(state_directory: str | os.PathLike[str]) -> Path:
    return Path(state_directory) / PEERS_DIRECTORY


def peer_file(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


def load_enrolled(directory: Path, identity: Identity | None = None) -> tuple[list[PeerConfig], list[str]]:
    """Every enrolled peer, in file-name order; a broken file is skipped and named in the problems.
    The files are judged for a daemon running as `identity` (default: this process)."""
    try:
        names = sorted(entry.name for entry in os.scandir(directory)
                       if entry.name.endswith(SUFFIX) and not entry.name.startswith("."))
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [f"cannot read {directory}: {exc.strerror or exc}"]
    peers, problems = [], []
    for name in names:
        try:
            peers += load_peer_file(directory / name, identity)
        except ConfigError as exc:
            problems.append(f"skipped: {exc}")
    return peers, problems


def with_enrolled(config: Config, enrolled: list[PeerConfig]) -> tuple[Config, list[str]]:
    """`config` plus the enrolled peers that clash with none of its own (or each other)."""
    peers = list(config.peers)
    problems = []
    for peer in enrolled:
        clash = _clash(peer, peers)
        if clash:
            problems.append(f"enrolled peer {peer.name or encode_key(peer.public_key)} skipped: {clash}")
        else:
            peers.append(peer)
    return dataclasses.replace(config, peers=peers), problems


def _clash(peer: PeerConfig, peers: list[PeerConfig]) -> str | None:
    for other in peers:
        if other.public_key == peer.public_key:
            return "its public key is already a peer in the config"
        if peer.name and other.name == peer.name:
            return f"the name {peer.name} is already taken"
        for network in peer.allowed_ips:
            if any(network.overlaps(mine) for mine in other.allowed_ips):
                return f"its AllowedIPs {network} overlap another peer's"
    return None


def peer_text(peer: PeerConfig, note: str) -> str:
    """The [Peer] file for one enrolled peer; `note` becomes its first comment line."""
    lines = [f"# {note}", "[Peer]", f"Name = {peer.name}", f"PublicKey = {encode_key(peer.public_key)}"]
    if peer.preshared_key is not None:
        lines.append(f"PresharedKey = {encode_key(peer.preshared_key)}")
    if peer.allowed_ips:
        lines.append(f"AllowedIPs = {', '.join(str(net) for net in peer.allowed_ips)}")
    return "\n".join(lines) + "\n"


def write_peer_file(directory: Path, name: str, text: str) -> None:
    """Atomically (temp file, fsync, rename, fsync of the directory), readable by the daemon only."""
    os.makedirs(directory, mode=DIRECTORY_MODE, exist_ok=True)
    replace_file(peer_file(directory, name), text.encode(), FILE_MODE)


def remove_peer_file(directory: Path, name: str) -> None:
    try:
        os.unlink(peer_file(directory, name))
    except FileNotFoundError:
        return
    fsync_directory(directory)
