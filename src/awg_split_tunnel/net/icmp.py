"""ICMP "too big" errors: what the router answers an app whose packet does not fit a packet tunnel.

A WireGuard tunnel cannot carry a packet larger than its MTU, and UDP cannot be segmented like TCP. The
router drops such a packet and answers with ICMPv4 "fragmentation needed" (type 3 code 4, next-hop MTU
per RFC 1191) or ICMPv6 "packet too big" (type 2, RFC 4443 §3.2), so that the app's stack lowers its
path MTU for that destination and sends smaller datagrams (or fragments them itself) from then on.
"""

from __future__ import annotations

import struct

from awg_split_tunnel.net.packet import PacketView, internet_checksum, pseudo_header_sum

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58

ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED = 4
ICMPV6_PACKET_TOO_BIG = 2

ICMPV4_MAX_LEN = 576
"""RFC 1812 §4.3.2.3: quote as much of the packet as fits in a 576-byte ICMP datagram."""
ICMPV6_MAX_LEN = 1280
"""RFC 4443 §2.4(c): as much of the packet as fits without exceeding the minimum IPv6 MTU."""

# ICMPv4 error types (RFC 1122 §3.2.2: never answer an ICMP error with another one).
_ICMPV4_ERRORS = frozenset({3, 4, 5, 11, 12})
_ICMPV6_INFO_MIN = 128
"""ICMPv6 types below 128 are errors (RFC 4443 §2.1)."""

_ICMP_TTL = 64

_H = struct.Struct("!H")
_IPV4_ICMP = struct.Struct("!BBHHHBBH4s4sBBHHH")
_IPV6_ICMP = struct.Struct("!IHBB16s16sBBHI")


def too_big_reply(
    packet: bytes | bytearray | memoryview, mtu: int, source: bytes | None = None
) -> bytearray | None:
    """The ICMP "too big" error for ``packet`` (IPv4 or IPv6) that exceeds ``mtu``, or None.

    None means no error may be sent: the packet is malformed, fits the MTU, or is one RFC 1122 / RFC 4443
    forbid answering (an ICMP error, a non-first IPv4 fragment, an unspecified / multicast / broadcast
    source, an IPv4 multicast / broadcast destination). ``source`` is the error's source address; by
    default the packet's destination, so the error appears to come from the path towards it.
    """
    buf = memoryview(packet) if isinstance(packet, bytes) else packet
    view = PacketView()
    if not view.parse(buf, len(buf)) or view.length <= mtu:
        return None
    if view.version == 4:
        return fragmentation_needed(view, mtu, source)
    return packet_too_big(view, mtu, source)


def fragmentation_needed(view: PacketView, mtu: int, source: bytes | None = None) -> bytearray | None:
    """ICMPv4 type 3 code 4 for the IPv4 packet in ``view``, carrying ``mtu`` as the next-hop MTU.

    Sent whether or not the packet has DF: hosts (Linux, Windows) update their path MTU on it either way
    and then fragment locally, which a tunnel that never fragments needs.
    """
    if view.version != 4:
        return None
    if not 68 <= mtu <= 0xFFFF:
        raise ValueError(f"next-hop MTU {mtu} is not a valid IPv4 MTU")
    buf = view.buf
    src, dst = view.src_addr, view.dst_addr
    if not _unicast_v4(src) or not _unicast_v4(dst):
        return None
    if _H.unpack_from(buf, 6)[0] & 0x1FFF:
        return None  # only the first fragment is answered (RFC 1122 §3.2.2)
    if view.proto == IPPROTO_ICMP:
        ihl = (buf[0] & 0x0F) * 4
        if view.length <= ihl or buf[ihl] in _ICMPV4_ERRORS:
            return None
    quote = min(view.length, ICMPV4_MAX_LEN - 28)
    reply = bytearray(28 + quote)
    _IPV4_ICMP.pack_into(
        reply,
        0,
        0x45,
        0,
        len(reply),
        0,
        0,
        _ICMP_TTL,
        IPPROTO_ICMP,
        0,
        dst if source is None else _checked(source, 4),
        src,
        ICMP_DEST_UNREACH,
        ICMP_FRAG_NEEDED,
        0,
        0,
        mtu,
    )
    reply[28:] = buf[:quote]
    _H.pack_into(reply, 10, internet_checksum(memoryview(reply)[:20]))
    _H.pack_into(reply, 22, internet_checksum(memoryview(reply)[20:]))
    return reply


def packet_too_big(view: PacketView, mtu: int, source: bytes | None = None) -> bytearray | None:
    """ICMPv6 type 2 "packet too big" for the IPv6 packet in ``view``, carrying ``mtu``.

    Unlike other ICMPv6 errors it may answer a multicast destination (RFC 4443 §2.4(e.2)).
    """
    if view.version != 6:
        return None
    if not 1280 <= mtu <= 0xFFFFFFFF:
        raise ValueError(f"MTU {mtu} is below the IPv6 minimum of 1280")
    buf = view.buf
    src, dst = view.src_addr, view.dst_addr
    if src == bytes(16) or src[0] == 0xFF:
        return None
    l4 = view.l4
    if view.proto == IPPROTO_ICMPV6 and l4 >= 0 and (view.length <= l4 or buf[l4] < _ICMPV6_INFO_MIN):
        return None
    quote = min(view.length, ICMPV6_MAX_LEN - 48)
    reply = bytearray(48 + quote)
    reply_src = dst if source is None else _checked(source, 16)
    if reply_src[0] == 0xFF:
        return None  # an error must come from a unicast address; the caller must give one
    _IPV6_ICMP.pack_into(
        reply,
        0,
        6 << 28,
        8 + quote,
        IPPROTO_ICMPV6,
        _ICMP_TTL,
        reply_src,
        src,
        ICMPV6_PACKET_TOO_BIG,
        0,
        0,
        mtu,
    )
    reply[48:] = buf[:quote]
    initial = pseudo_header_sum(reply_src, src, IPPROTO_ICMPV6, 8 + quote)
    _H.pack_into(reply, 42, internet_checksum(memoryview(reply)[40:], initial))
    return reply


def _unicast_v4(addr: bytes) -> bool:
    return addr[0] != 0 and addr[0] < 224 and addr != b"\xff\xff\xff\xff"


def _checked(addr: bytes, size: int) -> bytes:
    if len(addr) != size:
        raise ValueError(f"an IPv{4 if size == 4 else 6} error needs a {size}-byte source address")
    return addr
