"""Anti-replay window, sized and behaving as wireguard-go's (RFC 6479 ring; PROTOCOL.md: Replay window)."""

from __future__ import annotations

BLOCK_BITS = 64
RING_BLOCKS = 128
WINDOW_SIZE = (RING_BLOCKS - 1) * BLOCK_BITS  # 8128 counters
_BLOCK_MASK = RING_BLOCKS - 1
_BIT_MASK = BLOCK_BITS - 1
_LOG_BLOCK_BITS = 6


class ReplayWindow:
    """Accepts each counter below `limit` at most once, and nothing older than the window allows."""

    __slots__ = ("_last", "_ring")

    def __init__(self) -> None:
        self._last = 0
        self._ring = [0] * RING_BLOCKS

    def reset(self) -> None:
        self._last = 0
        self._ring = [0] * RING_BLOCKS

    def validate(self, counter: int, limit: int) -> bool:
        """Mark `counter` as seen; False when it is replayed, too old, or not below `limit`."""
        if counter >= limit:
            return False
        index_block = counter >> _LOG_BLOCK_BITS
        ring = self._ring
        if counter > self._last:
            current = self._last >> _LOG_BLOCK_BITS
            if index_block != current:  # most packets stay in the current block: nothing to clear
                diff = min(index_block - current, RING_BLOCKS)  # beyond the ring: clear all of it
                for i in range(current + 1, current + diff + 1):
                    ring[i & _BLOCK_MASK] = 0
            self._last = counter
        elif self._last - counter > WINDOW_SIZE:
            return False
        slot = index_block & _BLOCK_MASK
        bit = 1 << (counter & _BIT_MASK)
        old = ring[slot]
        ring[slot] = old | bit
        return old & bit == 0
