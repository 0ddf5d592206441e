"""`WireGuardDevice`: the asyncio adapter around the sans-I/O WireGuard/AmneziaWG protocol core.

It owns one UDP socket, the AllowedIPs table and a timer handle, and nothing else: every decision about
handshakes, keys and timers is the core's. IP packets go in through `send_packets` (routed by destination
to a peer) and come out through the `on_packets` callback (after the source check against the sending
peer's AllowedIPs). The socket is a raw non-blocking one driven by `loop.add_reader`, drained up to
`RECEIVE_BATCH` datagrams per wakeup: 1.3-1.5x the receive rate of an asyncio `DatagramProtocol`, which
returns to the selector after every datagram (`benchmarks/wg_throughput.py --micro`). Runs of same-size
datagrams to one endpoint leave in one `sendmsg` with UDP GSO (`UDP_SEGMENT`), and UDP GRO lets one read
return a whole run from a GSO sender, where the kernel supports them: with the TUN write coalescing of
`platform.linux.tun` these took the lab's single-stream download from ~450 to ~750-900 Mbit/s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from awg_split_tunnel.core.events import EventBus, TunnelStateChanged
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.errors import ConfigError, ProtocolError
from awg_split_tunnel.provider.amneziawg.envelope import envelope_for
from awg_split_tunnel.provider.amneziawg.params import (
    PARAM_NAMES,
    TIMER_KEYS,
    UNSET,
    AmneziaParams,
    timer_overrides,
)
from awg_split_tunnel.provider.wireguard.allowed_ips import AllowedIPs, Network
from awg_split_tunnel.provider.wireguard.conf import WgConf, awg_params
from awg_split_tunnel.provider.wireguard.envelope import Envelope, PlainEnvelope
from awg_split_tunnel.provider.wireguard.protocol import (
    DEFAULT_MTU,
    EndpointChanged,
    HandshakeCompleted,
    PacketReceived,
    PacketsReceived,
    PeerConfig,
    PeerUnreachable,
    WireGuardEvent,
    WireGuardProtocol,
)
from awg_split_tunnel.provider.wireguard.timers import TimerSettings
from awg_split_tunnel.provider.wireguard.uapi import (
    ERRNO_INVALID,
    DeviceState,
    PeerChange,
    PeerState,
    SetRequest,
    UapiError,
)
from awg_split_tunnel.provider.wireguard.value_range import Range

log = logging.getLogger("awg_split_tunnel.wireguard")

Endpoint = tuple[str, int]
PacketSink = Callable[[list[bytes]], None]

RECEIVE_BATCH = 256
MAX_DATAGRAM = 65535
SOCKET_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
UDP_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65535 - 40 - 8  # one GSO write is one IP datagram before segmentation (IPv6 worst case)
_SEGMENT_SIZE = struct.Struct("=H")
if sys.platform != "win32":
    _GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
else:  # no UDP GRO/GSO, no sendmsg/recvmsg: one datagram per call
    _GRO_CMSG_SPACE = 0


def _gro_segment_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    for level, kind, value in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
            return int.from_bytes(value[:4], sys.byteorder)
    return 0


@dataclass(slots=True)
class PeerStatistics:
    """What `status` shows per peer."""

    public_key: bytes
    endpoint: Endpoint | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    last_handshake: float | None = None  # wall-clock time (time.time()) of the last completed handshake


@dataclass(slots=True)
class DeviceStatistics:
    """Device-wide counters; every dropped packet is counted under its reason."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    gso_sends: int = 0
    dropped_no_route: int = 0
    dropped_source: int = 0
    dropped_send_error: int = 0
    dropped_invalid: int = 0
    peers: dict[bytes, PeerStatistics] = field(default_factory=dict)

    @property
    def rx_bytes(self) -> int:
        """Bytes received from every peer, as of the last `WireGuardDevice.statistics()`."""
        return sum(p.rx_bytes for p in self.peers.values())

    @property
    def tx_bytes(self) -> int:
        """Bytes sent to every peer, as of the last `WireGuardDevice.statistics()`."""
        return sum(p.tx_bytes for p in self.peers.values())


