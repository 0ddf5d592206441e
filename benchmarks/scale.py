"""The router's state at scale: memory per flow, poll() p99, status, and deciding a flow under a SYN flood.

    python3 benchmarks/scale.py [--flows 10000,100000,1000000] [--flood-seconds 2]

No network: a ``PacketRouter`` is driven through ``route`` with synthetic packets, connect events are given
to it directly (a fake event source), the clock is a fake one and process lookups are the real ones (on
Linux a sock_diag request that finds no socket for these made-up flows). For each table size:

- memory per flow: the process's RSS before and after the flows were routed in, divided by their number;
- ``poll()`` p99 (CPU time) over 140 s of fake time (a run every 0.1 s) while the same 5000 flows (never
  answered) expire at every table size, against the baseline of one scan of every flow (what expiry
  cost each second before the timer wheel) and against the smallest table's p99;
- ``status``: counting the flows (``PacketRouter.flow_counts()`` where it exists, else ``len(table)``:
  ``status_count`` below is the hook), against building the ``connections`` rows of every flow;
- deciding a new flow of app B (its connect event came first) during a 50k SYN/s flood of app A without
  connect events, against the same decision with no flood (both measured in this run), and how long
  (fake time) app B's flow waits when its event never comes (hold timeout, then an OS lookup).

First, once: what one OS lookup costs (a held flow whose event never came), through sock_diag for a
socket that does not exist and for one of this process's (loopback), against psutil's table walk.

Machines are shared and noisy: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable

import psutil

from awg_split_tunnel.core.packet_router import (
    HOLD_TIMEOUT,
    PacketAction,
    PacketRouter,
    TunnelRoute,
    flow_row,
)
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.packet import IPPROTO_TCP, TCP_ACK, TCP_SYN, build_packet
from awg_split_tunnel.process.lookup import os_lookup_pid, psutil_lookup_pid
from awg_split_tunnel.process.matcher import Platform

APP = ipaddress.ip_address("198.18.0.1").packed
FLOOD_TARGET = ipaddress.ip_address("198.18.250.1").packed
B_TARGET = ipaddress.ip_address("198.18.251.1").packed
PROXY_TCP = 15001
PID_A, PID_B, PID_C = 100, 200, 300
EXES = {PID_A: "/usr/bin/app-flood", PID_B: "/usr/bin/app-b", PID_C: "/usr/bin/app-tunnelled"}
PORTS_PER_ADDRESS = 49000
FLOOD_RATE = 50_000.0
BATCH = 64
"""Packets routed between two timer runs, as the divert loop does."""


def make_router() -> PacketRouter:
    rules = [Rule("app-tunnelled", "socks"), Rule("app-b", "direct"), Rule("app-flood", "direct")]
    return PacketRouter(
        RuleEngine(rules, "direct", Platform.POSIX),
        {"socks": TunnelState.UP}.get,
        {"socks": TunnelRoute(PROXY_TCP, None)},
        own_pids={999},
        exe_of=EXES.get,
        os_lookup=os_lookup_pid,
        owns=None,
    )


def status_count(router: PacketRouter) -> int:
    """What ``status`` costs to count flows: ``flow_counts()`` once the router has it, else ``len``."""
    flow_counts: Callable[[], object] | None = getattr(router, "flow_counts", None)
    if flow_counts is not None:
        flow_counts()
        return len(router.table)
    return len(router.table)


def destination(i: int) -> tuple[bytes, int]:
    n = i // PORTS_PER_ADDRESS
    return bytes([198, 18, 1 + n // 256, n % 256]), 16000 + i % PORTS_PER_ADDRESS  # above the proxy port


UNANSWERED = 5000
"""Flows of every table size that are never answered (they go after 75 s): the same number expires
whatever the size of the table, so poll() should cost the same at every size."""


def fill(router: PacketRouter, count: int, span: float) -> None:
    """``count`` tunnelled TCP flows routed in over ``span`` seconds of fake time: ``UNANSWERED`` of
    them never answered, the others answered by the proxy (they live 2 h 4 min idle)."""
    route = router.route
    step = max(1, count // UNANSWERED)
    for i in range(count):
        now = span * i / count
        dst, sport = destination(i)
        router.connect_event(IPPROTO_TCP, dst, 443, PID_C, now, local_port=sport)
        syn = build_packet(APP, dst, IPPROTO_TCP, sport, 443, tcp_flags=TCP_SYN, seq=1)
        if route(syn, len(syn), now, _meta) is not PacketAction.INJECT_INBOUND:
            raise SystemExit(f"flow {i} was not tunnelled")
        if i % step:
            reply = build_packet(APP, dst, IPPROTO_TCP, PROXY_TCP, sport, tcp_flags=TCP_SYN | TCP_ACK)
            route(reply, len(reply), now, _meta)


def _meta() -> object:
    return None


def rss() -> int:
    gc.collect()
    return int(psutil.Process(os.getpid()).memory_info().rss)


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98] if len(samples) >= 100 else max(samples)


def measure_polls(router: PacketRouter, start: float) -> tuple[float, float, int]:
    """p99 and max of ``poll`` (seconds of this thread's CPU time: a loaded machine's preemptions are not
    the router's) every 0.1 s of fake time over 140 s; flows expired meanwhile."""
    before = len(router.table)
    samples: list[float] = []
    now = start
    while now < start + 140.0:
        t = time.thread_time()
        router.poll(now)
        samples.append(time.thread_time() - t)
        now += 0.1
    return p99(samples), max(samples), before - len(router.table)


def old_expiry_scan(router: PacketRouter, now: float) -> float:
    """One expiry scan of every flow, as each second's expiry cost before the timer wheel (CPU time)."""
    t = time.thread_time()
    due = sum(1 for e in router.table if e.deadline() <= now)
    elapsed = time.thread_time() - t
    del due
    return elapsed


def timed(fn: Callable[[], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def decide_b(router: PacketRouter, now: float, sport: int) -> float:
    """CPU time of routing app B's SYN whose connect event came first (decided in ``route``)."""
    router.connect_event(IPPROTO_TCP, B_TARGET, 80, PID_B, now)
    syn = build_packet(APP, B_TARGET, IPPROTO_TCP, sport, 80, tcp_flags=TCP_SYN, seq=1)
    t = time.thread_time()
    action = router.route(syn, len(syn), now, _meta)
    elapsed = time.thread_time() - t
    if action is not PacketAction.REINJECT:
        raise SystemExit(f"app B's flow was not decided at once: {action.name}")
    return elapsed


def flood(router: PacketRouter, start: float, seconds: float) -> tuple[list[float], list[float], float]:
    """App A floods SYNs (no connect events) at ``FLOOD_RATE``; every 10 ms app B opens a flow with its
    event, every 100 ms one without. Returns B's decide times (CPU), the flood's per-packet route times
    (wall), and the longest fake-time wait of B's event-less flows."""
    b_times: list[float] = []
    a_times: list[float] = []
    waits: list[float] = []
    pending: dict[int, float] = {}
    total = int(seconds * FLOOD_RATE)
    next_b, next_silent_b, b_port = start, start, 10000
    for i in range(total):
        now = start + i / FLOOD_RATE
        sport = 1024 + i % 64000
        syn = build_packet(APP, FLOOD_TARGET, IPPROTO_TCP, sport, 80, tcp_flags=TCP_SYN, seq=i)
        t = time.perf_counter()
        router.route(syn, len(syn), now, _meta)
        a_times.append(time.perf_counter() - t)
        if now >= next_b:
            next_b += 0.01
            b_port += 1
            b_times.append(decide_b(router, now, b_port))
        if now >= next_silent_b:
            next_silent_b += 0.1
            b_port += 1
            silent = build_packet(APP, B_TARGET, IPPROTO_TCP, b_port, 8080, tcp_flags=TCP_SYN, seq=1)
            if router.route(silent, len(silent), now, _meta) is PacketAction.HOLD:
                pending[b_port] = now
        if i % BATCH == BATCH - 1:
            router.poll(now)
            for out in router.take_outgoing():
                port = int.from_bytes(out.data[20:22], "big")
                if port in pending and out.data[16:20] == B_TARGET:
                    waits.append(now - pending.pop(port))
    if pending:
        raise SystemExit(f"{len(pending)} of app B's flows without event were never decided")
    return b_times, a_times, max(waits, default=0.0)


def run(count: int, flood_seconds: float, smallest_p99: float | None) -> float:
    router = make_router()
    base = rss()
    span = 60.0
    t = time.perf_counter()
    fill(router, count, span)
    fill_time = time.perf_counter() - t
    per_flow = (rss() - base) / count
    print(f"\n{count:,} flows: routed in {fill_time:.1f} s ({fill_time / count * 1e6:.1f} µs per flow)")
    print(f"  memory per flow (RSS delta)             {per_flow:8.0f} B   ({(rss() - base) / 2**20:.0f} MiB)")

    scan = min(old_expiry_scan(router, span) for _ in range(3))
    poll_p99, poll_max, expired = measure_polls(router, span)
    print(
        f"  poll() p99 / max (CPU time)              {poll_p99 * 1e3:8.3f} / {poll_max * 1e3:.3f} ms "
        f"({expired:,} expired over 140 s)"
    )
    print(
        f"  one scan of every flow (baseline)        {scan * 1e3:8.3f} ms   "
        f"poll p99 / scan = {poll_p99 / scan:.4f}"
    )
    if smallest_p99 is not None:
        print(f"  poll p99 / the smallest table's            {poll_p99 / smallest_p99:8.2f}")

    count_time = timed(lambda: status_count(router))
    rows_time = timed(lambda: [flow_row(e) for e in router.connections()], repeat=1)
    hook = "flow_counts()" if hasattr(router, "flow_counts") else "len(table)"
    print(
        f"  status: counting flows ({hook:13s})   {count_time * 1e6:8.1f} µs   "
        f"rows of every flow {rows_time * 1e3:.0f} ms (ratio {count_time / rows_time:.6f})"
    )

    now = span + 140.0
    idle = [decide_b(router, now + k * 0.01, 5000 + k) for k in range(200)]
    b_times, a_times, silent_wait = flood(router, now + 5.0, flood_seconds)
    idle_p50, flood_p50 = statistics.median(idle), statistics.median(b_times)
    print(
        f"  app B decided, idle / under a 50k SYN/s flood (p50)  {idle_p50 * 1e6:6.1f} / "
        f"{flood_p50 * 1e6:.1f} µs (ratio {flood_p50 / idle_p50:.2f}; p99 {p99(b_times) * 1e6:.1f} µs)"
    )
    stats = router.stats
    print(
        f"  flood: {len(a_times):,} SYNs, route p50 {statistics.median(a_times) * 1e6:.1f} µs; "
        f"held over the per-remote cap {stats.held_remote_full:,}, lookups {stats.os_lookups:,}, "
        f"runs left behind {stats.os_lookups_deferred:,}"
    )
    print(
        f"  app B without connect event waited at most {silent_wait * 1e3:.0f} ms of fake time "
        f"(hold timeout {HOLD_TIMEOUT * 1e3:.0f} ms)"
    )
    return poll_p99


def lookups() -> None:
    """One OS lookup: sock_diag (no such socket / a socket of ours) against a psutil table walk."""
    loopback = socket.inet_aton("127.0.0.1")
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as c,
    ):
        local, remote = c.getsockname()[1], server.getsockname()[1]
        ours = (IPPROTO_TCP, loopback, local, loopback, remote)
        absent = (IPPROTO_TCP, loopback, local, loopback, 9)

        def each(fn: Callable[..., object], args: tuple[object, ...], n: int) -> float:
            return timed(lambda: [fn(*args) for _ in range(n)], repeat=3) / n

        walk = each(psutil_lookup_pid, ours, 20)
        print("one OS lookup for a held flow whose event never came:")
        print(f"  psutil table walk (baseline)              {walk * 1e6:9.1f} µs")
        if sys.platform.startswith("linux"):
            none, found = each(os_lookup_pid, absent, 2000), each(os_lookup_pid, ours, 50)
            print(
                f"  sock_diag, no such socket (a raw SYN)     {none * 1e6:9.1f} µs  ratio {none / walk:.4f}"
            )
            print(
                f"  sock_diag + /proc scan, a socket of ours  {found * 1e6:9.1f} µs  ratio {found / walk:.4f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", default="10000,100000,1000000")
    parser.add_argument("--flood-seconds", type=float, default=2.0)
    args = parser.parse_args()
    lookups()
    smallest: float | None = None
    for count in (int(n) for n in args.flows.split(",")):
        p99_poll = run(count, args.flood_seconds, smallest)
        smallest = p99_poll if smallest is None else smallest


if __name__ == "__main__":
    main()
