"""One runtime per running tunnel, one kind per tunnel type (used by the daemon).

The daemon drives every tunnel through the same small interface, ``TunnelRuntime``:

- ``open(why, changes)``: make its route ready (a stream tunnel's proxies listen) and note in ``changes``
  what the router process has to hear with the next config message;
- ``route()``: its route in the router (a stream tunnel's proxy ports, a packet tunnel's addresses);
- ``start()``: once the router knows the route (a stream tunnel's health probes begin);
- ``stop(changes)``: it leaves the config or the daemon stops;
- ``down()`` / ``up()``: `tunnel down` / `tunnel up` by hand (a tunnel taken down stays down until
  `tunnel up`, whatever its probes or device report meanwhile);
- ``report(row, router)``: fill its ``status`` row (bytes, flows, handshake age);
- ``state_changed(state)`` and ``device_state(state, reason)``: its registry state changed (the router has
  been told), and its device in the router process reported a state;
- ``flow_forgotten(entry)``: the router forgot one of its tunnelled flows (``FlowForgotten``);
- ``proxy_bounds_changed(bounds)``: the config's ``proxy:`` block changed.

``StreamTunnelRuntime`` (SOCKS5, HTTP CONNECT) owns a provider, one TunnelProxy (two for an HTTP tunnel
with ``udp: direct``) and a HealthMonitor. ``PacketTunnelRuntime`` (WireGuard, AmneziaWG) owns a device
factory and a route: its device runs in the router process (router/service.py), which starts and stops
it on a ``devices`` message; the daemon batches one such message per config change (``RouterChanges``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from awg_split_tunnel.core.config import AnyTunnel, HttpTunnel, PacketTunnel, ProxyBounds, Socks5Tunnel
from awg_split_tunnel.core.packet_router import TunnelRoute
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.tunnel_registry import TunnelRegistry
from awg_split_tunnel.errors import ConfigError, TunnelError
from awg_split_tunnel.packet_tunnels import packet_tunnel_devices
from awg_split_tunnel.provider.direct import DirectProvider
from awg_split_tunnel.provider.health import HealthMonitor
from awg_split_tunnel.provider.httpproxy.provider import HttpProxyProvider
from awg_split_tunnel.provider.interface import StreamProvider
from awg_split_tunnel.provider.socks5.provider import Socks5Provider
from awg_split_tunnel.proxy.tunnel_proxy import NatLookup, NatTarget, ProxyLimits, TunnelProxy
from awg_split_tunnel.router.process import DeviceFactory

if TYPE_CHECKING:
    from awg_split_tunnel.router.process import RouterProcess

log = logging.getLogger("awg_split_tunnel.core")

FIRST_PROBE_WAIT = 2.0
"""How long the daemon's start waits for the stream tunnels' first health probes before printing the status
line, and `tunnel up` for a stream tunnel's first probe."""
PACKET_TUNNEL_UP_WAIT = 5.0
"""Seconds `tunnel up` waits for a WireGuard/AmneziaWG handshake before answering with the state it has."""
PROXY_HOSTS: tuple[str, ...] = ("0.0.0.0", "::")
"""On the divert data path the tunnel proxies listen on every address of both families: the router's
hairpin delivers an app's flow to the app's own source address, whichever interface that is on."""
KERNEL_PROXY_HOSTS: tuple[str, ...] = ("127.0.0.1", "::1")
"""On the kernel data path nftables redirects locally sent flows to the loopback address of their family
(``redirect`` in the output hook), so the proxies listen there only: nothing from the network reaches them."""

BY_HAND = "taken down by hand"

AnyRoute = TunnelRoute | PacketTunnelRoute
PacketDevices = tuple[Mapping[str, PacketTunnelRoute], Mapping[str, DeviceFactory]]
"""What ``packet_tunnel_devices`` returns: packet tunnels' routes and device factories by tunnel id."""


@dataclass(slots=True)
class RouterChanges:
    """What one config change asks of the router process besides the new rules and routes."""

    down: list[str] = field(default_factory=list)
    """Tunnels the router must hear are DOWN before the new routes (one of the same id may have been UP)."""
    started: dict[str, DeviceFactory] = field(default_factory=dict)
    """Devices to build and start in the router process (one running under the same id is replaced)."""
    stopped: list[str] = field(default_factory=list)
    """Tunnels whose devices stop (their flows are reset as for a tunnel going DOWN)."""