def normalize_endpoint(address: tuple[Any, ...]) -> Endpoint:
    """(host, port) of a socket address; IPv4-mapped IPv6 addresses become plain IPv4."""
    host = str(address[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, int(address[1])


class DatagramSocket:
    """A non-blocking UDP socket (dual-stack when the host has IPv6) with batched GRO receive and GSO send."""

    __slots__ = (
        "_addr_cache",
        "_dual",
        "gro",
        "gso",
        "gso_sends",
        "oversize",
        "port",
        "receive_errors",
        "sock",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._dual = sock.family == socket.AF_INET6
        self.port: int = sock.getsockname()[1]
        self.gso = sys.platform == "linux"
        self.gso_sends = 0
        self.oversize = 0
        """The smallest datagram size a GSO write was refused for as bigger than the path carries in one
        packet (EMSGSIZE); datagrams this big or bigger are sent one by one, and the kernel fragments them
        (docs/THROUGHPUT.md, "Datagrams bigger than the path"). 0: none seen."""
        self.receive_errors = 0
        self.gro = False
        if sys.platform == "linux":
            try:
                # UDP GRO: the kernel hands over runs of same-size datagrams (what a GSO sender like
                # wireguard-go emits) as one read.
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass
        self._addr_cache: dict[tuple[Any, ...], Endpoint] = {}

    @classmethod
    def bind(cls, port: int = 0, host: str | None = None, *, fwmark: int = 0) -> DatagramSocket:
        """Bind to `port` (0: any) on every address, or on `host`."""
        family = socket.AF_INET
        if host is None:
            family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET
        elif ":" in host:
            family = socket.AF_INET6
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError:
            if family != socket.AF_INET6 or host is not None:
                raise
            family = socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and host is None:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for option, fallback in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
                try:
                    if sys.platform != "linux":  # the FORCE options' numbers mean other things elsewhere
                        raise OSError
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError:  # not root: the unprivileged option is capped by rmem_max/wmem_max
                    sock.setsockopt(socket.SOL_SOCKET, fallback, SOCKET_BUFFER)
            if fwmark and sys.platform == "linux":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
            bind_host = host if host is not None else ("::" if family == socket.AF_INET6 else "0.0.0.0")
            sock.bind((bind_host, port))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def receive_batch(self, limit: int = RECEIVE_BATCH) -> list[tuple[bytes, Endpoint]]:
        """Up to `limit` waiting datagrams with their normalised sources; [] when none wait. A GRO
        super-datagram (same-size datagrams the kernel coalesced) is split back into its datagrams."""
        out: list[tuple[bytes, Endpoint]] = []
        cache = self._addr_cache
        recvmsg: Callable[[int, int], tuple[bytes, list[tuple[int, int, bytes]], int, Any]] | None = None
        if sys.platform != "win32" and self.gro:
            recvmsg = self.sock.recvmsg
        recvfrom = self.sock.recvfrom
        for _ in range(limit):
            try:
                if recvmsg is not None:
                    data, ancdata, _flags, address = recvmsg(MAX_DATAGRAM, _GRO_CMSG_SPACE)
                else:
                    data, address = recvfrom(MAX_DATAGRAM)
                    ancdata = None
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP errors (port unreachable from a dead endpoint) surface here; nothing to read.
                self.receive_errors += 1
                continue
            endpoint = cache.get(address)
            if endpoint is None:
                if len(cache) > 1024:
                    cache.clear()
                endpoint = cache[address] = normalize_endpoint(address)
            if ancdata:
                segment = _gro_segment_size(ancdata)
                if segment and len(data) > segment:
                    out += [(data[i : i + segment], endpoint) for i in range(0, len(data), segment)]
                    continue
            out.append((data, endpoint))
        return out

    def _address(self, endpoint: Endpoint) -> tuple[Any, ...]:
        host, port = endpoint
        if self._dual and ":" not in host:
            return ("::ffff:" + host, port)
        return (host, port)

    def send_batch(self, datagrams: Sequence[tuple[bytes, Endpoint]]) -> tuple[int, int]:
        """Send in order; returns (sent, dropped). Consecutive datagrams of one size to one endpoint go
        out as one GSO super-datagram (the last of a run may be shorter, as UDP_SEGMENT allows)."""
        sent = dropped = 0
        sendto = self.sock.sendto
        i, n = 0, len(datagrams)
        while i < n:
            data, endpoint = datagrams[i]
            size = len(data)
            j = i + 1
            if self.gso and not (self.oversize and size >= self.oversize):
                total = size
                end = min(n, i + UDP_MAX_SEGMENTS)
                while j < end:
                    following, to = datagrams[j]
                    length = len(following)
                    if (
                        (to is not endpoint and to != endpoint)
                        or length > size
                        or total + length > GSO_MAX_BYTES
                    ):
                        break
                    total += length
                    j += 1
                    if length < size:
                        break  # only the last segment may be shorter
            address = self._address(endpoint)
            try:
                if j - i > 1 and sys.platform != "win32":
                    try:
                        self.sock.sendmsg(
                            [d for d, _ in datagrams[i:j]],
                            [(SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))],
                            0,
                            address,
                        )
                        self.gso_sends += 1
                    except OSError as exc:
                        if exc.errno == errno.EMSGSIZE:
                            # Segments bigger than the path's MTU: GSO does not fragment, a plain send
                            # does. This size and bigger go one by one from now on (GSO is only tried
                            # below `oversize`, so this size is the smallest refused yet).
                            self.oversize = size
                        elif exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                            # No UDP GSO here (old kernel, or a device that refuses it): one by one from now.
                            self.gso = False
                        else:
                            raise
                        j = i + 1
                        sendto(data, address)
                else:
                    sendto(data, address)
                sent += j - i
            except (BlockingIOError, InterruptedError):
                dropped += j - i  # a full socket buffer drops, as a full NIC queue would
            except OSError:
                dropped += j - i  # unreachable endpoint and the like: the timers retry
            i = j
        return sent, dropped


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """One `[Peer]`: what the device needs to route to it and reach it."""

    public_key: bytes
    allowed_ips: tuple[Network, ...] = ()
    endpoint: Endpoint | None = None
    preshared_key: bytes | None = field(default=None, repr=False)
    persistent_keepalive: Range | None = None


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """One `[Interface]` and its peers; `amnezia` None (or all unset) is plain WireGuard."""

    private_key: bytes = field(repr=False)
    peers: tuple[PeerSettings, ...] = ()
    listen_port: int = 0
    mtu: int = DEFAULT_MTU
    fwmark: int = 0
    amnezia: AmneziaParams | None = None


class WireGuardDevice:
    """A WireGuard/AmneziaWG interface in userspace: UDP socket + protocol core + AllowedIPs routing.

    Feed it IP packets with `send_packets`; decrypted packets whose source lies in the sending peer's
    AllowedIPs come out through `on_packets` (a list per receive batch). State changes are published on
    `bus` as `TunnelStateChanged(tunnel_id, ...)` and given to `state_listeners`: CONNECTING once started,
    UP after a completed handshake, DOWN when every peer's handshakes failed for the whole attempt time
    (REKEY_ATTEMPT_TIME) or the device stops.
    """

    def __init__(
        self,
        settings: DeviceSettings,
        *,
        tunnel_id: str = "wg",
        bus: EventBus | None = None,
        on_packets: PacketSink | None = None,
        timers: TimerSettings | None = None,
        bind_host: str | None = None,
        udp_gso: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.tunnel_id = tunnel_id
        self.udp_gso = udp_gso
        self.bus = bus
        self.on_packets: PacketSink = on_packets if on_packets is not None else _discard
        self.bind_host = bind_host
        self.clock = clock
        self.wall_clock = wall_clock
        self.state = TunnelState.DOWN
        self.stats = DeviceStatistics()
        self.state_listeners: list[Callable[[TunnelState, str], None]] = []
        params = settings.amnezia
        envelope: Envelope = envelope_for(params) if params is not None else PlainEnvelope()
        self.log_tag = "[WG]" if isinstance(envelope, PlainEnvelope) else "[AWG]"
        if timers is None:
            overrides = timer_overrides(params) if params is not None else {}
            timers = TimerSettings(**overrides)  # type: ignore[arg-type]
        self.core = WireGuardProtocol(
            settings.private_key,
            envelope=envelope,
            timers=timers,
            mtu=settings.mtu,
            wall_clock=wall_clock,
            disable_cookies=params.disable_cookies if params is not None else False,
        )
        self.allowed_ips: AllowedIPs[bytes] = AllowedIPs()
        now = clock()
        for peer in settings.peers:
            self.core.add_peer(
                PeerConfig(peer.public_key, peer.preshared_key, peer.endpoint, peer.persistent_keepalive), now
            )
            self.stats.peers[peer.public_key] = PeerStatistics(peer.public_key, peer.endpoint)
            for network in peer.allowed_ips:
                self.allowed_ips.insert(network, peer.public_key)
        self._peers_up: set[bytes] = set()
        self._socket: DatagramSocket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._oversize_told = 0

    @classmethod
    def from_conf(cls, conf: WgConf, **kwargs: Any) -> WireGuardDevice:
        """Build from a parsed `.conf` (`conf.parse_conf`): keys, peers, MTU, ListenPort, FwMark and the
        AmneziaWG parameters (an AmneziaWG set → `AmneziaEnvelope`, none → `PlainEnvelope`)."""
        return cls(settings_from_conf(conf), **kwargs)

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The UDP port the device listens on (after `start`)."""
        return self._socket.port if self._socket is not None else self.settings.listen_port

    @property
    def public_key(self) -> bytes:
        return self.core.public_key

    async def start(self) -> None:
        """Bind the socket and start reading; peers with a persistent keepalive handshake at once."""
        if self._socket is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._socket = DatagramSocket.bind(
            self.settings.listen_port, self.bind_host, fwmark=self.settings.fwmark
        )
        self._socket.gso = self._socket.gso and self.udp_gso
        self._loop.add_reader(self._socket.fileno(), self._on_readable)
        self._set_state(TunnelState.CONNECTING, "device started")
        self.core.start(self.clock())
        self._flush()
        self._rearm_timer()

    async def stop(self) -> None:
        """Stop reading, cancel timers, close the socket; state DOWN."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._socket is not None and self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
        self._socket = None
        self._peers_up.clear()
        self._set_state(TunnelState.DOWN, "device stopped")

    def connect(self) -> None:
        """Start a handshake with every peer that has an endpoint (instead of waiting for traffic)."""
        now = self.clock()
        for key in self.core.peers:
            self.core.initiate_handshake(key, now)
        self._flush()
        self._rearm_timer()

    # -- the data path -------------------------------------------------------------------------------

    def send_packets(self, packets: Sequence[bytes]) -> None:
        """Encrypt and send IP packets, each to the peer whose AllowedIPs hold its destination.
        Packets with no such peer are dropped and counted."""
        peers = self.allowed_ips.lookup_destinations(packets)
        # One batch per peer for the core (its timers and rekey check run once per batch); each peer's
        # packets keep their order.
        first = peers[0] if peers else None
        batches: Iterable[tuple[bytes, Sequence[bytes]]]
        if first is not None and peers.count(first) == len(peers):
            batches = ((first, packets),)  # the usual case: every packet to one peer
        else:
            by_peer: dict[bytes, list[bytes]] = {}
            no_route = 0
            for packet, peer in zip(packets, peers, strict=True):
                if peer is None:
                    no_route += 1
                    continue
                group = by_peer.get(peer)
                if group is None:
                    by_peer[peer] = [packet]
                else:
                    group.append(packet)
            self.stats.dropped_no_route += no_route
            batches = by_peer.items()
        now = self.clock()
        core_send = self.core.send_packets
        for peer, batch in batches:
            core_send(peer, batch, now)
        self._flush()
        self._rearm_timer()

    def send_packet(self, packet: bytes) -> None:
        self.send_packets((packet,))

    def _on_readable(self) -> None:
        sock = self._socket
        if sock is None:
            return
        batch = sock.receive_batch()
        if not batch:
            return
        self.stats.datagrams_in += len(batch)
        lookup_sources = self.allowed_ips.lookup_sources
        delivered: list[bytes] = []
        for event in self.core.receive_datagrams(batch, self.clock()):
            if type(event) is PacketsReceived:
                # Cryptokey routing: a peer may only send from addresses in its own AllowedIPs.
                peer = event.peer
                received = event.ip_packets
                sources = lookup_sources(received)
                if sources.count(peer) == len(received):
                    kept = received
                else:
                    kept = [p for p, source in zip(received, sources, strict=True) if source == peer]
                if len(kept) != len(received):
                    self.stats.dropped_source += len(received) - len(kept)
                delivered += kept
            else:
                self._on_event(event)
        if delivered:
            self.on_packets(delivered)
        self._flush()
        self._rearm_timer()

    def _on_event(self, event: WireGuardEvent) -> None:
        if isinstance(event, HandshakeCompleted):
            entry = self.stats.peers.get(event.peer)
            if entry is not None:
                entry.last_handshake = self.wall_clock()
            self._peers_up.add(event.peer)
            self._set_state(TunnelState.UP, "handshake completed")
        elif isinstance(event, PeerUnreachable):
            self._peers_up.discard(event.peer)
            if not self._peers_up:
                self._set_state(TunnelState.DOWN, "handshakes failed for the whole attempt time")
        elif isinstance(event, EndpointChanged):
            entry = self.stats.peers.get(event.peer)
            if entry is not None:
                entry.endpoint = event.endpoint
        elif isinstance(event, (PacketReceived, PacketsReceived)):
            self.stats.dropped_invalid += 1  # only the receive path may yield packets

    # -- I/O glue ------------------------------------------------------------------------------------

    def _flush(self) -> None:
        datagrams = self.core.datagrams_to_send()
        if not datagrams:
            return
        sock = self._socket
        if sock is None:
            return
        sent, dropped = sock.send_batch(datagrams)
        self.stats.datagrams_out += sent
        self.stats.dropped_send_error += dropped
        self.stats.gso_sends = sock.gso_sends
        if sock.oversize != self._oversize_told:
            self._tell_oversize(sock.oversize)

    def _tell_oversize(self, size: int) -> None:
        """Once per smaller size: the tunnel's datagrams do not fit the path in one packet."""
        self._oversize_told = size
        # A 1500-byte IPv4 link carries 1472 bytes of UDP payload in one packet (docs/THROUGHPUT.md).
        hint = f" by at least {size - 1472} for a 1500-byte IPv4 link" if size > 1472 else ""
        log.warning(
            "%s %s: encrypted packets of %d bytes are bigger than the network path carries in one packet; "
            "they are sent fragmented, which is slower and which some networks drop. Lower MTU (now %d) in "
            "the tunnel's config%s.",
            self.log_tag,
            self.tunnel_id,
            size,
            self.settings.mtu,
            hint,
        )

    def _rearm_timer(self) -> None:
        loop = self._loop
        if loop is None or self._socket is None:
            return
        deadline = self.core.next_timer_deadline()
        if self._timer is not None:
            if deadline == self._timer_deadline:
                return
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = deadline
        if deadline is None:
            return
        # The core's deadlines are on `self.clock`; asyncio's call_later converts from "now".
        self._timer = loop.call_later(max(0.0, deadline - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        for event in self.core.handle_timers(self.clock()):
            self._on_event(event)
        self._flush()
        self._rearm_timer()

    def _set_state(self, state: TunnelState, reason: str) -> None:
        if state == self.state:
            return
        old, self.state = self.state, state
        log.info("%s %s: %s -> %s (%s)", self.log_tag, self.tunnel_id, old, state, reason)
        if self.bus is not None:
            self.bus.publish(TunnelStateChanged(self.tunnel_id, old, state, reason, self.wall_clock()))
        for listener in self.state_listeners:
            listener(state, reason)

    # -- UAPI (`wg show` / `wg set`; docs/UAPI.md) ----------------------------------------------------

    def uapi_state(self) -> DeviceState:
        """The device as a UAPI get reports it: keys, port, fwmark, AmneziaWG parameters, and each peer's
        endpoint, last handshake, transfer counters, keepalive and allowed IPs."""
        peers = []
        networks: dict[bytes, list[Network]] = {}
        for network, key in self.allowed_ips.items():
            networks.setdefault(key, []).append(network)
        for key, peer in self.core.peers.items():
            entry = self.stats.peers.get(key)
            preshared = peer.handshake.preshared_key
            peers.append(
                PeerState(
                    public_key=key,
                    preshared_key=preshared if any(preshared) else None,
                    endpoint=peer.endpoint,
                    last_handshake=entry.last_handshake if entry is not None else None,
                    rx_bytes=peer.stats.rx_bytes,
                    tx_bytes=peer.stats.tx_bytes,
                    persistent_keepalive=peer.persistent_keepalive,
                    allowed_ips=tuple(networks.get(key, ())),
                )
            )
        return DeviceState(
            private_key=self.core.identity.private,
            listen_port=self.port,
            fwmark=self.settings.fwmark,
            amnezia=self.settings.amnezia,
            peers=tuple(peers),
        )

    def apply_uapi(self, request: SetRequest) -> None:
        """Apply a UAPI set to the running device, in the request's order; `UapiError` (with the errno to
        answer) for what it cannot take: another listen port or fwmark (both fixed while the device runs),
        AmneziaWG keys on a WireGuard device, timer keys, parameters that do not make a working set."""
        if request.listen_port is not None and request.listen_port != self.port:
            raise UapiError(ERRNO_INVALID, "the listen port is fixed while the device runs")
        if request.fwmark is not None and request.fwmark != self.settings.fwmark:
            raise UapiError(ERRNO_INVALID, "the fwmark is fixed while the device runs")
        params = self._amnezia_after(request.amnezia)
        now = self.clock()
        if request.private_key is not None:
            self.core.set_private_key(request.private_key, now)
            self.settings = dataclasses.replace(self.settings, private_key=request.private_key)
            for key in [k for k in self.stats.peers if k not in self.core.peers]:
                self._forget_peer(key)
        current = self.settings.amnezia
        if params is not None and current is not None and _differ(params, current):
            self.core.envelope = envelope_for(params)
            self.core.disable_cookies = params.disable_cookies
            self.settings = dataclasses.replace(self.settings, amnezia=params)
        if request.replace_peers:
            for key in list(self.core.peers):
                self._forget_peer(key)
        for change in request.peers:
            self._apply_peer_change(change, now)
        if not self._peers_up and self.state is TunnelState.UP:
            self._set_state(TunnelState.DOWN, "its peers were removed")
        self._flush()
        self._rearm_timer()

    def _amnezia_after(self, changes: Sequence[tuple[str, str]]) -> AmneziaParams | None:
        current = self.settings.amnezia
        if not changes:
            return current
        if current is None:
            raise UapiError(ERRNO_INVALID, "AmneziaWG keys given to a WireGuard device")
        values: dict[str, object] = {name: getattr(current, name) for name in PARAM_NAMES}
        values.update(changes)
        try:
            params = AmneziaParams.from_mapping(values)
            params.check()
        except ConfigError as exc:
            raise UapiError(ERRNO_INVALID, exc.reason) from None
        for key in TIMER_KEYS:
            if getattr(params, key) != getattr(current, key):
                raise UapiError(ERRNO_INVALID, "the timer keys are fixed while the device runs")
        return params

    def _apply_peer_change(self, change: PeerChange, now: float) -> None:
        key = change.public_key
        if key == self.core.public_key:
            return  # our own key: ignored, as wireguard-go does
        if change.remove:
            self._forget_peer(key)
            return
        keepalive = change.persistent_keepalive
        if key not in self.core.peers:
            if change.update_only:
                return
            try:
                self.core.add_peer(
                    PeerConfig(
                        key, change.preshared_key, change.endpoint, None if keepalive == UNSET else keepalive
                    ),
                    now,
                )
            except ProtocolError as exc:
                raise UapiError(ERRNO_INVALID, f"cannot add the peer: {exc}") from None
            self.stats.peers[key] = PeerStatistics(key, change.endpoint)
            log.info("%s %s: peer added through UAPI", self.log_tag, self.tunnel_id)
        else:
            self.core.update_peer(
                key,
                now,
                preshared_key=change.preshared_key,
                endpoint=change.endpoint,
                persistent_keepalive=keepalive,
                keepalive_off=keepalive == UNSET,
            )
        if change.replace_allowed_ips:
            self.allowed_ips.remove_value(key)
        for add, network in change.allowed_ips:
            if add:
                self.allowed_ips.insert(network, key)
            elif network in self.allowed_ips.networks_of(key):
                self.allowed_ips.remove(network)

    def _forget_peer(self, key: bytes) -> None:
        if key in self.core.peers:
            self.core.remove_peer(key)
            log.info("%s %s: peer removed through UAPI", self.log_tag, self.tunnel_id)
        self.allowed_ips.remove_value(key)
        self.stats.peers.pop(key, None)
        self._peers_up.discard(key)

    # -- status --------------------------------------------------------------------------------------

    def statistics(self) -> DeviceStatistics:
        """Device counters with every peer's entry brought up to date (see `peer_statistics`)."""
        self.peer_statistics()
        return self.stats

    def peer_statistics(self) -> list[PeerStatistics]:
        """Per-peer counters (bytes on the wire, as `wg show` counts them), endpoint and handshake time."""
        out = []
        for key, peer in self.core.peers.items():
            entry = self.stats.peers[key]
            entry.endpoint = peer.endpoint
            entry.rx_bytes = peer.stats.rx_bytes
            entry.tx_bytes = peer.stats.tx_bytes
            entry.rx_packets = peer.stats.rx_packets
            entry.tx_packets = peer.stats.tx_packets
            out.append(entry)
        return out

    @property
    def dropped(self) -> dict[str, int]:
        """Every drop counter: the core's (by reason) and the device's own."""
        counts = dict(self.core.dropped)
        for name in ("dropped_no_route", "dropped_source", "dropped_send_error", "dropped_invalid"):
            value = getattr(self.stats, name)
            if value:
                counts[name.removeprefix("dropped_")] = value
        return counts


def _differ(left: AmneziaParams, right: AmneziaParams) -> bool:
    return any(getattr(left, name) != getattr(right, name) for name in PARAM_NAMES)


def _discard(packets: list[bytes]) -> None:
    return None


def resolve_endpoint(host: str, port: int) -> Endpoint:
    """(address, port) for a configured endpoint; a host name is resolved once, as wg does."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise ConfigError(
                f"endpoint host {host!r} does not resolve: {exc.strerror}", key="Endpoint"
            ) from None
        host = str(infos[0][4][0])
    return host, port


def settings_from_conf(conf: WgConf, *, file: str | None = None) -> DeviceSettings:
    """`DeviceSettings` from a parsed `.conf`: endpoints resolved, AmneziaWG parameters checked
    (`ConfigError` naming the file and key when they do not make a working tunnel)."""
    iface = conf.interface
    raw_params = awg_params(conf)
    amnezia: AmneziaParams | None = None
    if raw_params:
        amnezia = AmneziaParams.from_mapping(raw_params, file=file)
        amnezia.check(file=file)
    peers = []
    for peer in conf.peers:
        endpoint = resolve_endpoint(peer.endpoint.host, peer.endpoint.port) if peer.endpoint else None
        keepalive = peer.persistent_keepalive
        if keepalive is not None and keepalive.hi == 0:
            keepalive = None  # 0 = off
        peers.append(
            PeerSettings(
                public_key=peer.public_key,
                allowed_ips=tuple(peer.allowed_ips),
                endpoint=endpoint,
                preshared_key=peer.preshared_key,
                persistent_keepalive=keepalive,
            )
        )
    return DeviceSettings(
        private_key=iface.private_key,
        peers=tuple(peers),
        listen_port=iface.listen_port or 0,
        mtu=iface.mtu or DEFAULT_MTU,
        fwmark=iface.fwmark or 0,
        amnezia=amnezia,
    )
