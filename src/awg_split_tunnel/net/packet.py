"""In-place views of IPv4/IPv6 + TCP/UDP headers, and Internet checksums.

The router parses and rewrites packets in the buffer they were received into: one ``PacketView`` is reused
for every packet, fields are read with ``struct`` on demand, and rewrites patch the checksums incrementally
(RFC 1624) instead of recomputing them. Nothing here allocates per packet beyond the small ints and address
slices the caller asks for.
"""

from __future__ import annotations

import struct

IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10

IPV4_HEADER_LEN = 20
IPV6_HEADER_LEN = 40
TCP_HEADER_LEN = 20
UDP_HEADER_LEN = 8

# IPv6 extension headers that may precede the transport header (RFC 8200 §4).
_IPV6_EXTENSIONS = frozenset({0, 43, 60, 51})
_IPV6_FRAGMENT = 44

_H = struct.Struct("!H")
_HH = struct.Struct("!HH")
_I = struct.Struct("!I")


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's complement sum of ``data`` (odd lengths padded with a zero byte), folded."""
    total = initial
    n = len(data)
    if n % 2:
        total += data[n - 1] << 8
        n -= 1
    # Because 2**16 == 1 (mod 0xFFFF), the buffer read as one big number is congruent to the sum of its
    # 16-bit words: one modulo replaces the word loop (10x faster in Python than folding by shifts).
    # The folded sum is 0 only when everything summed was 0; otherwise a multiple of 0xFFFF is 0xFFFF.
    big = int.from_bytes(data[:n], "big") if n else 0
    folded = (big + total) % 0xFFFF
    return 0xFFFF if folded == 0 and (big or total) else folded


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data``: the complement of its one's complement sum."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def checksum_adjust(checksum: int, old: int, new: int) -> int:
    """Update ``checksum`` for one 16-bit word changing from ``old`` to ``new`` (RFC 1624, eqn. 3)."""
    total = (~checksum & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def checksum_adjust_bytes(checksum: int, old: bytes | memoryview, new: bytes | memoryview) -> int:
    """Update ``checksum`` for a run of 16-bit words (e.g. an address) changing from ``old`` to ``new``."""
    total = (~checksum & 0xFFFF) + ones_complement_sum(new) + (~ones_complement_sum(old) & 0xFFFF)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """The one's complement sum of the TCP/UDP pseudo-header (RFC 793 / RFC 8200 §8.1)."""
    total = ones_complement_sum(src) + ones_complement_sum(dst) + proto + (length & 0xFFFF) + (length >> 16)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


class PacketView:
    """A reusable view of one IP packet in a caller-owned buffer.

    ``parse`` validates the headers and records offsets; accessors read fields on demand; setters write
    them and patch the checksums incrementally. Malformed packets make ``parse`` return False, never raise.
    """

    __slots__ = (
        "addr_len",
        "buf",
        "fragment",
        "l4",
        "length",
        "proto",
        "src_off",
        "version",
    )

    def __init__(self) -> None:
        self.buf: bytearray | memoryview = bytearray()
        self.length = 0
        self.version = 0
        self.proto = -1
        self.l4 = 0
        self.src_off = 0
        self.addr_len = 0
        self.fragment = False

    def parse(self, buf: bytearray | memoryview, length: int) -> bool:
        """Point the view at ``buf[:length]``; False if it is not a well-formed IPv4/IPv6 packet.

        Only the first fragment of a fragmented datagram has a transport header; later fragments parse
        with ``fragment`` True and ``has_ports`` False.
        """
        self.buf = buf
        self.length = length
        self.fragment = False
        self.proto = -1
        if length < 1:
            return False
        version = buf[0] >> 4
        self.version = version
        if version == 4:
            if length < IPV4_HEADER_LEN:
                return False
            ihl = (buf[0] & 0x0F) * 4
            total = _H.unpack_from(buf, 2)[0]
            if ihl < IPV4_HEADER_LEN or total < ihl or total > length:
                return False
            self.length = total
            frag = _H.unpack_from(buf, 6)[0]
            self.fragment = (frag & 0x3FFF) != 0
            self.proto = buf[9]
            self.src_off = 12
            self.addr_len = 4
            if frag & 0x1FFF:
                self.l4 = -1
                return True
            self.l4 = ihl
        elif version == 6:
            if length < IPV6_HEADER_LEN:
                return False
            total = IPV6_HEADER_LEN + _H.unpack_from(buf, 4)[0]
            if total > length:
                return False
            self.length = total
            self.src_off = 8
            self.addr_len = 16
            nxt = buf[6]
            off = IPV6_HEADER_LEN
            for _ in range(8):
                if nxt in _IPV6_EXTENSIONS:
                    if off + 8 > total:
                        return False
                    ext_len = (buf[off + 1] + 2) * 4 if nxt == 51 else (buf[off + 1] + 1) * 8
                    nxt = buf[off]
                    off += ext_len
                elif nxt == _IPV6_FRAGMENT:
                    if off + 8 > total:
                        return False
                    self.fragment = True
                    frag_off = _H.unpack_from(buf, off + 2)[0] & 0xFFF8
                    nxt = buf[off]
                    off += 8
                    if frag_off:
                        self.proto = nxt
                        self.l4 = -1
                        return True
                else:
                    break
            else:
                return False
            self.proto = nxt
            self.l4 = off
        else:
            return False
        if self.proto == IPPROTO_TCP:
            if self.l4 + TCP_HEADER_LEN > self.length:
                return False
            data_off = (buf[self.l4 + 12] >> 4) * 4
            if data_off < TCP_HEADER_LEN or self.l4 + data_off > self.length:
                return False
        elif self.proto == IPPROTO_UDP and self.l4 + UDP_HEADER_LEN > self.length:
            return False
        return True

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def has_ports(self) -> bool:
        """True for TCP/UDP packets that carry the transport header (not a later fragment)."""
        return self.l4 >= 0 and (self.proto == IPPROTO_TCP or self.proto == IPPROTO_UDP)

    @property
    def src_addr(self) -> bytes:
        return bytes(self.buf[self.src_off : self.src_off + self.addr_len])

    @property
    def dst_addr(self) -> bytes:
        off = self.src_off + self.addr_len
        return bytes(self.buf[off : off + self.addr_len])

    @property
    def src_port(self) -> int:
        return int(_H.unpack_from(self.buf, self.l4)[0])

    @property
    def dst_port(self) -> int:
        return int(_H.unpack_from(self.buf, self.l4 + 2)[0])

    def ports(self) -> tuple[int, int]:
        """(source port, destination port) in one unpack."""
        src, dst = _HH.unpack_from(self.buf, self.l4)
        return src, dst

    @property
    def tcp_flags(self) -> int:
        return int(self.buf[self.l4 + 13])

    @property
    def tcp_seq(self) -> int:
        return int(_I.unpack_from(self.buf, self.l4 + 4)[0])

    @property
    def tcp_ack(self) -> int:
        return int(_I.unpack_from(self.buf, self.l4 + 8)[0])

    @property
    def payload_len(self) -> int:
        """Bytes after the transport header (TCP options excluded)."""
        if self.proto == IPPROTO_TCP:
            return self.length - self.l4 - (self.buf[self.l4 + 12] >> 4) * 4
        return self.length - self.l4 - UDP_HEADER_LEN

    def _l4_checksum_offset(self) -> int:
        return self.l4 + (16 if self.proto == IPPROTO_TCP else 6)

    # -- rewriting -------------------------------------------------------------------------------------

    def swap_addresses(self) -> None:
        """Exchange source and destination addresses. No checksum changes: both sums are symmetric."""
        a, n = self.src_off, self.addr_len
        buf = self.buf
        src = bytes(buf[a : a + n])
        buf[a : a + n] = buf[a + n : a + 2 * n]
        buf[a + n : a + 2 * n] = src

    def _adjust_l4(self, old: int, new: int) -> None:
        off = self._l4_checksum_offset()
        cksum = _H.unpack_from(self.buf, off)[0]
        if self.proto == IPPROTO_UDP and cksum == 0 and self.version == 4:
            return  # IPv4 UDP without a checksum stays without one
        cksum = checksum_adjust(cksum, old, new)
        if self.proto == IPPROTO_UDP and cksum == 0:
            cksum = 0xFFFF
        _H.pack_into(self.buf, off, cksum)

    def set_src_port(self, port: int) -> None:
        old = _H.unpack_from(self.buf, self.l4)[0]
        _H.pack_into(self.buf, self.l4, port)
        self._adjust_l4(old, port)

    def set_dst_port(self, port: int) -> None:
        old = _H.unpack_from(self.buf, self.l4 + 2)[0]
        _H.pack_into(self.buf, self.l4 + 2, port)
        self._adjust_l4(old, port)

    def _set_addr(self, off: int, addr: bytes) -> None:
        buf = self.buf
        old = bytes(buf[off : off + self.addr_len])
        if len(addr) != self.addr_len:
            raise ValueError(f"address of {len(addr)} bytes in an IPv{self.version} packet")
        buf[off : off + self.addr_len] = addr
        if self.version == 4:
            _H.pack_into(buf, 10, checksum_adjust_bytes(_H.unpack_from(buf, 10)[0], old, addr))
        if self.has_ports:
            coff = self._l4_checksum_offset()
            cksum = _H.unpack_from(buf, coff)[0]
            if self.proto == IPPROTO_UDP and cksum == 0 and self.version == 4:
                return
            cksum = checksum_adjust_bytes(cksum, old, addr)
            if self.proto == IPPROTO_UDP and cksum == 0:
                cksum = 0xFFFF
            _H.pack_into(buf, coff, cksum)

    def set_src_addr(self, addr: bytes) -> None:
        self._set_addr(self.src_off, addr)

    def set_dst_addr(self, addr: bytes) -> None:
        self._set_addr(self.src_off + self.addr_len, addr)

    # -- full checksums --------------------------------------------------------------------------------

    def compute_checksums(self) -> None:
        """Recompute the IPv4 header and TCP/UDP checksums from scratch (crafted or offloaded packets)."""
        buf = self.buf
        if self.version == 4:
            ihl = (buf[0] & 0x0F) * 4
            _H.pack_into(buf, 10, 0)
            _H.pack_into(buf, 10, internet_checksum(memoryview(buf)[:ihl]))
        if not self.has_ports or self.fragment:
            return
        off = self._l4_checksum_offset()
        _H.pack_into(buf, off, 0)
        seg_len = self.length - self.l4
        initial = pseudo_header_sum(self.src_addr, self.dst_addr, self.proto, seg_len)
        cksum = internet_checksum(memoryview(buf)[self.l4 : self.length], initial)
        if self.proto == IPPROTO_UDP and cksum == 0:
            cksum = 0xFFFF
        _H.pack_into(buf, off, cksum)

    def checksums_valid(self) -> bool:
        """True if the IPv4 header and the TCP/UDP checksums verify (UDP/IPv4 checksum 0 counts as valid)."""
        buf = self.buf
        if self.version == 4 and ones_complement_sum(memoryview(buf)[: (buf[0] & 0x0F) * 4]) != 0xFFFF:
            return False
        if not self.has_ports or self.fragment:
            return True
        if self.proto == IPPROTO_UDP and self.version == 4 and _H.unpack_from(buf, self.l4 + 6)[0] == 0:
            return True
        seg_len = self.length - self.l4
        initial = pseudo_header_sum(self.src_addr, self.dst_addr, self.proto, seg_len)
        return ones_complement_sum(memoryview(buf)[self.l4 : self.length], initial) == 0xFFFF


def build_packet(
    src: bytes,
    dst: bytes,
    proto: int,
    src_port: int,
    dst_port: int,
    payload: bytes = b"",
    *,
    tcp_flags: int = TCP_ACK,
    seq: int = 0,
    ack: int = 0,
    window: int = 65535,
    ttl: int = 64,
) -> bytearray:
    """A complete IPv4 or IPv6 TCP/UDP packet with correct checksums (for RSTs, injection and tests)."""
    if len(src) != len(dst) or len(src) not in (4, 16):
        raise ValueError("source and destination must both be IPv4 or both IPv6 addresses")
    if proto == IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", src_port, dst_port, seq, ack, 5 << 4, tcp_flags, window, 0, 0)
    elif proto == IPPROTO_UDP:
        l4 = struct.pack("!HHHH", src_port, dst_port, UDP_HEADER_LEN + len(payload), 0)
    else:
        raise ValueError(f"unsupported protocol {proto}")
    seg = l4 + payload
    if len(src) == 4:
        hdr = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, IPV4_HEADER_LEN + len(seg), 0, 0x4000, ttl, proto, 0, src, dst
        )
    else:
        hdr = struct.pack("!IHBB16s16s", 6 << 28, len(seg), proto, ttl, src, dst)
    packet = bytearray(hdr + seg)
    view = PacketView()
    view.parse(packet, len(packet))
    view.compute_checksums()
    return packet


def tcp_reset_for(view: PacketView) -> bytearray:
    """An RST answering the TCP packet in ``view`` as its destination would (RFC 793 reset generation)."""
    flags = view.tcp_flags
    if flags & TCP_ACK:
        seq, ack, rst_flags = view.tcp_ack, 0, TCP_RST
    else:
        seg_len = view.payload_len + (1 if flags & TCP_SYN else 0) + (1 if flags & TCP_FIN else 0)
        seq, ack, rst_flags = 0, (view.tcp_seq + seg_len) & 0xFFFFFFFF, TCP_RST | TCP_ACK
    src_port, dst_port = view.ports()
    return build_packet(
        view.dst_addr,
        view.src_addr,
        IPPROTO_TCP,
        dst_port,
        src_port,
        tcp_flags=rst_flags,
        seq=seq,
        ack=ack,
        window=0,
    )
