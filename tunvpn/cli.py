"""The `tunvpn` command: one argparse entry point for every subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
from pathlib import Path

from . import __version__
from .checkconfig import register_check_config_parser
from .invite import register_invite_parsers
from .join import register_join_parser
from .login import register_login_parser
from .protocol.device import DEFAULT_LOAD_THRESHOLD
from .show import register_show_parser
from .totpsecret import register_totp_secret_parser
from .keys import InvalidKey, decode_key, derive_public_key, encode_key, generate_preshared_key, generate_private_key

EXIT_USAGE = 2


def _genkey(args: argparse.Namespace) -> int:
    return _print_secret("genkey", generate_private_key())


def _genpsk(args: argparse.Namespace) -> int:
    return _print_secret("genpsk", generate_preshared_key())


def _print_secret(command: str, key: bytes) -> int:
    _warn_if_stdout_is_exposed(command)
    print(encode_key(key))
    return 0


def _warn_if_stdout_is_exposed(command: str) -> None:
    """As `wg genkey` does: a key written to a file other users can open is no secret any more."""
    try:
        status = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout: nothing to judge
        return
    if stat.S_ISREG(status.st_mode) and status.st_mode & stat.S_IRWXO:
        print(f"tunvpn {command}: warning: the key goes to a file other users can open "
              f"(mode {stat.S_IMODE(status.st_mode):04o}); set the umask to 077 and make a new key",
              file=sys.stderr)


def _pubkey(args: argparse.Namespace) -> int:
    try:
        # Bytes, not sys.stdin's text: undecodable input must get the one-line error, not a traceback.
        private = decode_key(sys.stdin.buffer.read().decode("ascii", errors="replace"))
    except InvalidKey as exc:
        print(f"tunvpn pubkey: stdin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(encode_key(derive_public_key(private)))
    return 0


def _run_daemon(args: argparse.Namespace) -> int:
    # Imported here so that key commands work without pyroute2 installed.
    from .config import ConfigError, load_config
    from .daemon import Options
    from .io.controlsocket import ControlSocketError
    from .io.metrics import MetricsError
    from .io.netlink import NetlinkError
    from .io.tun import TunError
    from .io.udp import UdpError

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is one line per netlink message
    try:
        config = load_config(args.config, role=args.command)
    except ConfigError as exc:
        print(f"tunvpn {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = Options(control_socket=args.control_socket, state_dir=getattr(args, "state_dir", None),
                      load_threshold=args.handshake_load_threshold, offloads=args.offloads)
    if args.command == "server":
        from .server import Server as role
    else:
        from .client import Client as role
    try:
        return role(config, options).run()
    except (TunError, NetlinkError, UdpError, ControlSocketError, MetricsError) as exc:
        logging.getLogger("tunvpn").error("%s", exc)
        return 1


def _offloads(text: str) -> frozenset[str]:
    from .daemon import OFFLOADS

    if text == "all":
        return OFFLOADS
    wanted = frozenset(word.strip() for word in text.split(",") if word.strip()) - {"none"}
    unknown = wanted - OFFLOADS
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown offload {', '.join(sorted(unknown))}; "
                                         f"choose from {', '.join(sorted(OFFLOADS))} or none")
    return wanted


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunvpn", description="A VPN that speaks the WireGuard protocol.")
    parser.add_argument("--version", action="version", version=f"tunvpn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("genkey", help="print a new private key").set_defaults(func=_genkey)
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key").set_defaults(func=_pubkey)
    sub.add_parser("genpsk", help="print a new preshared key").set_defaults(func=_genpsk)
    for role in ("server", "client"):
        cmd = sub.add_parser(role, help=f"run a tunvpn {role} in the foreground")
        cmd.add_argument("-c", "--config", required=True, metavar="FILE", help="wg-quick style config file")
        cmd.add_argument("--control-socket", type=Path, metavar="PATH",
                         help="where `tunvpn show` finds this daemon (default /run/tunvpn/NAME.sock)")
        if role == "server":
            cmd.add_argument("--state-dir", type=Path, metavar="DIR",
                             help="leases and endpoints (default StateDirectory=, else /var/lib/tunvpn/NAME)")
        cmd.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        cmd.add_argument(
            "--handshake-load-threshold", type=_non_negative, default=DEFAULT_LOAD_THRESHOLD, metavar="N",
            help="handshake messages per second above which cookies are demanded (0: always; default %(default)s)",
        )
        cmd.add_argument(
            "--offloads", type=_offloads, default="all", metavar="LIST",
            help="data path offloads to use where the kernel has them: all (the default), none, or "
                 "a comma-separated list of coalesce, gso and gro (for diagnosis and benchmarks)",
        )
        cmd.set_defaults(func=_run_daemon)
    register_show_parser(sub)
    register_check_config_parser(sub)
    register_login_parser(sub)
    register_totp_secret_parser(sub)
    register_invite_parsers(sub)
    register_join_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
