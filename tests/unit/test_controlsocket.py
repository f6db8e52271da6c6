"""The control socket: one JSON line each way, never blocking the daemon, bounded, root-only."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tunvpn.io import controlsocket
from tunvpn.io.controlsocket import (
    IDLE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_REQUEST,
    ControlServer,
    ControlSocketError,
    DaemonError,
    default_socket_path,
    query,
)

DEADLINE = 10.0  # no single step here takes more than a fraction of this


def echo(request: dict) -> dict:
    return {"echo": request}


class ServingLoop:
    """The daemon's side in a thread: a selectors loop that only serves the control socket."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.selector = selectors.DefaultSelector()
        server.register(self.selector)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, mask in self.selector.select(0.05):
                self.server.handle(key, mask)  # the only thing registered here
            self.server.expire(time.monotonic())

    def __enter__(self) -> ServingLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive(), "the serving loop did not stop"
        self.server.close()
        self.selector.close()


@contextmanager
def serving(path: Path | str, handler: Callable[[dict], dict] = echo) -> Iterator[ServingLoop]:
    with ServingLoop(ControlServer(path, handler)) as loop:
        yield loop


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def raw_exchange(path: Path, data: bytes, half_close: bool = False) -> bytes:
    """Send bytes as they are and read until the server closes: for requests query() would never send."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(DEADLINE)
        sock.connect(str(path))
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
    return bytes(answer)


def stale_socket(path: Path) -> None:
    """What a daemon killed with -9 leaves behind: a socket file nobody listens on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


# --- round trip ---------------------------------------------------------------------------


def test_query_round_trip(tmp_path: Path) -> None:
    seen = []

    def handler(request: dict) -> dict:
        seen.append(request)
        return {"interface": "tv-test", "peers": [], "text": "ünïcode"}

    with serving(tmp_path / "t.sock", handler):
        answer = query(tmp_path / "t.sock", {"command": "show"})
    assert answer == {"interface": "tv-test", "peers": [], "text": "ünïcode"}
    assert seen == [{"command": "show"}]


def test_answers_many_requests_in_turn(tmp_path: Path) -> None:
    with serving(tmp_path / "t.sock") as loop:
        for number in range(50):
            assert query(tmp_path / "t.sock", {"n": number}) == {"echo": {"n": number}}
        wait_until(lambda: loop.server.connection_count == 0, "every connection to be closed")


def test_large_answer_arrives_whole(tmp_path: Path) -> None:
    """1000 peers is more than a socket buffer holds: the answer must go out in pieces."""
    status = {"peers": [{"public_key": f"{n:043d}=", "endpoint": f"[2001:db8::{n:x}]:51820",
                         "allowed_ips": [f"203.0.113.{n % 250}/32"] * 16, "rx_bytes": n * 1000}
                        for n in range(1000)]}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        send_buffer = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert len(json.dumps(status)) > send_buffer  # no single send() can take it
    with serving(tmp_path / "t.sock", lambda request: status):
        assert query(tmp_path / "t.sock", {"command": "show"}) == status


def test_slow_reader_does_not_block_other_clients(tmp_path: Path) -> None:
    """A client that asks for a large answer and never reads it must not stall the loop."""
    big = {"blob": "x" * (8 * 1024 * 1024)}
    path = tmp_path / "t.sock"
    with serving(path, lambda request: big if request.get("big") else {"ok": True}):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
            stalled.connect(str(path))
            stalled.sendall(b'{"big": true}\n')
            started = time.monotonic()
            assert query(path, {"small": True}, timeout=2.0) == {"ok": True}
            assert time.monotonic() - started < 2.0


def test_unterminated_request_is_answered_at_end_of_input(tmp_path: Path) -> None:
    with serving(tmp_path / "t.sock"):
        answer = raw_exchange(tmp_path / "t.sock", b'{"command": "show"}', half_close=True)
    assert json.loads(answer) == {"echo": {"command": "show"}}


def test_request_up_to_the_limit_is_accepted(tmp_path: Path) -> None:
    request = {"pad": "p" * (MAX_REQUEST - 20)}
    assert len(json.dumps(request, separators=(",", ":"))) < MAX_REQUEST
    with serving(tmp_path / "t.sock"):
        assert query(tmp_path / "t.sock", request) == {"echo": request}


