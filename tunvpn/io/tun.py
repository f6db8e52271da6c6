"""A Linux tun device: raw IP packets in and out of a non-blocking file descriptor.

The device is opened with IFF_NO_PI, so every read returns exactly one IP packet.  The event
loop drains it in batches (docs/architecture.md): `read_batch` until EAGAIN, `write_batch` for
everything decrypted from one receive burst.  With `vnet_header` (the daemons' default) each
packet carries a virtio-net header, which lets `write_batch` hand the kernel a burst of one TCP
flow's segments as one GSO packet (coalesce.py).  No offload is enabled for reads, so the
kernel still segments and checksums what it hands us, and the read header is just skipped.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Iterable

from .coalesce import VNET_HEADER_SIZE, coalesce

DEFAULT_DEVICE_PATH = "/dev/net/tun"
MAX_PACKET_SIZE = 65535

_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, then the rest of the union

# The kernel refuses one packet, not the device: drop it and go on.  EIO is what a write gets
# while the link is administratively down; a daemon must survive `ip link set tun0 down`.
_DROPPABLE_WRITE_ERRORS = frozenset({errno.EAGAIN, errno.ENOBUFS, errno.EINVAL, errno.EIO})


class TunError(Exception):
    """A tun device could not be created or used; the message is one line meant for the user."""


class TunDeleted(TunError):
    """The device was deleted underneath the daemon: every later read and write fails too."""


def _check_name(name: str) -> bytes:
    """Reject names the kernel would reject, with a message that says why."""
    encoded = name.encode("utf-8")
    if not encoded:
        raise TunError("invalid tun device name '': a name is required")
    if len(encoded) >= _IFNAMSIZ:
        raise TunError(f"invalid tun device name {name!r}: at most {_IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise TunError(f"invalid tun device name {name!r}: no '/', ':' or whitespace, not '.' or '..'")
    return encoded


def _open_device_node(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            reason = "no such device node (is the tun module loaded, does the container expose /dev/net/tun?)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied (needs root or CAP_NET_ADMIN and access to the device node)"
        else:
            reason = exc.strerror or str(exc)
        raise TunError(f"cannot open {path}: {reason}") from exc


def _attach_failure(name: str, exc: OSError) -> str:
    if exc.errno == errno.EBUSY:
        return f"tun device {name!r} is busy: another process has it open"
    if exc.errno == errno.EPERM:
        return f"cannot create tun device {name!r}: operation not permitted (needs CAP_NET_ADMIN)"
    if exc.errno == errno.EINVAL:
        return (f"cannot create tun device {name!r}: invalid name, "
                f"or a device of that name exists and is not a tun device")
    return f"cannot create tun device {name!r}: {exc.strerror}"


def _attach(fd: int, name: str, encoded: bytes, flags: int) -> str:
    """TUNSETIFF: create (or attach to) the device; return the name the kernel chose."""
    request = _IFREQ.pack(encoded, flags)
    try:
        reply = fcntl.ioctl(fd, _TUNSETIFF, request)
    except OSError as exc:
        raise TunError(_attach_failure(name, exc)) from exc
    actual, _flags = _IFREQ.unpack(reply)
    return actual.rstrip(b"\0").decode("utf-8", "replace")


class TunDevice:
    """One tun device owned by this process: it vanishes when the descriptor closes."""

    def __init__(self, name: str, *, device_path: str = DEFAULT_DEVICE_PATH, vnet_header: bool = False) -> None:
        encoded = _check_name(name)
        fd = _open_device_node(device_path)
        try:
            self.name = _attach(fd, name, encoded, _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_header else 0))
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self.vnet_header = vnet_header
        self.write_errors = 0

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"fd={self._fd}"
        return f"TunDevice({self.name!r}, {state})"

    def _require_fd(self) -> int:
        if self._fd is None:
            raise TunError(f"tun device {self.name!r} is closed")
        return self._fd

    def _failure(self, action: str, exc: OSError) -> TunError:
        if exc.errno == errno.EBADFD:
            return TunDeleted(f"cannot {action} tun device {self.name!r}: the device was deleted")
        return TunError(f"cannot {action} tun device {self.name!r}: {exc.strerror}")

    def fileno(self) -> int:
        return self._require_fd()

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        """Read queued packets until the kernel has none left or `max_packets` were read."""
        fd = self._require_fd()
        read = os.read
        packets: list[bytes] = []
        skip = VNET_HEADER_SIZE if self.vnet_header else 0
        while len(packets) < max_packets:
            try:
                packet = read(fd, MAX_PACKET_SIZE + skip)
            except BlockingIOError:
                break
            except OSError as exc:
                raise self._failure("read from", exc) from exc
            packets.append(packet[skip:] if skip else packet)
        return packets

    def write_batch(self, packets: Iterable[bytes]) -> int:
        """Write the packets, bursts of a TCP flow merged when the device has vnet headers;
        return how many packets the kernel took.

        A write the kernel refuses (queue full, not IPv4/IPv6, link down) is counted in
        `write_errors` and dropped, as a router drops a packet it cannot forward.
        """
        fd = self._require_fd()
        if self.vnet_header:
            vectors = coalesce(packets)
        else:
            vectors = [[packet] for packet in packets]
        writev = os.writev
        written = 0
        for vector in vectors:
            try:
                writev(fd, vector)
            except OSError as exc:
                if exc.errno not in _DROPPABLE_WRITE_ERRORS:
                    raise self._failure("write to", exc) from exc
                self.write_errors += 1
            else:
                written += _packets_in(vector)
        return written

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _packets_in(vector: list) -> int:
    """How many IP packets one write vector carries ([virtio header,] packet, or header, headers, payloads)."""
    return 1 if len(vector) <= 2 else len(vector) - 2
