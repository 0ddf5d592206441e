"""IP fragmentation of datagrams larger than a packet tunnel's MTU, done as the sending host would.

Where the router sees a datagram before the operating system fragments it (WinDivert on Windows, the
divert data path), a UDP datagram larger than the tunnel's MTU would otherwise only be answered with ICMP
"too big" — and an app whose stack does not react (IPv4 without DF, or any stack that cannot lower its
path MTU for a diverted route) would lose it every time. So, like the host's own IP layer:

- IPv4 without DF (RFC 791 §3.2): the datagram is cut into fragments of at most the MTU, each carrying
  the datagram's identification, its offset in 8-byte units and More Fragments on all but the last (an
  already fragmented datagram keeps its own offset and last MF); options with the copy bit set go into
  every fragment, the others only into the first.
- IPv6 (RFC 8200 §4.5): the source host fragments; a datagram whose next header is the transport header
  gets a Fragment header with a fresh identification. Datagrams with extension headers, already
  fragmented ones and tunnels whose MTU is below IPv6's minimum of 1280 are not fragmented.

Everything else (IPv4 with DF) is answered "too big" as before (``net/icmp.py``). The peer's stack
reassembles.
"""

from __future__ import annotations

import struct

from awg_split_tunnel.net.packet import IPV4_HEADER_LEN, IPV6_HEADER_LEN, PacketView, internet_checksum

IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV6_MIN_MTU = 1280
IPPROTO_FRAGMENT = 44
"""The IPv6 Fragment header's protocol number."""

_IPV6_NOT_TRANSPORT = frozenset({0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254})
"""IPv6 next-header values that are extension headers (RFC 8200 §4, IANA), not a transport header."""

_H = struct.Struct("!H")
_FRAGMENT_HEADER = struct.Struct("!BBHI")


def can_fragment(view: PacketView, mtu: int) -> bool:
    """Whether the datagram in ``view`` may be fragmented to fit ``mtu`` (see the module docstring)."""
    buf = view.buf
    if view.version == 4:
        if _H.unpack_from(buf, 6)[0] & IPV4_DF:
            return False
        header = (buf[0] & 0x0F) * 4
        return mtu - _later_header_len(buf, header) >= 8 and mtu - header >= 8
    if view.version == 6:
        return mtu >= IPV6_MIN_MTU and not view.fragment and buf[6] not in _IPV6_NOT_TRANSPORT
    return False


def fragment(view: PacketView, mtu: int, identification: int) -> list[bytearray]:
    """The fragments (each at most ``mtu`` bytes) of the datagram in ``view``, for which ``can_fragment``
    is true. ``identification`` is the IPv6 Fragment header's (IPv4 keeps the datagram's own)."""
    if view.version == 4:
        return _fragment_v4(view.buf, view.length, mtu)
    return _fragment_v6(view.buf, view.length, mtu, identification)


def _later_header_len(buf: bytearray | memoryview, header: int) -> int:
    return IPV4_HEADER_LEN + len(_copied_options(buf, header))


def _copied_options(buf: bytearray | memoryview, header: int) -> bytes:
    """The IPv4 options with the copy flag, padded to 4 bytes: what every later fragment carries."""
    out = bytearray()
    i = IPV4_HEADER_LEN
    while i < header:
        kind = buf[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no operation
            i += 1
            continue
        if i + 1 >= header or buf[i + 1] < 2:
            break  # malformed: stop; the first fragment carries the header as it was
        size = buf[i + 1]
        if kind & 0x80:
            out += buf[i : i + size]
        i += size
    out += bytes(-len(out) % 4)
    return bytes(out)


def _fragment_v4(buf: bytearray | memoryview, length: int, mtu: int) -> list[bytearray]:
    header = (buf[0] & 0x0F) * 4
    flags = _H.unpack_from(buf, 6)[0]
    base_offset = (flags & 0x1FFF) * 8
    last_more = flags & IPV4_MF
    later_header = bytearray(buf[:IPV4_HEADER_LEN]) + _copied_options(buf, header)
    later_header[0] = 0x40 | (len(later_header) // 4)
    data = memoryview(buf)[header:length]
    out: list[bytearray] = []
    offset = 0
    first = True
    while offset < len(data):
        head = bytearray(buf[:header]) if first else bytearray(later_header)
        room = (mtu - len(head)) // 8 * 8
        chunk = data[offset : offset + room]
        last = offset + len(chunk) >= len(data)
        packet = head + chunk
        _H.pack_into(packet, 2, len(packet))
        more = last_more if last else IPV4_MF
        _H.pack_into(packet, 6, (flags & 0x8000) | more | ((base_offset + offset) // 8))
        _H.pack_into(packet, 10, 0)
        _H.pack_into(packet, 10, internet_checksum(packet[: len(head)]))
        out.append(packet)
        offset += len(chunk)
        first = False
    return out


def _fragment_v6(buf: bytearray | memoryview, length: int, mtu: int, identification: int) -> list[bytearray]:
    next_header = buf[6]
    data = memoryview(buf)[IPV6_HEADER_LEN:length]
    room = (mtu - IPV6_HEADER_LEN - _FRAGMENT_HEADER.size) // 8 * 8
    out: list[bytearray] = []
    for offset in range(0, len(data), room):
        chunk = data[offset : offset + room]
        more = 1 if offset + len(chunk) < len(data) else 0
        packet = bytearray(buf[:IPV6_HEADER_LEN])
        packet[6] = IPPROTO_FRAGMENT
        _H.pack_into(packet, 4, _FRAGMENT_HEADER.size + len(chunk))
        packet += _FRAGMENT_HEADER.pack(next_header, 0, offset | more, identification & 0xFFFFFFFF)
        packet += chunk
        out.append(packet)
    return out
