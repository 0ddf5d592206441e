"""The router's side of a packet tunnel (WireGuard/AmneziaWG): app packets in, tunnel packets out.

As docs/ARCHITECTURE.md says, the router SNATs the app's packets to the tunnel address, clamps TCP MSS to
the tunnel MTU, segments oversize (offloaded) packets, fragments oversize datagrams where the sending host
may (``net/fragment.py``), and injects decrypted replies inbound after DNAT.
``PacketTunnelPath`` does exactly that for one tunnel, sans-I/O: ``send`` takes an app's captured packet
(parsed in a ``PacketView``) and queues what the device must encrypt; ``receive`` takes a decrypted
packet and returns it rewritten for the app. ``PacketRouter`` owns one path per packet tunnel and does
the flow bookkeeping. The I/O adapters are in ``router/``: ``router.divert_loop.AsyncRouterLoop`` runs
the divert handles and the tunnels' devices on one asyncio loop; ``router.service.RouterService`` is the
router process's body around it: it starts, replaces and stops devices as the control plane says (packet
tunnels edited while running).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from awg_split_tunnel.net.fragment import can_fragment, fragment
from awg_split_tunnel.net.icmp import too_big_reply
from awg_split_tunnel.net.packet import IPPROTO_TCP, TCP_SYN, PacketView
from awg_split_tunnel.net.segment import Rejected, clamp_mss, mss_for_mtu, segment_tcp
from awg_split_tunnel.net.tunnel_nat import NatResult, TunnelNat

DEFAULT_TUNNEL_MTU = 1420


@dataclass(frozen=True, slots=True)
class PacketTunnelRoute:
    """How the router reaches one packet tunnel: the addresses its peer knows us by, and its MTU.

    ``listen_port`` is the device's own UDP port: its datagrams to the endpoint are never diverted
    (``platform.divert.router_handles`` also leaves them out of the capture filter).
    """

    address_v4: bytes | None
    address_v6: bytes | None = None
    mtu: int = DEFAULT_TUNNEL_MTU
    lan_bypass: bool = True
    listen_port: int = 0
    dns_port: int = 0
    """The daemon's own local port (UDP and TCP) whose flows go into this tunnel whatever their
    destination: its lookups for the tunnel's apps (docs/DNS.md). 0: none."""
    dns_servers: tuple[bytes, ...] = ()
    """The tunnel's DNS servers (``.conf`` ``DNS =``), packed: where the local resolver's own port-53 flows
    into this tunnel are sent under ``dns.system`` (docs/DNS.md), the first of the flow's IP version."""

    def dns_server(self, version: int) -> bytes | None:
        """The first DNS server of IP ``version`` (4 or 6), else None."""
        return first_of_version(self.dns_servers, version)

    @classmethod
    def from_addresses(
        cls,
        addresses: Iterable[str],
        mtu: int = DEFAULT_TUNNEL_MTU,
        *,
        lan_bypass: bool = True,
        listen_port: int = 0,
        dns_servers: Iterable[str] = (),
    ) -> PacketTunnelRoute:
        """From a ``.conf``'s ``Address`` entries (``198.19.0.2/24``, ``2001:2:1::2/64``): first of each
        version; ``dns_servers`` from its ``DNS`` entries (addresses; search domains are not given)."""
        import ipaddress

        v4: bytes | None = None
        v6: bytes | None = None
        for text in addresses:
            address = ipaddress.ip_interface(text.strip()).ip
            if address.version == 4 and v4 is None:
                v4 = address.packed
            elif address.version == 6 and v6 is None:
                v6 = address.packed
        servers = tuple(ipaddress.ip_address(server).packed for server in dns_servers)
        return cls(v4, v6, mtu, lan_bypass, listen_port, dns_servers=servers)


def first_of_version(addresses: Iterable[bytes], version: int) -> bytes | None:
    """The first of the packed ``addresses`` of IP ``version`` (4 or 6), else None."""
    size = 4 if version == 4 else 16
    return next((address for address in addresses if len(address) == size), None)


@dataclass(slots=True)
class PacketTunnelStats:
    """Per tunnel, what the status page shows; every dropped packet is counted under its reason."""

    packets_out: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    segmented: int = 0
    """Oversize TCP packets cut into MTU-sized segments."""
    mss_clamped: int = 0
    fragmented: int = 0
    """Oversize datagrams sent as IP fragments (IPv4 without DF, IPv6: ``net/fragment.py``)."""
    too_big: int = 0
    """Oversize packets that may not be fragmented (IPv4 with DF) answered with ICMP too-big and dropped."""
    nat_failed: int = 0
    orphans: int = 0
    """Decrypted packets for no known flow (or not for our tunnel address): dropped."""
    malformed: int = 0


