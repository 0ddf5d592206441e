"""TunnelProxy: the local, transparent end of one stream tunnel (SOCKS5, HTTP proxy, direct).

The divert data path redirects an app's connection here by NAT + hairpin, so the proxy sees the peer as
(original destination IP, app's source port). ``nat_lookup`` — supplied by the router — turns that into the
original destination and the app's pid; the proxy then opens the flow through the tunnel's provider and
relays both ways. UDP works the same way on one local socket: one provider association per app address,
replies sent back to that address (the router rewrites them to come from the original destination).

On the kernel data path (``redirected=True``) the kernel hands the flow to the proxy on loopback: a TCP
connection by TPROXY to the transparent listener, so the peer is the app's own address and port and the
connection's local address is the original destination; a UDP datagram by ``redirect`` (NAT), so the
peer is the app and ``nat_lookup`` gives the destination. Either way ``nat_lookup`` must know the flow:
a connection the data path did not send here is refused.

Bounds (``ProxyLimits``; docs/ARCHITECTURE.md, "Proxy bounds"): at most so many TCP flows and UDP
associations per proxy and per app (an executable, else a pid, as the NAT entry names it) — beyond
them a TCP connection is reset and a datagram dropped, counted and logged once a minute; a TCP flow
idle for ``tcp_idle_timeout`` is reset, one that a side has half-closed once the other side has been
silent for ``half_close_timeout``; a UDP association ends after ``udp_idle_timeout`` without datagrams.
``withdraw`` closes the flow of a NAT entry the router forgot (the divert data path's flows).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from awg_split_tunnel.errors import AwgSplitTunnelError, TunnelError
from awg_split_tunnel.net.nat import TCP_IDLE_TIMEOUT, UDP_IDLE_TIMEOUT
from awg_split_tunnel.provider.interface import (
    STREAM_LIMIT,
    Address,
    StreamProvider,
    UdpChannel,
    abort_stream,
    format_address,
    normalize_ip,
)

log = logging.getLogger("awg_split_tunnel.proxy")

RELAY_CHUNK = 256 * 1024
"""Bytes asked of the kernel per read; also the write-buffer high-water mark that pauses the reader."""

CLOSE_TIMEOUT = 10.0
"""How long a finished flow may take to flush its last bytes before it is reset."""

HALF_CLOSE_TIMEOUT = 60.0
"""After one side of a TCP flow ended its half (FIN), how long the other side may stay silent before the
flow is reset: Linux's own ``tcp_fin_timeout`` (FIN-WAIT-2) is 60 s. Bytes still moving keep the flow."""
UDP_RETRY_AFTER = 1.0
"""After a failed open, an app address's datagrams are dropped this long before the tunnel is tried again."""
PORT_ATTEMPTS = 5
"""Tries to find one port number free on every listen host."""
SPLICE_AVAILABLE = sys.platform.startswith("linux") and hasattr(os, "splice")
"""TCP relays by ``os.splice`` (platform/linux/splice.py); elsewhere through asyncio streams."""
FAILURE_SUMMARY_PERIOD = 60.0
"""Seconds in which one flow failure (or refusal) is logged at info and the others counted (then summed
up at info)."""
UDP_PENDING_LIMIT = 64
"""Datagrams held per association while it is being opened through the tunnel."""

Protocol = Literal["tcp", "udp"]

