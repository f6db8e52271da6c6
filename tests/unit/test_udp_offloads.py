"""How UdpTransport batches for UDP GSO and splits GRO trains, with stand-in sockets (no root).

The real kernel round trip is in tests/netns/test_datapath_offloads.py.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys

import pytest

from tunvpn.io import udp
from tunvpn.io.udp import GSO_MAX_BYTES, GSO_MAX_SEGMENTS, SOL_UDP, UDP_GRO, UDP_SEGMENT, UdpTransport

A, B = ("192.0.2.2", 51820), ("192.0.2.3", 51820)


class StubSocket:
    """Records sends; plays back receives; can refuse GSO sends with an errno."""

    def __init__(self, received: list = (), refuse_gso: int | None = None) -> None:
        self.sent: list[tuple[list[bytes], int | None, tuple]] = []
        self.received = list(received)
        self.refuse_gso = refuse_gso

    def sendto(self, data: bytes, address: tuple) -> int:
        self.sent.append(([data], None, address))
        return len(data)

    def sendmsg(self, buffers: list, control: list, flags: int, address: tuple) -> int:
        ((level, option, value),) = control
        assert (level, option) == (SOL_UDP, UDP_SEGMENT)
        if self.refuse_gso is not None:
            raise OSError(self.refuse_gso, "refused")
        self.sent.append((list(buffers), struct.unpack("=H", value)[0], address))
        return sum(len(b) for b in buffers)

    def recvmsg(self, size: int, control_size: int):
        if not self.received:
            raise BlockingIOError
        data, segment, source = self.received.pop(0)
        control = [(SOL_UDP, UDP_GRO, segment.to_bytes(4, sys.byteorder))] if segment else []
        return data, control, 0, source


def transport(sock: StubSocket, gso: bool = True, gro: bool = True) -> UdpTransport:
    """A UdpTransport around one stub socket, skipping the real bind."""
    transport = UdpTransport.__new__(UdpTransport)
    transport.errors = udp.Counter()
    transport._v4, transport._v6 = sock, None
    transport.sockets = [sock]
    transport._gso = {sock} if gso else set()
    transport._gro = {sock} if gro else set()
    transport._segment_controls = {}
    return transport


def sends(sock: StubSocket) -> list[tuple[int, int | None, tuple]]:
    """(datagrams, segment size or None for a plain send, address) per system call."""
    return [(len(buffers), size, address) for buffers, size, address in sock.sent]


def test_equal_datagrams_to_one_address_go_in_one_send_and_a_shorter_one_ends_the_run():
    sock = StubSocket()
    datagrams = [(bytes(1452), A)] * 5 + [(bytes(100), A), (bytes(1452), A)]
    transport(sock).send(datagrams)
    assert sends(sock) == [(6, 1452, A), (1, None, A)]
    assert b"".join(b"".join(buffers) for buffers, _, _ in sock.sent) == b"".join(d for d, _ in datagrams)


def test_a_run_ends_at_another_address_a_larger_datagram_and_the_kernel_limits():
    sock = StubSocket()
    transport(sock).send([(bytes(500), A), (bytes(500), B), (bytes(500), B), (bytes(600), B), (bytes(600), B)])
    assert sends(sock) == [(1, None, A), (2, 500, B), (2, 600, B)]
    sock = StubSocket()
    transport(sock).send([(bytes(96), A)] * (GSO_MAX_SEGMENTS + 3))
    assert sends(sock) == [(GSO_MAX_SEGMENTS, 96, A), (3, 96, A)]
    sock = StubSocket()
    per_run = GSO_MAX_BYTES // 1452
    transport(sock).send([(bytes(1452), A)] * (per_run + 1))
    assert sends(sock) == [(per_run, 1452, A), (1, None, A)]


def test_without_gso_every_datagram_is_its_own_send():
    sock = StubSocket()
    transport(sock, gso=False).send([(bytes(1452), A)] * 3)
    assert sends(sock) == [(1, None, A)] * 3


@pytest.mark.parametrize("code", [errno.EIO, errno.EMSGSIZE, errno.EINVAL])
def test_a_refused_gso_send_is_sent_one_by_one_and_eio_turns_gso_off(code):
    sock = StubSocket(refuse_gso=code)
    transport_ = transport(sock)
    transport_.send([(bytes(1452), A)] * 3)
    assert sends(sock) == [(1, None, A)] * 3
    assert (sock in transport_._gso) is (code != errno.EIO)


def test_a_full_send_buffer_drops_and_counts_the_whole_run():
    sock = StubSocket(refuse_gso=errno.ENOBUFS)
    transport_ = transport(sock)
    transport_.send([(bytes(1452), A)] * 4)
    assert sock.sent == [] and transport_.errors == {"ENOBUFS": 4}


def test_a_gro_train_is_split_at_the_announced_size_with_a_shorter_last():
    train = bytes(range(200)) * 7 + b"tail"
    sock = StubSocket(received=[(train, 200, A), (b"single", 0, B)])
    batch = transport(sock).receive_batch(sock)
    assert [len(data) for data, _ in batch] == [200] * 7 + [4, 6]
    assert b"".join(data for data, _ in batch[:8]) == train
    assert [source for _, source in batch] == [A] * 8 + [B]


def test_a_receive_batch_stops_near_its_bound_and_leaves_the_rest_queued():
    sock = StubSocket(received=[(bytes(100 * 40), 100, A)] * 10)
    batch = transport(sock).receive_batch(sock, max_datagrams=100)
    assert len(batch) == 120 and len(sock.received) == 7


def test_the_steering_program_takes_only_a_power_of_two_of_queues() -> None:
    from tunvpn.io.sourcequeues import steering_program

    assert len(steering_program(socket.AF_INET, 8)) % 8 == 0
    with pytest.raises(ValueError, match="power of two"):
        steering_program(socket.AF_INET6, 6)
