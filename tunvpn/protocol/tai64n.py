"""TAI64N timestamps: the initiator's proof that an initiation is fresh.

The responder keeps the greatest timestamp it accepted per peer and refuses
any initiation not greater, so replayed initiations die.  Nanoseconds are
rounded down to 2**24 ns (about 17 ms) so that the timestamp leaks less
about the sender's clock, as wireguard-go does.
"""

from __future__ import annotations

import struct

TAI64N_SIZE = 12
_TAI64_EPOCH = 2**62 + 10  # TAI64 label of 1970-01-01, plus the 10 s TAI-UTC offset of 1970
_WHITENER_MASK = 2**24 - 1
_PACK = struct.Struct(">QI")


def timestamp(wall_seconds: float) -> bytes:
    """The 12-byte big-endian TAI64N label for a Unix time given in seconds."""
    whole = int(wall_seconds // 1)
    nanos = int((wall_seconds - whole) * 1e9) & ~_WHITENER_MASK
    return _PACK.pack(_TAI64_EPOCH + whole, min(nanos, 999_999_999))


def is_after(candidate: bytes, previous: bytes | None) -> bool:
    """Big-endian fixed width, so byte order is time order."""
    return previous is None or candidate > previous
