"""WireGuardDevice hands whole batches to the core: one batch of IP packets for several peers reaches each
peer in order, and the UDP side groups what it sends into GSO runs without reordering anything."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.device import (
    DatagramSocket,
    DeviceSettings,
    PeerSettings,
    WireGuardDevice,
)

NET_A = ipaddress.ip_network("198.19.0.1/32")
NET_B = ipaddress.ip_network("198.19.1.0/24")
NET_C = ipaddress.ip_network("198.19.2.0/24")


def udp_packet(src: str, dst: str, payload: bytes) -> bytes:
    total = 28 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        1,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload


def test_one_batch_for_two_peers_reaches_each_in_order() -> None:
    keys = {name: crypto.generate_private_key() for name in "abc"}
    received: dict[str, list[bytes]] = {"b": [], "c": []}

    async def scenario() -> None:
        remotes = {
            name: WireGuardDevice(
                DeviceSettings(keys[name], (PeerSettings(crypto.public_key(keys["a"]), (NET_A,)),)),
                tunnel_id=name,
                on_packets=received[name].extend,
                bind_host="127.0.0.1",
            )
            for name in "bc"
        }
        for remote in remotes.values():
            await remote.start()
        a = WireGuardDevice(
            DeviceSettings(
                keys["a"],
                tuple(
                    PeerSettings(
                        crypto.public_key(keys[name]), (net,), endpoint=("127.0.0.1", remotes[name].port)
                    )
                    for name, net in (("b", NET_B), ("c", NET_C))
                ),
            ),
            tunnel_id="a",
            bind_host="127.0.0.1",
        )
        await a.start()
        try:
            to_b = [udp_packet("198.19.0.1", "198.19.1.7", b"b%d" % i) for i in range(20)]
            to_c = [udp_packet("198.19.0.1", "198.19.2.7", b"c%d" % i) for i in range(20)]
            nowhere = udp_packet("198.19.0.1", "198.18.9.9", b"no route")
            batch = [p for pair in zip(to_b, to_c, strict=True) for p in pair] + [nowhere]
            a.send_packets(batch)  # queued behind both handshakes, then sent
            a.send_packets(batch[:-1])  # and once more, straight through the established sessions
            deadline = asyncio.get_running_loop().time() + 5
            while len(received["b"]) < 40 or len(received["c"]) < 40:
                assert asyncio.get_running_loop().time() < deadline, {k: len(v) for k, v in received.items()}
                await asyncio.sleep(0.01)
            assert received["b"] == to_b + to_b
            assert received["c"] == to_c + to_c
            assert a.stats.dropped_no_route == 1  # only the first batch had the unroutable packet
            stats = {entry.public_key: entry for entry in a.peer_statistics()}
            assert stats[crypto.public_key(keys["b"])].tx_packets == 40
        finally:
            await a.stop()
            for remote in remotes.values():
                await remote.stop()

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_gso_runs_keep_order_break_on_endpoint_size_and_segment_limit() -> None:
    receivers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    for receiver in receivers:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(2)
    sender = DatagramSocket.bind(0, "127.0.0.1")
    try:
        one, two = (("127.0.0.1", r.getsockname()[1]) for r in receivers)
        datagrams = (
            [(bytes([i]) * 1000, one) for i in range(3)]
            + [(b"short", one)]  # a shorter datagram ends its run ...
            + [(b"\xaa" * 1000, one)]  # ... so this one starts another, cut short by the next endpoint
            + [(bytes([i]) * 1000, two) for i in range(2)]
            + [(bytes([i % 256]) * 600, one) for i in range(70)]  # more than one GSO write can hold
        )
        sent, dropped = sender.send_batch(datagrams)
        assert (sent, dropped) == (len(datagrams), 0)
        if sender.gso:
            # [3 + short] [1 alone] [2 to the other endpoint] [64] [6]
            assert sender.gso_sends == 4
        for receiver, target in zip(receivers, (one, two), strict=True):
            expected = [d for d, to in datagrams if to == target]
            assert [receiver.recv(4096) for _ in expected] == expected
    finally:
        sender.close()
        for receiver in receivers:
            receiver.close()
