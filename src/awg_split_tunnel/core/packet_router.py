"""PacketRouter: every new outbound flow → its process → its rule → tunnel, pass or drop (docs/DESIGN.md).

``PacketRouter`` is sans-I/O: ``route(buf, length, now, copy_meta)`` looks at one captured outbound packet
in its receive buffer and returns a ``PacketAction`` (rewritten in place where needed); connect events come in
through ``connect_event``; packets it held or crafted (RSTs) come out of ``take_outgoing``; ``poll(now)``
runs the timers. Process lookups are injected callables. The I/O adapters live in ``router/``:
``router.divert_loop`` (the divert handles' loops), ``router.service`` and ``router.process`` (the router
process, docs/DESIGN.md).

A new flow's first packet (TCP SYN, first UDP datagram) waits until the connect event naming its process
has arrived (``hold_timeout``; events and packets come on different handles in no fixed order), then the
OS socket tables are asked; a flow whose owner stays unknown gets the ``default`` route (counted). The
decision is kept per flow in ``net.nat.FlowTable``; known flows take the fast path: one parse, one dict
lookup, at most an address swap and a port write with incremental checksums.

Packet tunnels (WireGuard/AmneziaWG, ``PacketTunnelRoute``): a flow routed to one is taken out of the stack
(``PacketAction.TO_TUNNEL``), rewritten by ``core.packet_tunnel.PacketTunnelPath`` (SNAT, MSS clamp,
segmentation, ICMP too-big) and queued for the device (``take_tunnel_packets``); the device's decrypted
packets come back through ``from_tunnel`` and leave ``take_outgoing`` DNATed, to be injected inbound.
``router.divert_loop.AsyncRouterLoop`` runs handles and devices on one event loop.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import queue
import struct
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from awg_split_tunnel.core.packet_tunnel import PacketTunnelPath, PacketTunnelRoute
from awg_split_tunnel.core.policy import DIRECT, DROP, FallbackPolicy, TunnelState
from awg_split_tunnel.core.router_messages import FlowRow
from awg_split_tunnel.core.rule_engine import Decision, resolve
from awg_split_tunnel.net.nat import (
    FIN_FROM_APP,
    FIN_FROM_PEER,
    FlowTable,
    FlowVerdict,
    NatEntry,
    app_key,
    reply_key,
)
from awg_split_tunnel.net.packet import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    PacketView,
    build_packet,
    tcp_reset_for,
)
from awg_split_tunnel.process.lookup import ConnectEvents, ExeResolver, os_lookup_pid, pid_owns_socket

log = logging.getLogger("awg_split_tunnel.router")

_U32 = struct.Struct("!I")

ConnectEvent = tuple[int, bytes, int, int, int]
"""(protocol, remote address, remote port, pid, local port — 0 when the event does not know it)."""

HOLD_TIMEOUT = 0.05
"""Seconds a new flow's first packet waits for its connect event before the OS lookup (a few ms usual)."""
MAX_HELD_PACKETS = 16
"""Packets kept per waiting flow (SYN retransmits, a UDP burst); more are dropped, never leaked."""
MAX_HELD_FLOWS = 1024
EXPIRE_INTERVAL = 1.0

ROUTER_FILTER = "outbound and !loopback and (tcp or udp or ip.FragOff > 0 or ipv6.NextHdr == 44)"
"""What the NETWORK handle diverts: every outbound TCP/UDP packet not on loopback, and every later IP
fragment — those carry no transport header, so ``udp`` alone lets them escape undiverted
(``scripts/repro/fragments_escape.py``). The rest is decided in Python: the backend's filter language has
no CIDR masks, and interface filters were slow."""


def router_filter(exclude_udp_ports: Iterable[int] = ()) -> str:
    """``ROUTER_FILTER``, leaving out UDP from ``exclude_udp_ports`` (packet tunnels' own sockets): their
    datagrams to the endpoint must never be diverted, and need not even be captured. Later IP fragments
    are diverted all the same, so a tunnelled app's big datagram never leaves half direct; the port test
    and the fragment clause side by side exclude the port as they should
    (``scripts/repro/fragment_clause_with_port.py``). (Devices sharing the router's namespace send no UDP
    GSO batches: ``packet_tunnels.DIVERT_SAFE_UDP_GSO``.)
    """
    ports = sorted(set(exclude_udp_ports))
    if not ports:
        return ROUTER_FILTER
    udp = " and ".join(["udp", *(f"udp.SrcPort != {port}" for port in ports)])
    return f"outbound and !loopback and (tcp or ({udp}) or ip.FragOff > 0 or ipv6.NextHdr == 44)"


class PacketAction(enum.IntEnum):
    """What the I/O side does with the one packet just routed (a flow's fate is its ``FlowVerdict``)."""

    DROP = 0
    REINJECT = 1
    """Send unchanged, same direction."""
    INJECT_INBOUND = 2
    """Rewritten in place (hairpin): send it back as an INBOUND packet on the same interface."""
    HOLD = 3
    """The router kept a copy; it comes out of ``take_outgoing`` once decided."""
    TO_TUNNEL = 4
    """Taken out of the stack: rewritten for a packet tunnel and queued for its device
    (``take_tunnel_packets``); not reinjected."""


@dataclass(frozen=True, slots=True)
class TunnelRoute:
    """How the router reaches one stream tunnel's local proxy (``None``: that protocol is not carried)."""

    tcp_port: int | None
    udp_port: int | None = None
    lan_bypass: bool = True


