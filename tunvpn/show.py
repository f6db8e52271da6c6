"""`tunvpn show`: ask running daemons for their status over the control socket and print it.

The text follows `wg show` (same labels, units and peer order) so WireGuard admins read it at
a glance; tunvpn adds what wg cannot know: roles, addresses handed out, pushed config, drops.
`--json` prints the daemon's status document unchanged, for scripts and tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Iterable

from .io.controlsocket import DEFAULT_RUN_DIR, ControlSocketError, default_socket_path, query

EXIT_NOT_RUNNING = 1
EXIT_USAGE = 2
QUERY_TIMEOUT = 5.0
_SOCKET_SUFFIX = ".sock"
_BYTE_UNITS = ("KiB", "MiB", "GiB", "TiB")
_TIME_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))

__all__ = ["DEFAULT_RUN_DIR", "format_status", "register_show_parser", "run_show"]


# --- text formatting ------------------------------------------------------------------


def format_bytes(count: int) -> str:
    """As wg prints transfer: whole bytes below 1 KiB, else two decimals in the largest unit that fits."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in _BYTE_UNITS:
        value /= 1024
        if value < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.2f} {unit}"
    raise AssertionError("unreachable: the last unit always returns")


def format_rate(bits: int) -> str:
    """As tc and the config write rates: 20 Mbit/s, 1.5 Gbit/s (powers of ten)."""
    for unit, size in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bits >= size:
            return f"{bits / size:g} {unit}"
    return f"{bits} bit/s"


def format_duration(seconds: int) -> str:
    """'1 hour, 2 minutes, 5 seconds': non-zero parts only, singular where it is one."""
    parts = []
    for name, size in _TIME_UNITS:
        amount, seconds = divmod(seconds, size)
        if amount:
            parts.append(f"{amount} {name}{'' if amount == 1 else 's'}")
    return ", ".join(parts) or "0 seconds"


def format_handshake(latest: int | float | None, now: float) -> str:
    if latest is None:
        return "never"
    elapsed = int(now - latest)
    if elapsed < 0:
        return "in the future (has the clock been set back?)"
    if elapsed == 0:
        return "now"
    return f"{format_duration(elapsed)} ago"


def _join(items: Iterable[Any]) -> str:
    return ", ".join(str(item) for item in items) or "(none)"


def _drops(counts: dict[str, int] | None) -> str | None:
    if not counts:
        return None
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))


def _pushed_config(pushed: dict | None) -> str:
    if not pushed:
        return "local (no push received)"
    details = [
        f"addresses {_join(pushed.get('addresses', []))}",
        f"routes {_join(pushed.get('routes', []))}",
        f"dns {_join(pushed.get('dns', []))}",
        *([f"search {_join(pushed['search'])}"] if pushed.get("search") else []),
    ]
    if pushed.get("mtu"):
        details.append(f"mtu {pushed['mtu']}")
    if pushed.get("keepalive"):
        details.append(f"keepalive every {format_duration(pushed['keepalive'])}")
    return f"pushed by the server ({', '.join(details)})"


def _peer_second_factor(second_factor: dict, now: float) -> str:
    if not second_factor.get("authorized"):
        return "required, not presented: its traffic is dropped until it is"
    return _authorized_until(second_factor["until"], now)


def _client_second_factor(second_factor: dict, name: str | None, now: float) -> str:
    state = second_factor.get("state")
    if state == "authorized" and second_factor.get("until"):
        return _authorized_until(second_factor["until"], now)
    detail = {"checking": "; a code is on its way", "refused": "; the last code was refused",
              "rate_limited": f"; too many codes, the next is taken in {second_factor.get('retry_after')} s"}.get(state, "")
    return f"waiting for second factor{detail} (tunvpn login {name or 'NAME'})"


def _authorized_until(until: float, now: float) -> str:
    clock = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(until))
    return f"authorized until {clock} ({format_duration(max(0, int(until - now)))} left)"


def _invite(invite: dict, now: float) -> str:
    left = max(0, int(invite.get("expires", 0) - now))
    return f"{invite.get('name')} ({invite.get('uses_left')} of {invite.get('uses')} use(s) left, expires in " \
           f"{format_duration(left) if left else 'a moment'})"


def _interface_lines(status: dict) -> list[str]:
    lines = [f"interface: {status.get('interface', '?')}"]
    if status.get("role"):
        lines.append(f"  role: {status['role']}" + (f" (config {status['name']})" if status.get("name") else ""))
    lines.append(f"  public key: {status.get('public_key', '?')}")
    if status.get("listen_port") is not None:
        lines.append(f"  listening port: {status['listen_port']}")
    lines.append(f"  addresses: {_join(status.get('addresses', []))}")
    if status.get("mtu") is not None:
        lines.append(f"  mtu: {status['mtu']}")
    if "offloads" in status:
        lines.append(f"  offloads: {_join(status['offloads']) if status['offloads'] else 'none'}")
    if status.get("role") == "server":
        lines.append(f"  client-to-client: {'yes' if status.get('client_to_client') else 'no'}")
        if status.get("enrolled"):
            lines.append(f"  enrolled peers: {_join(status['enrolled'])}")
        if status.get("invites"):
            lines.append(f"  open invites: {_join(_invite(i, time.time()) for i in status['invites'])}")
    elif status.get("role") == "client":
        lines.append(f"  config: {_pushed_config(status.get('pushed'))}")
        if status.get("second_factor"):
            second_factor = _client_second_factor(status["second_factor"], status.get("name"), time.time())
            lines.append(f"  second factor: {second_factor}")
    drops = _drops(status.get("dropped"))
    if drops:
        lines.append(f"  dropped: {drops}")
    for what, why in sorted((status.get("refused") or {}).items()):
        lines.append(f"  refused by the kernel: {what}: {why}")
    errors = _drops(status.get("internal_errors"))
    if errors:
        lines.append(f"  internal errors (see the log): {errors}")
    return lines


