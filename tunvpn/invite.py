"""`tunvpn invite`, `tunvpn peers` and `tunvpn revoke`: onboarding through the running server.

`invite` makes the invite's key pair and PSK here, hands the server the public key and PSK over
its control socket, and prints the `tunvpn join` line carrying the private key: the server never
sees it.  `invite --stock` is for the official WireGuard apps, which cannot enroll: the phone's
key pair is made here, on the server (it says so), the server adds the peer with a fixed pool
address, and a wg-quick config (and QR code) goes to stdout.  The server writes every peer to its
peers directory beside the loop, so these commands wait until the change shows in its list.
"""

from __future__ import annotations

import argparse
import sys
import time

from .config import is_peer_name, parse_duration, public_endpoint
from .invitetoken import MAX_ENDPOINTS, InviteToken, encode_token
from .io.controlsocket import DEFAULT_RUN_DIR, ControlSocketError, find_socket, query
from .keys import decode_key, derive_public_key, encode_key, generate_preshared_key, generate_private_key

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
SAVE_TIMEOUT = 10.0
POLL_INTERVAL = 0.1
STOCK_KEEPALIVE = 25  # a phone behind NAT must keep its mapping open: the server cannot push this


class InviteError(Exception):
    pass


def register_invite_parsers(subparsers: argparse._SubParsersAction) -> None:
    invite = subparsers.add_parser("invite", help="let a new client join with one command (tunvpn join)")
    _server_arguments(invite)
    invite.add_argument("--name", required=True, metavar="PEER", help="the new peer's name on the server")
    invite.add_argument("--endpoint", action="append", default=[], metavar="HOST:PORT",
                        help="where clients reach this server (repeat for more than one; "
                             "default: the Endpoint lines of the server's [Interface])")
    invite.add_argument("--expires", default="24h", metavar="DURATION",
                        help="how long the invite is valid, like 30m, 24h or 7d (default %(default)s)")
    invite.add_argument("--uses", type=int, default=1, metavar="N", help="clients it may enroll (default 1)")
    invite.add_argument("--stock", action="store_true",
                        help="for a stock WireGuard app: make its keys here and print a wg-quick config")
    invite.add_argument("--qr", action="store_true", help="also draw a QR code (needs python3-qrcode)")
    invite.set_defaults(func=run_invite)
    peers = subparsers.add_parser("peers", help="list the server's enrolled peers and open invites")
    _server_arguments(peers)
    peers.set_defaults(func=run_peers)
    revoke = subparsers.add_parser("revoke", help="remove an enrolled peer (cut off at once) or an open invite")
    _server_arguments(revoke)
    revoke.add_argument("peer", metavar="PEER", help="the peer's or invite's name, or its public key")
    revoke.set_defaults(func=run_revoke)


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("server", nargs="?", metavar="NAME",
                        help=f"the server's config name (its socket is {DEFAULT_RUN_DIR}/NAME.sock); "
                             "default: the only daemon running")
    parser.add_argument("--control-socket", metavar="PATH", help="the server's control socket, instead of NAME")


def _socket(args: argparse.Namespace) -> str:
    return find_socket(args.server, args.control_socket, "server")


def _ask(path: str, request: dict) -> dict:
    answer = query(path, request)
    if "error" in answer:
        raise InviteError(str(answer["error"]))
    return answer


def _wait_for(path: str, name: str, present: bool) -> dict | None:
    """The server's list entry for enrolled peer `name` once it is there (or gone, for `present=False`)."""
    deadline = time.monotonic() + SAVE_TIMEOUT
    while time.monotonic() < deadline:
        entry = next((p for p in _ask(path, {"command": "peers"})["enrolled"] if p["name"] == name), None)
        if (entry is not None) == present:
            return entry
        time.sleep(POLL_INTERVAL)
    raise InviteError(f"the server did not {'add' if present else 'remove'} {name} within {SAVE_TIMEOUT:.0f} s; "
                      "its log says why")


def _print_qr(text: str) -> None:
    try:
        import qrcode  # optional: Debian's python3-qrcode
    except ImportError:
        print("(no QR code: install python3-qrcode)", file=sys.stderr)
        return
    code = qrcode.QRCode(border=1)
    code.add_data(text)
    code.print_ascii(out=sys.stdout, invert=True)


def _checked_endpoints(endpoints: list[str]) -> list[str]:
    """--endpoint as the server's Endpoint key takes it, checked before the server makes the invite."""
    if len(endpoints) > MAX_ENDPOINTS:
        raise InviteError(f"--endpoint: an invite carries at most {MAX_ENDPOINTS}")
    try:
        return [public_endpoint(endpoint) for endpoint in endpoints]
    except ValueError as exc:
        raise InviteError(f"--endpoint {exc}") from None


