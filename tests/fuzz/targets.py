"""Fuzz targets: every parser and state machine of tunvpn that sees untrusted bytes.

A target is a function of one input (bytes) that feeds it to tunvpn the way the wire, the
control extension, a config or state file or the control socket would, and raises only when
tunvpn misbehaves: an exception escaping the code under test, or a broken invariant (a drop
counted twice, a round trip that changes the value, the replay window disagreeing with its
model).  Seeds are real messages made by the sans-I/O core (corepair), so a mutation starts
from something the code accepts; the handshake targets recompute mac1 over every input, as an
attacker who knows the server's public key can, so mutations reach the Noise code behind it.

Targets keep their fixture (devices, a server, a client) across inputs, as a daemon would, and
rebuild it when an input was accepted and so used up the state the seeds were made for.  The
fixtures are deterministic (seeded keys and randomness, simulated time): a seed made today
matches the fixture tomorrow.
"""

from __future__ import annotations

import ipaddress
import json
import selectors
import socket
import struct
import sys
import tempfile
import time
import types
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

TESTS = Path(__file__).resolve().parents[1]
for _path in (TESTS.parent, TESTS, TESTS / "unit"):  # runnable as a script, not only under pytest
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from corepair import CorePair, a_to_b_v4, a_to_b_v6, established, private_key  # noqa: E402
from tunvpn import client as client_module  # noqa: E402
from tunvpn import state as state_module  # noqa: E402
from tunvpn.client import Client  # noqa: E402
from tunvpn.config import ConfigError, parse_config  # noqa: E402
from tunvpn.daemon import Options  # noqa: E402
from tunvpn.io.controlsocket import _RECV_CHUNK, MAX_REQUEST, ControlServer, _Connection, _encode_answer  # noqa: E402
from tunvpn.keys import derive_public_key, encode_key  # noqa: E402
from tunvpn.protocol import control, messages  # noqa: E402
from tunvpn.protocol.cookie import LABEL_MAC1  # noqa: E402
from tunvpn.protocol.crypto import hash_, mac  # noqa: E402
from tunvpn.protocol.device import ControlReceived, Device  # noqa: E402
from tunvpn.protocol.replay import WINDOW_SIZE, ReplayWindow  # noqa: E402
from tunvpn.server import Server  # noqa: E402
from tunvpn.state import Lease, State  # noqa: E402

MALLORY = ("198.51.100.66", 40000)
MAX_INPUT = 2048  # a datagram's worth, and more than any control message or config line needs


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    about: str


def with_mac1(data: bytes, receiver_public: bytes) -> bytes:
    """`data` with its mac1 recomputed, as an attacker who knows the receiver's public key can."""
    offset = len(data) - 32
    if offset < 0:
        return data
    return data[:offset] + mac(hash_(LABEL_MAC1, receiver_public), data[:offset]) + data[offset + 16 :]


def total_drops(device: Device) -> int:
    return sum(device.drops().values()) + sum(
        sum(device.peer_stats(key).dropped.values()) for key in device.peer_keys()
    )


def feed(device: Device, data: bytes, source=MALLORY, now: float = 0.0) -> bool:
    """One datagram in; True if it was accepted (not counted as a drop). At most one drop per datagram."""
    before = total_drops(device)
    device.receive_datagrams([(data, source)], now)
    device.datagrams_to_send()
    while device.next_event() is not None:
        pass
    counted = total_drops(device) - before
    assert counted in (0, 1), f"one datagram counted as {counted} drops"
    return counted == 0


# --- datagrams at a device ---------------------------------------------------------------------

class _Waiting:
    """A pair where one host waits for exactly one kind of message; rebuilt once that is used up."""

    def __init__(self, build: Callable[[], tuple[CorePair, Device, bytes]]) -> None:
        self._build = build
        self.pair, self.target, self.genuine = build()

    def fresh(self) -> None:
        self.pair, self.target, self.genuine = self._build()


