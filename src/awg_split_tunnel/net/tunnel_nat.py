"""Source NAT of apps' packets to a packet tunnel's address, and back for the replies.

A WireGuard peer accepts from a client only packets sourced from the client's tunnel address, so the
router rewrites an app's packet (app A:a → remote R:r) to (T:t → R:r), T being the tunnel address and t
the app's port when no other flow holds (t, R:r) already, else a fresh one. Replies (R:r → T:t) find the
flow by (protocol, t, R, r) and are rewritten back to (R:r → A:a). Checksums are patched incrementally
(RFC 1624), and an IPv4 UDP checksum of 0 (none) stays 0.

ICMP errors from inside the tunnel (port unreachable, fragmentation needed / packet too big, time
exceeded, parameter problem) quote the packet that caused them, i.e. one of ours as it left: (T:t → R:r).
They are found by that quote and rewritten as the app would have received them directly: addressed to A,
quoting (A:a → R:r). Without that a tunnelled app would wait for its timeout instead of seeing "connection
refused", and path MTU discovery inside the tunnel would never reach it.

One ``TunnelNat`` per tunnel, owned by the router's loop; time is passed in. Mappings expire like the
router's flows (``net.nat``): TCP after ``TCP_SYN_TIMEOUT`` while nothing came back from inside the tunnel
(a SYN never answered), ``TCP_IDLE_TIMEOUT`` once something did; deadlines wait in a ``TimerWheel``, so
expiring costs what expires.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from awg_split_tunnel.net.packet import (
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    PacketView,
    internet_checksum,
    pseudo_header_sum,
)
from awg_split_tunnel.net.timer_wheel import TimerWheel

TCP_IDLE_TIMEOUT = 7440.0
"""RFC 5382 REQ-5: an established TCP mapping lives at least 2 h 4 min without packets."""
TCP_SYN_TIMEOUT = 75.0
"""A TCP mapping nothing came back to from inside the tunnel (a SYN never answered) goes after this, like
``net.nat.TCP_SYN_TIMEOUT``: a flood of unanswered SYNs must not stay for 2 h."""
TCP_CLOSED_LINGER = 10.0
"""After an RST or FINs both ways: room for the last ACKs and retransmitted FINs."""
UDP_IDLE_TIMEOUT = 120.0
"""RFC 4787 REQ-5: at least 2 min."""

EPHEMERAL_PORTS = range(49152, 65536)
"""Where a new tunnel-side port is taken from when the app's own port is held (RFC 6335)."""

_PORT_PROTOS = frozenset({IPPROTO_TCP, IPPROTO_UDP})
IPPROTO_ICMP = 1
ICMP_ERRORS_V4 = frozenset({3, 11, 12})
"""Destination unreachable (incl. fragmentation needed), time exceeded, parameter problem."""
ICMP_ERRORS_V6 = frozenset({1, 2, 3, 4})
"""Destination unreachable, packet too big, time exceeded, parameter problem."""
ICMP_HEADER_LEN = 8
_FIN_OUT = 1
_FIN_IN = 2
_H = struct.Struct("!H")
_HH = struct.Struct("!HH")


class NatResult(enum.Enum):
    """What ``TunnelNat.outbound`` / ``inbound`` did with a packet."""

    REWRITTEN = "rewritten"
    NO_MAPPING = "not addressed to the tunnel, or a reply to no known flow"
    NO_ADDRESS = "the tunnel has no address of this IP version"
    NO_PORT = "no free tunnel-side port towards this remote"
    UNSUPPORTED = "not TCP/UDP, or a fragment without ports"


@dataclass(slots=True, eq=False)
class TunnelMapping:
    """One flow through the tunnel: the app's address and port, and the port it has on the tunnel."""

    proto: int
    app_addr: bytes
    app_port: int
    remote_addr: bytes
    remote_port: int
    tunnel_port: int
    last_seen: float
    out_key: bytes
    in_key: bytes
    fin: int = 0
    closed_at: float | None = None
    replied: bool = False
    """Something came back for it from inside the tunnel."""
    slot: int = field(default=-1, repr=False)
    """Its expiry slot (``TimerWheel``)."""

    def deadline(self) -> float:
        if self.closed_at is not None:
            return self.closed_at + TCP_CLOSED_LINGER
        if self.proto == IPPROTO_TCP:
            return self.last_seen + (TCP_IDLE_TIMEOUT if self.replied else TCP_SYN_TIMEOUT)
        return self.last_seen + UDP_IDLE_TIMEOUT


def _outbound_key(view: PacketView) -> bytes:
    """App side: source address, destination address, source port, destination port."""
    buf, a, n, l4 = view.buf, view.src_off, view.addr_len, view.l4
    return bytes(buf[a : a + 2 * n]) + bytes(buf[l4 : l4 + 4])


