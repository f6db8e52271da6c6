#!/usr/bin/env python3
"""Many tunvpn clients in one process, for scale tests: each a sans-I/O `Device` on its own UDP port.

A worker is started inside a lab host with a spec file (JSON: the server's key and endpoint, the
clients' private keys, what to send) and talks to its parent over stdin/stdout, one JSON object
a line:

    worker -> {"ready": N}         every Device and socket exists
    parent -> go
    worker -> {"connected": N}     every client has its address and its echo replies (or the deadline passed)
    parent -> stop
    worker -> {"clients": [...]}   one record per client; then it exits

Each simulated client does what `tunvpn client` does against a server, minus the tun: it
initiates, asks for its configuration over the control extension as soon as the handshake
completes (again every second without an answer), takes the pushed routes and keepalive into its
server peer, then sends a few ICMPv6 echo requests from its pushed address to the server's tunnel
address, which the server's kernel answers through its tun. Persistent keepalives go on until stop.

One Device per client is the honest shape: every client has its own static key, so the server
sees a distinct peer doing a full Noise handshake, a lease and a push. The cost is the client
half of each handshake in Python, about what the server spends on it. Two things keep the
generator from being what is measured: each client's first initiation is made before `go`
(its Device runs on a clock of its own, `offset` behind the real one, that reads the same when
the initiation is sent as when it was made, so to the Device no time passed; the server only
asks a timestamp to be newer than the last it saw from that key), and several workers use
several cores. `in_flight` bounds how many clients of a worker are between their initiation
and their push, so the server is kept busy without a burst that only fills socket buffers.
"""

from __future__ import annotations

import heapq
import ipaddress
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from packets import internet_checksum  # noqa: E402

from tunvpn.keys import decode_key, encode_key  # noqa: E402
from tunvpn.protocol import control  # noqa: E402
from tunvpn.protocol.device import ControlReceived, Device, HandshakeCompleted  # noqa: E402

REQUEST_INTERVAL = 1.0  # as tunvpn's client: a config request unanswered for a second is sent again
ECHO_PAYLOAD = b"tunvpn-loadgen"
ICMPV6 = 58
ECHO_REQUEST, ECHO_REPLY = 128, 129
READS_PER_SOCKET = 8  # datagrams drained per ready socket and turn
NO_CLIENT_LOAD_LIMIT = 1 << 30  # a client never demands cookies from its server


@dataclass
class Record:
    """What one simulated client saw, times in seconds after `go` (None: it never happened)."""

    public_key: str
    started: float | None = None
    handshake: float | None = None
    connected: float | None = None  # the push arrived
    addresses: list[str] | None = None
    requests: int = 0
    pings: int = 0
    replies: int = 0
    tx_packets: int = 0  # transport messages sent: requests, echo requests and keepalives
    keepalive: int | None = None  # as pushed

    @property
    def keepalives(self) -> int:
        return self.tx_packets - self.requests - self.pings


def echo_request(source: bytes, destination: bytes, ident: int, sequence: int) -> bytes:
    """An IPv6 ICMPv6 echo request with a correct checksum (the server's kernel answers it)."""
    body = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, sequence) + ECHO_PAYLOAD
    pseudo = source + destination + struct.pack("!I3xB", len(body), ICMPV6)
    body = body[:2] + struct.pack("!H", internet_checksum(pseudo + body)) + body[4:]
    return struct.pack("!IHBB", 6 << 28, len(body), ICMPV6, 64) + source + destination + body


def is_echo_reply(packet: bytes) -> bool:
    return len(packet) >= 48 and packet[0] >> 4 == 6 and packet[6] == ICMPV6 and packet[40] == ECHO_REPLY


