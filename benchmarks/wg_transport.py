"""Per-packet cost of the WireGuard transport path for 1420-byte packets: batch vs single-packet entry points.

    python3 benchmarks/wg_transport.py [--packets 200000] [--batch 64] [--amnezia]

Times, on established sessions, batches of `--batch` packets as the device moves them:

- `send_packet` ×N + `datagrams_to_send` and `receive_datagram` ×N (the single-packet entry points);
- `send_packets` + `datagrams_to_send` and `receive_datagrams` (the batch entry points);

against a baseline measured in the same run: one bare `ChaCha20Poly1305.encrypt` / `decrypt` of the same
size with a cached key object. The single and batch paths alternate batch by batch on two separate pairs
of devices, so machine noise hits both alike; the ratios are what to compare. `--amnezia` puts an
AmneziaWG 2.0 envelope (S1-S4, H1-H4 ranges, junk) on both ends.
"""

from __future__ import annotations

import argparse
import random
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from awg_split_tunnel.provider.amneziawg.envelope import envelope_for
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard.envelope import Envelope, PlainEnvelope
from awg_split_tunnel.provider.wireguard.noise import StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import PeerConfig, WireGuardProtocol

SK_A, SK_B = bytes(range(1, 33)), bytes(range(101, 133))
PK_A, PK_B = StaticIdentity.from_private(SK_A).public, StaticIdentity.from_private(SK_B).public
EP_A, EP_B = ("198.18.0.1", 51820), ("198.18.0.2", 51821)
AWG_PARAMS = {
    "jc": 3,
    "jmin": 50,
    "jmax": 60,
    "s1": 37,
    "s2": 61,
    "s3": 11,
    "s4": 7,
    "h1": "100-199",
    "h2": "200-299",
    "h3": "300-399",
    "h4": "400-499",
}


def ipv4(size: int) -> bytes:
    return (
        bytes([0x45, 0])
        + size.to_bytes(2, "big")
        + bytes(8)
        + bytes([10, 0, 0, 1, 10, 0, 0, 2])
        + bytes(size - 20)
    )


def envelope(amnezia: bool, seed: int) -> Envelope:
    if not amnezia:
        return PlainEnvelope()
    return envelope_for(AmneziaParams.from_mapping(AWG_PARAMS), rng=random.Random(seed))


def session(amnezia: bool) -> tuple[WireGuardProtocol, WireGuardProtocol]:
    """Two devices, A sending to B, with a completed handshake."""
    a = WireGuardProtocol(SK_A, rng=random.Random(1), envelope=envelope(amnezia, 1))
    b = WireGuardProtocol(SK_B, rng=random.Random(2), envelope=envelope(amnezia, 2))
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), 0.0)
    b.add_peer(PeerConfig(PK_A, endpoint=EP_A), 0.0)
    a.initiate_handshake(PK_B, 0.0)
    for _ in range(3):
        for d, _ in a.datagrams_to_send():
            b.receive_datagram(d, EP_A, 0.0)
        for d, _ in b.datagrams_to_send():
            a.receive_datagram(d, EP_B, 0.0)
    assert a.peers[PK_B].keypairs.current is not None and b.peers[PK_A].keypairs.current is not None
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1420)
    parser.add_argument("--batch", type=int, default=64, help="packets per batch, as the device moves them")
    parser.add_argument("--amnezia", action="store_true", help="AmneziaWG 2.0 envelope on both ends")
    args = parser.parse_args()
    packet, batch = ipv4(args.size), args.batch
    rounds = args.packets // batch
    n = rounds * batch

    aead = ChaCha20Poly1305(bytes(32))
    nonce = bytes(12)
    started = time.perf_counter()
    for _ in range(n):
        sealed = aead.encrypt(nonce, packet, None)
    base_seal = (time.perf_counter() - started) / n
    started = time.perf_counter()
    for _ in range(n):
        aead.decrypt(nonce, sealed, None)
    base_open = (time.perf_counter() - started) / n

    single_a, single_b = session(args.amnezia)
    batch_a, batch_b = session(args.amnezia)
    send_one, drain_one, receive_one = (
        single_a.send_packet,
        single_a.datagrams_to_send,
        single_b.receive_datagram,
    )
    send_many, drain_many, receive_many = (
        batch_a.send_packets,
        batch_a.datagrams_to_send,
        batch_b.receive_datagrams,
    )
    packets = [packet] * batch
    times = {"single_send": 0.0, "single_receive": 0.0, "batch_send": 0.0, "batch_receive": 0.0}
    wire_size = 0
    # Seal a batch, then open it (keeps the data cache-warm, like packets fresh from a socket); the two
    # paths alternate so that noise from other work on the machine falls on both.
    for _ in range(rounds):
        started = time.perf_counter()
        for p in packets:
            send_one(PK_B, p, 1.0)
        datagrams = drain_one()
        middle = time.perf_counter()
        for d, _ in datagrams:
            receive_one(d, EP_A, 1.0)
        ended = time.perf_counter()
        times["single_send"] += middle - started
        times["single_receive"] += ended - middle

        started = time.perf_counter()
        send_many(PK_B, packets, 1.0)
        datagrams = drain_many()
        middle = time.perf_counter()
        receive_many([(d, EP_A) for d, _ in datagrams], 1.0)
        ended = time.perf_counter()
        times["batch_send"] += middle - started
        times["batch_receive"] += ended - middle
        wire_size = len(datagrams[0][0])
    assert single_b.peers[PK_A].stats.rx_packets == n, single_b.dropped
    assert batch_b.peers[PK_A].stats.rx_packets == n, batch_b.dropped
    per = {key: value / n for key, value in times.items()}

    kind = "AmneziaWG 2.0" if args.amnezia else "WireGuard"
    print(f"{kind}: {n} packets of {args.size} bytes (datagram {wire_size} bytes), batches of {batch}")
    print(f"baseline encrypt     {base_seal * 1e6:6.2f} us   decrypt {base_open * 1e6:6.2f} us")
    for label, key, base in (
        ("send_packet       ", "single_send", base_seal),
        ("send_packets      ", "batch_send", base_seal),
        ("receive_datagram  ", "single_receive", base_open),
        ("receive_datagrams ", "batch_receive", base_open),
    ):
        print(f"{label}   {per[key] * 1e6:6.2f} us   ({per[key] / base:.2f}x baseline)")
    print(
        f"batch / single      send {per['batch_send'] / per['single_send']:.2f}, "
        f"receive {per['batch_receive'] / per['single_receive']:.2f}"
    )
    print(
        f"throughput (batch)  send {args.size * 8 / per['batch_send'] / 1e6:.0f} Mbit/s, "
        f"receive {args.size * 8 / per['batch_receive'] / 1e6:.0f} Mbit/s"
    )


if __name__ == "__main__":
    main()