def _inbound_key(remote_addr: bytes, remote_port: int, tunnel_port: int) -> bytes:
    """Tunnel side: remote address, remote port, tunnel-side port (as a reply carries them)."""
    return remote_addr + remote_port.to_bytes(2, "big") + tunnel_port.to_bytes(2, "big")


class TunnelNat:
    """The SNAT of one packet tunnel: rewrites packets in place and keeps the flow mappings."""

    __slots__ = (
        "_app_addrs",
        "_expiry",
        "_inbound",
        "_next_port",
        "_outbound",
        "address_v4",
        "address_v6",
        "exhausted",
    )

    def __init__(self, address_v4: bytes | None, address_v6: bytes | None) -> None:
        if address_v4 is not None and len(address_v4) != 4:
            raise ValueError("the tunnel's IPv4 address must be 4 bytes")
        if address_v6 is not None and len(address_v6) != 16:
            raise ValueError("the tunnel's IPv6 address must be 16 bytes")
        self.address_v4 = address_v4
        self.address_v6 = address_v6
        # Per protocol (index 0 TCP, 1 UDP): app-side key → mapping, tunnel-side key → mapping.
        self._outbound: tuple[dict[bytes, TunnelMapping], dict[bytes, TunnelMapping]] = ({}, {})
        self._inbound: tuple[dict[bytes, TunnelMapping], dict[bytes, TunnelMapping]] = ({}, {})
        self._next_port = EPHEMERAL_PORTS.start
        # Per IP version: app address → number of its mappings (for reassembling-free fragment replies).
        self._app_addrs: tuple[dict[bytes, int], dict[bytes, int]] = ({}, {})
        self._expiry: TimerWheel[TunnelMapping] = TimerWheel()
        self.exhausted = 0
        """Packets dropped because no tunnel-side port was free (counted for the status page)."""

    def __len__(self) -> int:
        return len(self._outbound[0]) + len(self._outbound[1])

    def mappings(self) -> list[TunnelMapping]:
        return [*self._outbound[0].values(), *self._outbound[1].values()]

    def outbound(self, view: PacketView, now: float) -> NatResult:
        """Rewrite the app's packet in ``view`` (parsed) to come from the tunnel address, creating the
        flow's mapping on its first packet."""
        proto = view.proto
        tunnel_addr = self.address_v4 if view.version == 4 else self.address_v6
        if tunnel_addr is None:
            return NatResult.NO_ADDRESS
        if not view.has_ports:
            if view.l4 < 0 and proto in _PORT_PROTOS:
                # A later fragment carries no ports (the first one did, and got the port rewrite):
                # only the address changes, and only the IPv4 header checksum covers it.
                _rewrite(view, view.src_off, tunnel_addr, -1, 0)
                return NatResult.REWRITTEN
            return NatResult.UNSUPPORTED
        i = 0 if proto == IPPROTO_TCP else 1
        key = _outbound_key(view)
        mapping = self._outbound[i].get(key)
        if mapping is None:
            new = self._create(i, proto, view, key, now)
            if new is None:
                self.exhausted += 1
                return NatResult.NO_PORT
            mapping = new
        mapping.last_seen = now
        if proto == IPPROTO_TCP:
            self._track_close(mapping, view.tcp_flags, _FIN_OUT, now)
        _rewrite(view, view.src_off, tunnel_addr, view.l4, mapping.tunnel_port)
        return NatResult.REWRITTEN

    def inbound(self, view: PacketView, now: float) -> NatResult:
        """Rewrite a reply from the tunnel in ``view`` (parsed) back to the app's address and port."""
        proto = view.proto
        buf, off, n, l4 = view.buf, view.src_off, view.addr_len, view.l4
        tunnel_addr = self.address_v4 if n == 4 else self.address_v6
        if tunnel_addr is None or bytes(buf[off + n : off + 2 * n]) != tunnel_addr:
            return NatResult.NO_MAPPING
        if proto == (IPPROTO_ICMP if n == 4 else IPPROTO_ICMPV6) and l4 >= 0:
            return self._icmp_error(view, tunnel_addr)
        if not view.has_ports:
            app_addrs = self._app_addrs[0 if n == 4 else 1]
            if l4 < 0 and proto in _PORT_PROTOS and len(app_addrs) == 1:
                # A later fragment has no ports to find its flow by; with one app address behind the
                # tunnel (the usual single-homed host) it can only be for that address.
                _rewrite(view, off + n, next(iter(app_addrs)), -1, 0)
                return NatResult.REWRITTEN
            return NatResult.UNSUPPORTED
        i = 0 if proto == IPPROTO_TCP else 1
        key = bytes(buf[off : off + n]) + bytes(buf[l4 : l4 + 4])
        mapping = self._inbound[i].get(key)
        if mapping is None:
            return NatResult.NO_MAPPING
        mapping.last_seen = now
        if not mapping.replied:
            mapping.replied = True
            self._expiry.schedule(mapping, mapping.deadline())  # now, not when its SYN timeout comes
        if proto == IPPROTO_TCP:
            self._track_close(mapping, view.tcp_flags, _FIN_IN, now)
        _rewrite(view, off + n, mapping.app_addr, l4 + 2, mapping.app_port)
        return NatResult.REWRITTEN

    def _icmp_error(self, view: PacketView, tunnel_addr: bytes) -> NatResult:
        """An ICMP error addressed to the tunnel (checked by the caller): rewrite it for the app whose
        packet it quotes, or NO_MAPPING (informational messages, quotes of no flow of ours)."""
        buf, n, end = view.buf, view.addr_len, view.length
        icmp = view.l4
        quote = icmp + ICMP_HEADER_LEN
        if end - icmp < ICMP_HEADER_LEN or buf[icmp] not in (ICMP_ERRORS_V4 if n == 4 else ICMP_ERRORS_V6):
            return NatResult.NO_MAPPING
        # The quoted header: ours as it left, so it is the same IP version, from the tunnel address.
        if n == 4:
            if end - quote < IPV4_HEADER_LEN or buf[quote] >> 4 != 4:
                return NatResult.NO_MAPPING
            quoted_l4 = quote + (buf[quote] & 0x0F) * 4
            quoted_proto = buf[quote + 9]
            quoted_src = quote + 12
            if quoted_l4 < quote + IPV4_HEADER_LEN or _H.unpack_from(buf, quote + 6)[0] & 0x1FFF:
                return NatResult.NO_MAPPING  # bad header length, or a later fragment: no ports quoted
        else:
            if end - quote < IPV6_HEADER_LEN or buf[quote] >> 4 != 6:
                return NatResult.NO_MAPPING
            quoted_l4 = quote + IPV6_HEADER_LEN
            quoted_proto = buf[quote + 6]  # extension headers before TCP/UDP are not looked through
            quoted_src = quote + 8
        if quoted_proto not in _PORT_PROTOS or end - quoted_l4 < 4:
            return NatResult.NO_MAPPING
        if bytes(buf[quoted_src : quoted_src + n]) != tunnel_addr:
            return NatResult.NO_MAPPING
        remote_addr = bytes(buf[quoted_src + n : quoted_src + 2 * n])
        tunnel_port, remote_port = _HH.unpack_from(buf, quoted_l4)
        i = 0 if quoted_proto == IPPROTO_TCP else 1
        mapping = self._inbound[i].get(_inbound_key(remote_addr, remote_port, tunnel_port))
        if mapping is None:
            return NatResult.NO_MAPPING
        app_addr = mapping.app_addr
        # The quoted packet back as the app sent it: its source, and the checksums that cover it.
        ip4, port = (quote if n == 4 else -1), mapping.app_port
        _rewrite_headers(buf, ip4, quoted_l4, quoted_proto, quoted_src, app_addr, quoted_l4, port, end)
        # The outer header now goes to the app; the ICMP checksum is computed afresh over the message.
        dst = view.src_off + n
        buf[dst : dst + n] = app_addr
        buf[icmp + 2 : icmp + 4] = b"\0\0"
        if n == 4:
            buf[10:12] = b"\0\0"
            _H.pack_into(buf, 10, internet_checksum(buf[:icmp]))
            _H.pack_into(buf, icmp + 2, internet_checksum(buf[icmp:end]))
        else:
            src = view.src_off
            initial = pseudo_header_sum(bytes(buf[src : src + n]), app_addr, IPPROTO_ICMPV6, end - icmp)
            _H.pack_into(buf, icmp + 2, internet_checksum(buf[icmp:end], initial))
        return NatResult.REWRITTEN

    def expire(self, now: float, limit: int | None = None) -> list[TunnelMapping]:
        """Remove and return the mappings whose time is up: those of the expiry slots that came due, at
        most ``limit`` looked at (the rest at the next call)."""
        gone: list[TunnelMapping] = []
        wheel = self._expiry
        for mapping in wheel.due(now, limit):
            deadline = mapping.deadline()
            if deadline > now:
                wheel.schedule(mapping, deadline)
                continue
            gone.append(mapping)
            i = 0 if mapping.proto == IPPROTO_TCP else 1
            del self._outbound[i][mapping.out_key]
            del self._inbound[i][mapping.in_key]
            addrs = self._app_addrs[0 if len(mapping.app_addr) == 4 else 1]
            addrs[mapping.app_addr] -= 1
            if not addrs[mapping.app_addr]:
                del addrs[mapping.app_addr]
        return gone

    def _create(self, i: int, proto: int, view: PacketView, key: bytes, now: float) -> TunnelMapping | None:
        app_port, remote_port = view.ports()
        remote_addr = view.dst_addr
        inbound = self._inbound[i]
        port = app_port
        in_key = _inbound_key(remote_addr, remote_port, port)
        if in_key in inbound:
            port = self._free_port(inbound, remote_addr, remote_port)
            if port < 0:
                return None
            in_key = _inbound_key(remote_addr, remote_port, port)
        mapping = TunnelMapping(
            proto, view.src_addr, app_port, remote_addr, remote_port, port, now, key, in_key
        )
        self._outbound[i][key] = mapping
        inbound[in_key] = mapping
        self._expiry.schedule(mapping, mapping.deadline())
        addrs = self._app_addrs[0 if len(mapping.app_addr) == 4 else 1]
        addrs[mapping.app_addr] = addrs.get(mapping.app_addr, 0) + 1
        return mapping

    def _free_port(self, inbound: dict[bytes, TunnelMapping], remote_addr: bytes, remote_port: int) -> int:
        # A rotating cursor: consecutive collisions get different ports without rescanning from the start.
        start, size = EPHEMERAL_PORTS.start, len(EPHEMERAL_PORTS)
        prefix = remote_addr + remote_port.to_bytes(2, "big")
        for _ in range(size):
            port = self._next_port
            self._next_port = start + (port - start + 1) % size
            if prefix + port.to_bytes(2, "big") not in inbound:
                return port
        return -1

    def _track_close(self, mapping: TunnelMapping, flags: int, side: int, now: float) -> None:
        if flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            # A new connection on a lingering 4-tuple (TIME_WAIT reuse) revives the mapping.
            mapping.fin = 0
            mapping.closed_at = None
            mapping.replied = False
            self._expiry.schedule(mapping, mapping.deadline())
        elif flags & TCP_RST:
            mapping.closed_at = now
            self._expiry.schedule(mapping, mapping.deadline())
        elif flags & TCP_FIN:
            mapping.fin |= side
            if mapping.fin == _FIN_OUT | _FIN_IN:
                mapping.closed_at = now
                self._expiry.schedule(mapping, mapping.deadline())


