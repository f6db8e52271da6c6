"""Sliding-window replay protection (RFC 6479 bitmap, as wireguard-go sizes it).

A ring of 128 blocks of 64 bits; the block the newest counter falls in is
never fully usable, so the window is 127 * 64 = 8128 counters.  Call
`accept` only after the AEAD tag verified: an attacker must not be able to
move the window with forged packets.
"""

from __future__ import annotations

BLOCK_BITS = 64
RING_BLOCKS = 128
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 8128
_RING_MASK = RING_BLOCKS - 1
_BIT_MASK = BLOCK_BITS - 1


class ReplayWindow:
    __slots__ = ("_greatest", "_ring")

    def __init__(self) -> None:
        self._greatest = 0
        self._ring = [0] * RING_BLOCKS

    def digest(self) -> tuple:
        return (self._greatest, tuple(self._ring))

    def accept(self, counter: int, limit: int) -> bool:
        """True if `counter` is below `limit` and new; records it as seen."""
        greatest = self._greatest
        if counter > greatest:  # the common case, a packet in order: its bit cannot be set yet
            if counter >= limit:
                return False
            block = counter >> 6
            if block != greatest >> 6:
                self._clear_blocks_after(greatest >> 6, block)
            self._greatest = counter
            self._ring[block & _RING_MASK] |= 1 << (counter & _BIT_MASK)
            return True
        if counter >= limit or greatest - counter > WINDOW_SIZE:
            return False
        ring = self._ring
        index = (counter >> 6) & _RING_MASK
        bit = 1 << (counter & _BIT_MASK)
        word = ring[index]
        if word & bit:
            return False
        ring[index] = word | bit
        return True

    def _clear_blocks_after(self, current: int, block: int) -> None:
        """The window moves up to `block`: the blocks it enters held counters a ring ago."""
        ring = self._ring
        for step in range(1, min(block - current, RING_BLOCKS) + 1):
            ring[(current + step) & _RING_MASK] = 0
