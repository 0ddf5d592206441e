"""TAI64N timestamps as WireGuard sends them: nanoseconds whitened to 2^24 ns (docs/PROTOCOL.md: TAI64N)."""

from __future__ import annotations

TAI64N_SIZE = 12
TAI64_BASE = 0x400000000000000A
WHITENER_MASK = 0x1000000 - 1


def tai64n(unix_time: float) -> bytes:
    """The 12-byte big-endian TAI64N label of a Unix time, nanoseconds rounded down to 2^24 ns."""
    seconds = int(unix_time // 1)
    nanos = round((unix_time - seconds) * 1e9)
    if nanos >= 1_000_000_000:
        seconds, nanos = seconds + 1, nanos - 1_000_000_000
    nanos &= ~WHITENER_MASK
    return (TAI64_BASE + seconds).to_bytes(8, "big") + nanos.to_bytes(4, "big")


def tai64n_from_ns(unix_ns: int) -> bytes:
    """As `tai64n`, from integer nanoseconds (exact, for callers holding `time.time_ns()`)."""
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    return (TAI64_BASE + seconds).to_bytes(8, "big") + (nanos & ~WHITENER_MASK).to_bytes(4, "big")


def is_after(candidate: bytes, previous: bytes) -> bool:
    """Whether `candidate` is strictly later than `previous` (12-byte big-endian comparison)."""
    return candidate > previous