@dataclass(frozen=True, slots=True)
class RouterReport:
    """What the router process reported for ``status``: its devices' counters by tunnel, and how many flows
    each tunnel has."""

    packet_tunnels: Mapping[str, Any]
    flows_by_tunnel: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class RuntimeContext:
    """What the runtimes share with the daemon that holds them."""

    registry: TunnelRegistry
    dataplane: str
    """``divert`` or ``kernel`` (docs/DATAPATHS.md)."""
    base_dir: Path
    """The config file's folder: ``config_file`` paths of packet tunnels are relative to it."""
    router: Callable[[], RouterProcess | None]
    """The router process while it runs, else None."""
    nat_lookup: NatLookup
    change_devices: Callable[[Mapping[str, DeviceFactory], Sequence[str]], None]
    """A ``devices`` message (start these, stop those) with the daemon's current routes."""
    proxy_bounds: ProxyBounds = field(default_factory=ProxyBounds)
    """The config's ``proxy:`` block: what the stream tunnels' proxies may hold."""


class TunnelRuntime(Protocol):
    """One running tunnel as the daemon drives it (the module docstring lists what each call does)."""

    @property
    def settings(self) -> AnyTunnel: ...

    @property
    def settled(self) -> bool:
        """Its first verdict is in (a stream tunnel's first probe answered; a packet tunnel: always, it
        shows CONNECTING until its handshake)."""
        ...

    @property
    def added_note(self) -> str:
        """What the log line says after ``tunnel ID added`` / ``changed``."""
        ...

    async def open(self, why: str, changes: RouterChanges) -> None: ...

    def route(self) -> AnyRoute: ...

    def start(self) -> None: ...

    async def stop(self, changes: RouterChanges) -> None: ...

    async def down(self) -> None: ...

    async def up(self) -> None: ...

    def report(self, row: dict[str, Any], router: RouterReport | None) -> None: ...

    def state_changed(self, state: TunnelState) -> None: ...

    def device_state(self, state: TunnelState, reason: str) -> None: ...

    def flow_forgotten(self, entry: NatTarget) -> None: ...

    def proxy_bounds_changed(self, bounds: ProxyBounds) -> None: ...


def tunnel_runtime(settings: AnyTunnel, context: RuntimeContext, packets: PacketDevices) -> TunnelRuntime:
    """The runtime for one tunnel's settings, not opened yet; a packet tunnel's route and device factory
    are taken from ``packets`` (``packet_tunnel_devices`` of these settings: it resolves endpoints, so the
    daemon calls it off the event loop, before anything is torn down)."""
    if isinstance(settings, PacketTunnel):
        routes, devices = packets
        return PacketTunnelRuntime(settings, routes[settings.id], devices[settings.id], context)
    return StreamTunnelRuntime(settings, context)