class SimulatedClient:
    """One client: its Device, its socket, and where it is in connecting."""

    def __init__(self, index: int, private_key: bytes, spec: dict) -> None:
        self.index = index
        self.server_key = decode_key(spec["server_key"])
        self.endpoint = (spec["server"][0], spec["server"][1])
        self.target = ipaddress.ip_address(spec["target"]).packed
        self.ping_count = spec["pings"]
        self.go = 0.0  # the monotonic time the parent said go: records are relative to it
        self.device = Device(private_key, load_threshold=NO_CLIENT_LOAD_LIMIT)
        self.device.set_control_messages(True)
        self.device.set_peer(self.server_key, endpoint=self.endpoint)
        self.record = Record(encode_key(self.device.public_key))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((spec["local"], 0))
        self.sock.connect(self.endpoint)
        self.sock.setblocking(False)
        self.request_id = index % control.MAX_REQUEST_ID + 1
        self.next_request: float | None = None
        self.scheduled: float | None = None  # the deadline this client is in the heap under
        self.offset = 0.0  # the Device's clock is the real monotonic clock minus this
        self.initiation: list[bytes] = []
        self.prepared_at = 0.0

    @property
    def done(self) -> bool:
        """Connected, and every echo request answered."""
        return self.record.connected is not None and self.record.replies >= self.ping_count

    def prepare(self, now: float) -> None:
        """Make the first initiation before `go`; `start` sends it."""
        self.device.set_wall_clock(time.time(), now)
        self.device.initiate(self.server_key, now)
        self.initiation = [data for data, _ in self.device.datagrams_to_send()]
        self.prepared_at = now

    def start(self, now: float) -> None:
        self.record.started = now - self.go
        self.offset = now - self.prepared_at  # the Device's clock reads as when it made the initiation
        for data in self.initiation:
            self.send(data)

    def receive(self, datagrams: list[bytes], now: float) -> None:
        packets = self.device.receive_datagrams([(data, self.endpoint) for data in datagrams], now - self.offset)
        self.record.replies += sum(1 for packet in packets if is_echo_reply(packet))
        self.react(now)

    def tick(self, now: float) -> None:
        deadline = self.device.get_timer()
        if deadline is not None and deadline <= now - self.offset:
            self.device.set_wall_clock(time.time(), now - self.offset)
            self.device.handle_timer(now - self.offset)
        if self.next_request is not None and now >= self.next_request:
            self.send_request(now)
        self.react(now)

    def react(self, now: float) -> None:
        """Answer the device's events, then send what it queued."""
        while (event := self.device.next_event()) is not None:
            if isinstance(event, HandshakeCompleted):
                if self.record.handshake is None:
                    self.record.handshake = now - self.go
                if self.record.connected is None:
                    self.send_request(now)
            elif isinstance(event, ControlReceived):
                self.take_push(event.payload, now)
        self.flush()

    def send_request(self, now: float) -> None:
        self.record.requests += 1
        self.next_request = now + REQUEST_INTERVAL
        request = control.encode(control.ConfigRequest(self.request_id))
        self.device.send_to_peer(self.server_key, [request], now - self.offset)

    def take_push(self, payload: bytes, now: float) -> None:
        message = control.decode(payload)
        if not isinstance(message, control.ConfigPush) or message.request_id != self.request_id:
            return
        if self.record.connected is not None:
            return
        self.next_request = None
        self.record.connected = now - self.go
        self.record.addresses = [str(address) for address in message.addresses]
        self.record.keepalive = message.keepalive or 0
        self.device.set_peer(self.server_key, allowed_ips=message.routes, endpoint=self.endpoint,
                             persistent_keepalive=self.record.keepalive, now=now - self.offset)
        source = next((a.ip.packed for a in message.addresses if a.version == 6), None)
        if source is None:
            return  # no IPv6 address: nothing to ping from (the parent reports it)
        pings = [echo_request(source, self.target, self.index & 0xFFFF, n) for n in range(self.ping_count)]
        self.record.pings = len(pings)
        self.device.send_packets(pings, now - self.offset)

    def flush(self) -> None:
        for data, _ in self.device.datagrams_to_send():
            self.send(data)

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except (BlockingIOError, ConnectionRefusedError):
            pass  # a full buffer or a port not yet open loses it, as UDP would; the timers resend

    def deadline(self) -> float | None:
        """The next real time this client has something to do."""
        timer = self.device.get_timer()
        deadlines = [d for d in (None if timer is None else timer + self.offset, self.next_request) if d is not None]
        return min(deadlines) if deadlines else None

    def final_record(self) -> dict:
        self.record.tx_packets = self.device.peer_stats(self.server_key).tx_packets
        return asdict(self.record) | {"keepalives": self.record.keepalives}


