"""`Range`: an inclusive integer range as AmneziaWG writes it (`N` or `A-B`)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive range [lo, hi]; a single value N is Range(N, N)."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < 0 or self.hi < self.lo:
            raise ValueError(f"invalid range {self.lo}-{self.hi}: need 0 <= lo <= hi")

    @classmethod
    def single(cls, value: int) -> Range:
        return cls(value, value)

    @classmethod
    def parse(cls, text: str) -> Range:
        """Parse `N` or `A-B` (decimal, no sign); ValueError with a clear message otherwise."""
        parts = text.strip().split("-")
        if len(parts) not in (1, 2) or not all(p.isdigit() and p.isascii() for p in parts):
            raise ValueError(f"expected N or A-B (decimal), got {text!r}")
        lo, hi = int(parts[0]), int(parts[-1])
        if hi < lo:
            raise ValueError(f"range {text!r} has its start above its end")
        return cls(lo, hi)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.lo <= value <= self.hi

    def overlaps(self, other: Range) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def pick(self, rng: random.Random | random.SystemRandom) -> int:
        """A uniform value in [lo, hi]."""
        return self.lo if self.lo == self.hi else rng.randint(self.lo, self.hi)

    def __str__(self) -> str:
        return str(self.lo) if self.lo == self.hi else f"{self.lo}-{self.hi}"
