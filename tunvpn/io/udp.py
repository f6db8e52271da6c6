"""UDP sockets for the underlay: IPv4 and IPv6 sockets sharing a port.

Sockets per family instead of one dual-stack socket keep IPv4 peers' addresses as
plain (host, port) tuples, so an endpoint from the config and the source of
a datagram compare equal.  A server's port is a group of sockets per family, one
receive queue per group of source addresses (sourcequeues.py).  Sends never raise for one bad datagram: the
network refusing a packet is counted, not fatal.

Where the kernel offers them (Linux 4.18 and 5.0 on), UDP segmentation offload sends a run
of equal-sized datagrams to one address in one system call (UDP_SEGMENT), and receive
offload hands over a train of them from one source in one call (UDP_GRO): the kernel's cost
is per call, not per datagram, and what it costs is most of a userspace VPN's budget.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
from collections import Counter
from typing import Sequence

from .sourcequeues import RECEIVE_QUEUES, attach, steering_program

log = logging.getLogger(__name__)

SOCKET_BUFFER = 4 * 1024 * 1024
# Each of a group's receive queues: a flood from many sources fills all of them, so the
# group's total stays at twice a single socket's instead of RECEIVE_QUEUES times.
QUEUE_BUFFER = 2 * SOCKET_BUFFER // RECEIVE_QUEUES
# Linux values; the socket module names them only from Python 3.12 on.
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
MAX_DATAGRAM = 65535
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h; the socket module names neither
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS on kernels before 6.9 (128 after)
GSO_MAX_BYTES = 65000  # a little under the 64 KiB of one IP packet's payload, headers included
_GRO_CONTROL_SPACE = socket.CMSG_SPACE(4)  # the segment size, an int
_EPHEMERAL_BIND_ATTEMPTS = 16
_TRANSIENT_SEND_ERRORS = {errno.EAGAIN, errno.ENOBUFS, errno.ENETUNREACH, errno.EHOSTUNREACH,
                          errno.EPERM, errno.EACCES, errno.EADDRNOTAVAIL, errno.EMSGSIZE,
                          errno.ECONNREFUSED, errno.EINVAL, errno.ENETDOWN, errno.EHOSTDOWN}


class UdpError(Exception):
    """The sockets could not be set up (port in use, no address family)."""


def _grow_buffers(sock: socket.socket, receive: int, send: int | None) -> None:
    """Bigger kernel buffers absorb bursts between loop iterations; FORCE works as root."""
    for force, normal, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, receive), (SO_SNDBUFFORCE, socket.SO_SNDBUF, send)):
        if size is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, normal, size)


def _offers(sock: socket.socket, option: int, value: int) -> bool:
    """Probe an offload: kernels without it refuse the option (ENOPROTOOPT)."""
    try:
        sock.setsockopt(SOL_UDP, option, value)
    except OSError:
        return False
    return True


def _open(family: int, port: int, fwmark: int | None, *, queue_of_group: int | None = None) -> socket.socket:
    """One socket; `queue_of_group` makes it that queue of a reuseport group (the first,
    queue 0, is also the one the family sends from)."""
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if fwmark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        if queue_of_group is None:
            _grow_buffers(sock, SOCKET_BUFFER, SOCKET_BUFFER)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _grow_buffers(sock, QUEUE_BUFFER, SOCKET_BUFFER if queue_of_group == 0 else None)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _claim(family: int, port: int) -> None:
    """Bind the port once without SO_REUSEPORT, and let go: it fails, as a plain bind always
    did, while anything holds the port, and so keeps us from joining another's group."""
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))


# Errors that say the port or the family cannot be had at all: no fallback helps.
_BIND_ERRORS = {errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}


def _open_queues(family: int, port: int, fwmark: int | None) -> list[socket.socket]:
    """The listening port as one socket per source-address queue (see sourcequeues.py), or
    as one socket where the kernel cannot make or steer such a group."""
    _claim(family, port)
    group: list[socket.socket] = []
    try:
        for queue in range(RECEIVE_QUEUES):
            group.append(_open(family, port, fwmark, queue_of_group=queue))
        attach(group[0], steering_program(family, RECEIVE_QUEUES))
    except OSError as exc:
        _close_all(group)
        if exc.errno in _BIND_ERRORS:
            raise
        log.warning("receive queues per source address unavailable (%s); one socket for port %d",
                    exc.strerror, port)
        return [_open(family, port, fwmark)]
    except BaseException:
        _close_all(group)
        raise
    return group


def _close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


