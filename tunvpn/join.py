"""`tunvpn join TOKEN [--name NAME]`: become a client of the server that made the invite.

The client's own private key and PSK are made here and never leave this machine except as the
public key and the PSK inside the encrypted enrollment request.  This command speaks WireGuard
with the invite's key through the protocol core over a plain UDP socket (no tun, no route: an
invite peer carries nothing but control messages), sends ENROLL_REQUEST, and once the server
accepts writes NAME.conf, NAME.key and NAME.psk in the config directory.  The daemon then
connects under the new key (`systemctl enable --now tunvpn-client@NAME`) and gets its address
and config pushed as any client does.
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import sys
import time
from dataclasses import dataclass

from .config import is_peer_name, resolve_endpoint
from .invitetoken import InvalidToken, InviteToken, decode_token
from .keys import derive_public_key, encode_key, generate_preshared_key, generate_private_key
from .protocol import control
from .protocol.control import EnrollState
from .protocol.device import ControlReceived, Device

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
CONFIG_DIR = "/etc/tunvpn"
ENROLL_TIMEOUT = 20.0  # per endpoint: a handshake retries every 5 s, so this is four tries
REQUEST_INTERVAL = 1.0
MAX_DATAGRAM = 65535


class JoinError(Exception):
    pass


class EnrollRefused(JoinError):
    """The server answered no: trying another endpoint of it would not help."""


def register_join_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("join", help="enroll this machine with a server's invite and write its config")
    parser.add_argument("token", metavar="TOKEN", help="the tunvpn://join/... line from `tunvpn invite`")
    parser.add_argument("--name", metavar="NAME", help="the config's name here (default: the server's)")
    parser.add_argument("--config-dir", default=CONFIG_DIR, metavar="DIR",
                        help="where NAME.conf, NAME.key and NAME.psk go (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing NAME.conf")
    parser.add_argument("--timeout", type=float, default=ENROLL_TIMEOUT, metavar="SECONDS",
                        help="how long to wait for each of the server's endpoints (default %(default)s)")
    parser.set_defaults(func=run_join)
    return parser


@dataclass(frozen=True)
class Credentials:
    private_key: bytes
    preshared_key: bytes

    @property
    def public_key(self) -> bytes:
        return derive_public_key(self.private_key)


def enroll(token: InviteToken, own: Credentials, endpoint: tuple, timeout: float = ENROLL_TIMEOUT) -> str:
    """Ask the server to make `own` a peer; the name it gave, or JoinError saying why not."""
    device = Device(token.invite_private_key)
    device.set_control_messages(True)
    device.set_peer(token.server_public_key, preshared_key=token.preshared_key, endpoint=endpoint)
    request = control.encode(control.EnrollRequest(1, own.public_key, own.preshared_key))
    family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock, selectors.DefaultSelector() as selector:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        next_request = time.monotonic()
        while (now := time.monotonic()) < deadline:
            device.set_wall_clock(time.time(), now)
            if now >= next_request:  # the request once a session is up, repeated until answered
                if device.has_session(token.server_public_key):
                    device.send_to_peer(token.server_public_key, [request], now)
                else:
                    device.initiate(token.server_public_key, now)  # at most one per REKEY_TIMEOUT
                next_request = now + REQUEST_INTERVAL
            for data, address in device.datagrams_to_send():
                try:
                    sock.sendto(data, address)
                except OSError as exc:
                    raise JoinError(f"cannot send to {endpoint[0]} port {endpoint[1]}: {exc.strerror or exc}") from None
            waits = [d for d in (device.get_timer(), next_request, deadline) if d is not None]
            if selector.select(max(0.0, min(waits) - now)):
                _receive(sock, device)
            device.handle_timer(time.monotonic())
            answer = _answer(device)
            if answer is not None:
                return _verdict(answer)
    raise JoinError(f"no answer from the server at {endpoint[0]} port {endpoint[1]} within {timeout:.0f} s "
                    "(is it running and reachable, and the invite still open?)")


def _receive(sock: socket.socket, device: Device) -> None:
    datagrams = []
    for _ in range(64):
        try:
            data, address = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:  # an ICMP error (port unreachable) arrives as a failed read: retried later
            break
        datagrams.append((data, address))
    device.receive_datagrams(datagrams, time.monotonic())


def _answer(device: Device) -> control.EnrollAnswer | None:
    while (event := device.next_event()) is not None:
        if isinstance(event, ControlReceived):
            try:
                message = control.decode(event.payload)
            except control.ControlError:
                continue
            if isinstance(message, control.EnrollAnswer) and message.request_id == 1:
                return message
    return None


def _verdict(answer: control.EnrollAnswer) -> str:
    if answer.state == EnrollState.ACCEPTED:
        return answer.name
    if answer.state == EnrollState.RATE_LIMITED:
        raise EnrollRefused(f"the server takes no enrollment now (too many); try again in {answer.seconds} s")
    raise EnrollRefused(f"the server refused: {answer.reason or 'no reason given'}")


def client_config(token: InviteToken, name: str, peer_name: str) -> str:
    endpoint = token.endpoints[0]
    others = "".join(f"# another endpoint of this server: {e}\n" for e in token.endpoints[1:])
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return (f"# written by tunvpn join on {when}: this machine is peer {peer_name} of server {token.server_name}\n"
            "# The server pushes the address, routes and DNS.\n"
            f"[Interface]\nPrivateKeyFile = {name}.key\n\n"
            f"[Peer]\nName = {token.server_name}\nPublicKey = {encode_key(token.server_public_key)}\n"
            f"PresharedKeyFile = {name}.psk\nEndpoint = {endpoint}\n{others}")


def _owner(directory: str) -> tuple[int, int, int]:
    """(uid, gid, mode) of the files: the directory's group, and readable by it when that is not ours.

    The package's /etc/tunvpn is root:tunvpn 0750 and its units run as tunvpn, so there the files
    are root:tunvpn 0640, as the package's docs make them by hand; elsewhere 0600.
    """
    gid = os.stat(directory).st_gid
    return os.getuid(), gid, 0o600 if gid == os.getgid() else 0o640


def _write(path: str, text: str, force: bool) -> None:
    uid, gid, mode = _owner(os.path.dirname(path) or ".")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(fd, 0o600)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        file.write(text)


def _endpoints(token: InviteToken) -> list[tuple]:
    """The token's endpoints resolved, in its order; the ones that do not resolve are left out."""
    resolved, problems = [], []
    for text in token.endpoints:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        try:
            resolved.append(resolve_endpoint(host, int(port)))
        except (OSError, UnicodeError, ValueError) as exc:
            problems.append(f"{text}: {getattr(exc, 'strerror', None) or exc}")
    if not resolved:
        raise JoinError(f"cannot resolve the server's endpoint(s): {'; '.join(problems)}")
    return resolved