RESERVED_DESCRIPTORS = 256
"""Open files kept for everything but relayed flows: listeners, health probes, the control socket, the
router process's pipe, log files."""
TCP_FLOW_DESCRIPTORS = 2
"""A TCP flow relayed through asyncio streams holds the app's socket and the upstream one."""
SPLICED_TCP_FLOW_DESCRIPTORS = 8
"""A spliced flow holds, besides those two, a duplicate of each (platform/linux/splice.py ``duplicate``)
and one pipe (two descriptors) per direction."""
UDP_ASSOCIATION_DESCRIPTORS = 2
"""A SOCKS5 association holds its control connection and its relay socket (a direct one: one socket)."""
MAX_TCP_FLOWS = 8192
"""The most TCP flows one proxy relays however many open files the process may have: a flow costs
memory too (8000 idle flows took 104 MiB)."""
MAX_UDP_ASSOCIATIONS = 4096
WINDOWS_OPEN_FILES = 16384
"""Windows has no per-process open-file limit like POSIX's: the budget the caps are derived from."""


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """How much one proxy may hold at once, and how long a quiet flow is kept.

    ``for_open_files`` derives the caps from the process's open-file limit; the timeouts are
    docs/ARCHITECTURE.md's "Proxy bounds".
    """

    max_tcp_flows: int
    max_tcp_flows_per_app: int
    max_udp_associations: int
    max_udp_associations_per_app: int
    tcp_idle_timeout: float = TCP_IDLE_TIMEOUT
    half_close_timeout: float = HALF_CLOSE_TIMEOUT
    udp_idle_timeout: float = UDP_IDLE_TIMEOUT

    @classmethod
    def for_open_files(cls, open_files: int, *, splice: bool = SPLICE_AVAILABLE) -> ProxyLimits:
        """Caps for a process allowed ``open_files`` descriptors: one proxy may take half of what is left
        after ``RESERVED_DESCRIPTORS`` (three quarters of that for TCP, a quarter for UDP), one app half
        of its proxy's; never below 16 flows and 8 associations, never above ``MAX_TCP_FLOWS`` /
        ``MAX_UDP_ASSOCIATIONS``."""
        budget = max(0, open_files - RESERVED_DESCRIPTORS) // 2
        per_flow = SPLICED_TCP_FLOW_DESCRIPTORS if splice else TCP_FLOW_DESCRIPTORS
        tcp = min(MAX_TCP_FLOWS, max(16, budget * 3 // 4 // per_flow))
        udp = min(MAX_UDP_ASSOCIATIONS, max(8, budget // 4 // UDP_ASSOCIATION_DESCRIPTORS))
        return cls(tcp, max(1, tcp // 2), udp, max(1, udp // 2))

    @classmethod
    def default(cls, *, splice: bool = SPLICE_AVAILABLE) -> ProxyLimits:
        """``for_open_files`` of this process's current (soft) open-file limit."""
        return cls.for_open_files(open_file_limit(), splice=splice)


def open_file_limit() -> int:
    """The process's soft limit on open files (``WINDOWS_OPEN_FILES`` where there is none)."""
    if sys.platform == "win32":
        return WINDOWS_OPEN_FILES
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return WINDOWS_OPEN_FILES * 4 if soft == resource.RLIM_INFINITY else int(soft)


class QuietLog:
    """Once-a-minute logging of something that may happen per flow (failures, refusals): the first of a
    ``period`` at info, the rest at debug and counted; the count is then summed up at info with the first
    of the next period. Time is passed in."""

    def __init__(self, period: float = FAILURE_SUMMARY_PERIOD) -> None:
        self.period = period
        self._since = -period
        self._quiet = 0
        self._last = ""

    def log(self, now: float, message: str, summary: str) -> None:
        """Log ``message``; ``summary`` % (count, seconds, last message) sums up a period's quiet ones."""
        if now - self._since >= self.period:
            if self._quiet:
                log.info(summary, self._quiet, now - self._since, self._last)
            self._since, self._quiet = now, 0
            level = logging.INFO
        else:
            self._quiet += 1
            level = logging.DEBUG
        self._last = message
        log.log(level, "%s", message)


class NatTarget(typing.Protocol):
    """What the proxy needs of the router's entry for a flow (``net.nat.NatEntry``, which carries more):
    where the app meant to go, where to connect (the same, or its tunnel's DNS server under
    ``dns.system``), who the app is, and whether its rule fails closed."""

    @property
    def orig_dst_ip(self) -> str: ...
    @property
    def upstream_ip(self) -> str: ...
    @property
    def orig_dst_port(self) -> int: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def exe(self) -> str | None: ...
    @property
    def fail_closed(self) -> bool: ...


NatLookup = Callable[..., NatTarget | None]
"""``nat_lookup(proto, peer_ip, peer_port)``: the entry for the peer the proxy sees, or None; with
``redirected`` TCP also ``dst`` (the connection's original destination, its own local address)."""

FlowFailed = Callable[[BaseException], None]


@dataclass(slots=True)
class TunnelCounters:
    """Per-tunnel totals since start (``status`` shows them)."""

    tcp_flows: int = 0
    tcp_failed: int = 0
    nat_misses: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    udp_associations: int = 0
    udp_failed: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0
    datagrams_dropped: int = 0
    resets: int = 0
    tcp_refused: int = 0
    """TCP connections reset at once: the proxy's or the app's flow cap was reached."""
    udp_refused: int = 0
    """Datagrams dropped because a new association would pass the proxy's or the app's cap."""
    tcp_idle_closed: int = 0
    """Flows reset after ``tcp_idle_timeout`` without a byte, or ``half_close_timeout`` after a FIN."""
    udp_idle_closed: int = 0
    withdrawn: int = 0
    """Flows and associations closed because the router forgot their NAT entry (``withdraw``)."""


@dataclass(slots=True, eq=False)
class TcpFlow:
    """One relayed TCP connection (``connections`` lists them)."""

    flow_id: int
    peer: Address
    dst: Address
    pid: int | None
    exe: str | None
    started: float
    bytes_up: int = 0
    bytes_down: int = 0
    last_active: float = 0.0
    """When a byte last moved either way (the proxy's clock)."""
    half_closed: bool = False
    """One side has ended its half (FIN): the other gets ``half_close_timeout`` of silence at most."""
    entry: NatTarget | None = field(default=None, repr=False)
    _app: asyncio.StreamWriter | None = field(default=None, repr=False)
    _upstream: asyncio.StreamWriter | None = field(default=None, repr=False)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    _reset: bool = field(default=False, repr=False)


@dataclass(slots=True, eq=False)
class UdpAssociation:
    """One app address's datagrams through the tunnel."""

    peer: Address
    dst: Address
    pid: int | None
    exe: str | None
    started: float
    last_active: float
    channel: UdpChannel | None = None
    pending: list[bytes] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: int = 0
    failed_until: float = 0.0
    entry: NatTarget | None = field(default=None, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _reply_via: asyncio.DatagramTransport | None = field(default=None, repr=False)


class TunnelProxy:
    """The TCP listener and UDP relay of one stream tunnel."""

    def __init__(
        self,
        tunnel_id: str,
        provider: StreamProvider,
        nat_lookup: NatLookup,
        listen_host: str | Sequence[str] = "127.0.0.1",
        *,
        tcp_port: int = 0,
        udp_port: int = 0,
        udp: bool = True,
        on_flow_failed: FlowFailed | None = None,
        limits: ProxyLimits | None = None,
        redirected: bool = False,
        splice: bool = True,
    ) -> None:
        self.tunnel_id = tunnel_id
        self.redirected = redirected
        self.splice = splice
        """Relay TCP with ``os.splice`` where the OS has it (else through asyncio streams)."""
        self.limits = limits or ProxyLimits.default(splice=splice and SPLICE_AVAILABLE)
        """Caps and timeouts; may be replaced while the proxy runs (flows already open stay)."""
        self.clock: Callable[[], float] = time.monotonic
        self._failures = QuietLog()
        self._refusals = QuietLog()
        self.provider = provider
        self.counters = TunnelCounters()
        self._nat_lookup = nat_lookup
        # One host per address family the router hairpins to (e.g. an IPv4 and an IPv6 address).
        self._listen_hosts = [listen_host] if isinstance(listen_host, str) else list(listen_host)
        self._tcp_port = tcp_port
        self._udp_port = udp_port
        self._udp_enabled = udp
        self._on_flow_failed = on_flow_failed
        self._server: asyncio.Server | None = None
        self._udp_transports: list[asyncio.DatagramTransport] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._flows: dict[int, TcpFlow] = {}
        self._associations: dict[Address, UdpAssociation] = {}
        self._by_entry: dict[int, TcpFlow | UdpAssociation] = {}
        """``id()`` of a flow's NAT entry → the flow (the flow holds the entry, so the id stays its own)."""
        self._per_app: Counter[tuple[Protocol, Hashable]] = Counter()
        self._ids = itertools.count(1)
        self._udp_unsupported_logged = False

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the TCP listener (and the UDP socket when UDP is on). With several listen hosts every
        host gets the same port (the router redirects both families to one port number)."""
        for attempt in range(PORT_ATTEMPTS):
            try:
                await self._bind()
                break
            except OSError as exc:
                await self._unbind()
                if exc.errno != errno.EADDRINUSE or attempt == PORT_ATTEMPTS - 1:
                    raise
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle())
        log.info(
            "[Proxy] %s listening on %s",
            self.tunnel_id,
            ", ".join(format_address(*a) for a in self.tcp_addresses),
        )

    async def _bind(self) -> None:
        hosts = self._listen_hosts
        tcp_port = self._tcp_port
        if tcp_port == 0 and len(hosts) > 1:
            tcp_port = _free_port(hosts[0], socket.SOCK_STREAM)
        self._server = await asyncio.start_server(
            self._serve_tcp, hosts, tcp_port, limit=STREAM_LIMIT, backlog=1024
        )
        if self.redirected:
            for listener in self._server.sockets:
                make_transparent(listener)
        if not self._udp_enabled:
            return
        loop = asyncio.get_running_loop()
        udp_port = self._udp_port
        for host in hosts:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpRelayProtocol(self), sock=_udp_socket(host, udp_port)
            )
            self._udp_transports.append(transport)
            udp_port = transport.get_extra_info("sockname")[1]

    async def _unbind(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for transport in self._udp_transports:
            transport.close()
        self._udp_transports = []

    async def stop(self) -> None:
        """Stop listening and reset every flow."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.close_all()
        for transport in self._udp_transports:
            transport.close()
        self._udp_transports = []
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        await asyncio.sleep(0)

    @property
    def tcp_addresses(self) -> list[Address]:
        """Where the listener is bound, one address per listen host (ports differ when bound to 0)."""
        if self._server is None:
            raise RuntimeError("TunnelProxy not started")
        return [(s.getsockname()[0], s.getsockname()[1]) for s in self._server.sockets]

    @property
    def tcp_address(self) -> Address:
        return self.tcp_addresses[0]

    @property
    def udp_addresses(self) -> list[Address]:
        return [
            (t.get_extra_info("sockname")[0], t.get_extra_info("sockname")[1]) for t in self._udp_transports
        ]

    @property
    def udp_address(self) -> Address | None:
        addresses = self.udp_addresses
        return addresses[0] if addresses else None

    @property
    def tcp_flows(self) -> list[TcpFlow]:
        return list(self._flows.values())

    @property
    def udp_associations(self) -> list[UdpAssociation]:
        return list(self._associations.values())

    def reset_flows(self, select: Callable[[NatTarget], bool]) -> int:
        """Reset the TCP flows and end the UDP associations whose NAT entry (as the router gave it when the
        flow began) ``select`` picks, e.g. those of fail-closed rules when the tunnel goes DOWN; returns
        how many."""
        flows = [f for f in self._flows.values() if f.entry is not None and select(f.entry)]
        associations = [a for a in self._associations.values() if a.entry is not None and select(a.entry)]
        for flow in flows:
            self._reset_flow(flow)
        for assoc in associations:
            self._end_association(assoc)
        return len(flows) + len(associations)

    def withdraw(self, entry: NatTarget) -> bool:
        """Close the flow (reset) or end the association the router's NAT entry ``entry`` stands for — the
        router forgot it, so nothing may go on being sent for it; False when no flow has that entry."""
        flow = self._by_entry.get(id(entry))
        if flow is None or flow.entry is not entry:
            return False
        self.counters.withdrawn += 1
        if isinstance(flow, TcpFlow):
            self._reset_flow(flow)
        else:
            self._end_association(flow)
        return True

    def close_all(self) -> int:
        """Reset every flow of the tunnel (apps see a connection reset); returns how many were open.

        Used when the tunnel goes DOWN and its policy is not ``allow_direct``.
        """
        count = len(self._flows) + len(self._associations)
        for flow in list(self._flows.values()):
            self._reset_flow(flow)
        for assoc in list(self._associations.values()):
            self._end_association(assoc)
        return count

    # --- TCP ---------------------------------------------------------------------------------------

    async def _serve_tcp(self, app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter) -> None:
        peername = app_writer.get_extra_info("peername")
        if not peername:  # the app already gave up
            app_writer.transport.abort()
            return
        peer = (normalize_ip(peername[0]), peername[1])
        if self.redirected:
            # TPROXY: the connection is the app's own, its local address the destination it asked for.
            sockname = app_writer.get_extra_info("sockname")
            dst: Address | None = (normalize_ip(sockname[0]), sockname[1]) if sockname else None
            entry = None if dst is None else self._lookup("tcp", peer, dst)
            if entry is not None and dst is not None:
                dst = (entry.upstream_ip, dst[1])
        else:
            entry = self._lookup("tcp", peer)
            dst = None if entry is None else (entry.upstream_ip, entry.orig_dst_port)
        if entry is None or dst is None:
            abort_stream(app_writer, reset=True)
            return
        if self._refused("tcp", entry, dst):
            abort_stream(app_writer, reset=True)
            return
        flow = TcpFlow(
            next(self._ids),
            peer,
            dst,
            entry.pid,
            entry.exe,
            time.time(),
            last_active=self.clock(),
            entry=entry,
            _app=app_writer,
        )
        self._add_flow(flow)
        try:
            await self._relay_tcp(flow, app_reader, app_writer)
        finally:
            self._remove_flow(flow)

    def _add_flow(self, flow: TcpFlow) -> None:
        self._flows[flow.flow_id] = flow
        self._track(flow, "tcp", +1)

    def _remove_flow(self, flow: TcpFlow) -> None:
        if self._flows.pop(flow.flow_id, None) is flow:
            self._track(flow, "tcp", -1)

    def _track(self, flow: TcpFlow | UdpAssociation, proto: Protocol, change: int) -> None:
        """Keep the per-app counts and the index by NAT entry as a flow comes and goes."""
        app = (proto, _app_of(flow.exe, flow.pid))
        self._per_app[app] += change
        if self._per_app[app] <= 0:
            del self._per_app[app]
        if flow.entry is not None:
            if change > 0:
                self._by_entry[id(flow.entry)] = flow
            elif self._by_entry.get(id(flow.entry)) is flow:
                del self._by_entry[id(flow.entry)]

    def _refused(self, proto: Protocol, entry: NatTarget, dst: Address) -> bool:
        """Whether a new flow of ``entry``'s app would pass the proxy's or the app's cap (counted and
        logged once a minute if so)."""
        limits = self.limits
        if proto == "tcp":
            total, cap, per_app = len(self._flows), limits.max_tcp_flows, limits.max_tcp_flows_per_app
        else:
            total = len(self._associations)
            cap, per_app = limits.max_udp_associations, limits.max_udp_associations_per_app
        app_count = self._per_app[(proto, _app_of(entry.exe, entry.pid))]
        if total < cap and app_count < per_app:
            return False
        if proto == "tcp":
            self.counters.tcp_refused += 1
        else:
            self.counters.udp_refused += 1
            self.counters.datagrams_dropped += 1
        which = f"the tunnel's {cap}" if total >= cap else f"the app's {per_app}"
        what = "flows" if proto == "tcp" else "UDP associations"
        self._refusals.log(
            self.clock(),
            f"[Proxy] {self.tunnel_id}: {proto.upper()} flow of {entry.exe or '?'} (pid {entry.pid}) to "
            f"{format_address(*dst)} refused: {which} {what} are open",
            f"[Proxy] {self.tunnel_id}: %d more flows refused over a cap in %.0f s (the last: %s)",
        )
        return True

    async def _relay_tcp(
        self, flow: TcpFlow, app_reader: asyncio.StreamReader, app_writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await self.provider.open_tcp(*flow.dst)
        except asyncio.CancelledError:
            abort_stream(app_writer, reset=True)
            raise
        except Exception as exc:
            self.counters.tcp_failed += 1
            self._flow_failed("TCP", flow.dst, flow.exe, exc)
            abort_stream(app_writer, reset=True)
            return
        if flow._reset:  # close_all() ran while the flow was being opened
            abort_stream(up_writer)
            return
        flow._upstream = up_writer
        self.counters.tcp_flows += 1
        log.debug(
            "[Proxy] %s: %s (pid %s) -> %s",
            self.tunnel_id,
            flow.exe or "?",
            flow.pid,
            format_address(*flow.dst),
        )
        for writer in (app_writer, up_writer):
            writer.transport.set_write_buffer_limits(high=RELAY_CHUNK)
        loop = asyncio.get_running_loop()
        if self.splice and SPLICE_AVAILABLE and _plain_socket(app_writer) and _plain_socket(up_writer):
            await self._relay_spliced(flow, app_reader, app_writer, up_reader, up_writer)
            return
        up = loop.create_task(self._pump(flow, app_reader, up_writer, upstream=True))
        down = loop.create_task(self._pump(flow, up_reader, app_writer, upstream=False))
        flow._tasks = [up, down]
        try:
            done, _ = await asyncio.wait(flow._tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            self._reset_flow(flow)
            raise
        if flow._reset:
            return
        failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if failed or len(done) < 2:
            # One side broke: the other must not mistake it for a clean end.
            log.debug("[Proxy] %s: flow to %s reset: %s", self.tunnel_id, format_address(*flow.dst), failed)
            self._reset_flow(flow)
            return
        for writer in (app_writer, up_writer):
            writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                for writer in (app_writer, up_writer):
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            # A peer that stopped reading keeps our last bytes unsent; do not hold the flow for it.
            abort_stream(app_writer, reset=True)
            abort_stream(up_writer)

    async def _relay_spliced(
        self,
        flow: TcpFlow,
        app_reader: asyncio.StreamReader,
        app_writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Both directions by ``os.splice`` (platform/linux/splice.py), once the streams' buffers are out."""
        from awg_split_tunnel.platform.linux.splice import SplicePump, duplicate, take_buffered

        loop = asyncio.get_running_loop()
        pumps: list[SplicePump] = []
        sockets: list[socket.socket] = []
        try:
            ends = []
            for reader, writer, upstream in ((app_reader, up_writer, True), (up_reader, app_writer, False)):
                source = app_writer if upstream else up_writer
                early = await take_buffered(reader, source.transport)  # type: ignore[arg-type]
                if early:
                    self._count(flow, len(early), upstream=upstream)
                    writer.write(early)
                ends.append(reader.at_eof())
            for writer in (app_writer, up_writer):
                # Spliced bytes go straight to the socket: what the stream still buffers must be out first.
                writer.transport.set_write_buffer_limits(high=0)
                await writer.drain()
            # Both are plain sockets (``_plain_socket``): the duplicates exist.
            sockets = [duplicate(app_writer), duplicate(up_writer)]
            app_sock, up_sock = sockets
            for (src, dst, upstream), ended in zip(
                ((app_sock, up_sock, True), (up_sock, app_sock, False)), ends, strict=True
            ):
                if ended:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    self._half_closed(flow)
                    continue
                pump = SplicePump(
                    loop,
                    src,
                    dst,
                    lambda n, up=upstream: self._count(flow, n, upstream=up),  # type: ignore[misc]
                )
                pump.done.add_done_callback(lambda _: self._half_closed(flow))
                pumps.append(pump)
                pump.start()
            waiting = loop.create_task(_all_done([p.done for p in pumps]))
            flow._tasks = [waiting]
            await asyncio.wait([waiting])  # a reset cancels ``waiting``: that ends the flow, not this task
            if flow._reset:
                return
            failed = [p.done.exception() for p in pumps if not p.done.cancelled() and p.done.exception()]
            if failed:
                log.debug(
                    "[Proxy] %s: flow to %s reset: %s", self.tunnel_id, format_address(*flow.dst), failed
                )
                self._reset_flow(flow)
                return
        except asyncio.CancelledError:
            self._reset_flow(flow)
            raise
        except OSError as exc:
            log.debug("[Proxy] %s: flow to %s reset: %s", self.tunnel_id, format_address(*flow.dst), exc)
            self._reset_flow(flow)
            return
        finally:
            for pump in pumps:
                pump.close()
            for sock in sockets:
                sock.close()
        for writer in (app_writer, up_writer):
            writer.transport.abort()  # both sides were shut down for writing and read to EOF

    def _count(self, flow: TcpFlow, n: int, *, upstream: bool) -> None:
        flow.last_active = self.clock()
        if upstream:
            flow.bytes_up += n
            self.counters.bytes_up += n
        else:
            flow.bytes_down += n
            self.counters.bytes_down += n

    async def _pump(
        self,
        flow: TcpFlow,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        """Copy one direction; EOF is passed on as a half-close (shutdown SHUT_WR)."""
        while True:
            data = await reader.read(RELAY_CHUNK)
            if not data:
                if writer.can_write_eof() and not writer.transport.is_closing():
                    writer.write_eof()
                self._half_closed(flow)
                return
            writer.write(data)
            self._count(flow, len(data), upstream=upstream)
            await writer.drain()

    def _half_closed(self, flow: TcpFlow) -> None:
        """One direction ended: from now on the flow's silence is measured against ``half_close_timeout``."""
        if not flow.half_closed:
            flow.half_closed = True
            flow.last_active = self.clock()

    def _reset_flow(self, flow: TcpFlow) -> None:
        if flow._reset:
            return
        flow._reset = True
        self.counters.resets += 1
        if flow._app is not None:
            abort_stream(flow._app, reset=True)
        if flow._upstream is not None:
            abort_stream(flow._upstream)
        for task in flow._tasks:
            task.cancel()
        self._remove_flow(flow)

    # --- UDP ---------------------------------------------------------------------------------------

    def datagram_from_app(self, data: bytes, addr: Address, transport: asyncio.DatagramTransport) -> None:
        """One datagram from an app (as the router hairpinned it), received on ``transport``."""
        peer = (normalize_ip(addr[0]), addr[1])
        loop = asyncio.get_running_loop()
        now = self.clock()
        assoc = self._associations.get(peer)
        if assoc is not None and assoc.failed_until:
            if now < assoc.failed_until:
                self.counters.datagrams_dropped += 1
                return
            self._remove_association(assoc)
            assoc = None
        if assoc is None:
            if not self.provider.supports_udp:
                self.counters.datagrams_dropped += 1
                if not self._udp_unsupported_logged:
                    self._udp_unsupported_logged = True
                    log.info("[Proxy] %s: UDP is not carried by this tunnel; dropping it", self.tunnel_id)
                return
            entry = self._lookup("udp", peer)
            if entry is None:
                self.counters.datagrams_dropped += 1
                return
            dst = (entry.upstream_ip, entry.orig_dst_port)
            if self._refused("udp", entry, dst):
                return
            assoc = UdpAssociation(
                peer, dst, entry.pid, entry.exe, time.time(), now, entry=entry, _reply_via=transport
            )
            self._associations[peer] = assoc
            self._track(assoc, "udp", +1)
            self.counters.udp_associations += 1
            assoc._task = loop.create_task(self._run_association(assoc))
        assoc.last_active = now
        if assoc.channel is None:
            if len(assoc.pending) < UDP_PENDING_LIMIT:
                assoc.pending.append(data)
            else:
                assoc.dropped += 1
                self.counters.datagrams_dropped += 1
            return
        self._send_up(assoc, data)

    def _send_up(self, assoc: UdpAssociation, data: bytes) -> None:
        assert assoc.channel is not None
        try:
            assoc.channel.send_to(data, assoc.dst)
        except AwgSplitTunnelError:
            assoc.dropped += 1
            self.counters.datagrams_dropped += 1
            return
        assoc.bytes_up += len(data)
        self.counters.bytes_up += len(data)
        self.counters.datagrams_up += 1

    async def _run_association(self, assoc: UdpAssociation) -> None:
        try:
            channel = await self.provider.open_udp()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters.udp_failed += 1
            self.counters.datagrams_dropped += len(assoc.pending)
            assoc.pending.clear()
            # Remember the failure for a moment: a UDP burst must not become a burst of tunnel handshakes.
            assoc.failed_until = self.clock() + UDP_RETRY_AFTER
            self._flow_failed("UDP", assoc.dst, assoc.exe, exc)
            return
        if self._associations.get(assoc.peer) is not assoc:  # ended while opening
            channel.close()
            return
        assoc.channel = channel
        pending, assoc.pending = assoc.pending, []
        for data in pending:
            self._send_up(assoc, data)
        expected = (normalize_ip(assoc.dst[0]), assoc.dst[1])
        try:
            while True:
                data, src = await channel.recv()
                if (normalize_ip(src[0]), src[1]) != expected or assoc._reply_via is None:
                    # The hairpin can only present replies as coming from the original destination.
                    assoc.dropped += 1
                    self.counters.datagrams_dropped += 1
                    continue
                assoc.last_active = self.clock()
                assoc.bytes_down += len(data)
                self.counters.bytes_down += len(data)
                self.counters.datagrams_down += 1
                assoc._reply_via.sendto(data, assoc.peer)
        except TunnelError as exc:
            log.debug("[Proxy] %s: UDP association of %s ended: %s", self.tunnel_id, assoc.peer, exc)
        finally:
            channel.close()
            self._remove_association(assoc)

    def _remove_association(self, assoc: UdpAssociation) -> None:
        if self._associations.get(assoc.peer) is assoc:
            del self._associations[assoc.peer]
            self._track(assoc, "udp", -1)

    def _end_association(self, assoc: UdpAssociation) -> None:
        self._remove_association(assoc)
        if assoc.channel is not None:
            assoc.channel.close()
        if assoc._task is not None:
            assoc._task.cancel()

    async def _sweep_idle(self) -> None:
        while True:
            limits = self.limits  # may be replaced while running (a config change)
            shortest = min(limits.tcp_idle_timeout, limits.half_close_timeout, limits.udp_idle_timeout)
            await asyncio.sleep(max(shortest / 4, 0.05))
            self.sweep(self.clock())

    def sweep(self, now: float) -> None:
        """Reset the TCP flows and end the associations that have been quiet too long (by ``now``)."""
        limits = self.limits
        for flow in list(self._flows.values()):
            timeout = limits.half_close_timeout if flow.half_closed else limits.tcp_idle_timeout
            if now - flow.last_active >= timeout:
                log.debug(
                    "[Proxy] %s: flow to %s reset after %.0f s without traffic%s",
                    self.tunnel_id,
                    format_address(*flow.dst),
                    now - flow.last_active,
                    " (half-closed)" if flow.half_closed else "",
                )
                self.counters.tcp_idle_closed += 1
                self._reset_flow(flow)
        for assoc in list(self._associations.values()):
            if now - assoc.last_active >= limits.udp_idle_timeout:
                self.counters.udp_idle_closed += 1
                self._end_association(assoc)

    # --- shared ------------------------------------------------------------------------------------

    def _lookup(self, proto: Protocol, peer: Address, dst: Address | None = None) -> NatTarget | None:
        try:
            if dst is None:
                entry = self._nat_lookup(proto, peer[0], peer[1])
            else:
                entry = self._nat_lookup(proto, peer[0], peer[1], dst)
        except Exception:
            log.exception("[Proxy] %s: NAT lookup failed", self.tunnel_id)
            entry = None
        if entry is None:
            self.counters.nat_misses += 1
            # Every connection and datagram that reaches a tunnel's proxy was sent there by the router, so
            # a miss means an app's traffic is refused (a connection reset, a datagram dropped): a warning.
            log.warning(
                "[Proxy] %s: %s from %s refused: the router has no record of its flow",
                self.tunnel_id,
                proto.upper(),
                format_address(*peer),
            )
        return entry

    def _flow_failed(self, what: str, dst: Address, exe: str | None, exc: BaseException) -> None:
        # An app retrying a dead destination must not flood the log.
        self._failures.log(
            self.clock(),
            f"[Proxy] {self.tunnel_id}: {what} flow of {exe or '?'} to {format_address(*dst)} failed: {exc}",
            f"[Proxy] {self.tunnel_id}: %d more flow failures in %.0f s (the last: %s)",
        )
        if self._on_flow_failed is not None:
            try:
                self._on_flow_failed(exc)
            except Exception:
                log.exception("[Proxy] %s: flow-failure callback raised", self.tunnel_id)


class _UdpRelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, proxy: TunnelProxy) -> None:
        self._proxy = proxy
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's datagram transport does not inherit DatagramTransport on every version; it quacks.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._transport is not None:
            self._proxy.datagram_from_app(data, (str(addr[0]), addr[1]), self._transport)

    def error_received(self, exc: Exception) -> None:
        log.debug("[Proxy] %s: UDP socket: %s", self._proxy.tunnel_id, exc)


def _app_of(exe: str | None, pid: int | None) -> Hashable:
    """Whom a per-app cap counts a flow against: its executable, else its pid (else one shared bucket)."""
    return exe if exe is not None else pid


IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


async def _all_done(futures: list[asyncio.Future[None]]) -> None:
    """Until every pump ended, or one failed (the flow is then reset)."""
    if futures:
        await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)


def _plain_socket(writer: asyncio.StreamWriter) -> bool:
    """Whether the stream is a bare TCP socket (no TLS or other layer in between) that splice can take."""
    sock = writer.get_extra_info("socket")
    return (
        sock is not None and writer.get_extra_info("sslcontext") is None and sock.type == socket.SOCK_STREAM
    )


def make_transparent(sock: Any) -> None:
    """``IP_TRANSPARENT`` / ``IPV6_TRANSPARENT`` (linux/in.h, linux/in6.h; needs CAP_NET_ADMIN): TPROXY
    hands this listener connections addressed to other hosts (the kernel data path's stream tunnels)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


def _free_port(host: str, kind: socket.SocketKind) -> int:
    """A port number free on `host` right now (the caller retries if it is taken meanwhile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _udp_socket(host: str, port: int) -> socket.socket:
    """A bound UDP socket; an IPv6 one is IPv6-only, so a v4 and a v6 relay can share a port number
    (a dual-stack socket on `::` would take the v4 port too, and the router hairpins each family to its
    own socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
