"""sd_notify(3) without libsystemd: one datagram per notification to $NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op, so the daemons call it
unconditionally.  A notification that cannot be sent is counted and otherwise ignored: losing a
STATUS= line must never take the VPN down.  Sends never block (MSG_DONTWAIT): a stuck
service manager must not stall the data path.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import Mapping

log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*\Z")


def _socket_address(value: str) -> str | None:
    """A file system path, or "@name" for the abstract namespace; anything else (vsock:...) is unsupported."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _watchdog_seconds(environ: Mapping[str, str]) -> float | None:
    """WATCHDOG_USEC, if it is meant for this process (WATCHDOG_PID, when set, names it)."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Notifier:
    """Talks to the service manager; `address` None means there is none and nothing is sent."""

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address
        self._watchdog_seconds = watchdog_seconds if address is not None else None
        self._socket: socket.socket | None = None
        self.send_errors = 0
        self.last_error: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        value = environ.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        address = _socket_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%s is not a socket path or @name; systemd notifications are off", value)
            return cls(None)
        return cls(address, _watchdog_seconds(environ))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects WATCHDOG=1 (send at half of it), or None if it expects none."""
        return self._watchdog_seconds

    def notify(self, **fields: object) -> bool:
        """Send NAME=value lines, e.g. notify(READY=1, STATUS="up"); True if the datagram went out."""
        if self.address is None:
            return False
        for name in fields:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"not an sd_notify field name: {name!r}")
        # A newline inside a value would start a new field: fold it into a space.
        message = "".join(f"{name}={' '.join(str(value).splitlines())}\n" for name, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode("utf-8"), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError as exc:
            self.send_errors += 1
            self.last_error = exc.strerror or str(exc)
            if self.send_errors == 1:  # once, so a gone manager does not flood the log
                log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), self.last_error)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def stopping(self) -> bool:
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
