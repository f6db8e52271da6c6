"""The daemon's local control socket: one JSON request line in, one JSON answer line out.

The server side is driven by the daemon's own selectors loop and never blocks it: every
accept, read and write is non-blocking, answers go out under EVENT_WRITE (a status with a
thousand peers is bigger than a socket buffer), and everything a client can make the daemon
hold is bounded (connections, request size, idle time).  Access control is the file system:
the socket is 0600 in a 0700 directory, so only root reaches it, as with `wg`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/run/tunvpn"
MAX_CONNECTIONS = 16
MAX_REQUEST = 64 * 1024
IDLE_TIMEOUT = 5.0
MAX_ANSWER = 64 * 1024 * 1024  # the client's bound: far above any real status, far below harm
_SUN_PATH_MAX = 107  # sizeof(sun_path) minus the terminating NUL
_RECV_CHUNK = 64 * 1024
_ACCEPTS_PER_EVENT = 64  # bounds one handle() call; the selector reports the rest next turn
_BUSY_ANSWER = b'{"error":"too many control connections, try again"}\n'

Handler = Callable[[dict], dict]


class ControlSocketError(Exception):
    """The control socket could not be set up or queried; the message is one line for the user."""


class DaemonError(ControlSocketError):
    """The daemon answered, but with {"error": ...}: it understood the socket, not the request."""


def default_socket_path(name: str, run_dir: str = DEFAULT_RUN_DIR) -> str:
    """Where the daemon for config NAME listens unless --control-socket says otherwise."""
    return os.path.join(run_dir, f"{name}.sock")


def find_socket(name: str | None, control_socket: str | None, what: str, run_dir: str = DEFAULT_RUN_DIR) -> str:
    """The socket a command talks to: --control-socket, NAME's, or the only daemon's.

    `what` names the daemon in the error when there is not exactly one ("name the client: ...").
    """
    if control_socket:
        return control_socket
    if name:
        if "/" in name or name.startswith("."):
            raise ControlSocketError(f"invalid NAME {name!r}: a config name, like office for /etc/tunvpn/office.conf")
        return default_socket_path(name, run_dir)
    try:
        sockets = sorted(entry.name for entry in os.scandir(run_dir) if entry.name.endswith(".sock"))
    except FileNotFoundError:
        sockets = []
    except OSError as exc:
        raise ControlSocketError(f"cannot list {run_dir}: {exc.strerror or exc} (the control sockets are root-only)"
                                 ) from None
    if len(sockets) != 1:
        raise ControlSocketError(f"name the {what}: " + ("no tunvpn daemon is running" if not sockets
                                                         else f"{len(sockets)} daemons are running"))
    return os.path.join(run_dir, sockets[0])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass(eq=False)
class _Connection:
    """One client: what it sent so far, then the answer and how much of it went out."""

    server: ControlServer
    sock: socket.socket
    last_activity: float
    received: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None
    sent: int = 0


class ControlServer:
    """Answers control requests with `handler(request) -> answer` from inside the daemon's loop."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self._tag = object()  # the listener's selector data: unique per server, so owns() is exact
        self._connections: set[_Connection] = set()
        self._selector: selectors.BaseSelector | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        if len(os.fsencode(self.path)) > _SUN_PATH_MAX:
            raise ControlSocketError(f"control socket path {self.path} is too long (at most {_SUN_PATH_MAX} bytes)")
        _ensure_private_directory(Path(self.path).parent)
        _remove_if_stale(self.path)
        self._listener = self._bind()

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # Linux creates the socket file with the socket inode's mode (minus umask): setting it
            # before bind leaves no moment in which the file is open to others.
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(self.path)
            sock.listen(MAX_CONNECTIONS)
            info = os.lstat(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ControlSocketError(f"control socket {self.path} is in use by another process") from exc
            raise ControlSocketError(f"cannot bind control socket {self.path}: {exc.strerror or exc}") from exc
        self._identity = (info.st_dev, info.st_ino)
        return sock

    # --- selector interface ------------------------------------------------------

    def register(self, selector: selectors.BaseSelector) -> None:
        """Put the listening socket into the daemon's selector; connections follow on accept."""
        self._selector = selector
        selector.register(self._listener, selectors.EVENT_READ, self._tag)

    def owns(self, key: selectors.SelectorKey) -> bool:
        data = key.data
        return data is self._tag or (isinstance(data, _Connection) and data.server is self)

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        """Make whatever progress is possible without blocking."""
        if key.data is self._tag:
            self._accept()
            return
        connection: _Connection = key.data
        if connection.answer is None:
            if mask & selectors.EVENT_READ:
                self._read(connection)
        elif mask & selectors.EVENT_WRITE:
            self._write(connection)

    def expire(self, now: float) -> None:
        """Close connections idle for more than IDLE_TIMEOUT; `now` is time.monotonic()."""
        for connection in [c for c in self._connections if now - c.last_activity > IDLE_TIMEOUT]:
            log.debug("control connection idle for more than %.0f s, closed", IDLE_TIMEOUT)
            self._drop(connection)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    # --- connections ---------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: the listener stays, the next turn tries again
                log.warning("control socket: accept failed: %s", exc.strerror or exc)
                return
            sock.setblocking(False)
            if len(self._connections) >= MAX_CONNECTIONS:
                self.expire(time.monotonic())  # idle clients must not lock out a new one, even between expire() calls
            if len(self._connections) >= MAX_CONNECTIONS:
                self._refuse_busy(sock)
                continue
            connection = _Connection(self, sock, time.monotonic())
            self._connections.add(connection)
            assert self._selector is not None, "register() before the loop runs"
            self._selector.register(sock, selectors.EVENT_READ, connection)

    @staticmethod
    def _refuse_busy(sock: socket.socket) -> None:
        """Tell an excess client why instead of leaving it to time out; a fresh socket takes one short line."""
        try:
            sock.send(_BUSY_ANSWER, socket.MSG_NOSIGNAL)
        except OSError:
            pass
        sock.close()

    def _read(self, connection: _Connection) -> None:
        try:
            data = connection.sock.recv(_RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(connection)
            return
        connection.last_activity = time.monotonic()
        received = connection.received
        if not data:  # EOF: an unterminated last line still counts as the request
            if received:
                self._answer(connection, bytes(received))
            else:
                self._drop(connection)
            return
        search_from = len(received)
        received += data
        end = received.find(b"\n", search_from)
        if end > MAX_REQUEST or (end < 0 and len(received) > MAX_REQUEST):
            self._answer_with(connection, {"error": f"request longer than {MAX_REQUEST} bytes"})
        elif end >= 0:
            self._answer(connection, bytes(received[:end]))

    def _answer(self, connection: _Connection, line: bytes) -> None:
        self._answer_with(connection, self._process(line))

    def _answer_with(self, connection: _Connection, answer: dict) -> None:
        connection.received = bytearray()
        connection.answer = memoryview(_encode_answer(answer))
        assert self._selector is not None
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)

    def _process(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return {"error": f"bad request: not a JSON line ({_one_line(exc)})"}
        if not isinstance(request, dict):
            return {"error": "bad request: expected a JSON object"}
        try:
            answer = self.handler(request)
        except Exception as exc:  # the daemon outlives any one request
            log.error("control request %.200s failed: %s: %s", line.decode("utf-8", "replace"),
                      type(exc).__name__, _one_line(exc))
            log.debug("control request traceback", exc_info=True)
            return {"error": f"internal error: {type(exc).__name__}: {_one_line(exc)}"}
        if not isinstance(answer, dict):
            return {"error": f"internal error: the handler answered {type(answer).__name__}, not an object"}
        return answer

    def _write(self, connection: _Connection) -> None:
        assert connection.answer is not None
        try:
            sent = connection.sock.send(connection.answer[connection.sent:], socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the client went away; nothing to tell it
            self._drop(connection)
            return
        connection.last_activity = time.monotonic()
        connection.sent += sent
        if connection.sent >= len(connection.answer):
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        if self._selector is not None:
            try:
                self._selector.unregister(connection.sock)
            except (KeyError, ValueError, OSError):
                pass
        connection.sock.close()

    # --- teardown ------------------------------------------------------------------

    def close(self) -> None:
        """Close everything and remove the socket file, unless another daemon has replaced it since."""
        for connection in list(self._connections):
            self._drop(connection)
        if self._selector is not None:
            try:
                self._selector.unregister(self._listener)
            except (KeyError, ValueError, OSError):
                pass
            self._selector = None
        self._listener.close()
        if self._identity is not None:
            try:
                info = os.lstat(self.path)
                if (info.st_dev, info.st_ino) == self._identity:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._identity = None


def _encode_answer(answer: dict) -> bytes:
    try:
        return (json.dumps(answer, separators=(",", ":")) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:  # not serialisable, or circular
        return (json.dumps({"error": f"internal error: answer not serialisable: {_one_line(exc)}"}) + "\n").encode()


def _ensure_private_directory(directory: Path) -> None:
    """Create the run directory 0700; an existing one (e.g. systemd's RuntimeDirectory) is left as it is."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
    except FileExistsError:
        if not directory.is_dir():
            raise ControlSocketError(f"{directory} exists and is not a directory") from None
        return
    except OSError as exc:
        raise ControlSocketError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    os.chmod(directory, 0o700)  # mkdir's mode is filtered through the umask


def _remove_if_stale(path: str) -> None:
    """Replace the leftover of a killed daemon, but never take the socket of a live one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not replacing it")
    if _someone_listens(path):
        raise ControlSocketError(f"another daemon is already running on control socket {path}")
    log.info("removing stale control socket %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _someone_listens(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as probe:
        result = probe.connect_ex(path)
    if result in (0, errno.EAGAIN):  # EAGAIN: a full backlog is still a live listener
        return True
    if result in (errno.ECONNREFUSED, errno.ENOENT):
        return False
    raise ControlSocketError(f"cannot check control socket {path}: {os.strerror(result)}")


# --- client ----------------------------------------------------------------------------


def query(path: str | os.PathLike[str], request: dict, timeout: float = 5.0) -> dict:
    """Send one request to the daemon on PATH and return its answer; errors are one-line exceptions."""
    path = os.fspath(path)
    deadline = time.monotonic() + timeout
    line = (json.dumps(request, separators=(",", ":")) + "\n").encode("utf-8")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon answered without reading it all (busy, too long): the answer may be waiting
            raw = _receive_line(sock, deadline, path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlSocketError(f"no daemon is running on {path}") from None
        except PermissionError:
            raise ControlSocketError(f"permission denied on {path} (the control socket is root-only)") from None
        except TimeoutError:
            raise ControlSocketError(f"no answer on {path} within {timeout:g} s") from None
        except OSError as exc:
            raise ControlSocketError(f"cannot talk to the daemon on {path}: {exc.strerror or exc}") from None
    return _decode_answer(path, raw)


def _receive_line(sock: socket.socket, deadline: float, path: str) -> bytes:
    received = bytearray()
    while b"\n" not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(_RECV_CHUNK)
        if not chunk:
            break
        received += chunk
        if len(received) > MAX_ANSWER:
            raise ControlSocketError(f"bad answer from {path}: longer than {MAX_ANSWER} bytes")
    return bytes(received)


def _decode_answer(path: str, raw: bytes) -> dict[str, Any]:
    if not raw.endswith(b"\n") or raw.count(b"\n") != 1:
        if not raw:
            raise ControlSocketError(f"bad answer from {path}: the daemon closed the connection without answering")
        raise ControlSocketError(f"bad answer from {path}: not one complete line")
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ControlSocketError(f"bad answer from {path}: not JSON ({_one_line(exc)})") from None
    if not isinstance(answer, dict):
        raise ControlSocketError(f"bad answer from {path}: not a JSON object")
    if "error" in answer:
        raise DaemonError(f"the daemon on {path} answered: {_one_line(answer['error'])}")
    return answer
