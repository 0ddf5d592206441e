"""The flow table: each flow's decision and, for tunnelled flows, its NAT + hairpin mapping.

A tunnelled flow from the app (A:a → D:d) is rewritten to (D:a → A:P), P being the tunnel's local proxy
port, and injected inbound; the proxy thus sees its peer as D:a and finds d here, keyed by (D, a). The
proxy's replies (A:P → D:a) are rewritten back to (D:d → A:a). Keys are raw address+port bytes straight
from the packet, so the hot path builds one ``bytes`` per packet and nothing else.

Expiry (time passed in): TCP flows linger ``TCP_CLOSED_LINGER`` after an RST or a FIN from both sides,
and go after ``TCP_IDLE_TIMEOUT`` without packets (``TCP_SYN_TIMEOUT`` before the first reply); UDP flows
go after ``UDP_IDLE_TIMEOUT`` without packets. Deadlines are kept in a ``TimerWheel``, so expiring costs
what expires, not a scan of the table.

A tunnelled, reset or dropped flow that is forgotten leaves a ``Tombstone`` (``Tombstones``, bounded in
number and age): its later packets must not leave directly as those of an unknown connection would.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, PacketView
from awg_split_tunnel.net.timer_wheel import TimerWheel

TCP_IDLE_TIMEOUT = 7440.0
"""RFC 5382 REQ-5: an established TCP mapping lives at least 2 h 4 min without packets."""
TCP_SYN_TIMEOUT = 75.0
"""A flow that never saw a packet back (no SYN-ACK) is given up like a connect() would."""
TCP_CLOSED_LINGER = 10.0
"""After RST or FIN both ways: long enough for the last ACKs and retransmitted FINs."""
UDP_IDLE_TIMEOUT = 60.0
"""RFC 4787 REQ-5 asks for at least 2 min for arbitrary ports; 60 s keeps DNS/QUIC tables small."""

FIN_FROM_APP = 1
FIN_FROM_PEER = 2


PEER_PORTS = range(20000, 32768)
"""Ports a tunnelled flow's peer is translated to when its own is taken: below Linux's ephemeral range,
so they rarely meet a port the app side uses."""
PEER_PORT_PROBES = 16
"""Candidates tried for a free peer port before the flow is refused (a candidate can be taken only by a
flow whose own app port lies in ``PEER_PORTS``): finding one is O(1), exhaustion too."""

TOMBSTONE_AGE = TCP_IDLE_TIMEOUT
"""Seconds a forgotten flow's tombstone is kept: as long as an idle flow would have lived. It covers an
app that keeps retransmitting after a reset it did not take (Linux gives up after ~15 min,
``tcp_retries2``), and one that speaks again on a connection that expired after 2 h 4 min idle."""
MAX_TOMBSTONES = 65536
"""Tombstones kept per protocol at most; the oldest go first (~240 B each: 30 MiB for both when full,
measured with tracemalloc). A flood of forgotten flows cannot grow memory past it."""


class FlowVerdict(enum.IntEnum):
    """A flow's fate: what the router does with every packet of it. ``core.rule_engine.resolve`` gives a
    new flow PASS, TUNNEL or DROP; RESET is what a tunnelled flow becomes when its tunnel goes down."""

    PASS = 0
    """Reinject unchanged (direct, LAN bypass, the daemon's own traffic)."""
    TUNNEL = 1
    """Into its tunnel: NAT + hairpin to a stream tunnel's local proxy, or to a packet tunnel's device."""
    DROP = 2
    """Drop (policy drop, or tunnel down with ``block``)."""
    RESET = 3
    """The flow's tunnel went down: answer the app's next packet with an RST and drop it."""


@dataclass(slots=True, eq=False)
class NatEntry:
    """One flow: its owner, its verdict and, for tunnelled flows, where the proxy must connect to."""

    proto: int
    app_addr: bytes
    app_port: int
    orig_dst_addr: bytes
    orig_dst_port: int
    verdict: FlowVerdict
    tunnel_id: str | None = None
    proxy_port: int = 0
    pid: int | None = None
    exe: str | None = None
    created: float = 0.0
    last_seen: float = 0.0
    fail_closed: bool = False
    """Reset when the tunnel goes down (policy ``block``/``drop``); ``allow_direct`` flows are left be."""
    replied: bool = False
    fin: int = 0
    closed_at: float | None = None
    packets_out: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    app_ack: int = -1
    """The last acknowledgement number the app sent (TCP, tunnelled): where an RST to it must sit."""
    meta: object = field(default=None, repr=False)
    """The I/O side's address record of the flow's first packet (interface), for crafted replies."""
    key: bytes = field(default=b"", repr=False)
    syn_seq: int = -1
    """The sequence number of the app's SYN (TCP): a SYN with another one on this 4-tuple is a new
    connection (the app's port reused), to be decided afresh — not a retransmit."""
    peer_port: int = 0
    """The port the proxy sees this flow come from when it is not ``app_port`` (0): another tunnelled flow
    of the same app port to the same address (another destination port) holds that peer key."""
    slot: int = field(default=-1, repr=False)
    """The ``FlowTable``'s expiry slot (``TimerWheel``)."""
    dns_server: bytes | None = None
    """Where a packet-tunnel flow is sent instead of ``orig_dst_addr`` (same port): the local resolver's
    lookup under ``dns.system``, to the tunnel's DNS server (docs/DNS.md). Its replies reach the app from
    ``orig_dst_addr``, as it expects."""

    @property
    def to_packet_tunnel(self) -> bool:
        """A tunnelled flow of a WireGuard/AmneziaWG tunnel (no local proxy: its packets go to a device)."""
        return self.verdict is FlowVerdict.TUNNEL and not self.proxy_port

    @property
    def orig_dst_ip(self) -> str:
        """The destination the app asked for, as text (what a proxy connects to)."""
        return str(ipaddress.ip_address(self.orig_dst_addr))

    @property
    def upstream_ip(self) -> str:
        """Where a proxy connects this flow to, as text: ``dns_server`` if set, else ``orig_dst_ip``."""
        return str(ipaddress.ip_address(self.dns_server or self.orig_dst_addr))

    @property
    def app_ip(self) -> str:
        return str(ipaddress.ip_address(self.app_addr))

    @property
    def peer_key(self) -> bytes:
        """How the proxy sees this flow's peer: (original destination, app's port — or the port it was
        translated to, ``peer_port``)."""
        return self.orig_dst_addr + (self.peer_port or self.app_port).to_bytes(2, "big")

    def deadline(self) -> float:
        if self.closed_at is not None:
            return self.closed_at + TCP_CLOSED_LINGER
        if self.proto == IPPROTO_UDP:
            return self.last_seen + UDP_IDLE_TIMEOUT
        return self.last_seen + (TCP_IDLE_TIMEOUT if self.replied else TCP_SYN_TIMEOUT)


def app_key(view: PacketView) -> bytes:
    """The key of an app's packet: source and destination address, then source and destination port."""
    buf, a, n, l4 = view.buf, view.src_off, view.addr_len, view.l4
    if l4 == a + 2 * n:  # no IP options / extension headers: one contiguous slice
        return bytes(buf[a : l4 + 4])
    return bytes(buf[a : a + 2 * n]) + bytes(buf[l4 : l4 + 4])


def reply_key(view: PacketView) -> bytes:
    """The key of a proxy's reply (A:P → D:a): its destination address and port, i.e. the peer key."""
    buf, off = view.buf, view.src_off + view.addr_len
    return bytes(buf[off : off + view.addr_len]) + bytes(buf[view.l4 + 2 : view.l4 + 4])


def _proto_index(proto: int) -> int:
    if proto == IPPROTO_TCP:
        return 0
    if proto == IPPROTO_UDP:
        return 1
    raise ValueError(f"no flow table for protocol {proto}")


class FlowTable:
    """All known flows, by app-side key and (tunnelled flows) by peer key; plain dicts, one owner."""

    __slots__ = ("_expiry", "_flows", "_peer_ports", "_peers", "by_tunnel", "collisions", "exhausted")

    def __init__(self) -> None:
        self._flows: tuple[dict[bytes, NatEntry], dict[bytes, NatEntry]] = ({}, {})
        self._peers: tuple[dict[bytes, NatEntry], dict[bytes, NatEntry]] = ({}, {})
        # Per protocol: original destination address → its pool of translated peer ports.
        self._peer_ports: tuple[dict[bytes, _PeerPortPool], dict[bytes, _PeerPortPool]] = ({}, {})
        self._expiry: TimerWheel[NatEntry] = TimerWheel()
        self.collisions = 0
        """Tunnelled flows whose peer key was taken: given another peer port."""
        self.exhausted = 0
        """Tunnelled flows refused because no peer port was free."""
        self.by_tunnel: dict[str, int] = {}
        """How many flows each tunnel has (a flow's ``tunnel_id`` never changes once it is added), kept as
        flows come and go so that ``status`` never walks the table."""

    def __len__(self) -> int:
        return len(self._flows[0]) + len(self._flows[1])

    def __iter__(self) -> Iterator[NatEntry]:
        yield from list(self._flows[0].values())
        yield from list(self._flows[1].values())

    def flows(self, proto: int) -> dict[bytes, NatEntry]:
        """The app-side dict of ``proto`` (the router reads it directly on the hot path)."""
        return self._flows[_proto_index(proto)]

    def peers(self, proto: int) -> dict[bytes, NatEntry]:
        """The peer-key dict of ``proto``: tunnelled flows as their proxy sees them."""
        return self._peers[_proto_index(proto)]

    def add(self, key: bytes, entry: NatEntry) -> bool:
        """Insert a flow; False (counted) only if a tunnelled flow can get no peer key of its own.

        Two flows from the same app port to the same address but different destination ports (Linux
        gives one local port to connections to different destinations) would look identical to the
        proxy: the second one's port is translated (``peer_port``) on the way to the proxy and back.
        """
        i = _proto_index(entry.proto)
        entry.key = key
        if entry.verdict is FlowVerdict.TUNNEL:
            peers = self._peers[i]
            other = peers.get(entry.peer_key)
            if other is not None and other is not self._flows[i].get(key):
                self.collisions += 1
                port = self._take_peer_port(i, entry.orig_dst_addr)
                if port is None:
                    self.exhausted += 1
                    return False
                entry.peer_port = port
            peers[entry.peer_key] = entry
        old = self._flows[i].get(key)
        if old is not entry:
            if old is not None:
                self._unlink_peer(old)
                self._expiry.cancel(old)
                self._count(old.tunnel_id, -1)
            self._count(entry.tunnel_id, 1)
        self._flows[i][key] = entry
        self._expiry.schedule(entry, entry.deadline())
        return True

    def _count(self, tunnel_id: str | None, step: int) -> None:
        if tunnel_id is not None:
            left = self.by_tunnel.get(tunnel_id, 0) + step
            if left:
                self.by_tunnel[tunnel_id] = left
            else:
                del self.by_tunnel[tunnel_id]

    def _take_peer_port(self, i: int, address: bytes) -> int | None:
        pools = self._peer_ports[i]
        pool = pools.get(address)
        if pool is None:
            pool = pools[address] = _PeerPortPool()
        peers = self._peers[i]
        for _ in range(PEER_PORT_PROBES):
            port = pool.take()
            if port is None:
                break
            if address + port.to_bytes(2, "big") not in peers:
                pool.used += 1
                return port
            # Held by a flow's own app port (one in PEER_PORTS): left out of the pool until it empties.
        if not pool.used:
            del pools[address]
        return None

    def remove(self, entry: NatEntry) -> None:
        i = _proto_index(entry.proto)
        if self._flows[i].get(entry.key) is entry:
            del self._flows[i][entry.key]
            self._count(entry.tunnel_id, -1)
        self._unlink_peer(entry)
        self._expiry.cancel(entry)

    def _unlink_peer(self, entry: NatEntry) -> None:
        if entry.verdict is FlowVerdict.TUNNEL or entry.verdict is FlowVerdict.RESET:
            i = _proto_index(entry.proto)
            peers = self._peers[i]
            peer = entry.peer_key
            if peers.get(peer) is entry:
                del peers[peer]
                if entry.peer_port:
                    pools = self._peer_ports[i]
                    pool = pools[entry.orig_dst_addr]
                    pool.give_back(entry.peer_port)
                    if not pool.used:
                        del pools[entry.orig_dst_addr]

    def lookup_peer(self, proto: int, peer_addr: bytes, peer_port: int) -> NatEntry | None:
        """The tunnelled flow a proxy's accepted peer (address, port) stands for."""
        return self._peers[_proto_index(proto)].get(peer_addr + peer_port.to_bytes(2, "big"))

    def for_tunnel(self, tunnel_id: str) -> list[NatEntry]:
        return [e for e in self if e.tunnel_id == tunnel_id]

    def reschedule(self, entry: NatEntry) -> None:
        """``entry``'s deadline changed kind (it closed: earlier; first answered: later): put it in the slot
        of its deadline now. (A deadline pushed later by traffic needs no call: it is looked at again when
        its slot comes.)"""
        if self._flows[_proto_index(entry.proto)].get(entry.key) is entry:
            self._expiry.schedule(entry, entry.deadline())

    def expire(self, now: float, limit: int | None = None) -> list[NatEntry]:
        """Remove and return the flows whose time is up: those of the expiry slots that came due, at most
        ``limit`` looked at (``expiry_behind`` then says more are due)."""
        gone: list[NatEntry] = []
        wheel = self._expiry
        for entry in wheel.due(now, limit):
            deadline = entry.deadline()
            if deadline <= now:
                self.remove(entry)
                gone.append(entry)
            else:
                wheel.schedule(entry, deadline)
        return gone

    @property
    def expiry_behind(self) -> bool:
        """Whether flows already due wait for the next ``expire`` (the last one stopped at its limit)."""
        return self._expiry.behind


class _PeerPortPool:
    """The peer ports handed out for one original destination: given-back ports first, then fresh ones
    in order. Taking and giving back are O(1)."""

    __slots__ = ("freed", "fresh", "used")

    def __init__(self) -> None:
        self.freed: list[int] = []
        self.fresh = PEER_PORTS.start
        self.used = 0

    def take(self) -> int | None:
        if self.freed:
            return self.freed.pop()
        if self.fresh < PEER_PORTS.stop:
            self.fresh += 1
            return self.fresh - 1
        return None

    def give_back(self, port: int) -> None:
        self.used -= 1
        self.freed.append(port)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a forgotten flow that was not passed: enough to keep its packets from leaving."""

    pid: int | None
    """The flow's owner, for a UDP flow's next datagram whose owner the OS no longer tells."""
    until: float


class Tombstones:
    """Forgotten tunnelled, reset and dropped flows by app-side key, per protocol: at most
    ``MAX_TOMBSTONES`` each, for ``TOMBSTONE_AGE`` seconds, oldest first out (time passed in)."""

    __slots__ = ("_by_proto", "age", "limit")

    def __init__(self, age: float = TOMBSTONE_AGE, limit: int = MAX_TOMBSTONES) -> None:
        self.age = age
        self.limit = limit
        self._by_proto: tuple[OrderedDict[bytes, Tombstone], OrderedDict[bytes, Tombstone]] = (
            OrderedDict(),
            OrderedDict(),
        )

    def __len__(self) -> int:
        return len(self._by_proto[0]) + len(self._by_proto[1])

    def add(self, entry: NatEntry, now: float) -> None:
        """Leave a tombstone for ``entry`` (forgotten now) under its key."""
        stones = self._by_proto[_proto_index(entry.proto)]
        stones.pop(entry.key, None)  # re-added: to the end, so the order stays the order of age
        stones[entry.key] = Tombstone(entry.pid, now + self.age)
        if len(stones) > self.limit:
            stones.popitem(last=False)

    def get(self, proto: int, key: bytes, now: float) -> Tombstone | None:
        stone = self._by_proto[_proto_index(proto)].get(key)
        return stone if stone is not None and stone.until > now else None

    def pop(self, proto: int, key: bytes, now: float) -> Tombstone | None:
        """Take the tombstone of ``key`` away (a new flow on it was decided), returning it if still alive."""
        stone = self._by_proto[_proto_index(proto)].pop(key, None)
        return stone if stone is not None and stone.until > now else None

    def expire(self, now: float) -> int:
        """Drop the tombstones whose age is up (O(expired): they are kept in order of age)."""
        gone = 0
        for stones in self._by_proto:
            while stones:
                key = next(iter(stones))
                if stones[key].until > now:
                    break
                del stones[key]
                gone += 1
        return gone
