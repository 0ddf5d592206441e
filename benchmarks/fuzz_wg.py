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

from awg_split_tunnel.provider.wireguard.cookie import CookieGenerator
from awg_split_tunnel.provider.wireguard.envelope import HANDSHAKE_SIZES, MessageType
from awg_split_tunnel.provider.wireguard.noise import StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import PeerConfig, WireGuardProtocol

SK_A, SK_B = bytes(range(1, 33)), bytes(range(101, 133))
PK_A, PK_B = StaticIdentity.from_private(SK_A).public, StaticIdentity.from_private(SK_B).public
EP_A, EP_B = ("198.18.0.1", 51820), ("198.18.0.2", 51821)


def pair() -> tuple[WireGuardProtocol, WireGuardProtocol]:
    rnd = random.Random(3)

    def device(private: bytes, seed: int, ephemeral: bytes) -> WireGuardProtocol:
        return WireGuardProtocol(
            private,
            rng=random.Random(seed),
            random_bytes=rnd.randbytes,
            new_ephemeral=lambda: ephemeral,
            wall_clock=lambda: 1_700_000_000.0,
            under_load_handshakes=10**9,  # a flood would otherwise only meet cookie replies
        )

    a, b = device(SK_A, 1, b"\x11" * 32), device(SK_B, 2, b"\x22" * 32)
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), 0.0)
    b.add_peer(PeerConfig(PK_A, endpoint=EP_A), 0.0)
    return a, b


def world() -> tuple[dict[MessageType, bytes], dict[MessageType, WireGuardProtocol]]:
    a_pending, b_fresh = pair()
    a_pending.initiate_handshake(PK_B, 0.0)
    a_pending.datagrams_to_send()
    a, b = pair()
    a.initiate_handshake(PK_B, 0.0)
    ((initiation, _),) = a.datagrams_to_send()
    b.receive_datagram(initiation, EP_A, 0.0)
    ((response, _),) = b.datagrams_to_send()
    a.receive_datagram(response, EP_B, 0.0)
    ((keepalive, _),) = a.datagrams_to_send()
    b.receive_datagram(keepalive, EP_A, 0.0)
    b.set_under_load(0.0)
    b.receive_datagram(initiation, EP_A, 0.0)
    ((cookie_reply, _),) = b.datagrams_to_send()
    b.set_under_load(0.0, duration=0.0)
    a.send_packet(PK_B, bytes([0x45, 0, 0, 24]) + bytes(20), 0.0)
    ((transport, _),) = a.datagrams_to_send()
    samples = {
        MessageType.INITIATION: initiation,
        MessageType.RESPONSE: response,
        MessageType.COOKIE_REPLY: cookie_reply,
        MessageType.TRANSPORT: transport,
    }
    receivers = {
        MessageType.INITIATION: b_fresh,
        MessageType.RESPONSE: a_pending,
        MessageType.COOKIE_REPLY: a_pending,
        MessageType.TRANSPORT: b,
    }
    return samples, receivers


def remac(data: bytes, kind: MessageType) -> bytes:
    """Recompute mac1 as an attacker can (it needs only the receiver's public key), so that mutated
    handshakes get past the mac1 check into the Noise code."""
    if len(data) != HANDSHAKE_SIZES.get(kind):
        return data
    receiver = PK_B if kind is MessageType.INITIATION else PK_A
    return CookieGenerator.for_public_key(receiver).add_macs(data, 0.0)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    choice = rnd.randrange(6)
    if choice == 0 and buf:
        for _ in range(rnd.randint(1, 4)):
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
    elif choice == 1 and buf:
        i = rnd.randrange(len(buf))
        buf[i : i + rnd.randint(1, 16)] = rnd.randbytes(rnd.randint(1, 16))
    elif choice == 2:
        del buf[rnd.randrange(len(buf) + 1) :]
    elif choice == 3:
        buf += rnd.randbytes(rnd.randint(1, 64))
    elif choice == 4 and len(buf) >= 4:
        buf[0:4] = rnd.choice([1, 2, 3, 4, 0, 5, 0xFFFFFFFF]).to_bytes(4, "little")
    else:
        buf = bytearray(rnd.randbytes(len(buf)))
    return bytes(buf)


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