def _rewrite(view: PacketView, addr_off: int, addr: bytes, port_off: int, port: int) -> None:
    """``_rewrite_headers`` on the packet ``view`` is parsed to."""
    ip4 = 0 if view.version == 4 else -1
    _rewrite_headers(view.buf, ip4, view.l4, view.proto, addr_off, addr, port_off, port, view.length)


def _rewrite_headers(
    buf: bytearray | memoryview,
    ip4: int,
    l4: int,
    proto: int,
    addr_off: int,
    addr: bytes,
    port_off: int,
    port: int,
    end: int,
) -> None:
    """Write ``addr`` at ``addr_off`` (and ``port`` at ``port_off`` unless it is -1) into the IP + TCP/UDP
    headers at ``ip4`` (the IPv4 header's offset, -1 for IPv6) and ``l4`` (-1: a later fragment), patching
    the IPv4 header and TCP/UDP checksums with one combined delta (RFC 1624 eqn. 3 in arithmetic mod
    0xFFFF, where 2**16 ≡ 1 makes an address's integer value congruent to the sum of its 16-bit words).
    ``end`` is where the packet ends: a packet quoted in an ICMP error may stop before its checksum."""
    n = len(addr)
    delta = int.from_bytes(addr, "big") - int.from_bytes(buf[addr_off : addr_off + n], "big")
    buf[addr_off : addr_off + n] = addr
    if ip4 >= 0:
        _H.pack_into(buf, ip4 + 10, _adjusted(_H.unpack_from(buf, ip4 + 10)[0], delta))
    if l4 < 0:
        return  # a later fragment: no transport header, the first fragment's checksum covers the datagram
    if port_off >= 0:
        delta += port - _H.unpack_from(buf, port_off)[0]
        _H.pack_into(buf, port_off, port)
    csum_off = l4 + (16 if proto == IPPROTO_TCP else 6)
    if csum_off + 2 > end:
        return
    csum = _H.unpack_from(buf, csum_off)[0]
    if proto == IPPROTO_TCP:
        _H.pack_into(buf, csum_off, _adjusted(csum, delta))
    elif csum or ip4 < 0:  # IPv4 UDP without a checksum stays without one
        # A computed UDP checksum of 0 is sent as 0xFFFF: 0 means "none" (RFC 768).
        _H.pack_into(buf, csum_off, _adjusted(csum, delta) or 0xFFFF)


def _adjusted(checksum: int, delta: int) -> int:
    """``checksum`` after the summed data changed by ``delta``: HC' = ~(~HC + m' - m)."""
    total = (0xFFFF - checksum + delta) % 0xFFFF
    return 0xFFFF - (total or 0xFFFF)