def run_join(args: argparse.Namespace) -> int:
    try:
        token = decode_token(args.token)
    except InvalidToken as exc:
        print(f"tunvpn join: the invite is {exc}", file=sys.stderr)
        return EXIT_USAGE
    name = args.name or token.server_name
    if not is_peer_name(name):  # it is written into NAME.conf and names the systemd unit
        print(f"tunvpn join: invalid --name {name!r}: a config name, like office (1-64 letters, digits "
              "and . _ @ + -, starting with a letter or digit)", file=sys.stderr)
        return EXIT_USAGE
    paths = {suffix: os.path.join(args.config_dir, f"{name}.{suffix}") for suffix in ("conf", "key", "psk")}
    if os.path.exists(paths["conf"]) and not args.force:
        print(f"tunvpn join: {paths['conf']} exists; --force replaces it, or choose another --name", file=sys.stderr)
        return EXIT_USAGE
    if token.expires <= time.time():
        print("tunvpn join: the invite expired at "
              + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(token.expires)) + "; ask for a new one",
              file=sys.stderr)
        return EXIT_FAILED
    writable = args.config_dir if os.path.isdir(args.config_dir) else os.path.dirname(args.config_dir) or "."
    if not os.access(writable, os.W_OK):
        print(f"tunvpn join: cannot write to {writable} (run it as root?); the invite is not used yet", file=sys.stderr)
        return EXIT_USAGE
    own = Credentials(generate_private_key(), generate_preshared_key())
    try:
        peer_name = _enroll_anywhere(token, own, args.timeout)
        os.makedirs(args.config_dir, mode=0o755, exist_ok=True)
        _write(paths["key"], encode_key(own.private_key) + "\n", force=True)
        _write(paths["psk"], encode_key(own.preshared_key) + "\n", force=True)
        _write(paths["conf"], client_config(token, name, peer_name), force=args.force)
    except JoinError as exc:
        print(f"tunvpn join: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"tunvpn join: enrolled, but cannot write {exc.filename}: {exc.strerror or exc}; "
              "ask for a new invite", file=sys.stderr)
        return EXIT_FAILED
    print(f"joined server {token.server_name} as {peer_name}; wrote {paths['conf']}")
    print(f"start it with: systemctl enable --now tunvpn-client@{name}   (or: tunvpn client -c {paths['conf']})")
    return EXIT_OK


def _enroll_anywhere(token: InviteToken, own: Credentials, timeout: float) -> str:
    """Each endpoint in turn until one answers; a refusal is final."""
    failures = []
    for endpoint in _endpoints(token):
        try:
            return enroll(token, own, endpoint, timeout)
        except EnrollRefused:
            raise
        except JoinError as exc:
            failures.append(str(exc))
    raise JoinError("; ".join(failures))