def _peer_lines(peer: dict, now: float) -> list[str]:
    lines = [f"peer: {peer.get('public_key', '?')}"]
    if peer.get("name"):
        lines.append(f"  name: {peer['name']}")
    if peer.get("invite"):
        lines.append(f"  invite: {_invite(peer['invite'], now)} (may only enroll)")
    if peer.get("endpoint"):
        lines.append(f"  endpoint: {peer['endpoint']}")
    lines.append(f"  allowed ips: {_join(peer.get('allowed_ips', []))}")
    addresses = peer.get("addresses") or ([peer["address"]] if peer.get("address") else [])
    if addresses:
        lines.append(f"  address{'es' if len(addresses) > 1 else ''}: {_join(addresses)}")
    lines.append(f"  latest handshake: {format_handshake(peer.get('latest_handshake'), now)}")
    lines.append(
        f"  transfer: {format_bytes(peer.get('rx_bytes', 0))} received, {format_bytes(peer.get('tx_bytes', 0))} sent"
    )
    if peer.get("persistent_keepalive"):
        lines.append(f"  persistent keepalive: every {format_duration(peer['persistent_keepalive'])}")
    if peer.get("rate_limit"):
        lines.append(f"  rate limit: {format_rate(peer['rate_limit'])} each way")
    if peer.get("access") is not None:
        lines.append(f"  access: {_join(peer['access'])} (and the tunnel)")
    if peer.get("second_factor"):
        lines.append(f"  second factor: {_peer_second_factor(peer['second_factor'], now)}")
    if "tunvpn" in peer:  # False also while a tunvpn peer has not spoken yet: say only what is known
        lines.append(f"  control extension: {'yes' if peer['tunvpn'] else 'not seen'}")
    drops = _drops(peer.get("dropped"))
    if drops:
        lines.append(f"  dropped: {drops}")
    return lines


def sorted_peers(peers: list[dict]) -> list[dict]:
    """wg's order: most recent handshake first, peers that never shook hands last (stable otherwise)."""
    return sorted(peers, key=lambda peer: (peer.get("latest_handshake") is None, -(peer.get("latest_handshake") or 0)))


def format_status(status: dict, now: float | None = None) -> str:
    """The `wg show`-like text for one daemon's status document; `now` is unix seconds."""
    now = time.time() if now is None else now
    blocks = [_interface_lines(status)]
    blocks += [_peer_lines(peer, now) for peer in sorted_peers(status.get("peers", []))]
    return "\n\n".join("\n".join(block) for block in blocks) + "\n"


# --- the command ------------------------------------------------------------------------


def register_show_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("show", help="show the status of running tunvpn daemons")
    parser.add_argument("name", nargs="?", metavar="NAME",
                        help=f"config name (its socket is {DEFAULT_RUN_DIR}/NAME.sock); default: every daemon")
    parser.add_argument("--control-socket", metavar="PATH", help="the daemon's control socket, instead of NAME")
    parser.add_argument("--json", action="store_true", help="print the status document(s) as JSON")
    parser.set_defaults(func=run_show)
    return parser


class _UsageError(Exception):
    pass


def _explicit_socket(args: argparse.Namespace, run_dir: str) -> str | None:
    """The one socket NAME or --control-socket names, or None to show every daemon."""
    if args.name is not None and args.control_socket is not None:
        raise _UsageError("give NAME or --control-socket, not both")
    if args.control_socket is not None:
        return args.control_socket
    if args.name is not None:
        if not args.name or "/" in args.name or args.name.startswith("."):
            raise _UsageError(f"invalid NAME {args.name!r}: a config name, like office for /etc/tunvpn/office.conf")
        return default_socket_path(args.name, run_dir)
    return None


def _discover_sockets(run_dir: str) -> list[str]:
    try:
        names = sorted(entry.name for entry in os.scandir(run_dir) if entry.name.endswith(_SOCKET_SUFFIX))
    except FileNotFoundError:
        names = []
    except PermissionError:
        raise ControlSocketError(f"permission denied on {run_dir} (the control sockets are root-only)") from None
    except OSError as exc:
        raise ControlSocketError(f"cannot list {run_dir}: {exc.strerror or exc}") from None
    if not names:
        raise ControlSocketError(f"no tunvpn daemon is running (no control socket in {run_dir})")
    return [os.path.join(run_dir, name) for name in names]


def run_show(args: argparse.Namespace, run_dir: str = DEFAULT_RUN_DIR) -> int:
    """Print each daemon's status; exit 1 if one of them does not answer (others still print)."""
    try:
        explicit = _explicit_socket(args, run_dir)
    except _UsageError as exc:
        print(f"tunvpn show: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        paths = [explicit] if explicit is not None else _discover_sockets(run_dir)
    except ControlSocketError as exc:
        print(f"tunvpn show: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    statuses, failed = [], False
    for path in paths:
        try:
            statuses.append(query(path, {"command": "show"}, timeout=QUERY_TIMEOUT))
        except ControlSocketError as exc:
            print(f"tunvpn show: {exc}", file=sys.stderr)
            failed = True
    if args.json:
        if explicit is not None:
            if statuses:
                print(json.dumps(statuses[0], indent=2))
        else:  # every daemon: always a list, so scripts need not care how many run
            print(json.dumps(statuses, indent=2))
    else:
        print("\n".join(format_status(status) for status in statuses), end="")
    return EXIT_NOT_RUNNING if failed else 0
