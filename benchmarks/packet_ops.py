"""Cost of the packet-tunnel packet operations, against plain copies of the same packets.

    python3 benchmarks/packet_ops.py [--iterations 2000] [--mtu 1420] [--repeats 5]

Times, per operation:

- ``segment_tcp`` of a 64 KB IPv4 TCP super-packet (with timestamps) into ``--mtu`` segments, against a
  plain ``bytes`` copy of the same 64 KB packet;
- ``clamp_mss`` of a SYN, SNAT (``TunnelNat.outbound``) and un-NAT (``TunnelNat.inbound``) of a full-size
  TCP packet on a known flow, and the ICMP "fragmentation needed" answer to an oversize UDP packet, each
  including the parse of the packet; against restoring the packet into its reused buffer, the step every
  iteration takes before the operation (and itself a copy of the packet); restore + parse is printed too,
  so that the operation's own share can be read off.

Each figure is the best of ``--repeats`` runs of ``--iterations`` operations; the machines are shared and
noisy, so compare the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import ipaddress
import struct
import time
from collections.abc import Callable

from awg_split_tunnel.net.icmp import too_big_reply
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_SYN, PacketView, build_packet
from awg_split_tunnel.net.segment import clamp_mss, mss_for_mtu, segment_tcp
from awg_split_tunnel.net.tunnel_nat import TunnelNat

APP = ipaddress.IPv4Address("198.18.0.2").packed
TUNNEL = ipaddress.IPv4Address("198.18.1.2").packed
REMOTE = ipaddress.IPv4Address("198.19.0.1").packed
TIMESTAMPS = bytes([1, 1, 8, 10]) + bytes(8)


def with_tcp_options(packet: bytearray, options: bytes) -> bytearray:
    """``packet`` (IPv4 TCP, no options) with ``options`` added and checksums recomputed."""
    out = packet[:40] + options + packet[40:]
    out[32] = (5 + len(options) // 4) << 4
    struct.pack_into("!H", out, 2, len(out))
    view = PacketView()
    view.parse(out, len(out))
    view.compute_checksums()
    return out


def best_per_op(run: Callable[[], object], iterations: int, repeats: int) -> float:
    """Seconds per call of ``run``: the best of ``repeats`` timed loops of ``iterations`` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            run()
        best = min(best, (time.perf_counter() - start) / iterations)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--mtu", type=int, default=1420)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, repeats, mtu = args.iterations, args.repeats, args.mtu

    # -- 64 KB super-packet ---------------------------------------------------------------------------
    big = with_tcp_options(build_packet(APP, REMOTE, IPPROTO_TCP, 40000, 443, bytes(65535 - 52)), TIMESTAMPS)
    big_bytes = bytes(big)
    view = PacketView()
    segments = segment_tcp(big, mtu, view)
    assert isinstance(segments, list)
    seg_iterations = max(1, n // 20)
    copy_big = best_per_op(lambda: bytes(big), seg_iterations * 20, repeats)
    seg = best_per_op(lambda: segment_tcp(big_bytes, mtu, view), seg_iterations, repeats)
    print(f"64 KB TCP packet -> {len(segments)} segments of <= {mtu} bytes")
    print(f"  baseline bytes copy     {copy_big * 1e6:8.2f} us")
    print(
        f"  segment_tcp             {seg * 1e6:8.2f} us  ({seg / copy_big:.1f}x baseline, "
        f"{seg / len(segments) * 1e6:.2f} us per segment)"
    )

    # -- per-packet operations on reused buffers ------------------------------------------------------
    syn = with_tcp_options(
        build_packet(APP, REMOTE, IPPROTO_TCP, 40000, 443, tcp_flags=TCP_SYN),
        struct.pack("!BBH", 2, 4, 1460) + bytes([1, 3, 3, 7]),
    )
    full = build_packet(APP, REMOTE, IPPROTO_TCP, 40000, 443, bytes(mtu - 40), tcp_flags=TCP_ACK)
    reply = build_packet(REMOTE, TUNNEL, IPPROTO_TCP, 443, 40000, bytes(mtu - 40), tcp_flags=TCP_ACK)
    oversize = build_packet(APP, REMOTE, IPPROTO_UDP, 5000, 443, bytes(1500 - 28))
    nat = TunnelNat(TUNNEL, None)
    nat.outbound(_parsed(bytearray(full)), now=0.0)  # the flow exists: time the steady state
    clamp_to = mss_for_mtu(mtu, 4)

    syn_buf, full_buf, reply_buf = bytearray(syn), bytearray(full), bytearray(reply)
    syn_tpl, full_tpl, reply_tpl = bytes(syn), bytes(full), bytes(reply)

    def restore_full() -> None:
        full_buf[:] = full_tpl

    def clamp() -> None:
        syn_buf[:] = syn_tpl
        view.parse(syn_buf, len(syn_buf))
        clamp_mss(view, clamp_to)

    def snat() -> None:
        full_buf[:] = full_tpl
        view.parse(full_buf, len(full_buf))
        nat.outbound(view, 1.0)

    def unnat() -> None:
        reply_buf[:] = reply_tpl
        view.parse(reply_buf, len(reply_buf))
        nat.inbound(view, 1.0)

    def parse_only() -> None:
        full_buf[:] = full_tpl
        view.parse(full_buf, len(full_buf))

    base = best_per_op(restore_full, n * 5, repeats)
    parse = best_per_op(parse_only, n * 5, repeats)
    print(f"per packet ({len(full)}-byte TCP, {len(syn)}-byte SYN, {len(oversize)}-byte UDP)")
    print(f"  baseline restore buffer {base * 1e6:8.2f} us")
    print(f"  restore + parse only    {parse * 1e6:8.2f} us  ({parse / base:.1f}x baseline)")
    for label, run in (
        ("clamp_mss (SYN)", clamp),
        ("TunnelNat.outbound", snat),
        ("TunnelNat.inbound", unnat),
        ("too_big_reply (ICMP)", lambda: too_big_reply(oversize, mtu)),
    ):
        per = best_per_op(run, n * 5, repeats)
        print(f"  {label:<23} {per * 1e6:8.2f} us  ({per / base:.1f}x baseline)")


def _parsed(packet: bytearray) -> PacketView:
    view = PacketView()
    if not view.parse(packet, len(packet)):
        raise SystemExit("benchmark packet does not parse")
    return view


if __name__ == "__main__":
    main()