AnyTunnelRoute = TunnelRoute | PacketTunnelRoute
"""A stream tunnel's proxy ports, or a packet tunnel's addresses and MTU."""


@dataclass(slots=True)
class Outgoing:
    """A packet to send: held and now decided, or crafted (an RST). ``meta`` is the adapter's copy of the
    packet's address (interface index etc.); ``inbound`` says which direction to give it."""

    data: bytearray
    meta: object
    inbound: bool


@dataclass(slots=True)
class RouterStats:
    packets: int = 0
    new_flows: int = 0
    unknown_owner: int = 0
    os_lookups: int = 0
    held: int = 0
    hold_overflow: int = 0
    malformed: int = 0
    fragments_dropped: int = 0
    orphan_replies: int = 0
    nat_collisions: int = 0
    unroutable: int = 0
    inherited: int = 0
    """New flows of processes without a rule of their own that followed an ancestor's rule."""
    resets_sent: int = 0
    tunnel_orphans: int = 0
    """Decrypted packets from a packet tunnel that belong to no flow (or no tunnel we know): dropped."""
    flows_by_action: dict[str, int] = field(default_factory=dict)


class RuleMatcher(Protocol):
    """What the router needs of ``RuleEngine``."""

    def match(self, exe_path: str) -> Decision: ...

    @property
    def default(self) -> Decision: ...


@dataclass(slots=True)
class _HeldFlow:
    key: bytes
    proto: int
    src_addr: bytes
    src_port: int
    dst_addr: bytes
    dst_port: int
    deadline: float
    packets: list[tuple[bytearray, object]]
    meta: object = None
    syn_seq: int = -1


_LOOPBACK6 = bytes(15) + b"\x01"


def _is_loopback(addr: bytes) -> bool:
    return addr[0] == 127 if len(addr) == 4 else addr == _LOOPBACK6


def is_lan_destination(addr: bytes) -> bool:
    """The LAN list of docs/DESIGN.md, exactly: 10/8, 172.16/12, 192.168/16, 169.254/16, fc00::/7, fe80::/10,
    loopback. (Not ``ipaddress.is_private``: that also covers 198.18.0.0/15, the lab's internet.)"""
    b0 = addr[0]
    if len(addr) == 4:
        b1 = addr[1]
        return (b0 == 10 or b0 == 127 or (b0 == 172 and (b1 & 0xF0) == 16) or (b0 == 192 and b1 == 168)) or (
            b0 == 169 and b1 == 254
        )
    return (b0 & 0xFE) == 0xFC or (b0 == 0xFE and (addr[1] & 0xC0) == 0x80) or addr == _LOOPBACK6