class Worker:
    """Drives a slice of the clients from one epoll loop; at most `in_flight` connect at a time."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.clients = [SimulatedClient(spec["first_index"] + i, decode_key(key), spec)
                        for i, key in enumerate(spec["keys"])]
        self.selector = selectors.EpollSelector()
        for client in self.clients:
            self.selector.register(client.sock, selectors.EVENT_READ, client)
        self.selector.register(sys.stdin, selectors.EVENT_READ, None)
        for client in self.clients:
            client.prepare(time.monotonic())
        self.heap: list[tuple[float, int]] = []
        self.waiting = list(reversed(self.clients))  # not started yet, next at the end
        self.connecting: set[int] = set()
        self.unfinished = {client.index for client in self.clients}  # not yet done: kept, not recounted each turn
        self.stopping = False

    def run(self) -> None:
        say({"ready": len(self.clients)})
        self.wait_for("go")
        go = time.monotonic()
        for client in self.clients:
            client.go = go
        connect_by = go + self.spec["connect_deadline"]
        give_up = go + self.spec["deadline"]
        reported = False
        while not self.stopping and time.monotonic() < give_up:
            now = time.monotonic()
            self.start_more(now)
            if not reported and (not self.unfinished or now >= connect_by):
                say({"connected": len(self.clients) - len(self.unfinished)})
                reported = True
            self.turn(now)
        say({"clients": [client.final_record() for client in self.clients]})

    def start_more(self, now: float) -> None:
        self.connecting = {i for i in self.connecting if self.clients_by_index(i).record.connected is None}
        while self.waiting and len(self.connecting) < self.spec["in_flight"]:
            client = self.waiting.pop()
            client.start(now)
            self.connecting.add(client.index)
            self.schedule(client)

    def clients_by_index(self, index: int) -> SimulatedClient:
        return self.clients[index - self.spec["first_index"]]

    def turn(self, now: float) -> None:
        timeout = 0.2 if not self.heap else max(0.0, min(0.2, self.heap[0][0] - now))
        for key, _ in self.selector.select(timeout):
            if key.data is None:
                self.read_command()
                continue
            client: SimulatedClient = key.data
            datagrams = []
            for _ in range(READS_PER_SOCKET):
                try:
                    datagrams.append(client.sock.recv(2048))
                except (BlockingIOError, ConnectionRefusedError):
                    break
            if datagrams:
                client.receive(datagrams, time.monotonic())
                self.schedule(client)
                if client.done:
                    self.unfinished.discard(client.index)
        now = time.monotonic()
        while self.heap and self.heap[0][0] <= now:
            at, index = heapq.heappop(self.heap)
            client = self.clients_by_index(index)
            if client.scheduled != at:
                continue  # superseded by a later schedule()
            client.scheduled = None
            client.tick(now)
            self.schedule(client)

    def schedule(self, client: SimulatedClient) -> None:
        deadline = client.deadline()
        if deadline is not None and deadline != client.scheduled:
            client.scheduled = deadline
            heapq.heappush(self.heap, (deadline, client.index))

    def read_command(self) -> None:
        line = sys.stdin.readline()
        if line.strip() == "stop" or not line:
            self.stopping = True

    def wait_for(self, word: str) -> None:
        line = sys.stdin.readline()
        if line.strip() != word:
            raise SystemExit(f"loadgen: expected {word!r} from the parent, got {line!r}")


def say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def raise_file_limit() -> None:
    """One socket per client: thousands of descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    os.unlink(argv[1])  # it holds private keys: gone once read
    raise_file_limit()
    Worker(spec).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