def _initiation_at_b() -> tuple[CorePair, Device, bytes]:
    pair = CorePair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    (genuine,) = pair.collect(pair.a)
    return pair, pair.b.device, genuine.data


def _response_at_a() -> tuple[CorePair, Device, bytes]:
    pair = CorePair()
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(pair.a))
    (genuine,) = pair.collect(pair.b)
    return pair, pair.a.device, genuine.data


def _cookie_at_a() -> tuple[CorePair, Device, bytes]:
    pair = CorePair()
    pair.b.device._state.load.force = True
    pair.a.device.initiate(pair.b.device.public_key, pair.now)
    pair.deliver(pair.collect(pair.a))
    (genuine,) = pair.collect(pair.b)
    return pair, pair.a.device, genuine.data


def _handshake_target(build: Callable[[], tuple[CorePair, Device, bytes]],
                      load_from_last_byte: bool = False) -> Callable[[bytes], None]:
    """Each input goes in as it is and again with mac1 recomputed; an accepted one uses up the state.
    `load_from_last_byte`: inputs whose last byte is odd arrive under load (mac2, cookie replies)."""
    waiting = _Waiting(build)

    def run(data: bytes) -> None:
        under_load = load_from_last_byte and bool(data) and data[-1] & 1 == 1
        for variant in (data, with_mac1(data, waiting.target.public_key)):
            waiting.target._state.load.force = under_load
            if feed(waiting.target, variant, now=waiting.pair.now):
                waiting.fresh()

    return run


def _handshake_seeds(build: Callable[[], tuple[CorePair, Device, bytes]]) -> Callable[[], list[bytes]]:
    """The genuine message; it with another sender index (mac1 recomputed: a new, valid message);
    it with a flipped byte where Noise authenticates it."""

    def seeds() -> list[bytes]:
        _, device, genuine = build()
        other_index = with_mac1(genuine[:4] + bytes(4) + genuine[8:], device.public_key)
        flipped = genuine[:20] + bytes([genuine[20] ^ 1]) + genuine[21:]
        return [genuine, other_index, flipped]

    return seeds


def _transport_run() -> Callable[[bytes], None]:
    """The input is a counter (8 bytes, little-endian) and a plaintext, sealed under the live session:
    this reaches what only an authenticated peer can, the replay window and the inner-packet checks
    (IP version, lengths, allowed IPs, the control marker).  The raw input goes in too."""
    pair = established(CorePair())
    pair.b.device.set_control_messages(True)
    pair.b.device.set_forwarding(False)
    keypair = pair.a_peer.keypairs.current  # a's side never changes here: time stands still

    def run(data: bytes) -> None:
        feed(pair.b.device, data, source=pair.a.address, now=pair.now)
        counter = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
        sealed = messages.pack_transport(keypair.remote_index, counter, keypair.sender.seal(counter, data[8:]))
        feed(pair.b.device, sealed, source=pair.a.address, now=pair.now)

    return run


def _transport_seeds() -> list[bytes]:
    plaintexts = [a_to_b_v4(b"genuine"), a_to_b_v6(b"genuine"), b"",
                  control.encode(control.ConfigRequest(1)), control.encode(control.Goodbye("bye"))]
    return [struct.pack("<Q", counter) + text for counter, text in enumerate(plaintexts)] + \
           [struct.pack("<Q", WINDOW_SIZE + 5) + a_to_b_v4(b"ahead"), struct.pack("<Q", 2**64 - 1)]


def _any_datagram_run() -> Callable[[bytes], None]:
    """Any bytes at a device with a session and a pending handshake: the message-type dispatch."""
    holder: dict[str, CorePair] = {}

    def build() -> CorePair:
        pair = established(CorePair())
        pair.now += 10
        pair.a.device.initiate(pair.b.device.public_key, pair.now)
        pair.collect(pair.a)
        return pair

    holder["pair"] = build()

    def run(data: bytes) -> None:
        pair = holder["pair"]
        if feed(pair.a.device, data, now=pair.now):
            holder["pair"] = build()

    return run