class UdpTransport:
    def __init__(self, port: int | None, fwmark: int | None = None, *, gso: bool = True, gro: bool = True) -> None:
        """`gso` and `gro` allow the offloads; each is used only if the kernel has it."""
        self.errors: Counter[str] = Counter()
        self._v4: socket.socket | None = None  # each family's sending socket
        self._v6: socket.socket | None = None
        self.sockets: list[socket.socket] = []  # all, each family's first its sending one
        attempts = 1 if port else _EPHEMERAL_BIND_ATTEMPTS
        for _ in range(attempts):
            try:
                self._bind_both(port or 0, fwmark)
                break
            except OSError as exc:
                self.close()
                if port or exc.errno != errno.EADDRINUSE:
                    raise UdpError(f"cannot bind UDP port {port or '(ephemeral)'}: {exc.strerror}") from exc
        else:
            raise UdpError("no ephemeral UDP port free on both IPv4 and IPv6")
        self._gso = {sock for sock in self.sockets if gso and _offers(sock, UDP_SEGMENT, 0)}
        self._gro = {sock for sock in self.sockets if gro and _offers(sock, UDP_GRO, 1)}
        self._segment_controls: dict[int, list[tuple[int, int, bytes]]] = {}

    @property
    def offloads(self) -> list[str]:
        """The offloads in use, for the log and `tunvpn show`."""
        return [name for name, socks in (("gso", self._gso), ("gro", self._gro)) if socks]

    @property
    def receive_queues(self) -> int:
        """Sockets per address family: one per group of source addresses, or 1."""
        return sum(1 for sock in self.sockets if sock.family == socket.AF_INET)

    def _bind_both(self, port: int, fwmark: int | None) -> None:
        """A fixed port (a server's) gets a receive queue per group of sources; an ephemeral
        one (a client's, which talks to one server) a single socket."""
        queued = bool(port)

        def open_family(family: int, port: int) -> list[socket.socket]:
            return _open_queues(family, port, fwmark) if queued else [_open(family, port, fwmark)]

        v4 = open_family(socket.AF_INET, port)
        self.sockets.extend(v4)
        self._v4 = v4[0]
        self.port = self._v4.getsockname()[1]
        try:
            v6 = open_family(socket.AF_INET6, self.port)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            log.warning("IPv6 unavailable (%s); listening on IPv4 only", exc.strerror)
            return
        self.sockets.extend(v6)
        self._v6 = v6[0]

    def set_fwmark(self, mark: int) -> None:
        """Mark our own datagrams so policy routing can keep them out of a full tunnel."""
        for sock in self.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    def receive_batch(self, sock: socket.socket, max_datagrams: int = 256) -> list[tuple[bytes, tuple]]:
        """Drain one socket until it would block (or about `max_datagrams`, to stay fair to the tun).

        recvfrom allocates each datagram at its exact size.  Receiving into slots of one
        preallocated buffer and handing the core views was measured no faster here (~5 us per
        datagram either way, decrypt included), and Debian bookworm's cryptography 38 only
        decrypts bytes, so the plain call stays.  With UDP_GRO one call may return a train of
        datagrams from one source, all of the announced size but the last.
        """
        if sock in self._gro:
            return self._receive_trains(sock, max_datagrams)
        batch = []
        recvfrom = sock.recvfrom
        for _ in range(max_datagrams):
            try:
                batch.append(recvfrom(MAX_DATAGRAM))
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. ICMP errors reported on the socket: not fatal
                self._count(exc)
        return batch

    def _receive_trains(self, sock: socket.socket, max_datagrams: int) -> list[tuple[bytes, tuple]]:
        batch: list[tuple[bytes, tuple]] = []
        recvmsg = sock.recvmsg
        for _ in range(max_datagrams):
            try:
                data, control, _flags, source = recvmsg(MAX_DATAGRAM, _GRO_CONTROL_SPACE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._count(exc)
                continue
            size = int.from_bytes(control[0][2], sys.byteorder) if control else 0
            if 0 < size < len(data):
                batch.extend((data[start:start + size], source) for start in range(0, len(data), size))
            else:
                batch.append((data, source))
            if len(batch) >= max_datagrams:
                break
        return batch

    def send(self, datagrams: Sequence[tuple[bytes, tuple]]) -> None:
        """Send in order; runs of equal-sized datagrams to one address go as one GSO send."""
        v4, v6 = self._v4, self._v6
        gso = self._gso
        index, count = 0, len(datagrams)
        while index < count:
            data, address = datagrams[index]
            sock = v4 if len(address) == 2 else v6
            if sock is None:
                self.errors["no_socket_for_family"] += 1
                index += 1
                continue
            end = _run_end(datagrams, index) if sock in gso else index + 1
            if end - index == 1:
                self._send_one(sock, data, address)
            else:
                self._send_run(sock, datagrams, index, end)
            index = end

    def _send_one(self, sock: socket.socket, data: bytes, address: tuple) -> None:
        try:
            sock.sendto(data, address)
        except OSError as exc:
            if exc.errno not in _TRANSIENT_SEND_ERRORS:
                raise
            self._count(exc)

    def _send_run(self, sock: socket.socket, datagrams: Sequence[tuple[bytes, tuple]], start: int, end: int) -> None:
        size = len(datagrams[start][0])
        control = self._segment_controls.get(size)
        if control is None:
            control = self._segment_controls[size] = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        try:
            sock.sendmsg([data for data, _ in datagrams[start:end]], control, 0, datagrams[start][1])
            return
        except OSError as exc:
            if exc.errno not in _TRANSIENT_SEND_ERRORS and exc.errno != errno.EIO:
                raise
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                self.errors[errno.errorcode[exc.errno]] += end - start
                return
            if exc.errno == errno.EIO:  # the route's device cannot checksum segments for us
                log.info("UDP segmentation offload refused on this route (EIO); sending datagrams one by one")
                self._gso.discard(sock)
        for data, address in datagrams[start:end]:  # e.g. EMSGSIZE: a segment over the route's MTU
            self._send_one(sock, data, address)

    def _count(self, exc: OSError) -> None:
        self.errors[errno.errorcode.get(exc.errno, str(exc.errno))] += 1

    def close(self) -> None:
        _close_all(self.sockets)
        self.sockets = []
        self._v4 = self._v6 = None


def _run_end(datagrams: Sequence[tuple[bytes, tuple]], start: int) -> int:
    """Where a run of datagrams one GSO send can carry ends: one address, one size (the last
    may be shorter), within the kernel's limits of segments and bytes."""
    first, address = datagrams[start]
    size = len(first)
    total = size
    end = start + 1
    limit = min(len(datagrams), start + GSO_MAX_SEGMENTS)
    while end < limit:
        data, to = datagrams[end]
        length = len(data)
        if length > size or total + length > GSO_MAX_BYTES or (to is not address and to != address):
            break
        total += length
        end += 1
        if length < size:
            break
    return end
