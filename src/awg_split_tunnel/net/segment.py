"""TCP segmentation of oversize (offloaded) packets and MSS clamping, for packet tunnels.

An app's TCP stack may hand the router a GSO/TSO super-packet of up to 64 KB, and its SYN advertises an
MSS for the path it knows, not for the tunnel. A WireGuard tunnel carries only packets that fit its MTU,
so the router cuts super-packets into MTU-sized segments (``segment_tcp``) and lowers the MSS option of
SYN / SYN-ACK packets (``clamp_mss``) so that the peers send segments that fit in the first place.

Both work on raw IPv4/IPv6 packets; malformed input gives a ``Rejected`` / ``ClampResult`` value, never an
exception.
"""

from __future__ import annotations

import enum
import struct

from awg_split_tunnel.net.packet import (
    IPPROTO_TCP,
    TCP_FIN,
    TCP_PSH,
    TCP_SYN,
    PacketView,
    ones_complement_sum,
)

TCP_CWR = 0x80

TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_MSS = 2
TCPOLEN_MSS = 4

IPV4_MIN_MTU = 68
"""RFC 791: every IPv4 host and link handles datagrams of 68 bytes."""

_H = struct.Struct("!H")
_I = struct.Struct("!I")


class Rejected(enum.Enum):
    """Why a packet cannot be segmented (the router counts and drops it)."""

    MALFORMED = "truncated or inconsistent IP/TCP headers"
    NOT_TCP = "not a TCP packet"
    FRAGMENT = "an IP fragment"
    NO_ROOM = "the headers alone fill the MTU"
    SYN = "a SYN carrying more data than fits the MTU"


class ClampResult(enum.Enum):
    """What ``clamp_mss`` did."""

    CLAMPED = "MSS lowered"
    UNCHANGED = "not a SYN, no MSS option, or the MSS already fits"
    MALFORMED = "truncated headers or a TCP option overflowing the header"


def mss_for_mtu(mtu: int, version: int) -> int:
    """The MSS that fills an ``mtu``-sized packet with no IP or TCP options (what peers will send)."""
    return mtu - (40 if version == 4 else 60)


def _parse_tcp(view: PacketView, packet: bytearray | memoryview) -> Rejected | None:
    if not view.parse(packet, len(packet)):
        return Rejected.MALFORMED
    if view.fragment:
        return Rejected.FRAGMENT
    if view.proto != IPPROTO_TCP:
        return Rejected.NOT_TCP
    return None


def segment_tcp(
    packet: bytes | bytearray | memoryview, mtu: int, view: PacketView | None = None
) -> list[bytearray] | Rejected:
    """Cut a TCP packet into packets of at most ``mtu`` bytes.

    Each segment carries the original IP header (options and IPv6 extension headers included) and TCP
    header with its own IP length, IPv4 id (incremented per segment), sequence number and checksums;
    FIN and PSH stay only on the last segment, CWR only on the first. The incoming TCP checksum is not
    read (offloaded packets carry only a partial one); the urgent pointer is copied as it is (stacks do
    not offload urgent data). A packet that already fits comes back as one copy, unchanged. ``view`` may
    be passed to reuse one parser across calls.
    """
    if mtu < IPV4_MIN_MTU:
        raise ValueError(f"MTU {mtu} is below the IPv4 minimum of {IPV4_MIN_MTU}")
    buf = memoryview(packet) if isinstance(packet, bytes) else packet
    if view is None:
        view = PacketView()
    rejected = _parse_tcp(view, buf)
    if rejected is not None:
        return rejected
    total = view.length
    if total <= mtu:
        return [bytearray(buf[:total])]
    l4 = view.l4
    doff = (buf[l4 + 12] >> 4) * 4
    headers = l4 + doff
    mss = mtu - headers
    if mss <= 0:
        return Rejected.NO_ROOM
    v4 = view.version == 4
    flags = buf[l4 + 13]
    if flags & TCP_SYN:
        return Rejected.SYN  # stacks never offload SYNs; its data (TCP Fast Open) is the sender's to fit

    template = bytearray(buf[:headers])
    _H.pack_into(template, l4 + 16, 0)
    if v4:
        ip_id = _H.unpack_from(template, 4)[0]
        # The IPv4 header sum without length, id and checksum; each segment adds its own two words.
        template[2:6] = b"\0\0\0\0"
        template[10:12] = b"\0\0"
        ip_base = ones_complement_sum(memoryview(template)[:l4])
    seq = _I.unpack_from(template, l4 + 4)[0]
    pseudo_base = ones_complement_sum(memoryview(template)[view.src_off : view.src_off + 2 * view.addr_len])
    pseudo_base += IPPROTO_TCP

    payload = memoryview(buf)[headers:total]
    size = total - headers
    segments: list[bytearray] = []
    offset = 0
    index = 0
    while offset < size:
        end = min(offset + mss, size)
        seg = template + payload[offset:end]
        seg_len = len(seg)
        if v4:
            _H.pack_into(seg, 2, seg_len)
            seg_id = (ip_id + index) & 0xFFFF
            _H.pack_into(seg, 4, seg_id)
            _H.pack_into(seg, 10, ~((ip_base + seg_len + seg_id) % 0xFFFF or 0xFFFF) & 0xFFFF)
        else:
            _H.pack_into(seg, 4, seg_len - 40)
        _I.pack_into(seg, l4 + 4, (seq + offset) & 0xFFFFFFFF)
        seg_flags = flags
        if end < size:
            seg_flags &= ~(TCP_FIN | TCP_PSH)
        if index:
            seg_flags &= ~TCP_CWR
        seg[l4 + 13] = seg_flags
        tcp_len = seg_len - l4
        _H.pack_into(seg, l4 + 16, ~ones_complement_sum(memoryview(seg)[l4:], pseudo_base + tcp_len) & 0xFFFF)
        segments.append(seg)
        offset = end
        index += 1
    return segments


