"""Handshake rate limiting while under load, as wireguard-go's ``ratelimiter`` does it.

One token bucket per source: an IPv4 address, or an IPv6 **/64** — a host usually holds a whole /64, so
per-address buckets would let it send from 2^64 addresses and never be limited. A bucket refills at
``PER_SECOND`` up to ``BURST``; one idle for ``IDLE_EXPIRY`` is full again and is dropped by the sweep
that runs at most once a second, so a flood of spoofed sources costs memory only while it lasts and
never resets the buckets of the others (the earlier "clear everything past 4096 entries" did). Past
``MAX_BUCKETS`` live sources, new ones are refused until the sweep frees room.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

PER_SECOND = 20.0
BURST = 5.0
IDLE_EXPIRY = 1.0
"""Seconds without a handshake after which a bucket is full again and can go (BURST / PER_SECOND < 1)."""
MAX_BUCKETS = 65536


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


def source_key(host: str) -> bytes:
    """The bucket a source address falls in: its 4 bytes (IPv4, also IPv4-mapped IPv6) or its /64."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host.encode()
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped.packed
        return address.packed[:8]
    return address.packed


class HandshakeRateLimiter:
    """``allow(host, now)``: whether a handshake message from ``host`` may be answered now."""

    def __init__(self, per_second: float = PER_SECOND, burst: float = BURST, max_buckets: int = MAX_BUCKETS):
        self.per_second = per_second
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: dict[bytes, _Bucket] = {}
        self._swept = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, host: str, now: float) -> bool:
        if now - self._swept >= IDLE_EXPIRY:
            self._sweep(now)
        key = source_key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:
                return False
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.per_second)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _sweep(self, now: float) -> None:
        self._swept = now
        idle = [key for key, bucket in self._buckets.items() if now - bucket.at >= IDLE_EXPIRY]
        for key in idle:
            del self._buckets[key]