class PacketRouter:
    """The router's state machine: flows, their decisions and NAT; no sockets, no clocks of its own.

    ``tunnel_state`` is ``TunnelRegistry.state``; ``tunnels`` maps each stream tunnel id to its proxy's
    ports. ``own_pids`` are the daemon's processes: their traffic (e.g. proxies' upstream connections)
    always passes. Control methods (``set_tunnels``, ``tunnel_state_changed``, ``set_rules``) may be
    called from another thread: they are queued and applied by ``poll``.
    """

    def __init__(
        self,
        rules: RuleMatcher,
        tunnel_state: Callable[[str], TunnelState | None],
        tunnels: Mapping[str, AnyTunnelRoute],
        *,
        own_pids: Collection[int] = (),
        exe_of: Callable[[int], str | None] | None = None,
        ancestors_of: Callable[[int], Sequence[str]] | None = None,
        os_lookup: Callable[[int, bytes, int, bytes, int], int | None] | None = os_lookup_pid,
        owns: Callable[[int, int, int, bytes, int], bool | None] | None = pid_owns_socket,
        hold_timeout: float = HOLD_TIMEOUT,
        reject_tcp: bool = True,
        on_tunnelled: Callable[[NatEntry], None] | None = None,
        on_forgotten: Callable[[NatEntry], None] | None = None,
        on_decided: Callable[[NatEntry, list[object]], None] | None = None,
        carries_packets: bool = True,
    ) -> None:
        self._rules = rules
        # A data path that only asks for decisions (the kernel's: its held packets are queued in the
        # kernel, not here) takes each held flow's entry and its packets' metas instead of packets to send.
        self._on_decided = on_decided
        self.carries_packets = carries_packets
        """False where the kernel carries packet tunnels' flows (their first packet only gets a verdict):
        no NAT, no queue for the device here."""
        # Told about every flow entering / leaving the NAT, so a process that does not own the table (the
        # control plane, when the loop runs in its own process) can keep a mirror for nat_lookup.
        self._on_tunnelled = on_tunnelled
        self._on_forgotten = on_forgotten
        self._tunnel_state = tunnel_state
        self._tunnels: dict[str, AnyTunnelRoute] = {}
        self._tcp_proxy_ports: frozenset[int] = frozenset()
        self._udp_proxy_ports: frozenset[int] = frozenset()
        self._paths: dict[str, PacketTunnelPath] = {}
        self._device_ports: frozenset[int] = frozenset()
        self._dns_ports: dict[int, str] = {}
        """The daemon's DNS port of each packet tunnel → the tunnel (``PacketTunnelRoute.dns_port``)."""
        # First fragments sent into a packet tunnel: (src, dst, id) -> (tunnel id, when), so that the
        # later fragments (no ports) follow them.
        self._tunnel_fragments: dict[bytes, tuple[str, float]] = {}
        self._apply_tunnels(tunnels)
        self.own_pids = set(own_pids) or {os.getpid()}
        if exe_of is None:
            resolver = ExeResolver()
            exe_of, ancestors_of = resolver.exe, ancestors_of or resolver.ancestors
        self._exe_of = exe_of
        self._ancestors_of = ancestors_of
        """pid → its ancestors' exe paths, nearest first: a process without a rule of its own follows the
        first ancestor that has one (``ExeResolver.ancestors``). None: no inheritance."""
        self._os_lookup = os_lookup
        self._owns = owns
        self._pulled = False
        self.event_source: Callable[[], Iterable[ConnectEvent]] | None = None
        """Set by the I/O adapter: the connect events that arrived since it last looked (not yet given to
        ``connect_event``). A new flow's first packet pulls them before claiming its owner, so an event
        that came in while the packet batch was read is not missed (another app's event would be taken)."""
        self.hold_timeout = hold_timeout
        self.reject_tcp = reject_tcp
        self.table = FlowTable()
        self.events = ConnectEvents()
        self.stats = RouterStats()
        self._view = PacketView()
        self._held: dict[bytes, _HeldFlow] = {}
        self._outgoing: list[Outgoing] = []
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._next_expiry = 0.0
        self._fragment_ids: dict[bytes, float] = {}
        """Fragmented datagrams whose later fragments are dropped: (src, dst, id) -> when."""
        self._held_fragments: dict[bytes, bytes] = {}
        """First fragments waiting in a held flow: (src, dst, id) -> the held flow's key. Their later
        fragments wait with them and share their fate."""
        self._now = 0.0
        self._tcp_flows = self.table.flows(IPPROTO_TCP)
        self._udp_flows = self.table.flows(IPPROTO_UDP)
        self._tcp_peers = self.table.peers(IPPROTO_TCP)
        self._udp_peers = self.table.peers(IPPROTO_UDP)

    # -- control (any thread) ----------------------------------------------------------------------------

    def set_tunnels(self, tunnels: Mapping[str, AnyTunnelRoute]) -> None:
        """Replace the tunnels' routes (tunnels added or removed); an unchanged packet tunnel keeps its
        NAT mappings."""
        snapshot = dict(tunnels)
        self._commands.put(lambda: self._apply_tunnels(snapshot))

    def set_rules(self, rules: RuleMatcher) -> None:
        """Use new rules for new flows; existing flows keep their decision."""

        def apply() -> None:
            self._rules = rules

        self._commands.put(apply)

    def tunnel_state_changed(self, tunnel_id: str, state: TunnelState) -> None:
        """A tunnel left or reached UP: reset its fail-closed flows, re-decide flows it had blocked."""
        self._commands.put(lambda: self._apply_state(tunnel_id, state))

    def nat_lookup(self, proto: int | str, peer_ip: str, peer_port: int) -> NatEntry | None:
        """The flow a proxy's accepted peer (``getpeername()``) stands for: orig_dst_ip/port, pid, exe.

        Safe from the proxies' thread: one dict read.
        """
        number = proto_number(proto)
        address = ipaddress.ip_address(peer_ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return self.table.lookup_peer(number, address.packed, peer_port)

    @property
    def routes(self) -> dict[str, AnyTunnelRoute]:
        """The tunnels' routes in use (after queued ``set_tunnels`` calls were applied by ``poll``)."""
        return dict(self._tunnels)

    def connections(self) -> list[NatEntry]:
        """The live flows (a snapshot for ``connections`` / ``status``)."""
        return list(self.table)

    # -- events ------------------------------------------------------------------------------------------

    def connect_event(
        self, proto: int, remote_addr: bytes, remote_port: int, pid: int, now: float, local_port: int = 0
    ) -> None:
        """A process (already known to be in this network namespace) connects to a remote.

        ``local_port`` is 0 for Linux SOCKET CONNECT events and the real port for FLOW ESTABLISHED.
        Waiting flows this event belongs to are decided at once.
        """
        self._record_event(proto, remote_addr, remote_port, pid, now, local_port)
        if not self._held:
            return
        waiting = self._held_for(proto, remote_addr, remote_port)
        for held in waiting:
            owner = self._claim(held, now, ambiguous=len(waiting) > 1)
            if owner is not None:
                self._decide_held(held, owner, now)

    def flow_deleted(
        self, proto: int, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
    ) -> None:
        """The app's socket of this flow closed (a FLOW DELETED event: UDP). Its entry goes now: the
        kernel may give the port to another process talking to the same remote, whose datagrams must
        not inherit this flow's route (UDP has no SYN that would tell a new flow from an old one)."""
        if proto != IPPROTO_UDP or len(local_addr) != len(remote_addr):
            return
        key = local_addr + remote_addr + local_port.to_bytes(2, "big") + remote_port.to_bytes(2, "big")
        entry = self._udp_flows.get(key)
        if entry is not None:
            self._forget(entry)

    def _claim(self, held: _HeldFlow, now: float, ambiguous: bool = False) -> int | None:
        """The owner of a new flow from the connect events, confirmed against the OS when more than one
        process (or flow) could be its owner; None if no event is known to be its."""
        confirm = None
        if self._owns is not None:
            owns = self._owns
            proto, port, addr, remote_port = held.proto, held.src_port, held.dst_addr, held.dst_port

            def confirm(pid: int) -> bool | None:
                return owns(pid, proto, port, addr, remote_port)

        return self.events.claim(
            held.proto, held.src_port, held.dst_addr, held.dst_port, now, confirm=confirm, ambiguous=ambiguous
        )

    def _pull_events(self, now: float) -> None:
        source = self.event_source
        if source is None:
            return
        for proto, remote_addr, remote_port, pid, local_port in source():
            self._pulled = True  # flows held earlier may be among their owners: ``poll`` looks
            self._record_event(proto, remote_addr, remote_port, pid, now, local_port)

    def _record_event(
        self, proto: int, remote_addr: bytes, remote_port: int, pid: int, now: float, local_port: int
    ) -> None:
        if local_port:
            self.events.add_flow(proto, local_port, remote_addr, remote_port, pid, now)
        else:
            self.events.add_connect(proto, remote_addr, remote_port, pid, now)

    # -- the packet path -----------------------------------------------------------------------------------

    def route(
        self, buf: bytearray | memoryview, length: int, now: float, copy_meta: Callable[[], object]
    ) -> PacketAction:
        """Decide one captured outbound packet; rewrites ``buf`` in place for ``INJECT_INBOUND``."""
        self.stats.packets += 1
        self._now = now
        v = self._view
        if not v.parse(buf, length):
            self.stats.malformed += 1
            return PacketAction.REINJECT
        proto = v.proto
        if not v.has_ports:
            if v.fragment:
                return self._later_fragment(v, copy_meta)
            return PacketAction.REINJECT
        l4 = v.l4
        sport = (buf[l4] << 8) | buf[l4 + 1]
        if proto == IPPROTO_TCP:
            if sport in self._tcp_proxy_ports:
                return self._proxy_reply(v, self._tcp_peers, now)
            entry = self._tcp_flows.get(app_key(v))
            if (
                entry is not None
                and buf[l4 + 13] & (TCP_SYN | TCP_ACK) == TCP_SYN
                and _U32.unpack_from(buf, l4 + 4)[0] != entry.syn_seq
            ):
                # Not a retransmit: a new connection from a port the kernel handed out again (a closed
                # connection's entry lingers). It may belong to another process: decided afresh.
                self._forget(entry)
                entry = None
        else:
            if sport in self._udp_proxy_ports:
                return self._proxy_reply(v, self._udp_peers, now)
            if sport in self._device_ports:
                return PacketAction.REINJECT  # a packet tunnel's own datagrams to its endpoint
            entry = self._udp_flows.get(app_key(v))
        if entry is None:
            return self._new_flow(v, now, copy_meta)
        entry.last_seen = now
        entry.packets_out += 1
        verdict = entry.verdict
        if verdict is FlowVerdict.PASS:
            if proto == IPPROTO_TCP and buf[l4 + 13] & (TCP_FIN | TCP_RST):
                self._tcp_closing(entry, buf[l4 + 13], FIN_FROM_APP, now)
            return PacketAction.REINJECT
        if verdict is FlowVerdict.TUNNEL:
            if v.fragment and not entry.to_packet_tunnel:
                return self._first_fragment(v)
            if proto == IPPROTO_TCP:
                flags = buf[l4 + 13]
                if flags & TCP_ACK:
                    entry.app_ack = _U32.unpack_from(buf, l4 + 8)[0]
                if flags & (TCP_FIN | TCP_RST):
                    self._tcp_closing(entry, flags, FIN_FROM_APP, now)
            if entry.to_packet_tunnel:
                return self._to_packet_tunnel(v, entry, now, copy_meta)
            v.swap_addresses()
            v.set_dst_port(entry.proxy_port)
            if entry.peer_port:
                v.set_src_port(entry.peer_port)
            return PacketAction.INJECT_INBOUND
        if v.fragment:
            self._drop_later_fragments(v)
        if verdict is FlowVerdict.RESET:
            self._reset(v, copy_meta())
            self._forget(entry)
            return PacketAction.DROP
        if proto == IPPROTO_TCP and self.reject_tcp and buf[l4 + 13] & TCP_SYN:
            self._reset(v, copy_meta())
        return PacketAction.DROP

    def _proxy_reply(self, v: PacketView, peers: dict[bytes, NatEntry], now: float) -> PacketAction:
        entry = peers.get(reply_key(v))
        if entry is None or entry.verdict is not FlowVerdict.TUNNEL:
            # The proxy answering a flow we no longer know: sent out it would reach the real host with
            # the proxy's port, so it is dropped.
            self.stats.orphan_replies += 1
            return PacketAction.DROP
        entry.last_seen = now
        entry.replied = True
        entry.packets_in += 1
        if v.proto == IPPROTO_TCP:
            flags = v.buf[v.l4 + 13]
            if flags & (TCP_FIN | TCP_RST):
                self._tcp_closing(entry, flags, FIN_FROM_PEER, now)
        v.swap_addresses()
        v.set_src_port(entry.orig_dst_port)
        if entry.peer_port:
            v.set_dst_port(entry.app_port)
        return PacketAction.INJECT_INBOUND

    def _tcp_closing(self, entry: NatEntry, flags: int, side: int, now: float) -> None:
        if flags & TCP_RST:
            entry.closed_at = now
        else:
            entry.fin |= side
            if entry.fin == FIN_FROM_APP | FIN_FROM_PEER or entry.verdict is FlowVerdict.PASS:
                # A passed flow's inbound FIN is never seen here; its entry may go early, later packets
                # of it pass as unknown non-SYN packets.
                entry.closed_at = now

    def _first_fragment(self, v: PacketView) -> PacketAction:
        # Only the first fragment carries the ports the proxy NAT needs, and later fragments escaped
        # port filters (docs/ARCHITECTURE.md): fragments of tunnelled flows are dropped, which also blocks the
        # leak. The (src, dst, id) is remembered so the later fragments are recognised.
        self.stats.fragments_dropped += 1
        self._drop_later_fragments(v)
        return PacketAction.DROP

    def _drop_later_fragments(self, v: PacketView) -> None:
        """The first fragment ``v`` is dropped: so are the later ones (they carry no ports to route by)."""
        self._fragment_ids[self._fragment_id(v)] = self._now

    def _later_fragment(self, v: PacketView, copy_meta: Callable[[], object]) -> PacketAction:
        if self._held_fragments:
            waiting = self._held_fragments.get(self._fragment_id(v))
            held = self._held.get(waiting) if waiting is not None else None
            if held is not None:
                # Its first fragment waits for the flow's owner: passed on now, it would leave directly
                # whatever the flow's route turns out to be.
                if len(held.packets) >= MAX_HELD_PACKETS:
                    self.stats.hold_overflow += 1
                    return PacketAction.DROP
                held.packets.append((bytearray(v.buf[: v.length]), copy_meta()))
                return PacketAction.HOLD
        if self._tunnel_fragments:
            tunnelled = self._tunnel_fragments.get(self._fragment_id(v))
            if tunnelled is not None:
                path = self._paths.get(tunnelled[0])
                if path is None or path.send(v, self._now) is not None:
                    self.stats.fragments_dropped += 1
                    return PacketAction.DROP
                return PacketAction.TO_TUNNEL
        if self._fragment_ids and self._fragment_id(v) in self._fragment_ids:
            self.stats.fragments_dropped += 1
            return PacketAction.DROP
        return PacketAction.REINJECT

    @staticmethod
    def _fragment_id(v: PacketView) -> bytes:
        buf, a, n = v.buf, v.src_off, v.addr_len
        if v.version == 4:
            return bytes(buf[a : a + 2 * n]) + bytes(buf[4:6])
        # IPv6: the identification sits in the fragment header, 4 bytes after its start; find it.
        off, nxt = 40, buf[6]
        while nxt != 44 and off < v.length:
            nxt, off = buf[off], off + (buf[off + 1] + 1) * 8
        return bytes(buf[a : a + 2 * n]) + bytes(buf[off + 4 : off + 8])

    # -- new flows ---------------------------------------------------------------------------------------

    def _new_flow(self, v: PacketView, now: float, copy_meta: Callable[[], object]) -> PacketAction:
        buf, l4, proto = v.buf, v.l4, v.proto
        if proto == IPPROTO_TCP and (buf[l4 + 13] & (TCP_SYN | TCP_ACK | TCP_RST)) != TCP_SYN:
            return PacketAction.REINJECT  # mid-stream packet of a connection older than the router
        key = app_key(v)
        held = self._held.get(key)
        if held is not None:
            if len(held.packets) >= MAX_HELD_PACKETS:
                self.stats.hold_overflow += 1
                return PacketAction.DROP
            held.packets.append((bytearray(buf[: v.length]), copy_meta()))
            return PacketAction.HOLD
        src_port, dst_port = v.ports()
        dst_addr = v.dst_addr
        if _is_loopback(dst_addr):
            return PacketAction.REINJECT
        if len(self._held) >= MAX_HELD_FLOWS:
            self.stats.hold_overflow += 1
            return PacketAction.DROP
        meta = copy_meta()
        held = _HeldFlow(
            key, proto, v.src_addr, src_port, dst_addr, dst_port, now + self.hold_timeout, [], meta
        )
        if proto == IPPROTO_TCP:
            held.syn_seq = _U32.unpack_from(buf, l4 + 4)[0]
        self.stats.new_flows += 1
        self._pull_events(now)
        pid = self._claim(held, now, ambiguous=self._others_waiting(held))
        if pid is not None:
            # The event came first: decide now, and let the caller send this very buffer.
            entry = self._decide(held, pid, now)
            return self._apply_first(v, entry, copy_meta)
        held.packets.append((bytearray(buf[: v.length]), meta))
        self._held[key] = held
        if v.fragment:
            self._held_fragments[self._fragment_id(v)] = key
        self.stats.held += 1
        return PacketAction.HOLD

    def _held_for(self, proto: int, remote_addr: bytes, remote_port: int) -> list[_HeldFlow]:
        """The held flows waiting for an event of this remote."""
        return [
            h
            for h in self._held.values()
            if h.proto == proto and h.dst_port == remote_port and h.dst_addr == remote_addr
        ]

    def _others_waiting(self, held: _HeldFlow) -> bool:
        """Whether another held flow waits for an event of the same remote (an event could be either's)."""
        return any(h is not held for h in self._held_for(held.proto, held.dst_addr, held.dst_port))

    def _apply_first(self, v: PacketView, entry: NatEntry, copy_meta: Callable[[], object]) -> PacketAction:
        if entry.verdict is FlowVerdict.PASS:
            return PacketAction.REINJECT
        if entry.verdict is FlowVerdict.TUNNEL:
            if entry.to_packet_tunnel:
                return self._to_packet_tunnel(v, entry, self._now, copy_meta)
            if v.fragment:
                return self._first_fragment(v)
            v.swap_addresses()
            v.set_dst_port(entry.proxy_port)
            if entry.peer_port:
                v.set_src_port(entry.peer_port)
            return PacketAction.INJECT_INBOUND
        if v.fragment:
            if v.has_ports:
                self._drop_later_fragments(v)
            return PacketAction.DROP
        if v.proto == IPPROTO_TCP and self.reject_tcp and v.buf[v.l4 + 13] & TCP_SYN:
            self._reset(v, copy_meta())
        return PacketAction.DROP

    def _decide_held(self, held: _HeldFlow, pid: int | None, now: float) -> None:
        self._now = now
        self._held.pop(held.key, None)
        entry = self._decide(held, pid, now)
        if self._on_decided is not None:
            self._on_decided(entry, [meta for _, meta in held.packets])
            return
        for data, meta in held.packets:
            view = self._view
            if not view.parse(data, len(data)):
                continue
            verdict = self._apply_first(view, entry, lambda meta=meta: meta)  # type: ignore[misc]
            if verdict is PacketAction.REINJECT:
                self._outgoing.append(Outgoing(data, meta, inbound=False))
            elif verdict is PacketAction.INJECT_INBOUND:
                self._outgoing.append(Outgoing(data, meta, inbound=True))

    def _decide(self, held: _HeldFlow, pid: int | None, now: float) -> NatEntry:
        """Owner → exe → rule → the flow's fate (a ``FlowVerdict``); records the flow, returns its entry."""
        exe: str | None = None
        if pid is not None and pid not in self.own_pids:
            exe = self._exe_of(pid)
        if pid is not None and pid in self.own_pids:
            decision, fate = self._own_flow(held)
        else:
            if exe is None:
                self.stats.unknown_owner += 1
                log.debug("[Router] owner of %s unknown: default route", _describe(held))
                decision = self._rules.default
            else:
                decision = self._rules.match(exe)
                if decision.rule_index is None and self._ancestors_of is not None and pid is not None:
                    decision = self._inherited(pid, decision)
            fate = self._fate(decision, held.dst_addr)
        entry = NatEntry(
            held.proto,
            held.src_addr,
            held.src_port,
            held.dst_addr,
            held.dst_port,
            FlowVerdict.PASS,
            pid=pid,
            exe=exe,
            created=now,
            last_seen=now,
            meta=held.meta,
            syn_seq=held.syn_seq,
        )
        if decision is not None:
            entry.tunnel_id = decision.tunnel if decision.tunnel not in (DIRECT, DROP) else None
            entry.fail_closed = decision.fallback is not FallbackPolicy.ALLOW_DIRECT
        if fate is FlowVerdict.TUNNEL and entry.tunnel_id in self._paths:
            if self._paths[entry.tunnel_id].has_address(4 if len(held.dst_addr) == 4 else 6):
                entry.verdict = FlowVerdict.TUNNEL  # no proxy port: ``to_packet_tunnel``
            else:
                # No tunnel address of this IP version: the peer would drop it; fail closed.
                self.stats.unroutable += 1
                fate = FlowVerdict.DROP
        elif fate is FlowVerdict.TUNNEL:
            route = self._tunnels.get(entry.tunnel_id or "")
            port = None
            if isinstance(route, TunnelRoute):
                port = route.tcp_port if held.proto == IPPROTO_TCP else route.udp_port
            if port is None:
                # A packet tunnel, or UDP through a tunnel that cannot carry it (HTTP): fail closed.
                self.stats.unroutable += 1
                fate = FlowVerdict.DROP
            else:
                entry.verdict = FlowVerdict.TUNNEL
                entry.proxy_port = port
        if fate is FlowVerdict.DROP:
            entry.verdict = FlowVerdict.DROP
        if not self.table.add(held.key, entry):
            self.stats.nat_collisions += 1
            entry.verdict = FlowVerdict.DROP
            self.table.add(held.key, entry)
        counts = self.stats.flows_by_action
        counts[entry.verdict.name] = counts.get(entry.verdict.name, 0) + 1
        if entry.verdict is FlowVerdict.TUNNEL and entry.proxy_port and self._on_tunnelled is not None:
            self._on_tunnelled(entry)
        return entry

    def _own_flow(self, held: _HeldFlow) -> tuple[Decision | None, FlowVerdict]:
        """The daemon's own flows pass, except those from a packet tunnel's DNS port (docs/DNS.md): into
        that tunnel while it is UP, else dropped (never a tunnelled app's lookup on the direct path)."""
        tunnel_id = self._dns_ports.get(held.src_port)
        if tunnel_id is None:
            return None, FlowVerdict.PASS
        decision = Decision(tunnel_id, FallbackPolicy.BLOCK, None)
        return decision, resolve(decision, self._tunnel_state(tunnel_id))

    def _inherited(self, pid: int, own: Decision) -> Decision:
        """The rule of the nearest ancestor that has one, for a process that has none (else ``own``)."""
        assert self._ancestors_of is not None
        for exe in self._ancestors_of(pid):
            decision = self._rules.match(exe)
            if decision.rule_index is not None:
                self.stats.inherited += 1
                return decision
        return own

    def _forget(self, entry: NatEntry) -> None:
        self.table.remove(entry)
        if self._on_forgotten is not None and entry.proxy_port:
            self._on_forgotten(entry)

    def _fate(self, decision: Decision, dst_addr: bytes) -> FlowVerdict:
        tunnel = decision.tunnel
        if (
            tunnel not in (DIRECT, DROP)
            and decision.fallback is not FallbackPolicy.DROP
            and is_lan_destination(dst_addr)
        ):
            route = self._tunnels.get(tunnel)
            if route is None or route.lan_bypass:
                return FlowVerdict.PASS
        state = None if tunnel in (DIRECT, DROP) else self._tunnel_state(tunnel)
        return resolve(decision, state)

    def _reset(self, v: PacketView, meta: object) -> None:
        if v.proto != IPPROTO_TCP or v.buf[v.l4 + 13] & TCP_RST:
            return
        self.stats.resets_sent += 1
        self._outgoing.append(Outgoing(tcp_reset_for(v), meta, inbound=True))

    # -- packet tunnels ----------------------------------------------------------------------------------

    def _to_packet_tunnel(
        self, v: PacketView, entry: NatEntry, now: float, copy_meta: Callable[[], object]
    ) -> PacketAction:
        if not self.carries_packets:
            return PacketAction.TO_TUNNEL
        path = self._paths.get(entry.tunnel_id or "")
        if path is None:
            self.stats.unroutable += 1
            return PacketAction.DROP
        if path.last_meta is None:
            path.last_meta = entry.meta
        if v.fragment:
            self._tunnel_fragments[self._fragment_id(v)] = (path.tunnel_id, now)
        error = path.send(v, now)
        if error is not None:
            self._outgoing.append(Outgoing(error, copy_meta(), inbound=True))
            if v.fragment:
                # The first fragment did not fit: the later ones must not go anywhere either.
                del self._tunnel_fragments[self._fragment_id(v)]
                self._fragment_ids[self._fragment_id(v)] = now
            return PacketAction.DROP
        return PacketAction.TO_TUNNEL

    def take_tunnel_packets(self) -> list[tuple[str, list[bytes]]]:
        """(tunnel id, packets) for every packet tunnel with packets queued for its device, in order."""
        out: list[tuple[str, list[bytes]]] = []
        for tunnel_id, path in self._paths.items():
            if path.pending:
                out.append((tunnel_id, path.take_pending()))
        return out

    def from_tunnel(self, tunnel_id: str, packets: Iterable[bytes], now: float) -> None:
        """Decrypted packets from a packet tunnel's device: DNATed back to their app and queued (in
        ``take_outgoing``) for injection inbound on the interface the flow left by. Call on the router's
        thread. Packets for no known flow are counted and dropped."""
        path = self._paths.get(tunnel_id)
        if path is None:
            self.stats.tunnel_orphans += sum(1 for _ in packets)
            return
        view = self._view
        for packet in packets:
            data = path.receive(packet, now)
            if data is None:
                self.stats.tunnel_orphans += 1
                continue
            if not view.parse(data, len(data)):
                continue
            entry: NatEntry | None = None
            if view.has_ports:
                buf, a, n, l4 = data, view.src_off, view.addr_len, view.l4
                # The app's key of this reply's flow: (app, remote, app port, remote port).
                key = bytes(buf[a + n : a + 2 * n]) + bytes(buf[a : a + n]) + bytes(buf[l4 + 2 : l4 + 4])
                key += bytes(buf[l4 : l4 + 2])
                flows = self._tcp_flows if view.proto == IPPROTO_TCP else self._udp_flows
                entry = flows.get(key)
                if entry is None or entry.verdict is not FlowVerdict.TUNNEL:
                    # The NAT still knew it, the router no longer does (reset, expired): never deliver.
                    self.stats.tunnel_orphans += 1
                    continue
                entry.last_seen = now
                entry.replied = True
                entry.packets_in += 1
                if view.proto == IPPROTO_TCP:
                    flags = data[l4 + 13]
                    if flags & (TCP_FIN | TCP_RST):
                        self._tcp_closing(entry, flags, FIN_FROM_PEER, now)
            meta = entry.meta if entry is not None else path.last_meta
            if meta is None:
                self.stats.tunnel_orphans += 1
                continue
            if entry is not None:
                path.last_meta = meta
            self._outgoing.append(Outgoing(data, meta, inbound=True))

    def packet_tunnel_stats(self) -> dict[str, Any]:
        """Per packet tunnel: its counters and live NAT mappings."""
        import dataclasses

        return {
            tunnel_id: {**dataclasses.asdict(path.stats), "mappings": len(path.nat)}
            for tunnel_id, path in self._paths.items()
        }

    # -- timers ------------------------------------------------------------------------------------------

    def release_held(self) -> list[object]:
        """Forget every held flow undecided; the metas of their packets (a data path shutting down lets
        them go their own way)."""
        metas = [meta for held in self._held.values() for _, meta in held.packets]
        self._held.clear()
        self._held_fragments.clear()
        return metas

    @property
    def has_outgoing(self) -> bool:
        """Whether ``take_outgoing`` has packets (cheap: for the loops' per-packet check)."""
        return bool(self._outgoing)

    def take_outgoing(self) -> list[Outgoing]:
        """Packets to send now (decided held packets, RSTs), in order."""
        out, self._outgoing = self._outgoing, []
        return out

    def next_deadline(self) -> float | None:
        """When ``poll`` next has work (a held flow's timeout), or None."""
        if not self._held:
            return None
        if self._pulled:
            return self._now  # events pulled while routing may decide held flows: poll at once
        return min(h.deadline for h in self._held.values())

    def poll(self, now: float) -> None:
        """Apply queued control commands, decide timed-out held flows, expire old flows."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            command()
        if self._pulled:
            self._pulled = False
            for held in list(self._held.values()):
                if held.key in self._held and self.events.waiting(
                    held.proto, held.src_port, held.dst_addr, held.dst_port
                ):
                    owner = self._claim(held, now, ambiguous=self._others_waiting(held))
                    if owner is not None:
                        self._decide_held(held, owner, now)
        for held in [h for h in self._held.values() if h.deadline <= now]:
            pid = self._claim(held, now, ambiguous=self._others_waiting(held))
            if pid is None and self._os_lookup is not None:
                self.stats.os_lookups += 1
                pid = self._os_lookup(held.proto, held.src_addr, held.src_port, held.dst_addr, held.dst_port)
            self._decide_held(held, pid, now)
        if now >= self._next_expiry:
            self._next_expiry = now + EXPIRE_INTERVAL
            for entry in self.table.expire(now):
                if self._on_forgotten is not None and entry.proxy_port:
                    self._on_forgotten(entry)
            for path in self._paths.values():
                path.expire(now)
            if self._tunnel_fragments:
                limit = now - 30.0
                self._tunnel_fragments = {k: v for k, v in self._tunnel_fragments.items() if v[1] > limit}
            self.events.expire(now)
            if self._fragment_ids:
                limit = now - 30.0
                self._fragment_ids = {k: t for k, t in self._fragment_ids.items() if t > limit}
            if self._held_fragments:
                self._held_fragments = {k: h for k, h in self._held_fragments.items() if h in self._held}

    # -- control, applied on the router's thread ---------------------------------------------------------

    def _apply_tunnels(self, tunnels: Mapping[str, AnyTunnelRoute]) -> None:
        self._tunnels = dict(tunnels)
        streams = [r for r in tunnels.values() if isinstance(r, TunnelRoute)]
        self._tcp_proxy_ports = frozenset(r.tcp_port for r in streams if r.tcp_port)
        self._udp_proxy_ports = frozenset(r.udp_port for r in streams if r.udp_port)
        paths: dict[str, PacketTunnelPath] = {}
        for tunnel_id, route in tunnels.items():
            if isinstance(route, PacketTunnelRoute):
                old = self._paths.get(tunnel_id)
                paths[tunnel_id] = (
                    old if old is not None and old.route == route else PacketTunnelPath(tunnel_id, route)
                )
        self._paths = paths
        self._device_ports = frozenset(
            r.listen_port for r in tunnels.values() if isinstance(r, PacketTunnelRoute) and r.listen_port
        )
        self._dns_ports = {
            r.dns_port: tunnel_id
            for tunnel_id, r in tunnels.items()
            if isinstance(r, PacketTunnelRoute) and r.dns_port
        }

    def _apply_state(self, tunnel_id: str, state: TunnelState) -> None:
        if state is TunnelState.CONNECTING:
            # A transient (a device starting, a manual reconnect): flows keep their decision until UP or
            # DOWN. Applied late, it must not reset flows opened once the tunnel was UP.
            return
        packet_tunnel = tunnel_id in self._paths
        for entry in self.table.for_tunnel(tunnel_id):
            if state is TunnelState.UP:
                if entry.verdict is FlowVerdict.DROP:
                    self._forget(entry)  # decided while down: the next packet decides afresh
            elif packet_tunnel and entry.verdict is FlowVerdict.TUNNEL and not entry.fail_closed:
                # allow_direct through a packet tunnel: the SNATed connection cannot continue directly
                # (another source address), so TCP is reset now and reconnects direct; a UDP flow's next
                # datagram is decided afresh (direct).
                if entry.proto == IPPROTO_UDP:
                    self._forget(entry)
                else:
                    entry.fail_closed = True
                    self._apply_state_down(entry)
            elif entry.verdict is FlowVerdict.TUNNEL and entry.fail_closed:
                self._apply_state_down(entry)

    def _apply_state_down(self, entry: NatEntry) -> None:
        """A fail-closed flow's tunnel went down: RESET, and an RST to the app at once (TCP)."""
        entry.verdict = FlowVerdict.RESET
        if entry.proto == IPPROTO_TCP and entry.app_ack >= 0 and entry.meta is not None:
            # Reset the app now, not at its next packet: an app waiting for data may never send.
            # If data was in flight the app answers with a challenge ACK, which meets RESET.
            rst = build_packet(
                entry.orig_dst_addr,
                entry.app_addr,
                IPPROTO_TCP,
                entry.orig_dst_port,
                entry.app_port,
                tcp_flags=TCP_RST,
                seq=entry.app_ack,
                window=0,
            )
            self.stats.resets_sent += 1
            self._outgoing.append(Outgoing(rst, entry.meta, inbound=True))


def flow_row(e: NatEntry) -> FlowRow:
    """One flow for ``status`` and ``connections`` (a ``Snapshot``'s rows)."""
    return FlowRow(
        proto=e.proto,
        app_ip=e.app_ip,
        app_port=e.app_port,
        dst_ip=e.orig_dst_ip,
        dst_port=e.orig_dst_port,
        verdict=e.verdict.name,
        tunnel=e.tunnel_id,
        pid=e.pid,
        exe=e.exe,
        packets_out=e.packets_out,
        packets_in=e.packets_in,
    )


def packed_address(ip: str) -> bytes:
    """An address's bytes as the NAT keys it (IPv4-mapped IPv6 as IPv4)."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.packed


def proto_number(proto: int | str) -> int:
    """6 or 17 from a number or ``tcp``/``udp``."""
    if isinstance(proto, int):
        return proto
    return {"tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}[proto.lower()]


def _describe(held: _HeldFlow) -> str:
    name = "tcp" if held.proto == IPPROTO_TCP else "udp"
    src, dst = ipaddress.ip_address(held.src_addr), ipaddress.ip_address(held.dst_addr)
    return f"{name} {src}:{held.src_port} -> {dst}:{held.dst_port}"