def clamp_mss(view: PacketView, mss: int) -> ClampResult:
    """Lower the MSS option of the SYN / SYN-ACK in ``view`` (already parsed) to ``mss``, in place.

    Never raises the MSS; the TCP checksum is updated incrementally (RFC 1624). Other packets, and SYNs
    without an MSS option, are left alone (the peer then assumes 536 / 1220, which fits any tunnel).
    """
    if view.proto != IPPROTO_TCP or view.l4 < 0 or view.fragment:
        return ClampResult.UNCHANGED
    buf, l4 = view.buf, view.l4
    if not buf[l4 + 13] & TCP_SYN:
        return ClampResult.UNCHANGED
    end = l4 + (buf[l4 + 12] >> 4) * 4
    off = l4 + 20
    while off < end:
        kind = buf[off]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            off += 1
            continue
        if off + 2 > end:
            return ClampResult.MALFORMED
        opt_len = buf[off + 1]
        if opt_len < 2 or off + opt_len > end:
            return ClampResult.MALFORMED
        if kind == TCPOPT_MSS:
            if opt_len != TCPOLEN_MSS:
                return ClampResult.MALFORMED
            old = _H.unpack_from(buf, off + 2)[0]
            if old <= mss:
                return ClampResult.UNCHANGED
            _patch_tcp(buf, l4, off + 2, _H.pack(mss))
            return ClampResult.CLAMPED
        off += opt_len
    return ClampResult.UNCHANGED


def clamp_mss_packet(packet: bytearray | memoryview, mss: int) -> ClampResult:
    """``clamp_mss`` on a raw packet: parse it first (malformed headers give ``MALFORMED``)."""
    view = PacketView()
    if not view.parse(packet, len(packet)):
        return ClampResult.MALFORMED
    return clamp_mss(view, mss)


def _patch_tcp(buf: bytearray | memoryview, l4: int, off: int, new: bytes) -> None:
    """Write ``new`` at ``off`` and patch the TCP checksum; options can sit at odd offsets, so the
    checksum is adjusted over the enclosing 16-bit-aligned words (the header starts word-aligned)."""
    start = off - ((off - l4) & 1)
    stop = off + len(new)
    stop += (stop - l4) & 1
    old_words = int.from_bytes(buf[start:stop], "big")
    buf[off : off + len(new)] = new
    # RFC 1624 eqn. 3, HC' = ~(~HC + m' - m), in arithmetic mod 0xFFFF (see ``ones_complement_sum``).
    delta = int.from_bytes(buf[start:stop], "big") - old_words
    total = (0xFFFF - _H.unpack_from(buf, l4 + 16)[0] + delta) % 0xFFFF or 0xFFFF
    _H.pack_into(buf, l4 + 16, 0xFFFF - total)
