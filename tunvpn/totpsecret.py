"""`tunvpn totp-secret NAME --peer PEER`: make a peer's TOTP secret where the server looks for it.

The file is the peer's TOTPSecretFile, or NAME.totp/KEY beside the config.  It gets the config
file's owner and group, and mode 0600, or 0640 when the config is readable by its group (the
Debian package's root:tunvpn 0640, for a daemon running as tunvpn), so the daemon can read it
and nobody else.  The otpauth:// URI goes to stdout for the user's authenticator app, with a
QR code on a terminal when python3-qrcode is installed.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

from .config import ConfigError, PeerConfig, load_config
from .keys import encode_key
from .totp import encode_secret, generate_secret, otpauth_uri

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
CONFIG_DIR = "/etc/tunvpn"


def register_totp_secret_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("totp-secret", help="make a peer's TOTP secret and print its otpauth:// URI")
    parser.add_argument("name", metavar="NAME", help=f"the server's config name ({CONFIG_DIR}/NAME.conf)")
    parser.add_argument("--peer", required=True, metavar="PEER", help="the peer's public key or Name")
    parser.add_argument("-c", "--config", metavar="FILE", help="the server's config file, instead of NAME's")
    parser.add_argument("--force", action="store_true", help="replace an existing secret")
    parser.set_defaults(func=run_totp_secret)
    return parser


def _find_peer(peers: list[PeerConfig], wanted: str) -> PeerConfig:
    for peer in peers:
        if wanted in (encode_key(peer.public_key), peer.name):
            return peer
    raise LookupError(f"no [Peer] with the public key or Name {wanted!r}")


def _write_secret(path: str, secret: bytes, like: os.stat_result, force: bool) -> None:
    """Create the file (and its directory) so the daemon can read it and nobody else ever could."""
    group_reads = bool(like.st_mode & stat.S_IRGRP)
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.mkdir(directory, 0o700)
        os.chown(directory, like.st_uid, like.st_gid)
        os.chmod(directory, 0o750 if group_reads else 0o700)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)  # an existing file keeps no looser mode, whatever the umask
        os.fchown(fd, like.st_uid, like.st_gid)
        if group_reads:
            os.fchmod(fd, 0o640)
        file.write(encode_secret(secret) + "\n")


def _print_qr(uri: str) -> None:
    """A QR code for the authenticator app, if a terminal shows it and python3-qrcode is installed."""
    if not sys.stdout.isatty():
        return
    try:
        import qrcode  # optional: Debian's python3-qrcode
    except ImportError:
        return
    code = qrcode.QRCode(border=1)
    code.add_data(uri)
    code.print_ascii(out=sys.stdout, invert=True)


def run_totp_secret(args: argparse.Namespace) -> int:
    path = args.config or os.path.join(CONFIG_DIR, f"{args.name}.conf")
    try:
        config = load_config(path, role="server", resolve=False, totp_secrets=False)
        peer = _find_peer(config.peers, args.peer)
    except (ConfigError, LookupError) as exc:
        print(f"tunvpn totp-secret: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not peer.totp:
        print(f"tunvpn totp-secret: the [Peer] on line {peer.line} of {path} has no TOTP = yes", file=sys.stderr)
        return EXIT_USAGE
    secret = generate_secret()
    try:
        _write_secret(peer.totp_secret_file, secret, os.stat(path), args.force)
    except FileExistsError:
        print(f"tunvpn totp-secret: {peer.totp_secret_file} exists; --force replaces it", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"tunvpn totp-secret: cannot write {peer.totp_secret_file}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    uri = otpauth_uri(secret, f"tunvpn {config.name}", peer.name or encode_key(peer.public_key)[:10])
    print(uri)
    _print_qr(uri)
    print(f"wrote {peer.totp_secret_file}; reload the server to use it", file=sys.stderr)
    return EXIT_OK
