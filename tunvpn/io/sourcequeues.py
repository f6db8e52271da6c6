"""One receive queue per group of source addresses, so one flooding host fills only its own.

A socket's receive buffer is a single FIFO: a host sending faster than the loop drains it
fills the buffer, and the kernel then drops everyone's datagrams alike, a new client's
initiation as likely as the flood's.  The listening port is therefore bound by several
sockets (SO_REUSEPORT), and a classic BPF program attached to the group
(SO_ATTACH_REUSEPORT_CBPF) picks each datagram's socket from its source address: an IPv4
address's four bytes folded together, or an IPv6 address's /64 prefix (the unit a host is
handed, and the one the cookie budget counts).  The loop drains the ready sockets in turn,
a bounded batch each, so a flood from one host costs others at most one batch's wait.

The choice is made in the kernel for a few instructions per datagram; no state, no
syscall.  Many spoofed sources spread a flood over all queues, as they would over one, and
then only the loop's speed counts, as before.
"""

from __future__ import annotations

import array
import socket
import struct

RECEIVE_QUEUES = 8  # a power of two: the program masks the folded address
SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h; the socket module does not name it
_SKF_NET_OFF = -0x100000  # loads relative to the network header (linux/filter.h)

# Classic BPF opcodes (linux/bpf_common.h), as the few this program needs.
_LD_W_ABS = 0x20
_TAX = 0x07
_RSH_K = 0x74
_XOR_X = 0xAC
_AND_K = 0x54
_RET_A = 0x16


def _instruction(code: int, k: int = 0) -> bytes:
    return struct.pack("=HBBI", code, 0, 0, k & 0xFFFFFFFF)


def steering_program(family: int, queues: int = RECEIVE_QUEUES) -> bytes:
    """The program: returns the index (in bind order) of the socket for a datagram."""
    if queues & (queues - 1) or queues < 1:
        raise ValueError(f"queues must be a power of two, not {queues}")
    if family == socket.AF_INET:
        load = [_instruction(_LD_W_ABS, _SKF_NET_OFF + 12)]  # the source address
    else:  # the /64 prefix of the source address: its first two words
        load = [_instruction(_LD_W_ABS, _SKF_NET_OFF + 8), _instruction(_TAX),
                _instruction(_LD_W_ABS, _SKF_NET_OFF + 12), _instruction(_XOR_X)]
    fold = [_instruction(_TAX), _instruction(_RSH_K, 16), _instruction(_XOR_X),
            _instruction(_TAX), _instruction(_RSH_K, 8), _instruction(_XOR_X)]
    return b"".join(load + fold + [_instruction(_AND_K, queues - 1), _instruction(_RET_A)])


def attach(sock: socket.socket, program: bytes) -> None:
    """Attach `program` to the reuseport group `sock` belongs to (the kernel copies it)."""
    code = array.array("B", program)
    address, _length = code.buffer_info()
    # struct sock_fprog {unsigned short len; struct sock_filter *filter;}, in native layout.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, struct.pack("@HP", len(program) // 8, address))

