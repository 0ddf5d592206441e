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
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from awg_split_tunnel.core.packet_tunnel import PacketTunnelPath, PacketTunnelRoute, first_of_version
from awg_split_tunnel.core.policy import DIRECT, DROP, FallbackPolicy, TunnelState
from awg_split_tunnel.core.router_messages import FlowRow
from awg_split_tunnel.core.rule_engine import Decision, resolve
from awg_split_tunnel.dns.upstream import DNS_PORT
from awg_split_tunnel.net.nat import (
    FIN_FROM_APP,
    FIN_FROM_PEER,
    FlowTable,
    FlowVerdict,
    NatEntry,
    Tombstones,
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
from awg_split_tunnel.process.lookup import (
    OS_LOOKUPS_PER_POLL,
    ConnectEvents,
    ExeResolver,
    os_lookup_pid,
    pid_owns_socket,
)

log = logging.getLogger("awg_split_tunnel.router")

_U32 = struct.Struct("!I")

ConnectEvent = tuple[int, bytes, int, int, int]
"""(protocol, remote address, remote port, pid, local port — 0 when the event does not know it)."""

HOLD_TIMEOUT = 0.05
"""Seconds a new flow's first packet waits for its connect event before the OS lookup (a few ms usual)."""
OWNER_PENDING = -1
"""What an ``os_lookup`` returns when it answers later, off the packet loop, as a connect event with the
flow's local port (Windows: ``platform.windows.owners``): the flow then waits up to ``LOOKUP_TIMEOUT``
more for it, once."""
LOOKUP_TIMEOUT = 1.0
"""Seconds a held flow waits for an owner lookup that answers later; then its owner is unknown."""
MAX_HELD_PACKETS = 16
"""Packets kept per waiting flow (SYN retransmits, a UDP burst); more are dropped, never leaked."""
MAX_HELD_FLOWS = 8192
"""Flows waiting for their owner at most, all remotes together."""
MAX_HELD_BYTES = 32 * 2**20
"""Bytes of packets kept for waiting flows at most, all together (``MAX_HELD_FLOWS`` × 16 packets of
1500 bytes would be 190 MiB)."""
MAX_HELD_PER_REMOTE = 256
"""Flows waiting for their owner at most per remote address. While a flow waits its process is unknown,
so the cap cannot be per app; a flood from one app goes to one or a few servers (a download, a benchmark,
a SYN flood), so capping per remote keeps it from filling ``MAX_HELD_FLOWS`` and stopping other apps'
new flows from being decided. Flows over the cap are dropped (the app retransmits) and counted
(``RouterStats.held_remote_full``)."""
EXPIRE_INTERVAL = 1.0
SERVICE_REFRESH = 5.0
"""Seconds between two readings of the pids of the services ``service:`` rules name (Windows)."""
SERVICE_RECHECK = 1.0
"""Seconds at least between two early readings, made when a process the last reading did not know opens
a flow (a service restarted under a new pid is matched within about this long)."""
FRAGMENT_MEMORY = 30.0
"""Seconds a fragmented datagram's id is remembered (its later fragments follow its first one's fate)."""
EXPIRE_PER_POLL = 20000
"""Flow entries (and, per packet tunnel, NAT mappings) looked at per timer run at most: a burst of
flows created together expires over a few runs, not in one long stall of the packet loop."""

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
    dns_servers: tuple[bytes, ...] = ()
    """The tunnel's DNS servers (``dns:``), packed: where its proxy sends the local resolver's own port-53
    flows under ``dns.system`` (docs/DNS.md), the first of the flow's IP version."""

    def dns_server(self, version: int) -> bytes | None:
        """The first DNS server of IP ``version`` (4 or 6), else None."""
        return first_of_version(self.dns_servers, version)


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
    held_remote_full: int = 0
    """New flows dropped because ``MAX_HELD_PER_REMOTE`` flows to their remote already wait."""
    os_lookups_deferred: int = 0
    """Timer runs that left held flows for the next one (``os_lookups_per_poll`` spent)."""
    tombstone_drops: int = 0
    """Packets of forgotten tunnelled/reset/dropped TCP flows dropped (and answered with an RST)."""
    tombstone_owners: int = 0
    """UDP flows whose owner the OS no longer told, given the owner of the flow forgotten on their key."""
    flows_by_action: dict[str, int] = field(default_factory=dict)


class RuleMatcher(Protocol):
    """What the router needs of ``RuleEngine``."""

    def match(self, exe_path: str) -> Decision: ...

    @property
    def default(self) -> Decision: ...

    @property
    def services(self) -> Sequence[tuple[str, Decision]]:
        """``service:`` rules: (service name, decision), in rule order."""
        ...


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
    looked_up: bool = False


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
        os_lookups_per_poll: int = OS_LOOKUPS_PER_POLL,
        service_pids: Callable[[str], Collection[int]] | None = None,
    ) -> None:
        self._rules = rules
        self._service_pids = service_pids
        """A Windows service's name → the pids of the processes hosting it
        (``platform.windows.services.service_pids``); None: ``service:`` rules match nothing."""
        self._pid_rules: dict[int, Decision] = {}
        """pid → the decision of the first ``service:`` rule naming a service it hosts, as last read."""
        self._pids_read_at = float("-inf")
        self._pids_checked: set[int] = set()
        """Processes that an early reading found hosting no service a rule names (until the next one)."""
        # A data path that only asks for decisions (the kernel's: its held packets are queued in the
        # kernel, not here) takes each held flow's entry and its packets' metas instead of packets to send.
        self._on_decided = on_decided
        self.carries_packets = carries_packets
        """False where the kernel carries packet tunnels' flows (their first packet only gets a verdict):
        no NAT, no queue for the device here, and no packet crafted for a flow later (the kernel rejects),
        so a flow's entry keeps no meta: the adapter's (a queued packet with its payload) goes with its
        verdict instead of living as long as the flow."""
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
        self._dns_redirects: dict[bytes, NatEntry] = {}
        """Flows sent to their tunnel's DNS server instead of their destination (``NatEntry.dns_server``),
        by protocol and the app key their replies carry (the server in the remote's place)."""
        # First fragments sent into a packet tunnel: (src, dst, id) -> (tunnel id, when), so that the
        # later fragments (no ports) follow them.
        self._tunnel_fragments: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._apply_tunnels(tunnels)
        self.own_pids = set(own_pids) or {os.getpid()}
        if exe_of is None:
            resolver = ExeResolver()
            exe_of, ancestors_of = resolver.exe, ancestors_of or resolver.ancestors
        self._exe_of = exe_of
        self._ancestors_of = ancestors_of
        """pid → its ancestors' exe paths, nearest first: a process without a rule of its own follows the
        first ancestor that has one (``ExeResolver.ancestors``). None: no inheritance."""
        self.os_lookup = os_lookup
        """Who owns a flow no event named (proto, local addr, port, remote addr, port → pid, None, or
        ``OWNER_PENDING``). The I/O adapter may set its data path's own (``router.divert_loop``)."""
        self._owns = owns
        self._pulled = False
        self.event_source: Callable[[], Iterable[ConnectEvent]] | None = None
        """Set by the I/O adapter: the connect events that arrived since it last looked (not yet given to
        ``connect_event``). A new flow's first packet pulls them before claiming its owner, so an event
        that came in while the packet batch was read is not missed (another app's event would be taken)."""
        self.hold_timeout = hold_timeout
        self.reject_tcp = reject_tcp
        self.os_lookups_per_poll = os_lookups_per_poll
        self.table = FlowTable()
        self.tombstones = Tombstones()
        """Forgotten flows that were not passed: their later packets never leave directly."""
        self.events = ConnectEvents()
        self.stats = RouterStats()
        self._view = PacketView()
        self._held: dict[bytes, _HeldFlow] = {}
        # The same held flows by remote (what a connect event names) and per remote address (the cap),
        # and in arrival order, which is the order of their deadlines (decided ones are skipped).
        self._held_by_remote: dict[tuple[int, bytes, int], dict[bytes, _HeldFlow]] = {}
        self._held_per_address: dict[bytes, int] = {}
        self._held_order: deque[_HeldFlow] = deque()
        self._lookup_order: deque[_HeldFlow] = deque()
        """Held flows whose owner lookup answers later (``OWNER_PENDING``), oldest first."""
        self._held_bytes = 0
        self._pulled_remotes: set[tuple[int, bytes, int]] = set()
        self._lookups_behind = False
        self._outgoing: list[Outgoing] = []
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._next_expiry = 0.0
        self._fragment_ids: OrderedDict[bytes, float] = OrderedDict()
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
            self._read_service_pids(self._now)

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
        """The live flows (what a ``connections`` listing pages through)."""
        return list(self.table)

    def flow_counts(self) -> tuple[int, dict[str, int]]:
        """(flows in all, flows by tunnel) for ``status``: kept by the flow table, no flow is visited."""
        return len(self.table), dict(self.table.by_tunnel)

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
            self._forget(entry, tombstone=False)  # the port may go to another process: no owner to keep
        self.tombstones.pop(IPPROTO_UDP, key, self._now)  # nor from a flow forgotten before

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
            self._pulled_remotes.add((proto, remote_addr, remote_port))
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
                self._forget(entry, tombstone=False)
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
        entry.bytes_out += v.length
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
        if not entry.replied:
            entry.replied = True
            self.table.reschedule(entry)  # to its idle deadline now, not when its SYN timeout comes
        entry.packets_in += 1
        entry.bytes_in += v.length
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
            self.table.reschedule(entry)
        else:
            entry.fin |= side
            if entry.fin == FIN_FROM_APP | FIN_FROM_PEER or entry.verdict is FlowVerdict.PASS:
                # A passed flow's inbound FIN is never seen here; its entry may go early, later packets
                # of it pass as unknown non-SYN packets.
                entry.closed_at = now
                self.table.reschedule(entry)

    def _first_fragment(self, v: PacketView) -> PacketAction:
        # Only the first fragment carries the ports the proxy NAT needs, and later fragments escaped
        # port filters (docs/ARCHITECTURE.md): fragments of tunnelled flows are dropped, which also blocks the
        # leak. The (src, dst, id) is remembered so the later fragments are recognised.
        self.stats.fragments_dropped += 1
        self._drop_later_fragments(v)
        return PacketAction.DROP

    def _drop_later_fragments(self, v: PacketView) -> None:
        """The first fragment ``v`` is dropped: so are the later ones (they carry no ports to route by)."""
        _remember(self._fragment_ids, self._fragment_id(v), self._now)

    def _later_fragment(self, v: PacketView, copy_meta: Callable[[], object]) -> PacketAction:
        if self._held_fragments:
            waiting = self._held_fragments.get(self._fragment_id(v))
            held = self._held.get(waiting) if waiting is not None else None
            if held is not None:
                # Its first fragment waits for the flow's owner: passed on now, it would leave directly
                # whatever the flow's route turns out to be.
                return self._keep(held, v, copy_meta)
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
            if self.tombstones.get(proto, app_key(v), now) is not None:
                # A connection we tunnelled, reset or dropped and then forgot (reset, expired, closed):
                # sent on now it would leave directly, un-NATed. The app is told it is gone.
                self.stats.tombstone_drops += 1
                self._reset(v, copy_meta())
                return PacketAction.DROP
            return PacketAction.REINJECT  # mid-stream packet of a connection older than the router
        key = app_key(v)
        held = self._held.get(key)
        if held is not None:
            return self._keep(held, v, copy_meta)
        src_port, dst_port = v.ports()
        dst_addr = v.dst_addr
        if _is_loopback(dst_addr):
            return PacketAction.REINJECT
        if len(self._held) >= MAX_HELD_FLOWS or self._held_bytes >= MAX_HELD_BYTES:
            self.stats.hold_overflow += 1
            return PacketAction.DROP
        if self._held_per_address.get(dst_addr, 0) >= MAX_HELD_PER_REMOTE:
            self.stats.held_remote_full += 1
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
            entry.packets_out, entry.bytes_out = 1, v.length
            return self._apply_first(v, entry, copy_meta)
        held.packets.append((bytearray(buf[: v.length]), meta))
        self._held_bytes += v.length
        self._hold(held)
        if v.fragment:
            self._held_fragments[self._fragment_id(v)] = key
        self.stats.held += 1
        return PacketAction.HOLD

    def _keep(self, held: _HeldFlow, v: PacketView, copy_meta: Callable[[], object]) -> PacketAction:
        """Keep another packet of a held flow (a retransmit, a burst, a later fragment) while the caps
        allow; else drop it (counted), never let it go before its flow is decided."""
        if len(held.packets) >= MAX_HELD_PACKETS or self._held_bytes >= MAX_HELD_BYTES:
            self.stats.hold_overflow += 1
            return PacketAction.DROP
        held.packets.append((bytearray(v.buf[: v.length]), copy_meta()))
        self._held_bytes += v.length
        return PacketAction.HOLD

    def _hold(self, held: _HeldFlow) -> None:
        self._held[held.key] = held
        remote = (held.proto, held.dst_addr, held.dst_port)
        group = self._held_by_remote.get(remote)
        if group is None:
            group = self._held_by_remote[remote] = {}
        group[held.key] = held
        self._held_per_address[held.dst_addr] = self._held_per_address.get(held.dst_addr, 0) + 1
        self._held_order.append(held)

    def _unhold(self, held: _HeldFlow) -> None:
        if self._held.get(held.key) is not held:
            return
        del self._held[held.key]
        self._held_bytes -= sum(len(data) for data, _ in held.packets)
        remote = (held.proto, held.dst_addr, held.dst_port)
        group = self._held_by_remote[remote]
        del group[held.key]
        if not group:
            del self._held_by_remote[remote]
        count = self._held_per_address[held.dst_addr] - 1
        if count:
            self._held_per_address[held.dst_addr] = count
        else:
            del self._held_per_address[held.dst_addr]

    def _held_for(self, proto: int, remote_addr: bytes, remote_port: int) -> list[_HeldFlow]:
        """The held flows waiting for an event of this remote."""
        group = self._held_by_remote.get((proto, remote_addr, remote_port))
        return list(group.values()) if group else []

    def _others_waiting(self, held: _HeldFlow) -> bool:
        """Whether another held flow waits for an event of the same remote (an event could be either's)."""
        group = self._held_by_remote.get((held.proto, held.dst_addr, held.dst_port))
        return group is not None and (len(group) > 1 or held.key not in group)

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
        self._unhold(held)
        entry = self._decide(held, pid, now)
        entry.packets_out = len(held.packets)
        entry.bytes_out = sum(len(data) for data, _ in held.packets)
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
        stone = self.tombstones.pop(held.proto, held.key, now)
        if pid is None and stone is not None and stone.pid is not None and held.proto == IPPROTO_UDP:
            # The next datagram of a UDP flow we forgot (reset, expired), its socket not closed (that
            # takes the tombstone away): still that process's, whom the OS no longer names.
            self.stats.tombstone_owners += 1
            pid = stone.pid
        exe: str | None = None
        if pid is not None and pid not in self.own_pids:
            exe = self._exe_of(pid)
        if pid is not None and pid in self.own_pids:
            decision, fate = self._own_flow(held)
        else:
            service = None if pid is None else self._service_rule(pid, now)
            if exe is None and service is None:
                self.stats.unknown_owner += 1
                log.debug("[Router] owner of %s unknown: default route", _describe(held))
                decision = self._rules.default
            elif exe is None:
                assert service is not None
                decision = service
            else:
                decision = self._rules.match(exe)
                if service is not None:
                    # First match wins: an exe rule above the service rule still takes the process.
                    own = decision.rule_index
                    if own is None or service.rule_index is None or own > service.rule_index:
                        decision = service
                elif decision.rule_index is None and self._ancestors_of is not None and pid is not None:
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
            meta=held.meta if self.carries_packets else None,
            syn_seq=held.syn_seq,
        )
        if decision is not None:
            entry.tunnel_id = decision.tunnel if decision.tunnel not in (DIRECT, DROP) else None
            entry.fail_closed = decision.fallback is not FallbackPolicy.ALLOW_DIRECT
        if fate is FlowVerdict.TUNNEL and entry.tunnel_id in self._paths:
            path = self._paths[entry.tunnel_id]
            if path.has_address(4 if len(held.dst_addr) == 4 else 6):
                entry.verdict = FlowVerdict.TUNNEL  # no proxy port: ``to_packet_tunnel``
                if decision is not None and decision.system_dns:
                    entry.dns_server = self._system_dns_server(path.route, held)
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
                if decision is not None and decision.system_dns:
                    assert isinstance(route, TunnelRoute)
                    entry.dns_server = self._system_dns_server(route, held)
        if fate is FlowVerdict.DROP:
            entry.verdict = FlowVerdict.DROP
        if not self.table.add(held.key, entry):
            self.stats.nat_collisions += 1
            entry.verdict = FlowVerdict.DROP
            self.table.add(held.key, entry)
        elif entry.dns_server is not None and entry.to_packet_tunnel:
            self._dns_redirects[_redirect_key(entry)] = entry
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

    def _service_rule(self, pid: int, now: float) -> Decision | None:
        """The decision of the first ``service:`` rule naming a service process ``pid`` hosts, else None.
        A dict lookup; the Service Control Manager is asked again early (at most every
        ``SERVICE_RECHECK`` s) when a process the last reading did not know opens a flow."""
        if self._service_pids is None or not self._rules.services:
            return None
        decision = self._pid_rules.get(pid)
        if decision is not None or pid in self._pids_checked:
            return decision
        if now >= self._pids_read_at + SERVICE_RECHECK:
            self._read_service_pids(now)
            decision = self._pid_rules.get(pid)
            if decision is None:
                self._pids_checked.add(pid)  # not a service of ours as of now: not asked again for it
        return decision

    def _read_service_pids(self, now: float) -> None:
        """Read the pids of the services ``service:`` rules name (one SCM query per such rule)."""
        self._pids_read_at = now
        self._pids_checked.clear()
        services = self._rules.services
        if self._service_pids is None or not services:
            self._pid_rules = {}
            return
        pid_rules: dict[int, Decision] = {}
        for name, decision in services:
            for pid in self._service_pids(name):
                pid_rules.setdefault(pid, decision)  # rules in order: the first one naming it wins
        self._pid_rules = pid_rules

    @staticmethod
    def _system_dns_server(route: AnyTunnelRoute, held: _HeldFlow) -> bytes | None:
        """``dns.system`` (docs/DNS.md): the local resolver's own lookup (port 53, UDP or TCP) into a tunnel
        goes to that tunnel's DNS server of its IP version, not to the server the resolver asked (a packet
        tunnel's: rewritten here or by the kernel's table; a stream tunnel's: its proxy connects there).
        None: sent where it was going (another port, or the tunnel has no such server)."""
        if held.dst_port != DNS_PORT:
            return None
        server = route.dns_server(4 if len(held.dst_addr) == 4 else 6)
        return None if server == held.dst_addr else server

    def _inherited(self, pid: int, own: Decision) -> Decision:
        """The rule of the nearest ancestor that has one, for a process that has none (else ``own``)."""
        assert self._ancestors_of is not None
        for exe in self._ancestors_of(pid):
            decision = self._rules.match(exe)
            if decision.rule_index is not None:
                self.stats.inherited += 1
                return decision
        return own

    def _forget(self, entry: NatEntry, *, tombstone: bool = True) -> None:
        """Remove a flow; unless it was passed (or ``tombstone`` is False: a new flow takes its key, its
        socket closed), it leaves a tombstone so its later packets cannot leave directly."""
        self.table.remove(entry)
        if entry.dns_server is not None and entry.to_packet_tunnel:
            self._dns_redirects.pop(_redirect_key(entry), None)
        if tombstone and entry.verdict is not FlowVerdict.PASS:
            self.tombstones.add(entry, self._now)
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
        if entry.dns_server is not None:
            if v.fragment:
                # Later fragments carry no ports to tell the flow by: never rewritten, so never sent.
                self.stats.fragments_dropped += 1
                self._drop_later_fragments(v)
                return PacketAction.DROP
            v.set_dst_addr(entry.dns_server)
        if path.last_meta is None:
            path.last_meta = entry.meta
        if v.fragment:
            _remember(self._tunnel_fragments, self._fragment_id(v), (path.tunnel_id, now))
        error = path.send(v, now)
        if error is not None:
            self._outgoing.append(Outgoing(error, copy_meta(), inbound=True))
            if v.fragment:
                # The first fragment did not fit: the later ones must not go anywhere either.
                del self._tunnel_fragments[self._fragment_id(v)]
                _remember(self._fragment_ids, self._fragment_id(v), now)
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
                if entry is None and self._dns_redirects:
                    entry = self._dns_redirects.get(bytes((view.proto,)) + key)
                    if entry is not None and entry.verdict is FlowVerdict.TUNNEL:
                        view.set_src_addr(entry.orig_dst_addr)  # the answer of the server the app asked
                if entry is None or entry.verdict is not FlowVerdict.TUNNEL:
                    # The NAT still knew it, the router no longer does (reset, expired): never deliver.
                    self.stats.tunnel_orphans += 1
                    continue
                entry.last_seen = now
                if not entry.replied:
                    entry.replied = True
                    self.table.reschedule(entry)
                entry.packets_in += 1
                entry.bytes_in += view.length
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
        self._held_bytes = 0
        self._held_by_remote.clear()
        self._held_per_address.clear()
        self._held_order.clear()
        self._lookup_order.clear()
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
        """When ``poll`` next has work (a held flow's timeout, work left by the last run), or None."""
        if self._lookups_behind or self.table.expiry_behind:
            return self._now  # the last run stopped at its budget: run again soon
        if not self._held:
            return None
        if self._pulled:
            return self._now  # events pulled while routing may decide held flows: poll at once
        deadlines = []
        for order in (self._held_order, self._lookup_order):
            while order and self._held.get(order[0].key) is not order[0]:
                order.popleft()  # decided already
            if order:
                deadlines.append(order[0].deadline)
        return min(deadlines) if deadlines else None

    def poll(self, now: float) -> None:
        """Apply queued control commands, decide timed-out held flows, expire old flows.

        Costs what is due, not what is kept: held flows are looked at in deadline order, at most
        ``os_lookups_per_poll`` OS lookups are made (the rest wait for the next run, which
        ``next_deadline`` asks for at once), and expiry takes the flows of the timer slots that came due,
        at most ``EXPIRE_PER_POLL``.
        """
        self._now = now
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            command()
        if self._pulled:
            self._pulled = False
            remotes, self._pulled_remotes = self._pulled_remotes, set()
            for remote in remotes:
                for held in self._held_for(*remote):
                    if self._held.get(held.key) is held and self.events.waiting(
                        held.proto, held.src_port, held.dst_addr, held.dst_port
                    ):
                        owner = self._claim(held, now, ambiguous=self._others_waiting(held))
                        if owner is not None:
                            self._decide_held(held, owner, now)
        self._decide_timed_out(now)
        if now >= self._pids_read_at + SERVICE_REFRESH:
            self._read_service_pids(now)
        if now >= self._next_expiry or self.table.expiry_behind:
            self._next_expiry = now + EXPIRE_INTERVAL
            for entry in self.table.expire(now, EXPIRE_PER_POLL):
                if entry.dns_server is not None and entry.to_packet_tunnel:
                    self._dns_redirects.pop(_redirect_key(entry), None)
                if entry.verdict is not FlowVerdict.PASS:
                    self.tombstones.add(entry, now)
                if self._on_forgotten is not None and entry.proxy_port:
                    self._on_forgotten(entry)
            self.tombstones.expire(now)
            for path in self._paths.values():
                path.expire(now, EXPIRE_PER_POLL)
            limit = now - FRAGMENT_MEMORY
            tunnelled = self._tunnel_fragments
            while tunnelled and next(iter(tunnelled.values()))[1] <= limit:
                tunnelled.popitem(last=False)
            self.events.expire(now)
            dropped = self._fragment_ids
            while dropped and next(iter(dropped.values())) <= limit:
                dropped.popitem(last=False)
            if self._held_fragments:
                self._held_fragments = {k: h for k, h in self._held_fragments.items() if h in self._held}

    def _decide_timed_out(self, now: float) -> None:
        """Decide the held flows whose hold timeout passed: by a connect event that came meanwhile, else
        by an OS lookup while the run's budget lasts."""
        order, budget = self._held_order, self.os_lookups_per_poll
        self._lookups_behind = False
        while order:
            held = order[0]
            if self._held.get(held.key) is not held:
                order.popleft()  # decided already
                continue
            if held.deadline > now:
                break
            pid = self._claim(held, now, ambiguous=self._others_waiting(held))
            if pid is None and self.os_lookup is not None and not held.looked_up:
                if budget <= 0:
                    self._lookups_behind = True
                    self.stats.os_lookups_deferred += 1
                    break
                budget -= 1
                self.stats.os_lookups += 1
                held.looked_up = True
                pid = self.os_lookup(held.proto, held.src_addr, held.src_port, held.dst_addr, held.dst_port)
                if pid is not None and pid != OWNER_PENDING:
                    # Its CONNECT was late (or never comes): when it does, it is this flow's.
                    self.events.expect_late(held.proto, held.dst_addr, held.dst_port, pid, now)
                if pid == OWNER_PENDING:
                    # Its answer comes through connect_event; until LOOKUP_TIMEOUT it waits in a queue of
                    # its own (all of the same timeout, so in deadline order too).
                    order.popleft()
                    held.deadline = now + LOOKUP_TIMEOUT
                    self._lookup_order.append(held)
                    continue
            order.popleft()
            self._decide_held(held, pid, now)
        pending = self._lookup_order
        while pending:
            held = pending[0]
            if self._held.get(held.key) is not held:
                pending.popleft()  # decided by the lookup's answer
                continue
            if held.deadline > now:
                break
            pending.popleft()
            self._decide_held(held, self._claim(held, now, ambiguous=self._others_waiting(held)), now)

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


def _redirect_key(entry: NatEntry) -> bytes:
    """How a reply of a flow sent to its tunnel's DNS server (``NatEntry.dns_server``) finds it: protocol,
    then the app key with the server in the remote's place."""
    assert entry.dns_server is not None
    ports = entry.app_port.to_bytes(2, "big") + entry.orig_dst_port.to_bytes(2, "big")
    return bytes((entry.proto,)) + entry.app_addr + entry.dns_server + ports


def _remember(ids: OrderedDict[bytes, Any], key: bytes, value: Any) -> None:
    """Record ``key`` as the newest: the dict stays in order of time, so expiry pops from the front."""
    ids[key] = value
    ids.move_to_end(key)


def flow_row(e: NatEntry) -> FlowRow:
    """One flow for ``connections`` (a ``ConnectionsPage``'s rows)."""
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
        bytes_out=e.bytes_out,
        bytes_in=e.bytes_in,
        created=e.created,
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
