"""The `tunvpn` command: one argparse entry point for every subcommand."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .keys import InvalidKey, decode_key, derive_public_key, encode_key, generate_preshared_key, generate_private_key

EXIT_USAGE = 2


def _genkey(args: argparse.Namespace) -> int:
    print(encode_key(generate_private_key()))
    return 0


def _genpsk(args: argparse.Namespace) -> int:
    print(encode_key(generate_preshared_key()))
    return 0


def _pubkey(args: argparse.Namespace) -> int:
    try:
        private = decode_key(sys.stdin.read())
    except InvalidKey as exc:
        print(f"tunvpn pubkey: stdin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(encode_key(derive_public_key(private)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunvpn", description="A VPN that speaks the WireGuard protocol.")
    parser.add_argument("--version", action="version", version=f"tunvpn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("genkey", help="print a new private key").set_defaults(func=_genkey)
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key").set_defaults(func=_pubkey)
    sub.add_parser("genpsk", help="print a new preshared key").set_defaults(func=_genpsk)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
