"""A timer wheel for expiring table entries in O(due) rather than O(entries) (time passed in).

Entries go into one-second slots by the earliest time they can expire (so at most a second late, as
with the expiry scan once a second this replaces). The owner moves an entry when its deadline changes
kind (a flow closing, a flow first answered); a deadline pushed later by traffic (``last_seen``) is left
where it is, and when its slot comes due the owner looks at the real deadline and either removes the
entry or schedules it again. An active entry is so moved once per timeout, not once per packet, and a
poll touches only the entries of the slots that came due — never the whole table.

Each entry records its own slot (``slot``, -1 when not scheduled), so cancelling is O(1).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar


class Scheduled(Protocol):
    slot: int
    """The wheel slot the entry waits in; -1 when it waits in none (the wheel sets it)."""


T = TypeVar("T", bound=Scheduled)


class TimerWheel(Generic[T]):
    """Entries by the second their deadline falls in; ``due(now, limit)`` takes those whose slot came."""

    __slots__ = ("_behind", "_next", "_slots", "count")

    def __init__(self) -> None:
        self._slots: dict[int, dict[T, None]] = {}
        self._next: int | None = None
        """The first slot not yet taken by ``due`` (None before the first call)."""
        self._behind = False
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def schedule(self, entry: T, deadline: float) -> None:
        """Put ``entry`` into the slot of ``deadline`` (moving it from the slot it was in)."""
        slot = math.ceil(deadline)  # slot s holds deadlines in (s - 1, s]: due once now >= s
        if self._next is not None and slot < self._next:
            slot = self._next
        old = entry.slot
        if old == slot:
            return
        if old >= 0:
            bucket = self._slots[old]
            del bucket[entry]
            if not bucket:
                del self._slots[old]
        else:
            self.count += 1
        target = self._slots.get(slot)
        if target is None:
            target = self._slots[slot] = {}
        target[entry] = None
        entry.slot = slot

    def cancel(self, entry: T) -> None:
        """Take ``entry`` out of the wheel (no-op if it is in none)."""
        old = entry.slot
        if old < 0:
            return
        bucket = self._slots[old]
        del bucket[entry]
        if not bucket:
            del self._slots[old]
        entry.slot = -1
        self.count -= 1

    def due(self, now: float, limit: int | None = None) -> list[T]:
        """Take out (``slot`` set to -1) the entries of every slot that came due by ``now``, at most
        ``limit`` of them (the rest stay for the next call; ``behind`` tells)."""
        last = math.floor(now)
        start = self._next if self._next is not None else min(self._slots, default=last)
        out: list[T] = []
        for slot in self._due_slots(start, last):
            bucket = self._slots.get(slot)
            if bucket is not None:
                while bucket:
                    if limit is not None and len(out) >= limit:
                        self._next = slot
                        self._behind = True
                        return out
                    entry, _ = bucket.popitem()
                    entry.slot = -1
                    self.count -= 1
                    out.append(entry)
                del self._slots[slot]
        self._next = max(last + 1, start)
        self._behind = False
        return out

    @property
    def behind(self) -> bool:
        """Whether the last ``due`` stopped at its limit: entries already due wait for the next call."""
        return self._behind

    def _due_slots(self, start: int, last: int) -> Iterator[int]:
        if last - start < len(self._slots):
            return iter(range(start, last + 1))
        # A long gap (a suspended host, a test's clock): walk the slots that exist, not every second.
        return iter(sorted(s for s in self._slots if s <= last))