# --- bad input becomes an error answer, never a dead daemon ----------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"not json\n", "not a JSON line"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b'"show"\n', "expected a JSON object"),
        (b'{"command": "\xff\xfe"}\n', "not a JSON line"),
        (b"[" * 60000 + b"\n", "not a JSON line"),  # nesting deep enough to exhaust the recursion limit
        (b"\n", "not a JSON line"),
    ],
)
def test_bad_request_line_gets_error_answer(tmp_path: Path, line: bytes, expected: str) -> None:
    path = tmp_path / "t.sock"
    with serving(path):
        answer = json.loads(raw_exchange(path, line))
        assert expected in answer["error"]
        assert query(path, {"still": "alive"}) == {"echo": {"still": "alive"}}


def test_request_longer_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    handled = []
    with serving(path, lambda request: handled.append(request) or {}):
        answer = json.loads(raw_exchange(path, b"x" * (MAX_REQUEST + 1)))
        assert f"longer than {MAX_REQUEST}" in answer["error"]
        answer = json.loads(raw_exchange(path, b'{"a": "' + b"y" * MAX_REQUEST + b'"}\n'))
        assert f"longer than {MAX_REQUEST}" in answer["error"]
    assert handled == []


def test_query_reads_the_refusal_of_a_request_too_long(tmp_path: Path) -> None:
    """The daemon answers and closes while the client is still sending: the answer must not be lost."""
    path = tmp_path / "t.sock"
    with serving(path):
        with pytest.raises(DaemonError, match=f"longer than {MAX_REQUEST}"):
            query(path, {"pad": "z" * (8 * 1024 * 1024)})


def test_handler_exception_becomes_error_and_daemon_goes_on(tmp_path: Path) -> None:
    def handler(request: dict) -> dict:
        if request.get("command") == "explode":
            raise RuntimeError("boom\nsecond line")
        return {"fine": True}

    path = tmp_path / "t.sock"
    with serving(path, handler):
        with pytest.raises(DaemonError) as caught:
            query(path, {"command": "explode"})
        assert "RuntimeError: boom second line" in str(caught.value)
        assert "\n" not in str(caught.value)
        assert query(path, {"command": "show"}) == {"fine": True}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [(["a", "list"], "answered list, not an object"), ({"key": object()}, "not serialisable")],
)
def test_unusable_handler_answer_becomes_error(tmp_path: Path, answer: object, expected: str) -> None:
    path = tmp_path / "t.sock"
    with serving(path, lambda request: answer):
        with pytest.raises(DaemonError, match=expected):
            query(path, {})


# --- bounds ---------------------------------------------------------------------------------


def test_connections_beyond_the_limit_are_told_busy(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    with serving(path) as loop:
        idle = []
        try:
            for _ in range(MAX_CONNECTIONS):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
                idle.append(sock)
            wait_until(lambda: loop.server.connection_count == MAX_CONNECTIONS, "the idle connections")
            with pytest.raises(DaemonError, match="too many control connections"):
                query(path, {})
            assert loop.server.connection_count == MAX_CONNECTIONS
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: loop.server.connection_count == 0, "the closed connections to be noticed")
        assert query(path, {"n": 1}) == {"echo": {"n": 1}}


def pump(selector: selectors.BaseSelector, server: ControlServer, until: Callable[[], bool]) -> None:
    """Drive the server by hand, as the daemon's loop does, until a condition holds."""
    deadline = time.monotonic() + DEADLINE
    while not until():
        assert time.monotonic() < deadline, "the server made no progress"
        for key, mask in selector.select(0.05):
            assert server.owns(key)
            server.handle(key, mask)


