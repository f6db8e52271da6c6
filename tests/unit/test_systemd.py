"""sd_notify: what systemd receives on a real datagram socket, and that failures never escape."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tunvpn.io.systemd import Notifier

DEADLINE = 5.0


@pytest.fixture
def manager_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """Plays the service manager: a datagram socket at a path, as systemd creates it."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(DEADLINE)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_manager_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"tunvpn-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(DEADLINE)
    yield sock, "@" + name
    sock.close()


def notifier_for(address: str, **environ: str) -> Notifier:
    return Notifier.from_environment({"NOTIFY_SOCKET": address, **environ})


def test_every_notification_arrives_as_systemd_expects(manager_socket: tuple[socket.socket, str]) -> None:
    sock, path = manager_socket
    notifier = notifier_for(path)
    try:
        assert notifier.enabled
        assert notifier.ready("server office up: 3 peers")
        assert sock.recv(4096) == b"READY=1\nSTATUS=server office up: 3 peers\n"
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1\n"
        assert notifier.status("2 of 3 peers connected")
        assert sock.recv(4096) == b"STATUS=2 of 3 peers connected\n"
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1\n"
        assert notifier.stopping()
        assert sock.recv(4096) == b"STOPPING=1\n"
        assert notifier.notify(RELOADING=1, STATUS="reloading", MONOTONIC_USEC=12345)
        assert sock.recv(4096) == b"RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC=12345\n"
        assert notifier.send_errors == 0
    finally:
        notifier.close()


def test_abstract_socket_address(abstract_manager_socket: tuple[socket.socket, str]) -> None:
    sock, address = abstract_manager_socket
    notifier = notifier_for(address)
    try:
        assert notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"
    finally:
        notifier.close()


def test_newline_in_a_value_cannot_forge_a_field(manager_socket: tuple[socket.socket, str]) -> None:
    sock, path = manager_socket
    notifier = notifier_for(path)
    try:
        assert notifier.status("peer name\nREADY=1\r\nx")
        assert sock.recv(4096) == b"STATUS=peer name READY=1 x\n"
    finally:
        notifier.close()


@pytest.mark.parametrize("name", ["ready", "STATUS=", "1READY", "", "STÄTUS"])
def test_field_names_are_checked(manager_socket: tuple[socket.socket, str], name: str) -> None:
    notifier = notifier_for(manager_socket[1])
    try:
        with pytest.raises(ValueError, match="sd_notify field name"):
            notifier.notify(**{name: 1})
    finally:
        notifier.close()


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.notify(FOO=1) is False
    assert notifier.watchdog_interval() is None
    assert notifier.send_errors == 0
    assert notifier._socket is None  # not even a file descriptor spent
    notifier.close()


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unsupported_addresses_turn_notifications_off(value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tunvpn.io.systemd"):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": value})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert "systemd notifications are off" in caplog.text


def test_reads_the_process_environment(manager_socket: tuple[socket.socket, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = manager_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    notifier = Notifier.from_environment()
    try:
        assert notifier.watchdog_interval() == 4.0
        assert notifier.watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1\n"
    finally:
        notifier.close()


def test_send_errors_are_swallowed_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = notifier_for(str(tmp_path / "gone"))
    try:
        with caplog.at_level(logging.WARNING, logger="tunvpn.io.systemd"):
            assert notifier.ready() is False
            assert notifier.status("x") is False
            assert notifier.watchdog() is False
        assert notifier.send_errors == 3
        assert notifier.last_error
        warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        notifier.close()


def test_a_manager_that_does_not_read_never_blocks_the_daemon(manager_socket: tuple[socket.socket, str]) -> None:
    """The receive queue fills up (net.unix.max_dgram_qlen); sends must fail at once, not wait."""
    sock, path = manager_socket
    notifier = notifier_for(path)
    try:
        started = time.monotonic()
        results = [notifier.status(f"update {n}") for n in range(2000)]
        elapsed = time.monotonic() - started
        assert results[0] is True
        assert False in results
        assert notifier.send_errors == results.count(False)
        assert elapsed < DEADLINE
        assert sock.recv(4096) == b"STATUS=update 0\n"  # what got through is intact
    finally:
        notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "SELF"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "OTHER"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nonsense"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(manager_socket: tuple[socket.socket, str], environ: dict[str, str],
                           expected: float | None) -> None:
    pids = {"SELF": str(os.getpid()), "OTHER": str(os.getpid() + 1)}
    environ = {key: pids.get(value, value) for key, value in environ.items()}
    notifier = notifier_for(manager_socket[1], **environ)
    assert notifier.watchdog_interval() == expected