def run_invite(args: argparse.Namespace) -> int:
    try:
        if not is_peer_name(args.name):
            raise InviteError(f"--name {args.name!r}: 1-64 letters, digits and . _ @ + -, starting with one of the first two")
        endpoints = _checked_endpoints(args.endpoint)
        try:
            lifetime = parse_duration(args.expires)
        except ValueError as exc:
            print(f"tunvpn invite: --expires: {exc}", file=sys.stderr)
            return EXIT_USAGE
        path = _socket(args)
        if args.stock:
            _stock_invite(path, args, endpoints)
        else:
            _join_invite(path, args, endpoints, lifetime)
    except (InviteError, ControlSocketError) as exc:
        print(f"tunvpn invite: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _join_invite(path: str, args: argparse.Namespace, endpoints: list[str], lifetime: int) -> None:
    private, preshared = generate_private_key(), generate_preshared_key()
    answer = _ask(path, {"command": "invite", "name": args.name, "lifetime": lifetime, "uses": args.uses,
                         "public_key": encode_key(derive_public_key(private)),
                         "preshared_key": encode_key(preshared), "endpoints": endpoints})
    server_name = answer["name"] if is_peer_name(answer["name"]) else "tunvpn"
    token = encode_token(InviteToken(decode_key(answer["public_key"]), private, preshared,
                                     int(answer["invite"]["expires"]), server_name, tuple(answer["endpoints"])))
    line = f"tunvpn join {token}"
    print(line)
    if args.qr:
        _print_qr(line)
    until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(answer["invite"]["expires"]))
    print(f"invite {args.name}: {args.uses} use(s), valid until {until}. Whoever has this line can join: "
          f"hand it over a channel you trust. `tunvpn revoke {args.name}` cancels it.", file=sys.stderr)


def _stock_invite(path: str, args: argparse.Namespace, endpoints: list[str]) -> None:
    private, preshared = generate_private_key(), generate_preshared_key()
    answer = _ask(path, {"command": "add-peer", "name": args.name, "public_key": encode_key(derive_public_key(private)),
                         "preshared_key": encode_key(preshared), "endpoints": endpoints})
    _wait_for(path, args.name, present=True)
    text = wg_quick_config(answer, private, preshared, answer["endpoints"][0])
    print(text, end="")
    if args.qr:
        _print_qr(text)
    print(f"peer {args.name}: added with {', '.join(answer['addresses'])}. Its private key was made on this server "
          "and is shown only here: import it into the WireGuard app and do not keep a copy.", file=sys.stderr)


def wg_quick_config(answer: dict, private: bytes, preshared: bytes, endpoint: str) -> str:
    """What a stock WireGuard app imports: its keys, its fixed address, the server's routes and DNS."""
    lines = ["[Interface]", f"PrivateKey = {encode_key(private)}", f"Address = {', '.join(answer['addresses'])}"]
    if answer.get("dns"):
        lines.append(f"DNS = {', '.join(answer['dns'])}")
    if answer.get("mtu"):
        lines.append(f"MTU = {answer['mtu']}")
    lines += ["", "[Peer]", f"PublicKey = {answer['public_key']}", f"PresharedKey = {encode_key(preshared)}",
              f"Endpoint = {endpoint}", f"AllowedIPs = {', '.join(answer['routes'])}",
              f"PersistentKeepalive = {answer.get('keepalive') or STOCK_KEEPALIVE}"]
    return "\n".join(lines) + "\n"


def run_peers(args: argparse.Namespace) -> int:
    try:
        answer = _ask(_socket(args), {"command": "peers"})
    except (InviteError, ControlSocketError) as exc:
        print(f"tunvpn peers: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(format_peers(answer, time.time()), end="")
    return EXIT_OK


def format_peers(answer: dict, now: float) -> str:
    lines = [f"server {answer['name']}: enrolled peers in {answer['peers_directory']}"]
    for peer in answer["enrolled"]:
        state = "connected" if peer["connected"] else "not connected"
        lines.append(f"  {peer['name']}  {peer['kind']}  {', '.join(peer['addresses']) or 'no address yet'}  "
                     f"{state}  {peer['public_key']}")
    if not answer["enrolled"]:
        lines.append("  (none)")
    lines.append("open invites:")
    for invite in answer["invites"]:
        left = invite["expires"] - now
        lines.append(f"  {invite['name']}  {invite['uses_left']} of {invite['uses']} use(s) left  "
                     f"expires in {max(0, int(left)) // 60} min  invite key {invite['public_key']}")
    if not answer["invites"]:
        lines.append("  (none)")
    return "\n".join(lines) + "\n"


def run_revoke(args: argparse.Namespace) -> int:
    try:
        path = _socket(args)
        answer = _ask(path, {"command": "revoke", "peer": args.peer})
        if answer["revoked"] == "peer":
            _wait_for(path, answer["name"], present=False)
    except (InviteError, ControlSocketError) as exc:
        print(f"tunvpn revoke: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"revoked {answer['revoked']} {answer['name']}")
    return EXIT_OK