def _any_datagram_seeds() -> list[bytes]:
    pair = established(CorePair())
    pair.a.device.send_packets([a_to_b_v4(b"data")], pair.now)
    transport = pair.collect(pair.a)[0].data
    return [b"", bytes(4), transport, transport[:32], _initiation_at_b()[2], _response_at_a()[2], _cookie_at_a()[2]]


# --- the replay window, against a model -------------------------------------------------------------

def _replay_run() -> Callable[[bytes], None]:
    """The input is a limit (8 bytes) and counters (8 bytes each, as deltas from the greatest so far,
    so inputs stay near the window's edge); each answer must match a set-based model."""

    def run(data: bytes) -> None:
        limit = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
        window, seen, greatest = ReplayWindow(), set(), 0
        for offset in range(8, len(data) - 7, 8):
            delta = int.from_bytes(data[offset : offset + 8], "little", signed=True)
            counter = max(0, greatest + delta) if offset % 16 else abs(delta)
            expected = counter < limit and counter not in seen and (counter > greatest or greatest - counter <= WINDOW_SIZE)
            got = window.accept(counter, limit)
            assert got == expected, f"counter {counter} (greatest {greatest}, limit {limit}): {got}, model {expected}"
            if got:
                seen.add(counter)
                greatest = max(greatest, counter)

    return run


def _replay_seeds() -> list[bytes]:
    def pack(limit: int, *deltas: int) -> bytes:
        return struct.pack("<Q", limit) + b"".join(struct.pack("<q", d) for d in deltas)

    return [pack(2**60, 1, 1, 0, -1, WINDOW_SIZE, -WINDOW_SIZE, -WINDOW_SIZE - 1),
            pack(100, 99, 100, 101, 50), pack(2**64 - 1, 64, 128 * 64, -127 * 64, 1)]


# --- the control extension ---------------------------------------------------------------------------

SERVER_KEY, CLIENT_KEYS = private_key(500), [private_key(501 + n) for n in range(3)]
SERVER_PUBLIC, CLIENT_PUBLICS = derive_public_key(SERVER_KEY), [derive_public_key(k) for k in CLIENT_KEYS]