def test_idle_connection_expires(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "t.sock", echo)
    selector = selectors.DefaultSelector()
    server.register(selector)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "t.sock"))
            client.sendall(b'{"half": ')
            pump(selector, server, lambda: server.connection_count == 1)
            pump(selector, server, lambda: not selector.select(0.05))  # the partial request is read
            server.expire(time.monotonic() + IDLE_TIMEOUT - 1)
            assert server.connection_count == 1
            server.expire(time.monotonic() + IDLE_TIMEOUT + 1)
            assert server.connection_count == 0
            client.settimeout(DEADLINE)
            assert client.recv(100) == b""  # closed by the server, no answer
            assert len(selector.get_map()) == 1  # only the listener remains registered
    finally:
        server.close()
        selector.close()


def test_idle_connections_make_room_for_a_new_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even if the daemon's loop never calls expire(), idle clients cannot lock the socket for good."""
    monkeypatch.setattr(controlsocket, "IDLE_TIMEOUT", 0.2)
    path = tmp_path / "t.sock"
    server = ControlServer(path, echo)
    selector = selectors.DefaultSelector()
    server.register(selector)
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            idle[-1].connect(str(path))
        pump(selector, server, lambda: server.connection_count == MAX_CONNECTIONS)
        went_idle = time.monotonic()
        wait_until(lambda: time.monotonic() - went_idle > 0.3, "the idle timeout to pass")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as newcomer:
            newcomer.connect(str(path))
            newcomer.sendall(b'{"n": 17}\n')
            newcomer.setblocking(False)
            answer = bytearray()

            def answered() -> bool:
                try:
                    answer.extend(newcomer.recv(65536))
                except BlockingIOError:
                    pass
                return answer.endswith(b"\n")

            pump(selector, server, answered)
        assert json.loads(answer) == {"echo": {"n": 17}}
        for sock in idle:
            sock.settimeout(DEADLINE)
            assert sock.recv(100) == b""  # evicted without an answer
    finally:
        for sock in idle:
            sock.close()
        server.close()
        selector.close()


def test_owns_only_its_own_keys(tmp_path: Path) -> None:
    first = ControlServer(tmp_path / "a.sock", echo)
    second = ControlServer(tmp_path / "b.sock", echo)
    selector = selectors.DefaultSelector()
    other_r, other_w = os.pipe()
    try:
        first.register(selector)
        second.register(selector)
        selector.register(other_r, selectors.EVENT_READ, "tun")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(tmp_path / "a.sock"))
            pump(selector, first, lambda: first.connection_count == 1)
            owners = {}
            for key in selector.get_map().values():
                owners[key.fileobj if isinstance(key.fileobj, int) else key.fileobj.fileno()] = (
                    first.owns(key), second.owns(key))
        assert sorted(owners.values()) == [(False, False), (False, True), (True, False), (True, False)]
        assert owners[other_r] == (False, False)
    finally:
        first.close()
        second.close()
        selector.close()
        os.close(other_r)
        os.close(other_w)


# --- the socket file --------------------------------------------------------------------------


def test_socket_is_0600_in_a_new_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    run_dir = tmp_path / "run" / "tunvpn"
    old_umask = os.umask(0)
    try:
        server = ControlServer(run_dir / "office.sock", echo)
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
        mode = os.lstat(run_dir / "office.sock").st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        server.close()


