"""Cost of ``service:`` rules (Windows) in the router's decision, against the same rules without one.

    PYTHONPATH=src python3 benchmarks/service_rules.py [--flows 20000] [--pids 500] [--repeats 5]

Each run decides ``--flows`` new TCP flows (connect event, then the SYN) of ``--pids`` processes, every
one an ``svchost.exe``, through a ``PacketRouter`` with 50 exe rules — once with a ``service:Dnscache``
rule in front of them and an in-memory Service Control Manager (Dnscache in one of the processes), once
without. The clock advances 1 ms per flow, so the router asks the SCM as it would in use (every 5 s, and
early at most once a second when an unknown process opens a flow); how many times it asked is printed.
Alternating runs, best of ``--repeats`` each; the machine is shared, so read the ratio.
"""

from __future__ import annotations

import argparse
import ipaddress
import time

from awg_split_tunnel.core.packet_router import PacketRouter, TunnelRoute
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.packet import IPPROTO_TCP, TCP_SYN, build_packet
from awg_split_tunnel.process.matcher import Platform

SVCHOST = r"C:\Windows\System32\svchost.exe"
APP = ipaddress.ip_address("198.18.0.1").packed
WEB = ipaddress.ip_address("198.18.0.10").packed


def run(flows: int, pids: int, with_service: bool) -> tuple[float, int]:
    """(seconds for ``flows`` decisions, SCM questions asked)."""
    asked = 0

    def service_pids(name: str) -> set[int]:
        nonlocal asked
        asked += 1
        return {1000} if name == "dnscache" else set()

    rules = [Rule(f"app{i}.exe", "socks") for i in range(50)]
    if with_service:
        rules.insert(0, Rule("service:Dnscache", "socks"))
    router = PacketRouter(
        RuleEngine(rules, "direct", Platform.WINDOWS),
        {"socks": TunnelState.UP}.get,
        {"socks": TunnelRoute(15001, 15002)},
        own_pids={1},
        exe_of=lambda pid: SVCHOST,
        os_lookup=None,
        owns=None,
        service_pids=service_pids,
    )
    packets = [
        build_packet(APP, WEB, IPPROTO_TCP, 1024 + i % 60000, 80 + i // 60000, tcp_flags=TCP_SYN, seq=i)
        for i in range(flows)
    ]
    start = time.perf_counter()
    for i, packet in enumerate(packets):
        now = i * 0.001
        router.connect_event(IPPROTO_TCP, WEB, 80 + i // 60000, 1000 + i % pids, now)
        router.route(packet, len(packet), now, lambda: None)
        if i % 100 == 0:
            router.poll(now)
    return time.perf_counter() - start, asked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=20000)
    parser.add_argument("--pids", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    best = {False: float("inf"), True: float("inf")}
    asked = 0
    for _ in range(args.repeats):
        for with_service in (False, True):
            seconds, questions = run(args.flows, args.pids, with_service)
            best[with_service] = min(best[with_service], seconds)
            if with_service:
                asked = questions
    for with_service, label in ((False, "50 exe rules"), (True, "service:Dnscache + 50 exe rules")):
        per_second = args.flows / best[with_service]
        print(f"{label:34s} {per_second:10,.0f} new flows/s")
    print(f"ratio (with / without)             {best[False] / best[True]:10.2f}")
    print(f"SCM questions over {args.flows * 0.001:.0f} s of flows: {asked}")


if __name__ == "__main__":
    main()
