"""Answers kept per route for their TTL: a lookup answered through one tunnel is never served to an app
of another route (each tunnel's resolver may answer differently, and sharing would tell one route what
another asked)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from awg_split_tunnel.dns.message import Answer, Query, QuestionKey, aged

MAX_ENTRIES = 4096
MAX_TTL = 3600
"""Seconds at most an answer is kept, whatever its records say."""


@dataclass(slots=True)
class _Entry:
    wire: bytes
    stored: float
    expires: float


class DnsCache:
    """Answers by (route, question); least recently used dropped beyond ``max_entries``. Time is passed
    in (``now``, seconds)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, QuestionKey], _Entry] = OrderedDict()
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, route: str, query: Query, now: float) -> bytes | None:
        """The cached answer to ``query`` through ``route``, with the query's ID and TTLs aged; or None."""
        key = (route, query.key)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return aged(entry.wire, query.id, int(now - entry.stored))

    def put(self, route: str, query: Query, answer: Answer, now: float) -> None:
        """Keep ``answer`` for its TTL (an answer with none — errors, truncated — is not kept)."""
        if answer.ttl is None or answer.ttl <= 0:
            return
        key = (route, query.key)
        self._entries[key] = _Entry(answer.wire, now, now + min(answer.ttl, MAX_TTL))
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget_route(self, route: str) -> None:
        """Drop every answer of ``route`` (its tunnel changed or went away)."""
        for key in [k for k in self._entries if k[0] == route]:
            del self._entries[key]
