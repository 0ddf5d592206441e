"""Fuzz the WireGuard core: random and mutated datagrams of every message type into live devices.

    python3 benchmarks/fuzz_wg.py [--count 100000] [--seed 1]

For each message type it feeds `count` random datagrams carrying that type (random body, sizes around
the real one) and `count` mutations of a valid datagram (bit flips, overwrites, truncation, extension,
retyping) into a device in the state that would accept the valid one. Any exception is a failure.
Prints, per type, how the datagrams were dropped and the time taken.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

from awg_split_tunnel.provider.wireguard.envelope import HANDSHAKE_SIZES, MessageType
from awg_split_tunnel.provider.wireguard.protocol import WireGuardProtocol

# The corpus, the devices and the mutations are the unit fuzz tests' own (which CI runs with 100,000
# hypothesis examples per type); this script adds per-type timing and drop reasons.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "provider" / "wireguard"))
from test_wg_fuzz import EP_A, _world, mutate, remac


def world() -> tuple[dict[MessageType, bytes], dict[MessageType, WireGuardProtocol]]:
    """Fresh devices each call (the tests' version is cached)."""
    return _world.__wrapped__()  # type: ignore[no-any-return]


def random_of_type(kind: MessageType, rnd: random.Random) -> bytes:
    size = HANDSHAKE_SIZES.get(kind, 32 + 16 * rnd.randrange(90))
    if rnd.random() < 0.2:
        size = max(0, size + rnd.randint(-8, 8))
    return (int(kind).to_bytes(4, "little") + rnd.randbytes(size))[:size]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rnd = random.Random(args.seed)
    failures = 0
    for mode in ("random", "mutated"):
        samples, receivers = world()
        for kind in MessageType:
            device = receivers[kind]
            before = Counter(device.dropped)
            events = outgoing = 0
            started = time.perf_counter()
            now = 1.0
            for _ in range(args.count):
                data = random_of_type(kind, rnd) if mode == "random" else mutate(samples[kind], rnd)
                if rnd.random() < 0.5:
                    data = remac(data, kind)
                try:
                    events += len(device.receive_datagram(data, EP_A, now))
                    device.handle_timers(now)
                except Exception as exc:  # the point of the exercise: report, keep going
                    failures += 1
                    print(f"FAIL {mode} {kind.name}: {exc!r} on {data.hex()}", file=sys.stderr)
                outgoing += len(device.datagrams_to_send())
                now += 0.0001
            elapsed = time.perf_counter() - started
            drops = Counter(device.dropped)
            drops.subtract(before)
            summary = ", ".join(f"{k}={v}" for k, v in sorted(drops.items()) if v)
            print(
                f"{mode:7} {kind.name:12} {args.count} datagrams in {elapsed:.1f} s "
                f"({elapsed / args.count * 1e6:.1f} us each); events={events} sent={outgoing}; "
                f"dropped: {summary}"
            )
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
