"""The daemon's DNS forwarder (asyncio): apps' queries to the local resolver, answered through each app's
own route (docs/DNS.md).

Linux: a redirect (``platform/linux/dns_redirect.py``) sends every query to a resolver on loopback
(systemd-resolved's 127.0.0.53, a dnsmasq on 127.0.0.1, ``::1``; UDP and TCP) to a listener here. The
listener finds the app by the query's source port, takes its rule from the same ``RuleEngine`` as the
router, and asks:

- ``direct``: the local resolver itself, from a socket carrying our mark (the redirect leaves it alone),
  so nothing changes for direct apps;
- a WireGuard/AmneziaWG tunnel: the tunnel's DNS servers from the tunnel's **DNS port**: a socket of ours
  whose flows the router sends into that tunnel (``PacketTunnelRoute.dns_port``), on either data path,
  from the tunnel address;
- a SOCKS5 tunnel: through the proxy (UDP ASSOCIATE, else DNS over TCP through CONNECT); an HTTP proxy:
  DNS over TCP through CONNECT;
- a route refused (``block`` with its tunnel down, ``drop``): SERVFAIL or REFUSED, nothing sent.

Answers are cached per route by TTL; an answer truncated over UDP is asked again over TCP. How a query
reaches each kind of server is ``dns_transport.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import psutil

from awg_split_tunnel.core.config import Config, HttpTunnel, PacketTunnel, Socks5Tunnel
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import DIRECT, FallbackPolicy, TunnelState
from awg_split_tunnel.core.routing import engine_from_config
from awg_split_tunnel.core.rule_engine import Decision, RuleEngine
from awg_split_tunnel.dns.cache import DnsCache
from awg_split_tunnel.dns.message import (
    MAX_MESSAGE,
    SERVFAIL,
    Answer,
    Query,
    TcpFramer,
    error_answer,
    read_answer,
    read_query,
    tcp_frame,
    truncated_answer,
)
from awg_split_tunnel.dns.route import STUB, DnsRoute, dns_route
from awg_split_tunnel.dns.upstream import DNS_PORT, route_servers, system_upstream_servers
from awg_split_tunnel.dns_transport import TunnelPort, ask_resolver, ask_through_proxy
from awg_split_tunnel.process.lookup import ExeResolver, os_lookup_pid, pid_owns_socket, process_identity
from awg_split_tunnel.provider.interface import StreamProvider

log = logging.getLogger("awg_split_tunnel.dns")

IPPROTO_TCP = 6
IPPROTO_UDP = 17
RECENT_LOOKUPS = 256
"""Lookups kept for ``connections``."""
RECENT_ASKERS = 8
"""Processes whose sockets are looked at first when a query's owner is looked for."""


@dataclass(frozen=True, slots=True)
class LocalResolver:
    """A resolver listening on loopback port 53 (found by its socket) and its process."""

    address: str
    pid: int | None


def find_local_resolvers() -> list[LocalResolver]:
    """Every address on loopback where something listens on UDP port 53, in this network namespace."""
    found: dict[str, LocalResolver] = {}
    try:
        sockets = psutil.net_connections(kind="udp")
    except (psutil.Error, OSError):
        return []
    for conn in sockets:
        if not conn.laddr or conn.laddr.port != DNS_PORT or conn.raddr:
            continue
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(conn.laddr.ip).is_loopback:
                found.setdefault(conn.laddr.ip, LocalResolver(conn.laddr.ip, conn.pid))
    return sorted(found.values(), key=lambda r: r.address)


def resolver_exes(resolvers: list[LocalResolver]) -> list[str]:
    """The exe paths of the local resolvers' processes (those that can be read)."""
    exes = ExeResolver()
    return [exe for r in resolvers if r.pid is not None and (exe := exes.exe(r.pid)) is not None]


@dataclass(slots=True)
class RouteCounters:
    """Lookups of one route (``direct`` or a tunnel id)."""

    answered: int = 0
    cached: int = 0
    refused: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class TunnelDns:
    """How one tunnel's lookups travel: its kind and the servers it asks."""

    kind: str
    """``packet`` (WireGuard/AmneziaWG), ``socks5`` or ``http``."""
    servers: tuple[str, ...]
    udp: bool = True
    """Whether a stream tunnel carries UDP (SOCKS5 with ``udp: true``)."""


@dataclass(slots=True)
class _Lookup:
    """One lookup as ``connections`` shows it."""

    proto: int
    pid: int | None
    exe: str | None
    src: tuple[str, int]
    resolver: str
    name: str
    route: DnsRoute
    when: float = field(default_factory=time.time)


