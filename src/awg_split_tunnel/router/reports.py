"""What the router process reports, on every data path: ``status`` (``router_status``: counters and flow
counts, no flow visited) and ``connections`` by pages (``FlowListings``).

A listing is the router's flows as they were when it started (a list of references: copying 200,000 of
them takes a few milliseconds); each ``ConnectionsRequest`` turns at most ``limit`` of them into rows, so
the packet loop is never held longer than one page takes. A flow that ended since the listing started is
still listed. Listings are dropped when read to the end, after ``LISTING_TTL`` seconds without a request,
or when more than ``MAX_LISTINGS`` are open (the oldest first): a client that goes away leaves nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from awg_split_tunnel.core.packet_router import PacketRouter, flow_row
from awg_split_tunnel.core.router_messages import (
    CONNECTIONS_PAGE,
    ConnectionsPage,
    ConnectionsRequest,
    RouterStatus,
)
from awg_split_tunnel.net.nat import NatEntry
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP

LISTING_TTL = 30.0
"""Seconds a listing waits for its next page request (the control socket drops idle clients after 10)."""
MAX_LISTINGS = 8
"""Listings open at once: more than the control socket's clients ever read at the same moment."""
MAX_PAGE = 4 * CONNECTIONS_PAGE
"""A request for more rows gets this many."""


def router_status(router: PacketRouter, request_id: int, stats: dict[str, Any] | None = None) -> RouterStatus:
    """The answer to a ``StatusRequest``: counters (``stats``, else the router's) and the flow counts the
    router keeps as flows come and go."""
    total, by_tunnel = router.flow_counts()
    return RouterStatus(request_id, stats or dataclasses.asdict(router.stats), total, by_tunnel)


class FlowListings:
    """Open ``connections`` listings by id; ``page(request, now)`` answers one ``ConnectionsRequest``."""

    def __init__(self, router: PacketRouter) -> None:
        self._router = router
        self._ids = itertools.count(1)
        self._open: dict[int, tuple[list[NatEntry], float]] = {}

    def page(self, request: ConnectionsRequest, now: float) -> ConnectionsPage:
        self._expire(now)
        listing = request.listing
        if listing == 0:
            listing = next(self._ids)
            table = self._router.table
            # Two C-level copies of the flow dicts' values: a few milliseconds at 200,000 flows.
            self._open[listing] = (
                [*table.flows(IPPROTO_TCP).values(), *table.flows(IPPROTO_UDP).values()],
                now,
            )
            while len(self._open) > MAX_LISTINGS:
                del self._open[next(iter(self._open))]
        held = self._open.pop(listing, None)
        if held is None:
            return ConnectionsPage(request.request_id, 0, request.offset, 0, ())
        flows = held[0]
        start = max(0, request.offset)
        end = start + max(1, min(request.limit, MAX_PAGE))
        rows = tuple(flow_row(entry) for entry in flows[start:end])
        if end < len(flows):
            self._open[listing] = (flows, now)  # kept (and moved to the newest) for the next page
        return ConnectionsPage(request.request_id, listing, start, len(flows), rows)

    def _expire(self, now: float) -> None:
        stale = [i for i, (_, at) in self._open.items() if now - at > LISTING_TTL]
        for listing in stale:
            del self._open[listing]

    def __len__(self) -> int:
        return len(self._open)
