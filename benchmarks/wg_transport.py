"""Per-packet cost of the WireGuard transport path for 1420-byte packets.

    python3 benchmarks/wg_transport.py [--packets 200000]

Times `send_packet` + `datagrams_to_send` (pad, seal, frame) and `receive_datagram` (open, replay check,
trim, event) on an established session, against a baseline measured in the same run: one bare
`ChaCha20Poly1305.encrypt` / `decrypt` of the same size with a cached key object.
"""

from __future__ import annotations

import argparse
import random
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from awg_split_tunnel.provider.wireguard.noise import StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import PeerConfig, WireGuardProtocol

SK_A, SK_B = bytes(range(1, 33)), bytes(range(101, 133))
PK_A, PK_B = StaticIdentity.from_private(SK_A).public, StaticIdentity.from_private(SK_B).public
EP_A, EP_B = ("198.18.0.1", 51820), ("198.18.0.2", 51821)


def ipv4(size: int) -> bytes:
    return (
        bytes([0x45, 0])
        + size.to_bytes(2, "big")
        + bytes(8)
        + bytes([10, 0, 0, 1, 10, 0, 0, 2])
        + bytes(size - 20)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1420)
    args = parser.parse_args()
    n, packet = args.packets, ipv4(args.size)

    a = WireGuardProtocol(SK_A, rng=random.Random(1))
    b = WireGuardProtocol(SK_B, rng=random.Random(2))
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), 0.0)
    b.add_peer(PeerConfig(PK_A, endpoint=EP_A), 0.0)
    a.initiate_handshake(PK_B, 0.0)
    for d, _ in a.datagrams_to_send():
        b.receive_datagram(d, EP_A, 0.0)
    for d, _ in b.datagrams_to_send():
        a.receive_datagram(d, EP_B, 0.0)
    for d, _ in a.datagrams_to_send():
        b.receive_datagram(d, EP_A, 0.0)

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

    # Batches of 64, as the device moves them: seal a batch, then open it (keeps the data cache-warm,
    # like packets fresh from a socket).
    send, drain, receive = a.send_packet, a.datagrams_to_send, b.receive_datagram
    seal_time = open_time = 0.0
    batch = 64
    wire_size = 0
    for _ in range(n // batch):
        started = time.perf_counter()
        for _ in range(batch):
            send(PK_B, packet, 1.0)
        datagrams = drain()
        middle = time.perf_counter()
        for d, _ in datagrams:
            receive(d, EP_A, 1.0)
        open_time += time.perf_counter() - middle
        seal_time += middle - started
        wire_size = len(datagrams[0][0])
    n = n // batch * batch
    seal, opened = seal_time / n, open_time / n
    assert b.peers[PK_A].stats.rx_packets == n, b.dropped

    print(f"{n} packets of {args.size} bytes (datagram {wire_size} bytes)")
    print(f"baseline encrypt  {base_seal * 1e6:6.2f} us   decrypt {base_open * 1e6:6.2f} us")
    print(f"send_packet       {seal * 1e6:6.2f} us   ({seal / base_seal:.1f}x baseline encrypt)")
    print(f"receive_datagram  {opened * 1e6:6.2f} us   ({opened / base_open:.1f}x baseline decrypt)")
    print(
        f"throughput        send {args.size * 8 / seal / 1e6:.0f} Mbit/s, "
        f"receive {args.size * 8 / opened / 1e6:.0f} Mbit/s"
    )


if __name__ == "__main__":
    main()
