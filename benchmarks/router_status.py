"""What `status` and `connections` cost the router process's packet loop, at many flows, in one run.

    python benchmarks/router_status.py [--flows 100000] [--repeat 5]

Fills a ``PacketRouter`` with synthetic flows (a quarter through one tunnel) and times, on this thread as
the router process's loop would run them, each answer with the pickling that sends it up the pipe:

- every flow as a row, pickled (what a `status` that counts rows, or an unpaged `connections`, costs);
- ``router_status`` (the flow counts the table keeps, and the counters);
- one ``connections`` page (a new listing, then a page from the middle of it).

Prints the best of ``--repeat`` runs in milliseconds, the message sizes, and the ratios against the
every-row baseline measured in the same run (machines are shared and noisy: compare ratios).
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Callable

from awg_split_tunnel.core.packet_router import PacketRouter, flow_row
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.router_messages import ConnectionsRequest
from awg_split_tunnel.core.rule_engine import RuleEngine
from awg_split_tunnel.net.nat import FlowVerdict, NatEntry
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP
from awg_split_tunnel.process.matcher import Platform
from awg_split_tunnel.router.reports import FlowListings, router_status

APP, WEB = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 10])


def filled_router(flows: int) -> PacketRouter:
    states: dict[str, TunnelState] = {}
    router = PacketRouter(RuleEngine([], "direct", Platform.POSIX), states.get, {})
    for i in range(flows):
        proto = IPPROTO_TCP if i % 2 else IPPROTO_UDP
        entry = NatEntry(proto, APP, 1024 + i % 50_000, WEB, 443 + i // 50_000, FlowVerdict.PASS)
        entry.tunnel_id = "wg" if i % 4 == 0 else None
        entry.pid, entry.exe = 1000 + i % 300, f"/usr/bin/app-{i % 300}"
        router.table.add(i.to_bytes(4, "big"), entry)
    return router


def best(repeat: int, work: Callable[[], bytes]) -> tuple[float, int]:
    """(best time in ms, size of the pickled answer)."""
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = len(work())
        times.append((time.perf_counter() - started) * 1000)
    return min(times), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    router = filled_router(args.flows)
    listings = FlowListings(router)
    middle = args.flows // 2

    def every_row() -> bytes:
        return pickle.dumps(tuple(flow_row(e) for e in router.connections()))

    def counts() -> bytes:
        return pickle.dumps(router_status(router, 1))

    def first_page() -> bytes:
        return pickle.dumps(listings.page(ConnectionsRequest(1), time.monotonic()))

    def middle_page() -> bytes:
        page = listings.page(ConnectionsRequest(1), time.monotonic())
        return pickle.dumps(listings.page(ConnectionsRequest(2, page.listing, middle), time.monotonic()))

    baseline = best(args.repeat, every_row)
    print(f"{args.flows} flows; best of {args.repeat}")
    print(f"  every flow as a row:     {baseline[0]:8.1f} ms  {baseline[1] / 2**20:6.2f} MiB")
    for name, work in (("status (counts)", counts), ("connections, new listing", first_page)):
        took, size = best(args.repeat, work)
        print(f"  {name + ':':<24} {took:8.2f} ms  {size / 1024:6.1f} KiB  ratio {took / baseline[0]:.4f}")
    took, size = best(args.repeat, middle_page)
    name = "listing + middle page:"
    print(f"  {name:<24} {took:8.2f} ms  {size / 1024:6.1f} KiB  ratio {took / baseline[0]:.4f}")


if __name__ == "__main__":
    main()
