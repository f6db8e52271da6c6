"""Where Prometheus gets the metrics: an HTTP endpoint on the loop, or a textfile-collector file.

The endpoint answers `GET /metrics` (HTTP/1.0 and 1.1, one request per connection) from the
daemon's own selectors loop: every accept, read and write is non-blocking, requests and
connections are bounded, idle ones are closed.  It has no authentication: listen on loopback
(the documented default) or on an address only the monitoring host reaches.
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Callable

from .atomicfile import replace_file

MAX_CONNECTIONS = 8
MAX_REQUEST = 8 * 1024
IDLE_TIMEOUT = 5.0
_ACCEPTS_PER_EVENT = 16


class MetricsError(Exception):
    """The endpoint could not be set up; the message is one line for the log."""


@dataclass
class _Client:
    sock: socket.socket
    since: float
    request: bytes = b""
    answer: bytes = b""
    sent: int = 0


class MetricsServer:
    """A Service of io.loop: serves `render()` (Prometheus text) at /metrics."""

    def __init__(self, address: tuple[str, int], render: Callable[[], str], content_type: str) -> None:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._render = render
        self._content_type = content_type
        self._clients: dict[int, _Client] = {}
        self._selector: selectors.BaseSelector | None = None
        self._listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(MAX_CONNECTIONS)
        except OSError as exc:
            self._listener.close()
            where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            raise MetricsError(f"cannot listen for metrics on {where}: {exc.strerror or exc}") from None
        self.port = self._listener.getsockname()[1]

    def register(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        selector.register(self._listener, selectors.EVENT_READ, self)

    def owns(self, key: selectors.SelectorKey) -> bool:
        return key.data is self or (type(key.data) is tuple and key.data[0] is self)

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.data is self:
            self._accept()
            return
        client = self._clients.get(key.data[1])
        if client is None:
            return
        if mask & selectors.EVENT_READ:
            self._read(client)
        elif mask & selectors.EVENT_WRITE:
            self._write(client)

    def expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if now - c.since > IDLE_TIMEOUT]:
            self._drop(client)

    def _accept(self) -> None:
        assert self._selector is not None
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. EMFILE; the next wake-up tries again
            if len(self._clients) >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, time.monotonic())
            self._clients[sock.fileno()] = client
            self._selector.register(sock, selectors.EVENT_READ, (self, sock.fileno()))

    def _read(self, client: _Client) -> None:
        try:
            chunk = client.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(client)
            return
        client.request += chunk
        if b"\r\n\r\n" in client.request or b"\n\n" in client.request:
            self._respond(client, *self._answer(client.request.split(b"\n", 1)[0]))
        elif len(client.request) > MAX_REQUEST:
            self._respond(client, "431 Request Header Fields Too Large", "text/plain", "request too large\n")

    def _answer(self, request_line: bytes) -> tuple[str, str, str]:
        parts = request_line.strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return "400 Bad Request", "text/plain", "expected 'GET /metrics HTTP/1.1'\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return "405 Method Not Allowed", "text/plain", "only GET\n"
        if target != b"/metrics":
            return "404 Not Found", "text/plain", "the metrics are at /metrics\n"
        return "200 OK", self._content_type, self._render()

    def _respond(self, client: _Client, status: str, content_type: str, body: str) -> None:
        assert self._selector is not None
        data = body.encode()
        client.answer = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                         "Connection: close\r\n\r\n").encode() + data
        self._selector.modify(client.sock, selectors.EVENT_WRITE, (self, client.sock.fileno()))
        self._write(client)

    def _write(self, client: _Client) -> None:
        try:
            client.sent += client.sock.send(client.answer[client.sent:], socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            client.sent = len(client.answer)
        if client.sent >= len(client.answer):
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        self._clients.pop(fd, None)
        if self._selector is not None and fd >= 0:
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        self._listener.close()


def write_metrics_file(path: str, text: str) -> None:
    """Replace `path` at once (temp file and rename), as node_exporter's textfile collector needs:
    it must never read half a file.  Readable by all, as metrics are not secret."""
    replace_file(path, text.encode(), 0o644, durable=False)