class PacketTunnelPath:
    """SNAT + MSS clamp + segmentation + too-big towards one tunnel's device, and DNAT back.

    ``send`` queues packets in ``pending`` (taken by the I/O side with ``take_pending``) and returns
    an ICMP error to inject inbound to the app, if one is due.
    """

    __slots__ = (
        "_fragment_id",
        "_in_view",
        "_seg_view",
        "last_meta",
        "mss_v4",
        "mss_v6",
        "mtu",
        "nat",
        "pending",
        "route",
        "stats",
        "tunnel_id",
    )

    def __init__(self, tunnel_id: str, route: PacketTunnelRoute) -> None:
        self.tunnel_id = tunnel_id
        self.route = route
        self.mtu = route.mtu
        self.mss_v4 = mss_for_mtu(route.mtu, 4)
        self.mss_v6 = mss_for_mtu(route.mtu, 6)
        self.nat = TunnelNat(route.address_v4, route.address_v6)
        self.pending: list[bytes] = []
        self.stats = PacketTunnelStats()
        self._in_view = PacketView()
        self._seg_view = PacketView()
        self._fragment_id = int.from_bytes(os.urandom(4), "big")
        """The last IPv6 Fragment header identification used (RFC 7739: not predictable from outside)."""
        self.last_meta: object = None
        """The I/O side's address record of a recent flow: where replies without ports (later
        fragments) are injected."""

    def has_address(self, version: int) -> bool:
        return (self.route.address_v4 if version == 4 else self.route.address_v6) is not None

    def take_pending(self) -> list[bytes]:
        out, self.pending = self.pending, []
        return out

    def send(self, v: PacketView, now: float) -> bytearray | None:
        """Rewrite the app's packet in ``v`` (its receive buffer) and queue it for the device.

        Returns an ICMP too-big error for the app (the packet is then dropped), or None.
        """
        stats = self.stats
        length = v.length
        if length > self.mtu:
            if v.proto == IPPROTO_TCP and not v.fragment:
                return self._send_segmented(v, now)
            if can_fragment(v, self.mtu):
                self._send_fragmented(v, now)
                return None
            # IPv4 with DF: the app's stack lowers its path MTU on the error and sends smaller datagrams
            # from then on. Quoted before NAT: the app must recognise its own packet.
            stats.too_big += 1
            return _too_big(v, self.mtu)
        if self.nat.outbound(v, now) is not NatResult.REWRITTEN:
            stats.nat_failed += 1
            return None
        if v.has_ports and not v.fragment:
            if v.proto == IPPROTO_TCP and v.buf[v.l4 + 13] & TCP_SYN:
                self._clamp(v)
            # The captured packet may carry only a partial (offloaded) checksum; the peer's side checks
            # the real one.
            v.compute_checksums()
        self.pending.append(bytes(v.buf[:length]))
        stats.packets_out += 1
        stats.bytes_out += length
        return None

    def _send_segmented(self, v: PacketView, now: float) -> bytearray | None:
        stats = self.stats
        original = bytes(v.buf[: v.length])
        if self.nat.outbound(v, now) is not NatResult.REWRITTEN:
            stats.nat_failed += 1
            return None
        # segment_tcp recomputes every checksum, so the partial one of an offloaded packet does not matter.
        segments = segment_tcp(memoryview(v.buf)[: v.length], self.mtu, self._seg_view)
        if isinstance(segments, Rejected):
            stats.too_big += 1
            view = PacketView()
            view.parse(bytearray(original), len(original))
            return _too_big(view, self.mtu)
        stats.segmented += 1
        for segment in segments:
            self.pending.append(bytes(segment))
            stats.bytes_out += len(segment)
        stats.packets_out += len(segments)
        return None

    def _send_fragmented(self, v: PacketView, now: float) -> None:
        """A datagram over the MTU that may be fragmented (``net/fragment.py``): NAT, checksums, fragments."""
        stats = self.stats
        if self.nat.outbound(v, now) is not NatResult.REWRITTEN:
            stats.nat_failed += 1
            return
        if v.has_ports and not v.fragment:
            v.compute_checksums()
        self._fragment_id = (self._fragment_id + 1) & 0xFFFFFFFF
        fragments = fragment(v, self.mtu, self._fragment_id)
        stats.fragmented += 1
        for piece in fragments:
            self.pending.append(bytes(piece))
            stats.bytes_out += len(piece)
        stats.packets_out += len(fragments)

    def _clamp(self, v: PacketView) -> None:
        if clamp_mss(v, self.mss_v4 if v.version == 4 else self.mss_v6).name == "CLAMPED":
            self.stats.mss_clamped += 1

    def receive(self, packet: bytes | bytearray, now: float) -> bytearray | None:
        """A decrypted packet from the device, rewritten back to the app's address and port; None
        (counted) when it belongs to no flow of ours or is malformed."""
        data = bytearray(packet)
        v = self._in_view
        if not v.parse(data, len(data)):
            self.stats.malformed += 1
            return None
        if self.nat.inbound(v, now) is not NatResult.REWRITTEN:
            self.stats.orphans += 1
            return None
        if v.has_ports and v.proto == IPPROTO_TCP and data[v.l4 + 13] & TCP_SYN:
            self._clamp(v)  # the SYN-ACK's MSS: the remote's segments must fit the tunnel as well
        self.stats.packets_in += 1
        self.stats.bytes_in += v.length
        if v.length < len(data):
            del data[v.length :]
        return data

    def expire(self, now: float, limit: int | None = None) -> None:
        self.nat.expire(now, limit)


def _too_big(v: PacketView, mtu: int) -> bytearray | None:
    try:
        return too_big_reply(v.buf[: v.length], mtu)
    except ValueError:
        return None  # an IPv6 tunnel MTU below 1280 cannot be announced; the packet is just dropped