def proxy_limits(bounds: ProxyBounds) -> ProxyLimits:
    """A stream tunnel proxy's limits: the config's ``proxy:`` values where it gives them, else caps that
    follow the open-file limit and the default timeouts; a per-app cap left out is half its tunnel's."""
    default = ProxyLimits.default()
    tcp = bounds.max_flows or default.max_tcp_flows
    udp = bounds.max_udp_associations or default.max_udp_associations
    return ProxyLimits(
        tcp,
        bounds.max_flows_per_app or max(1, tcp // 2),
        udp,
        bounds.max_udp_associations_per_app or max(1, udp // 2),
        bounds.tcp_idle_timeout or default.tcp_idle_timeout,
        bounds.half_close_timeout or default.half_close_timeout,
        bounds.udp_idle_timeout or default.udp_idle_timeout,
    )


def make_provider(tunnel: Socks5Tunnel | HttpTunnel) -> StreamProvider:
    """The provider for one stream tunnel's settings."""
    endpoint = tunnel.endpoint
    host = str(endpoint.host).strip("[]")
    if isinstance(tunnel, Socks5Tunnel):
        return Socks5Provider(
            host, endpoint.port, username=tunnel.username, password=tunnel.password, udp=tunnel.udp
        )
    return HttpProxyProvider(host, endpoint.port, username=tunnel.username, password=tunnel.password)


class StreamTunnelRuntime:
    """A SOCKS5 or HTTP CONNECT tunnel: its provider, local proxies and health monitor."""

    def __init__(self, settings: Socks5Tunnel | HttpTunnel, context: RuntimeContext) -> None:
        self._settings = settings
        self.context = context
        self.provider = make_provider(settings)
        self.monitor = HealthMonitor(settings.id, self.provider, self._on_health)
        self.proxy: TunnelProxy | None = None
        self.udp_proxy: TunnelProxy | None = None
        """For an HTTP tunnel with ``udp: direct``: a direct relay for its apps' UDP."""
        self.down_by_hand = False

    @property
    def settings(self) -> AnyTunnel:
        return self._settings

    @property
    def settled(self) -> bool:
        return self.monitor.state is not None

    @property
    def added_note(self) -> str:
        return f"({self._settings.type} {self._settings.server})"

    async def open(self, why: str, changes: RouterChanges) -> None:
        """Start the proxies; the router hears the tunnel is DOWN until its first probe says otherwise."""
        settings, context = self._settings, self.context
        carries_udp = isinstance(settings, Socks5Tunnel) and settings.udp
        redirected = context.dataplane == "kernel"
        limits = proxy_limits(context.proxy_bounds)
        self.proxy = await self._start_proxy(
            lambda hosts: TunnelProxy(
                settings.id,
                self.provider,
                context.nat_lookup,
                hosts,
                udp=carries_udp,
                on_flow_failed=self.monitor.flow_failed,
                limits=limits,
                redirected=redirected,
            )
        )
        if isinstance(settings, HttpTunnel) and settings.udp == "direct":
            # An HTTP proxy cannot carry UDP; with `udp: direct` the apps' datagrams are relayed directly.
            self.udp_proxy = await self._start_proxy(
                lambda hosts: TunnelProxy(
                    settings.id,
                    DirectProvider(),
                    context.nat_lookup,
                    hosts,
                    udp=True,
                    limits=limits,
                    redirected=redirected,
                )
            )
        changes.down.append(settings.id)

    async def _start_proxy(self, make: Callable[[tuple[str, ...]], TunnelProxy]) -> TunnelProxy:
        """A started proxy on both families, or on IPv4 alone where the host has no IPv6."""
        hosts = KERNEL_PROXY_HOSTS if self.context.dataplane == "kernel" else PROXY_HOSTS
        proxy = make(hosts)
        try:
            await proxy.start()
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise
            log.warning("[Core] no IPv6 on this host (%s): tunnel proxies listen on IPv4 only", exc)
            proxy = make(hosts[:1])
            await proxy.start()
        return proxy

    def route(self) -> AnyRoute:
        assert self.proxy is not None, "opened first"
        tcp_port = self.proxy.tcp_address[1]
        udp_address = (self.udp_proxy or self.proxy).udp_address
        udp_port = None if udp_address is None else udp_address[1]
        dns_servers = tuple(ipaddress.ip_address(server).packed for server in self._settings.dns)
        return TunnelRoute(tcp_port, udp_port, self._settings.lan_bypass, dns_servers)

    def start(self) -> None:
        self.monitor.start()

    async def stop(self, changes: RouterChanges) -> None:
        await self.monitor.stop()
        for proxy in (self.proxy, self.udp_proxy):
            if proxy is not None:
                await proxy.stop()
        self.provider.close()

    async def down(self) -> None:
        self.down_by_hand = True
        await self.monitor.stop()
        self.monitor.state = None
        self.context.registry.set_state(self._settings.id, TunnelState.DOWN, BY_HAND)

    async def up(self) -> None:
        """Probe again; answers with the first probe's verdict rather than the DOWN it had a moment ago."""
        self.down_by_hand = False
        self.monitor.start()
        deadline = time.monotonic() + FIRST_PROBE_WAIT
        while self.monitor.state is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def report(self, row: dict[str, Any], router: RouterReport | None) -> None:
        proxy = self.proxy
        if proxy is None:
            return
        counters = proxy.counters
        row["rx_bytes"], row["tx_bytes"] = counters.bytes_down, counters.bytes_up
        row["flows"] = len(proxy.tcp_flows) + len(proxy.udp_associations)
        # The proxies' counters that are not zero (refusals over a cap, timeouts, failures...).
        totals: dict[str, int] = {}
        for each in (self.proxy, self.udp_proxy):
            if each is not None:
                for name, value in dataclasses.asdict(each.counters).items():
                    totals[name] = totals.get(name, 0) + value
        row["proxy"] = {name: value for name, value in totals.items() if value}

    def state_changed(self, state: TunnelState) -> None:
        if state is not TunnelState.DOWN:
            return
        # The proxy ends the fail-closed flows (`allow_direct` flows carry on): on the kernel path the router
        # never sees their packets; on the divert path it resets the app's side itself, but the proxy's
        # upstream connection would otherwise go on sending what it holds, and stay open. Each flow is
        # judged by the entry it was accepted with: the router may have forgotten it since (the kernel
        # path keeps a flow only a while after its first packet).
        for proxy in (self.proxy, self.udp_proxy):
            if proxy is not None:
                proxy.reset_flows(lambda entry: entry.fail_closed)

    def device_state(self, state: TunnelState, reason: str) -> None:
        """A stream tunnel has no device in the router process: nothing to hear."""

    def flow_forgotten(self, entry: NatTarget) -> None:
        """On the divert data path the router's flow table is the data path: a flow it forgot (reset when
        its tunnel went down, expired, its port reused) is routed no more, so its relay is closed. On the
        kernel path the router keeps a flow only a while after its first packet (docs/DATAPATHS.md) and
        the conntrack mark goes on routing it: forgetting says nothing about the connection there (its
        fail-closed flows are reset by ``state_changed``)."""
        if self.context.dataplane == "kernel":
            return
        for proxy in (self.proxy, self.udp_proxy):
            if proxy is not None and proxy.withdraw(entry):
                return

    def proxy_bounds_changed(self, bounds: ProxyBounds) -> None:
        """New caps and timeouts for its proxies, from now on (no open flow is closed for a lower cap)."""
        limits = proxy_limits(bounds)
        for proxy in (self.proxy, self.udp_proxy):
            if proxy is not None:
                proxy.limits = limits

    def _on_health(self, tunnel_id: str, state: TunnelState, reason: str) -> None:
        registry = self.context.registry
        if self.down_by_hand or tunnel_id not in registry:
            return
        registry.set_state(tunnel_id, state, reason)


class PacketTunnelRuntime:
    """A WireGuard or AmneziaWG tunnel: its route and the factory of its device, which runs in the router
    process. Its state comes from the device (UP after a handshake, DOWN when handshakes keep failing)."""

    def __init__(
        self,
        settings: PacketTunnel,
        route: PacketTunnelRoute,
        device: DeviceFactory,
        context: RuntimeContext,
    ) -> None:
        self._settings = settings
        self._route = route
        self.device = device
        self.context = context
        self.down_by_hand = False
        """Taken down with `tunnel down`: its device is stopped until `tunnel up`."""

    @property
    def settings(self) -> AnyTunnel:
        return self._settings

    @property
    def settled(self) -> bool:
        return True

    @property
    def added_note(self) -> str:
        return f"({self._settings.type}): starting its device"

    async def open(self, why: str, changes: RouterChanges) -> None:
        """Its device starts with the next ``devices`` message (or with the router process)."""
        self.context.registry.set_state(self._settings.id, TunnelState.CONNECTING, why)
        changes.started[self._settings.id] = self.device

    def route(self) -> AnyRoute:
        return self._route

    def start(self) -> None:
        """Nothing: the router process connects the device it started."""

    async def stop(self, changes: RouterChanges) -> None:
        if not self.down_by_hand:
            changes.stopped.append(self._settings.id)

    def _router(self) -> RouterProcess:
        router = self.context.router()
        if router is None:
            raise TunnelError(f"{self._settings.id} is not running in this daemon")
        return router

    async def down(self) -> None:
        """Stop its device: its flows are reset, its rules' fallback policies apply."""
        self._router()
        tunnel_id = self._settings.id
        if not self.down_by_hand:
            self.down_by_hand = True
            self.context.change_devices({}, [tunnel_id])
        self.context.registry.set_state(tunnel_id, TunnelState.DOWN, BY_HAND)

    async def up(self) -> None:
        """Build and connect its device again; returns once it is UP, or after a few seconds."""
        self._router()
        tunnel_id, registry = self._settings.id, self.context.registry
        if self.down_by_hand:
            try:
                _, devices = await asyncio.to_thread(
                    packet_tunnel_devices, [self._settings], self.context.base_dir, self.context.dataplane
                )
            except ConfigError as exc:
                raise TunnelError(f"{tunnel_id} cannot start: {exc}") from None
            self.down_by_hand = False
            self.device = devices[tunnel_id]
            registry.set_state(tunnel_id, TunnelState.CONNECTING, "brought up by hand")
            self.context.change_devices(devices, [])
        deadline = time.monotonic() + PACKET_TUNNEL_UP_WAIT
        while registry.state(tunnel_id) is not TunnelState.UP and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def report(self, row: dict[str, Any], router: RouterReport | None) -> None:
        if router is not None:
            report_packet_tunnel(row, router)

    def state_changed(self, state: TunnelState) -> None:
        """Nothing: the router process resets a packet tunnel's flows itself."""

    def flow_forgotten(self, entry: NatTarget) -> None:
        """Nothing: a packet tunnel's flows have no relay in this process."""

    def proxy_bounds_changed(self, bounds: ProxyBounds) -> None:
        """Nothing: a packet tunnel has no proxy."""

    def device_state(self, state: TunnelState, reason: str) -> None:
        if self.down_by_hand:
            return  # its stopped device's last word; it stays DOWN "taken down by hand"
        registry = self.context.registry
        if self._settings.id in registry:
            registry.set_state(self._settings.id, state, reason)


def report_packet_tunnel(row: dict[str, Any], router: RouterReport) -> None:
    """Fill a packet tunnel's status row from the router process (its device lives there); a row the
    router has no counters for is left as it is."""
    stats = router.packet_tunnels.get(row["id"])
    if not isinstance(stats, Mapping):
        return
    row["rx_bytes"] = stats.get("rx_bytes", 0)
    row["tx_bytes"] = stats.get("tx_bytes", 0)
    row["flows"] = router.flows_by_tunnel.get(row["id"], 0)
    if stats.get("handshake_age") is not None:
        row["handshake_age"] = stats["handshake_age"]
