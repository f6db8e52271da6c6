"""`tunvpn login [NAME]`: give the running client the second-factor code its server asks for.

The code is read without echo from the terminal (or one line of stdin, or --code), handed to the
client daemon over its control socket, and the client passes it to the server.  The control
socket answers at once; the server's verdict arrives later, so this polls the client's status
until the answer to this attempt is there.
"""

from __future__ import annotations

import argparse
import getpass
import sys
import time

from .io.controlsocket import DEFAULT_RUN_DIR, ControlSocketError, find_socket, query

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
ANSWER_TIMEOUT = 10.0
POLL_INTERVAL = 0.2

_VERDICTS = {
    "authorized": "second factor accepted",
    "refused": "second factor refused: a wrong or already used code; wait for the next one and try again",
    "rate_limited": "too many codes; the server takes the next in {retry_after} s",
}


def register_login_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("login", help="give a running client the second-factor code its server asks for")
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help=f"the client's config name (its socket is {DEFAULT_RUN_DIR}/NAME.sock); "
                             "default: the only daemon running")
    parser.add_argument("--control-socket", metavar="PATH", help="the client's control socket, instead of NAME")
    parser.add_argument("--code", help="the code (default: asked on the terminal, else one line of stdin)")
    parser.set_defaults(func=run_login)
    return parser


class _LoginError(Exception):
    pass


def _read_code(args: argparse.Namespace) -> str:
    if args.code is not None:
        return args.code.strip()
    if sys.stdin.isatty():
        return getpass.getpass("code: ").strip()
    return sys.stdin.readline().strip()


def _wait_for_answer(path: str, attempt: int) -> dict:
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while time.monotonic() < deadline:
        second_factor = query(path, {"command": "show"}).get("second_factor") or {}
        if second_factor.get("answered") == attempt:
            return second_factor
        time.sleep(POLL_INTERVAL)
    raise _LoginError(f"no answer from the server within {ANSWER_TIMEOUT:.0f} s (is it connected? "
                      "see tunvpn show); try again with the next code")


def run_login(args: argparse.Namespace, run_dir: str = DEFAULT_RUN_DIR) -> int:
    try:
        path = find_socket(args.name, args.control_socket, "client", run_dir)
        code = _read_code(args)
        if not code:
            raise _LoginError("no code given")
        answer = query(path, {"command": "login", "code": code})
        if "error" in answer:
            raise _LoginError(str(answer["error"]))
        verdict = _wait_for_answer(path, answer["attempt"])
    except (_LoginError, ControlSocketError, EOFError, KeyboardInterrupt) as exc:
        print(f"tunvpn login: {exc or 'interrupted'}", file=sys.stderr)
        return EXIT_USAGE
    state = verdict.get("state")
    text = _VERDICTS.get(state, f"the server says: {state}").format(retry_after=verdict.get("retry_after"))
    if state == "authorized" and verdict.get("until"):
        text += time.strftime("; authorized until %Y-%m-%d %H:%M:%S %Z", time.localtime(verdict["until"]))
    print(text, file=sys.stdout if state == "authorized" else sys.stderr)
    return EXIT_OK if state == "authorized" else EXIT_REFUSED