def _control_seeds() -> list[bytes]:
    push = control.ConfigPush(
        7, addresses=[ipaddress.ip_interface("203.0.113.2/29"), ipaddress.ip_interface("2001:db8:100::2/64")],
        routes=[ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:200::/48")],
        dns=[ipaddress.ip_address("203.0.113.1")], search=["office.example"], mtu=1420, keepalive=25)
    held = control.ConfigRequest(8, [ipaddress.ip_interface("203.0.113.5/29"), ipaddress.ip_interface("2001:db8:100::5/64")])
    enroll = [control.EnrollRequest(9, bytes(range(32)), bytes(32)),
              control.EnrollAnswer(9, control.EnrollState.ACCEPTED, "laptop-2"),
              control.EnrollAnswer(9, control.EnrollState.RATE_LIMITED, seconds=12),
              control.EnrollAnswer(9, control.EnrollState.REFUSED, reason="this invite is used up")]
    return [control.encode(m) for m in (control.ConfigRequest(7), held, push, control.ConfigRefused(7, "pool exhausted"),
                                         control.Goodbye("shutting down"), control.Goodbye(""), *enroll)]


def _decode_run() -> Callable[[bytes], None]:
    """decode raises only ControlError; what it accepts, encode gives back unchanged."""

    def run(data: bytes) -> None:
        try:
            message = control.decode(data)
        except control.ControlError:
            return
        if message is not None:
            assert control.decode(control.encode(message)) == message, message

    return run


def _server_text() -> str:
    text = f"[Interface]\nPrivateKey = {encode_key(SERVER_KEY)}\nAddress = 203.0.113.1/29, 2001:db8:100::1/64\n" \
           "PushRoute = 198.51.100.0/24\nPushDNS = 203.0.113.1, office.example\n"
    return text + "".join(f"\n[Peer]\nPublicKey = {encode_key(public)}\n" for public in CLIENT_PUBLICS)


class _FakeLink:
    """Stands in for io.netlink.LinkSetup: accepts whatever the daemon asks."""

    def __getattr__(self, name: str) -> Callable[..., bool]:
        return lambda *args, **kwargs: True


def _make_server(directory: Path) -> Server:
    path = directory / "office.conf"
    path.write_text(_server_text())
    path.chmod(0o600)
    server = Server(parse_config(path.read_text(), str(path), role="server", resolve=False),
                    Options(state_dir=directory / "state"))
    server.link = _FakeLink()
    server.udp = types.SimpleNamespace(port=51820, errors={}, offloads=["gso", "gro"])
    server.tun = types.SimpleNamespace(name="tv-office", write_errors=0, vnet_header=True)
    return server


def _server_control_run() -> Callable[[bytes], None]:
    """Control payloads from the clients the server knows, time moving on, answers checked."""
    directory = Path(tempfile.mkdtemp(prefix="tunvpn-fuzz-server-"))
    server = _make_server(directory)
    sent: list[bytes] = []
    server.device.send_to_peer = lambda key, payloads, now: sent.extend(payloads)
    clock = {"now": 0.0}

    def run(data: bytes) -> None:
        clock["now"] += 0.7
        sender = CLIENT_PUBLICS[data[-1] % len(CLIENT_PUBLICS)] if data else CLIENT_PUBLICS[0]
        server.handle_event(ControlReceived(sender, data), clock["now"])
        for answer in sent:
            assert isinstance(control.decode(answer), (control.ConfigPush, control.ConfigRefused))
        sent.clear()

    return run


class _FakeDns:
    def __init__(self, ifname: str) -> None:
        self.ifname = ifname

    def apply(self, servers, search, exclusive=False) -> str:
        return "recorded"

    def revert(self) -> None:
        pass


@contextmanager
def _fake_dns() -> Iterator[None]:
    real = client_module.DnsManager
    client_module.DnsManager = _FakeDns
    try:
        yield
    finally:
        client_module.DnsManager = real


def _make_client() -> Client:
    text = (f"[Interface]\nPrivateKey = {encode_key(CLIENT_KEYS[0])}\n\n"
            f"[Peer]\nPublicKey = {encode_key(SERVER_PUBLIC)}\nEndpoint = 192.0.2.1:51820\n")
    client = Client(parse_config(text, "/etc/tunvpn/office.conf", role="client", resolve=False), Options())
    client.link = _FakeLink()
    client.tun = types.SimpleNamespace(name="tv-office", write_errors=0, vnet_header=True)
    client.udp = types.SimpleNamespace(set_fwmark=lambda mark: None, port=0, errors={}, offloads=["gso", "gro"])
    client.cleanup = ExitStack()
    return client


def _client_control_run() -> Callable[[bytes], None]:
    """Control payloads from the server at a client, which applies what validate_push lets through.
    Request id 0 (an unsolicited push) is the one a client always takes, so inputs may carry it."""
    client = _make_client()
    clock = {"now": 0.0}

    def run(data: bytes) -> None:
        clock["now"] += 1.0
        with _fake_dns():
            client.handle_event(ControlReceived(SERVER_PUBLIC, data), clock["now"])

    return run


def _client_control_seeds() -> list[bytes]:
    seeds = _control_seeds()
    return seeds + [seed[:4] + b"\0\0" + seed[6:] for seed in seeds]  # request id 0


# --- files and the control socket -----------------------------------------------------------------

def _config_run() -> Callable[[bytes], None]:
    """Config text (as load_config decodes it) for both roles: ConfigError or a Config, nothing else."""

    def run(data: bytes) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return  # load_config refuses it before parsing
        for role in ("server", "client"):
            try:
                parse_config(text, "/etc/tunvpn/fuzz.conf", role=role, resolve=False)
            except ConfigError:
                pass

    return run


def _config_seeds() -> list[bytes]:
    client = (f"[Interface]\nPrivateKey = {encode_key(CLIENT_KEYS[0])}\nAddress = 203.0.113.2/29\nDNS = 203.0.113.1\n"
              f"MTU = 1420\n\n[Peer]\nPublicKey = {encode_key(SERVER_PUBLIC)}\nEndpoint = 192.0.2.1:51820\n"
              "AllowedIPs = 0.0.0.0/0, ::/0\nPersistentKeepalive = 25\n")
    return [_server_text().encode(), client.encode(), b"[Interface]\n", b"# only a comment\n"]


def _state_run() -> Callable[[bytes], None]:
    """A state file's bytes: what is read must serialize and read back the same, without problems."""

    def run(data: bytes) -> None:
        state, _ = state_module._decode(data)
        again, problems = state_module._decode(state_module.serialize(state))
        assert problems == [], problems
        assert (again.leases, again.endpoints) == (state.leases, state.endpoints)

    return run


def _state_seeds() -> list[bytes]:
    state = State()
    state.leases[CLIENT_PUBLICS[0]] = Lease(ipaddress.IPv4Address("203.0.113.2"), ipaddress.IPv6Address("2001:db8:100::2"))
    state.leases[CLIENT_PUBLICS[1]] = Lease(ipaddress.IPv4Address("203.0.113.3"), None)
    state.endpoints[CLIENT_PUBLICS[0]] = state_module.endpoint_to_text(("192.0.2.7", 40000))
    state.endpoints[CLIENT_PUBLICS[1]] = state_module.endpoint_to_text(("2001:db8::7", 40001, 0, 0))
    good = state_module.serialize(state)
    return [good, good[: len(good) // 2], b"{}", b"[]", b'{"version": 2}']


def _control_socket_run() -> Callable[[bytes], None]:
    """A request line at a server's control socket: always a JSON answer, never an internal error."""
    directory = Path(tempfile.mkdtemp(prefix="tunvpn-fuzz-socket-"))
    server = _make_server(directory)
    control_server = ControlServer(directory / "control.sock", server.handle_request)

    def run(data: bytes) -> None:
        answer = control_server._process(data)
        assert "internal error" not in str(answer.get("error", "")), answer
        json.loads(_encode_answer(answer))

    return run


def _control_socket_seeds() -> list[bytes]:
    return [b'{"command": "show"}', b'{"command": "nope"}', b"[]", b'{"command": ["show"]}', b"{" * 100,
            b'{"command": "invite", "name": "x", "lifetime": 1e999, "uses": [1]}', b'{"command": "peers"}',
            b'{"command": "revoke", "peer": {"a": 1}}', b'{"command": "add-peer", "name": "../x"}']


_HUGE_CHUNK = b"\xfe"  # a chunk starting with this byte is its rest repeated past MAX_REQUEST


def _stream_chunks(data: bytes) -> list[bytes]:
    chunks = [chunk for chunk in data.split(b"\0") if chunk]
    return [chunk[1:] * (MAX_REQUEST // max(1, len(chunk) - 1) + 1) if chunk.startswith(_HUGE_CHUNK) and len(chunk) > 1
            else chunk for chunk in chunks]


def _control_stream_run() -> Callable[[bytes], None]:
    """Bytes through a real socket into a server's control socket connection, in chunks (split at
    NUL bytes), then EOF: the line assembly, the size limit, EOF without a newline. Whatever came,
    exactly one JSON line answers it (nothing answers a connection that sent nothing)."""
    directory = Path(tempfile.mkdtemp(prefix="tunvpn-fuzz-stream-"))
    control_server = ControlServer(directory / "control.sock", _make_server(directory).handle_request)
    selector = selectors.DefaultSelector()
    control_server.register(selector)

    def run(data: bytes) -> None:
        ours, theirs = socket.socketpair()
        ours.settimeout(5)
        theirs.setblocking(False)
        connection = _Connection(control_server, theirs, time.monotonic())
        control_server._connections.add(connection)
        selector.register(theirs, selectors.EVENT_READ, connection)
        chunks = _stream_chunks(data)
        try:
            for chunk in chunks:
                ours.sendall(chunk)
                for _ in range(len(chunk) // _RECV_CHUNK + 2):  # a huge chunk takes several reads
                    if connection.answer is None and connection in control_server._connections:
                        control_server._read(connection)
                if connection.answer is not None:
                    break
            if connection.answer is None:
                ours.shutdown(socket.SHUT_WR)
                control_server._read(connection)
            for _ in range(1000):
                if connection not in control_server._connections:
                    break
                control_server._write(connection)
            reply = _read_to_end(ours)
        finally:
            if connection in control_server._connections:
                control_server._drop(connection)
            ours.close()
        if not chunks:
            assert reply == b"", reply
            return
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply[:200]
        assert isinstance(json.loads(reply), dict)

    return run


def _read_to_end(sock: socket.socket) -> bytes:
    """Everything the server wrote. It closes with the rest of a too-long request unread, so the
    end of the stream may come as ECONNRESET (after the answer, which arrives first)."""
    data = b""
    try:
        while piece := sock.recv(1 << 20):
            data += piece
    except ConnectionResetError:
        pass
    return data


def _control_stream_seeds() -> list[bytes]:
    return [b'{"command": "show"}\n', b'{"comm\0and": "show"}', b'{"command": "show"}', b"\n",
            _HUGE_CHUNK + b"x", b'{"command":\0' + _HUGE_CHUNK + b" "]


# --- the list -------------------------------------------------------------------------------------

_FACTORIES: dict[str, tuple[Callable[[], Callable[[bytes], None]], Callable[[], list[bytes]], str]] = {
    "datagram": (_any_datagram_run, _any_datagram_seeds, "any bytes at a device with a session and a pending handshake"),
    "initiation": (lambda: _handshake_target(_initiation_at_b, load_from_last_byte=True), _handshake_seeds(_initiation_at_b),
                   "initiations at a responder, mac1 recomputed, half under load"),
    "response": (lambda: _handshake_target(_response_at_a), _handshake_seeds(_response_at_a), "responses at an initiator waiting for one, mac1 recomputed"),
    "cookie_reply": (lambda: _handshake_target(_cookie_at_a), _handshake_seeds(_cookie_at_a), "cookie replies at an initiator that sent an initiation"),
    "transport": (_transport_run, _transport_seeds, "plaintexts sealed under a live session at any counter: decryption, replay window, inner checks"),
    "replay_window": (_replay_run, _replay_seeds, "the replay window against a set-based model"),
    "control_decode": (_decode_run, _control_seeds, "the control codec: decode, and encode(decode(x)) round trips"),
    "server_control": (_server_control_run, _control_seeds, "control messages from known clients at a server"),
    "client_control": (_client_control_run, _client_control_seeds, "control messages from the server at a client"),
    "config": (_config_run, _config_seeds, "config text for both roles"),
    "state_file": (_state_run, _state_seeds, "state file bytes, and what is kept round trips"),
    "control_socket": (_control_socket_run, _control_socket_seeds, "control socket request lines at a server"),
    "control_stream": (_control_stream_run, _control_stream_seeds, "bytes in chunks through a control socket connection"),
}

NAMES = list(_FACTORIES)


def _canary_run() -> Callable[[bytes], None]:
    """A planted bug one byte away from its seed: proof that a campaign reports what it finds."""

    def run(data: bytes) -> None:
        if data[:4] == b"FUZZ":
            raise RuntimeError("the canary sang")

    return run


_FACTORIES["canary"] = (_canary_run, lambda: [b"FUZY"], "a planted bug, for the campaign's own test")


def target(name: str) -> Target:
    """Build one target's fixture (only that one: the others cost nothing until asked for)."""
    make_run, seeds, about = _FACTORIES[name]
    return Target(name, make_run(), seeds, about)