class DnsForwarder:
    """Listeners for the local resolvers' addresses and the upstream side of every route.

    ``tunnel_state`` is the registry's; ``stream_provider`` gives a stream tunnel's provider; ``own_mark``
    is the ``SO_MARK`` of sockets to the local resolver (the redirect leaves marked packets alone).
    """

    def __init__(
        self,
        tunnel_state: Callable[[str], TunnelState | None],
        stream_provider: Callable[[str], StreamProvider | None],
        own_mark: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        owner_of: Callable[[int, bytes, int, bytes, int], int | None] = os_lookup_pid,
        owns: Callable[[int, int, int, bytes, int], bool | None] = pid_owns_socket,
        exes: ExeResolver | None = None,
    ) -> None:
        self._tunnel_state = tunnel_state
        self._stream_provider = stream_provider
        self._own_mark = own_mark
        self._clock = clock
        self._owner_of = owner_of
        self._owns = owns
        self._askers: OrderedDict[int, None] = OrderedDict()
        """The processes that asked last, newest last: asked first whether they own a query's socket (a
        look at one process's sockets), before the scan of every process's (milliseconds)."""
        self._exes = exes or ExeResolver()
        self._engine: RuleEngine | None = None
        self._system: str | None = None
        self._default_decision: Decision | None = None
        self._tunnels: dict[str, TunnelDns] = {}
        self._system_servers: list[str] = system_upstream_servers()
        self._ports: dict[str, TunnelPort] = {}
        self._transports: list[asyncio.BaseTransport] = []
        self._servers: list[asyncio.AbstractServer] = []
        self.listeners: dict[str, int] = {}
        """Resolver address → the port of its listener here."""
        self.resolvers: list[LocalResolver] = []
        self.cache = DnsCache()
        self.counters: dict[str, RouteCounters] = {}
        self.malformed = 0
        self.recent: deque[_Lookup] = deque(maxlen=RECENT_LOOKUPS)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- configuration -----------------------------------------------------------------------------------

    def set_config(self, config: Config) -> None:
        """Rules, tunnels' DNS servers and ``dns.system`` from ``config`` (cached answers of tunnels whose
        settings changed are dropped)."""
        tunnels: dict[str, TunnelDns] = {}
        for tunnel in config.tunnels:
            if isinstance(tunnel, PacketTunnel):
                servers = tuple(str(address) for address in tunnel.wg_conf.interface.dns)
                tunnels[tunnel.id] = TunnelDns("packet", servers)
            elif isinstance(tunnel, Socks5Tunnel):
                tunnels[tunnel.id] = TunnelDns("socks5", tunnel.dns, tunnel.udp)
            elif isinstance(tunnel, HttpTunnel):
                tunnels[tunnel.id] = TunnelDns("http", tunnel.dns, False)
        for tunnel_id in set(self._tunnels) | set(tunnels):
            if self._tunnels.get(tunnel_id) != tunnels.get(tunnel_id):
                self.cache.forget_route(tunnel_id)
        if config.dns.system != self._system:
            self.cache.forget_route(DIRECT)  # the local resolver's answers now come another way
        self._tunnels = tunnels
        self._engine = engine_from_config(config)
        self._system = config.dns.system

    def pin_routes(self, routes: Mapping[str, Any]) -> dict[str, Any]:
        """``routes`` with each packet tunnel's DNS port set (a port opened for a new tunnel, closed for
        one that is gone), for the router."""
        loop = asyncio.get_running_loop()
        pinned: dict[str, Any] = {}
        for tunnel_id, route in routes.items():
            if isinstance(route, PacketTunnelRoute):
                port = self._ports.get(tunnel_id)
                if port is None:
                    port = self._ports[tunnel_id] = TunnelPort(loop)
                route = replace(route, dns_port=port.port)
            pinned[tunnel_id] = route
        for gone in [tunnel_id for tunnel_id in self._ports if tunnel_id not in pinned]:
            self._ports.pop(gone).close()
        return pinned

    # -- listeners ---------------------------------------------------------------------------------------

    async def start(self, resolvers: list[LocalResolver]) -> dict[str, int]:
        """Listen (UDP and TCP, one port per resolver address, on loopback of its family); the ports."""
        self.resolvers = resolvers
        for resolver in resolvers:
            local = "::1" if ":" in resolver.address else "127.0.0.1"
            for _ in range(8):
                port = await self._listen(resolver.address, local)
                if port is not None:
                    self.listeners[resolver.address] = port
                    break
        return dict(self.listeners)

    async def _listen(self, resolver: str, local: str) -> int | None:
        """A UDP and a TCP listener on one port number of ``local``; the port, or None when the TCP port of
        that number was taken."""
        loop = asyncio.get_running_loop()

        def udp_listener() -> _UdpListener:
            return _UdpListener(self, resolver)

        async def serve_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_tcp(reader, writer, resolver)

        transport, _ = await loop.create_datagram_endpoint(udp_listener, local_addr=(local, 0))
        port: int = transport.get_extra_info("sockname")[1]
        try:
            server = await asyncio.start_server(serve_tcp, local, port)
        except OSError:
            transport.close()
            return None
        self._transports.append(transport)
        self._servers.append(server)
        return port

    async def stop(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        for port in self._ports.values():
            port.close()
        self._ports.clear()
        self._transports.clear()
        self._servers.clear()

    def answer_datagram(
        self, data: bytes, app: tuple[str, int], resolver: str, transport: asyncio.DatagramTransport
    ) -> None:
        """Answer one UDP query on a task of its own (a slow upstream never holds up the others)."""

        async def reply() -> None:
            answer = await self.answer(data, app, resolver, IPPROTO_UDP)
            if answer is not None and not transport.is_closing():
                transport.sendto(answer, app)

        task = asyncio.get_running_loop().create_task(reply())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, resolver: str
    ) -> None:
        peer = writer.get_extra_info("peername")
        framer = TcpFramer()
        try:
            while data := await reader.read(MAX_MESSAGE):
                for wire in framer.receive(data):
                    answer = await self.answer(wire, (peer[0], peer[1]), resolver, IPPROTO_TCP)
                    if answer is not None:
                        writer.write(tcp_frame(answer))
                        await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    # -- answering ---------------------------------------------------------------------------------------

    async def answer(self, wire: bytes, app: tuple[str, int], resolver: str, proto: int) -> bytes | None:
        """The answer to one app's query to ``resolver`` (None: not a query, nothing to answer)."""
        query = read_query(wire)
        if query is None:
            self.malformed += 1
            return None
        pid = await asyncio.to_thread(self._owner, proto, app, resolver, list(reversed(self._askers)))
        if pid is not None:
            self._askers[pid] = None
            self._askers.move_to_end(pid)
            while len(self._askers) > RECENT_ASKERS:
                self._askers.popitem(last=False)
        exe, route = self._route_of(pid)
        self.recent.append(_Lookup(proto, pid, exe, app, resolver, query.name, route))
        counters = self.counters.setdefault(route.via, RouteCounters())
        if route.rcode is not None:
            counters.refused += 1
            return error_answer(query, route.rcode)
        cached = self.cache.get(route.via, query, self._clock())
        if cached is not None:
            counters.cached += 1
            if proto == IPPROTO_UDP and len(cached) > query.udp_size:
                return truncated_answer(query)  # kept from a TCP exchange: the app asks again over TCP
            return cached
        answer = await self._ask(route.via, query, resolver, tcp=proto == IPPROTO_TCP)
        if answer is None:
            counters.failed += 1
            return error_answer(query, SERVFAIL)
        counters.answered += 1
        return answer.wire

    def _owner(self, proto: int, app: tuple[str, int], resolver: str, recent: list[int]) -> int | None:
        """The process whose socket sent a query (on a worker thread): one of the ``recent`` askers when
        it owns the socket, else whoever the OS socket tables name."""
        resolver_address = ipaddress.ip_address(resolver).packed
        for pid in recent:
            if self._owns(pid, proto, app[1], resolver_address, DNS_PORT):
                return pid
        app_address = ipaddress.ip_address(app[0]).packed
        return self._owner_of(proto, app_address, app[1], resolver_address, DNS_PORT)

    def _route_of(self, pid: int | None) -> tuple[str | None, DnsRoute]:
        """The app's exe and its lookup's route: the daemon's own lookups go to the local resolver (never
        back to itself); a lookup whose app is unknown follows ``dns.system``, else ``default``."""
        engine = self._engine
        if engine is None or (pid is not None and _is_own(pid)):
            return None, STUB
        exe = None if pid is None else self._exes.exe(pid)
        if exe is None:
            system = self._system
            decision = engine.default if system is None else Decision(system, FallbackPolicy.BLOCK, None)
        else:
            decision = engine.match(exe)
            if decision.rule_index is None and pid is not None:
                for ancestor in self._exes.ancestors(pid):
                    inherited = engine.match(ancestor)
                    if inherited.rule_index is not None:
                        decision = inherited
                        break
        if decision.tunnel != DIRECT and decision.tunnel not in self._tunnels:
            return exe, dns_route(decision, None)
        return exe, dns_route(decision, self._tunnel_state(decision.tunnel))

    async def _ask(self, via: str, query: Query, resolver: str, *, tcp: bool) -> Answer | None:
        """Ask ``via``'s servers (UDP first unless ``tcp``; a truncated UDP answer is asked again over TCP);
        the answer is cached. None when no server answered."""
        now = self._clock()
        if via == DIRECT:
            servers = [resolver]
        else:
            tunnel = self._tunnels[via]
            servers = route_servers(tunnel.servers, self._system_servers)
        for server in servers:
            answer: Answer | None = None
            if not tcp:
                answer = self._read(await self._exchange(via, query, server, tcp=False), query)
            if answer is None or answer.truncated:
                full = self._read(await self._exchange(via, query, server, tcp=True), query)
                if full is not None and (tcp or len(full.wire) <= query.udp_size):
                    answer = full
                elif full is not None:
                    self.cache.put(via, query, full, now)  # the app's TCP retry is answered from here
                    answer = Answer(truncated_answer(query), True, None)
            if answer is not None:
                self.cache.put(via, query, answer, now)
                return answer
        return None

    @staticmethod
    def _read(wire: bytes | None, query: Query) -> Answer | None:
        return None if wire is None else read_answer(wire, query)

    async def _exchange(self, via: str, query: Query, server: str, *, tcp: bool) -> bytes | None:
        if via == DIRECT:
            return await ask_resolver(query, server, self._own_mark, tcp=tcp)
        tunnel = self._tunnels[via]
        if tunnel.kind == "packet":
            port = self._ports.get(via)
            if port is None:
                return None
            return await (port.ask_tcp(query, server) if tcp else port.ask_udp(query, server))
        provider = self._stream_provider(via)
        if provider is None:
            return None
        return await ask_through_proxy(provider, query, server, tcp=tcp, udp=tunnel.udp)

    # -- what status and connections show ----------------------------------------------------------------

    def tunnel_report(self, tunnel_id: str) -> dict[str, Any]:
        """A tunnel's DNS route and its lookups, for ``status``."""
        tunnel = self._tunnels.get(tunnel_id)
        counters = self.counters.get(tunnel_id, RouteCounters())
        servers = [] if tunnel is None else route_servers(tunnel.servers, self._system_servers)
        how = ""
        if tunnel is not None:
            how = {
                "packet": "from the tunnel address",
                "socks5": "through the proxy",
                "http": "DNS over TCP",
            }[tunnel.kind]
            if tunnel.kind == "socks5" and not tunnel.udp:
                how = "DNS over TCP"
        return {
            "servers": servers,
            "via": how,
            "answered": counters.answered,
            "cached": counters.cached,
            "refused": counters.refused,
            "failed": counters.failed,
        }

    def summary(self) -> dict[str, Any]:
        """What ``status`` shows besides the tunnels: the resolvers intercepted, the lookups answered
        by the local resolver (direct), the cache and what was dropped as malformed."""
        direct = self.counters.get(DIRECT, RouteCounters())
        return {
            "resolvers": [{"address": r.address, "pid": r.pid} for r in self.resolvers],
            "direct": {"answered": direct.answered, "cached": direct.cached, "failed": direct.failed},
            "cached_answers": len(self.cache),
            "malformed": self.malformed,
        }

    def lookups(self) -> list[dict[str, Any]]:
        """The recent lookups, for ``connections`` (newest last)."""
        rows = []
        for lookup in self.recent:
            route = lookup.route
            verdict = "drop" if route.refused else "pass" if route.via == DIRECT else "tunnel"
            rows.append(
                {
                    "proto": "dns" if lookup.proto == IPPROTO_UDP else "dns/tcp",
                    "pid": lookup.pid,
                    "exe": lookup.exe,
                    "src": _format(lookup.src[0], lookup.src[1]),
                    "dst": _format(lookup.resolver, DNS_PORT),
                    "route": verdict,
                    "tunnel": None if route.via == DIRECT else route.via,
                    "name": lookup.name,
                }
            )
        return rows


def _is_own(pid: int) -> bool:
    """The daemon or one of its children (the router process, whose devices resolve their endpoints):
    their lookups go to the local resolver, never through a tunnel (no loop, no tunnel inside itself)."""
    if pid == os.getpid():
        return True
    try:
        return process_identity(pid)[0] == os.getpid()
    except (OSError, psutil.Error, ValueError, IndexError):
        return False


def _format(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class _UdpListener(asyncio.DatagramProtocol):
    """Queries redirected to one resolver address's UDP listener; each answered on its own task."""

    def __init__(self, forwarder: DnsForwarder, resolver: str) -> None:
        self._forwarder = forwarder
        self._resolver = resolver
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self._transport is not None:
            self._forwarder.answer_datagram(
                data, (str(addr[0]), int(addr[1])), self._resolver, self._transport
            )