def test_existing_directory_is_left_as_it_is(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.chmod(run_dir, 0o755)  # e.g. made by systemd's RuntimeDirectory=
    server = ControlServer(run_dir / "x.sock", echo)
    server.close()
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o755


def test_close_removes_the_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    with serving(path):
        assert path.exists()
    assert not path.exists()
    with pytest.raises(ControlSocketError, match="no daemon is running"):
        query(path, {})


def test_close_leaves_a_successors_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    first = ControlServer(path, echo)
    os.unlink(path)  # e.g. an admin cleaned up, and a new daemon started
    with serving(path, lambda request: {"who": "second"}):
        first.close()
        assert path.exists()
        assert query(path, {}) == {"who": "second"}


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    stale_socket(path)
    with pytest.raises(ControlSocketError, match="no daemon is running"):
        query(path, {})
    with serving(path):
        assert query(path, {"n": 2}) == {"echo": {"n": 2}}


def test_live_daemons_socket_is_not_stolen(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    with serving(path, lambda request: {"who": "first"}):
        inode = os.lstat(path).st_ino
        with pytest.raises(ControlSocketError, match="already running") as caught:
            ControlServer(path, echo)
        assert str(path) in str(caught.value)
        assert os.lstat(path).st_ino == inode
        assert query(path, {}) == {"who": "first"}


def test_live_but_busy_daemon_is_not_stolen(tmp_path: Path) -> None:
    """A daemon whose loop is stuck (backlog full, nobody accepting) is still alive."""
    path = tmp_path / "t.sock"
    first = ControlServer(path, echo)  # never registered: nothing accepts
    queued = []
    try:
        for _ in range(MAX_CONNECTIONS + 8):  # beyond the backlog
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            if sock.connect_ex(str(path)) != 0:
                sock.close()
                break
            queued.append(sock)
        with pytest.raises(ControlSocketError, match="already running"):
            ControlServer(path, echo)
    finally:
        for sock in queued:
            sock.close()
        first.close()


def test_non_socket_file_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    path.write_text("precious")
    with pytest.raises(ControlSocketError, match="not a socket"):
        ControlServer(path, echo)
    assert path.read_text() == "precious"


def test_too_long_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlSocketError, match="too long"):
        ControlServer(tmp_path / ("n" * 120 + ".sock"), echo)


def test_default_socket_path() -> None:
    assert default_socket_path("office") == "/run/tunvpn/office.sock"
    assert default_socket_path("lab", "/tmp/x") == "/tmp/x/lab.sock"


# --- client errors ------------------------------------------------------------------------------


def test_query_without_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlSocketError) as caught:
        query(tmp_path / "missing.sock", {})
    assert str(caught.value) == f"no daemon is running on {tmp_path / 'missing.sock'}"


def test_query_times_out_on_a_silent_daemon(tmp_path: Path) -> None:
    path = tmp_path / "t.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)  # accepted by the kernel, never answered
        started = time.monotonic()
        with pytest.raises(ControlSocketError, match=r"no answer on .* within 0.3 s"):
            query(path, {}, timeout=0.3)
        assert 0.25 < time.monotonic() - started < 3.0


@contextmanager
def canned_daemon(path: Path, answer: bytes) -> Iterator[list[bytes]]:
    """A one-shot fake daemon that answers whatever it is asked with fixed bytes."""
    requests: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(DEADLINE)

    def serve_once() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(DEADLINE)
            requests.append(conn.recv(65536))
            conn.sendall(answer)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        thread.join(DEADLINE)
        listener.close()


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"", "closed the connection without answering"),
        (b'{"partial": ', "not one complete line"),
        (b"hello\n", "not JSON"),
        (b"[1]\n", "not a JSON object"),
        (b'{"a": 1}\n{"b": 2}\n', "not one complete line"),
    ],
)
def test_query_rejects_bad_answers(tmp_path: Path, answer: bytes, expected: str) -> None:
    path = tmp_path / "t.sock"
    with canned_daemon(path, answer) as requests:
        with pytest.raises(ControlSocketError, match=expected) as caught:
            query(path, {"command": "show"})
    assert requests == [b'{"command":"show"}\n']
    assert f"bad answer from {path}" in str(caught.value)
    assert not isinstance(caught.value, DaemonError)


@pytest.mark.root
def test_socket_refuses_other_users(tmp_path: Path) -> None:
    """The 0600 mode alone keeps non-root users out, even in a directory anyone may enter."""
    open_dir = Path(tempfile.mkdtemp(prefix="tunvpn-ctl-", dir="/tmp"))
    try:
        os.chmod(open_dir, 0o755)
        path = open_dir / "t.sock"
        with serving(path):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: become nobody and try
                try:
                    os.close(read_end)
                    os.setgid(65534)
                    os.setuid(65534)
                    try:
                        query(path, {}, timeout=2.0)
                        message = "answered"
                    except ControlSocketError as exc:
                        message = str(exc)
                    os.write(write_end, message.encode())
                finally:
                    os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as reader:
                message = reader.read().decode()
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert message == f"permission denied on {path} (the control socket is root-only)"
            assert query(path, {}) == {"echo": {}}  # root still gets in
    finally:
        shutil.rmtree(open_dir)
