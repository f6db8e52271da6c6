"""`tunvpn check-config`: validate a config without running it, for admins and for CI.

It loads the file exactly as the daemon would, endpoint names resolved, so what passes here
starts there (the state directory and the control socket are the daemon's business). For a
server it also reads the peers its clients enrolled (peers.d in the state directory) and warns
of each file the server would skip; those never stop a server, so they do not fail the check.
"""

from __future__ import annotations

import argparse
import pwd
import sys

from .config import (INTERFACE_KEYS, MAX_CONFIG_BYTES, ROLES, Config, ConfigError, Identity, guess_role, load_config,
                     one_line, redact)
from .peersdir import load_enrolled, peers_directory, with_enrolled

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_CONFIG = 2


def _keys_only_for(role: str) -> str:
    return ", ".join(key.name for key in INTERFACE_KEYS if key.roles == (role,))


ROLE_HELP = (  # the rule of config.guess_role
    "which daemon the file is for. Without it the file decides: a server-only key in [Interface] "
    f"({_keys_only_for('server')}) means server; else a client-only key ({_keys_only_for('client')}) means "
    "client; else ListenPort means server; else client"
)


def register_check_config_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "check-config",
        help="validate a config file without running it",
        description="Validate a config file. Prints 'FILE: OK (ROLE, N peers)' and exits 0, or prints "
                    "'FILE:LINE: KEY: reason' on stderr and exits 2.",
    )
    parser.add_argument("--role", choices=ROLES, help=ROLE_HELP)
    parser.add_argument("--user", type=_daemon_user, metavar="USER",
                        help="judge owners and modes for a daemon running as USER and USER's group, such as tunvpn "
                             "for the package's units (default: as whoever runs this)")
    parser.add_argument("file", metavar="FILE", help="wg-quick style config file")
    parser.set_defaults(func=run_check_config)
    return parser


def _daemon_user(name: str) -> Identity:
    """The user the daemon will run as, with his primary group (as systemd's User= without Group=)."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user {name!r}") from None
    return Identity(entry.pw_uid, entry.pw_gid)


def _role_of(path: str) -> str:
    """The file's guessed role; a file that cannot be read gets one too, and load_config says why."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError):
        return ROLES[0]
    return guess_role(data.decode("utf-8", errors="replace"))


def run_check_config(args: argparse.Namespace) -> int:
    role = args.role or _role_of(args.file)
    try:
        config = load_config(args.file, role=role, resolve=True, identity=args.user)
    except ConfigError as exc:
        for error in getattr(exc, "errors", [exc]):  # every error in the file, one escaped line each
            print(error, file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Exception as exc:  # a parser bug must still be one line, must not pass for a bad config, and
        # must not print a key the config held
        print(one_line(redact(f"tunvpn check-config: {args.file}: internal error: {type(exc).__name__}: {exc}")),
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    peers = len(config.peers)
    print(one_line(f"{config.path}: OK ({config.role}, {peers} peer{'' if peers == 1 else 's'}"
                   f"{_enrolled_note(config, args.user)})"))
    return EXIT_OK


def _enrolled_note(config: Config, identity: Identity | None) -> str:
    """', N enrolled in DIR' for a server with enrolled peers; a warning per file it would skip."""
    if config.role != "server" or not config.interface.state_directory:
        return ""
    directory = peers_directory(config.interface.state_directory)
    enrolled, problems = load_enrolled(directory, identity)
    merged, clashes = with_enrolled(config, enrolled)
    for problem in (*problems, *clashes):
        print(one_line(f"warning: {directory}: {problem}"), file=sys.stderr)
    count = len(merged.peers) - len(config.peers)
    return f", {count} enrolled in {directory}" if count or problems or clashes else ""
