"""The Windows router loop's own cost per packet: batches of 64 against one packet per call.

    PYTHONPATH=src python3 benchmarks/windows_loop.py [--packets 20000] [--runs 3]

Routes ``packets`` UDP datagrams of a direct app's flow through the real ``PacketRouter`` on
``AsyncRouterLoop`` with the Windows handles (reader threads, WinDivertRecvEx/SendEx batches) against the
fake WinDivert of the unit tests, once reading and sending 64 packets per call and once one per call (what
pydivert's ``recv``/``send`` do). Prints packets per second of each and their ratio, measured in the same
run. The fake stands in for the driver, so absolute rates say nothing about Windows; the ratio is what the
batches save on the Python side (a thread hand-off, a wake-up of the loop, a call per batch instead of per
packet).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "platform" / "windows"))
from test_windows_router_loop import DNS, Env, datagram, run, until

from awg_split_tunnel.net.packet import IPPROTO_UDP
from awg_split_tunnel.platform.windows.handles import WindowsNetworkHandle


def rate(packets: int, batch: int) -> float:
    """Packets per second through the loop, reading and sending ``batch`` per call."""
    WindowsNetworkHandle.read_batch = WindowsNetworkHandle.send_batch = batch
    env = Env(hold_timeout=5.0)
    load = [datagram(6000, DNS, payload=bytes(1200)) for _ in range(packets)]

    async def scenario() -> float:
        env.connect(200, IPPROTO_UDP, 6000, DNS, 53)
        await until(lambda: len(env.router.events) == 1)
        sent = env.fake.handle(env.network.layer).sent
        start = time.perf_counter()
        env.packets(*load)
        await until(lambda: len(sent) >= packets, timeout=120.0)
        return packets / (time.perf_counter() - start)

    return run(env, scenario)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    batched, single = [], []
    for _ in range(args.runs):  # alternating, so that a busy moment of the machine hits both
        batched.append(rate(args.packets, 64))
        single.append(rate(args.packets, 1))
    b, s = statistics.median(batched), statistics.median(single)
    print(f"64 per call: {b:,.0f} packets/s   1 per call: {s:,.0f} packets/s   ratio {b / s:.2f}")


if __name__ == "__main__":
    main()
