"""The daemon behind ``awg-split-tunnel run``: the wiring of every level.

ConfigManager → TunnelRegistry → providers (SOCKS5, HTTP proxy) → one TunnelProxy and one HealthMonitor
per stream tunnel → the packet router in its own process (``RouterProcess``, docs/DESIGN.md). State changes
reach the router through the EventBus; config edits (the file changed on disk, polled every second) are
applied without a restart: new rules apply to the next flow, tunnels are added and removed.

Packet tunnels (WireGuard, AmneziaWG) run inside the router process, next to the divert handles
(core/packet_tunnel.py): their devices connect at start, report UP after a handshake and DOWN when
handshakes keep failing, and the router process retries them while DOWN. Packet tunnels edited while
running go the same way as stream tunnels: an added one's device is built (endpoints resolved first)
and started in the router process, and its rules apply to the next connection once it is UP (their
fallback policies until then); a removed one's device is stopped and its flows reset as for a tunnel
going DOWN; a changed one (key, endpoint, parameters, MTU, address) is replaced. Settings that cannot
make a working device are reported and the running config stays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from awg_split_tunnel.core.config import (
    AnyTunnel,
    Config,
    ConfigManager,
    HttpTunnel,
    Socks5Tunnel,
)
from awg_split_tunnel.core.events import ConfigChanged, EventBus, TunnelStateChanged
from awg_split_tunnel.core.packet_router import RouterProcess, RouterSettings, TunnelRoute
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.router_messages import FlowRow
from awg_split_tunnel.core.routing import default_fallback, engine_rules
from awg_split_tunnel.core.tunnel_registry import TunnelRegistry
from awg_split_tunnel.errors import AwgSplitTunnelError, ConfigError, TunnelError
from awg_split_tunnel.packet_tunnels import OWN_TRAFFIC_MARK, packet_tunnel_devices
from awg_split_tunnel.provider.direct import DirectProvider
from awg_split_tunnel.provider.health import HealthMonitor
from awg_split_tunnel.provider.httpproxy.provider import HttpProxyProvider
from awg_split_tunnel.provider.interface import StreamProvider, set_own_socket_mark
from awg_split_tunnel.provider.socks5.provider import Socks5Provider
from awg_split_tunnel.proxy.tunnel_proxy import NatTarget, TunnelProxy

log = logging.getLogger("awg_split_tunnel.core")
rule_log = logging.getLogger("awg_split_tunnel.rule")

WATCH_INTERVAL = 1.0
"""Seconds between looks at the config file's modification time."""
FIRST_PROBE_WAIT = 2.0
"""How long ``start`` waits for the stream tunnels' first health probes before printing the status line."""
PACKET_TUNNEL_UP_WAIT = 5.0
"""Seconds `tunnel up` waits for a WireGuard/AmneziaWG handshake before answering with the state it has."""
PROXY_HOSTS: tuple[str, ...] = ("0.0.0.0", "::")
"""On the divert data path the tunnel proxies listen on every address of both families: the router's
hairpin delivers an app's flow to the app's own source address, whichever interface that is on."""
KERNEL_PROXY_HOSTS: tuple[str, ...] = ("127.0.0.1", "::1")
"""On the kernel data path nftables redirects locally sent flows to the loopback address of their family
(``redirect`` in the output hook), so the proxies listen there only: nothing from the network reaches them."""

EXIT_OK = 0
EXIT_FAILURE = 1

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class DaemonError(AwgSplitTunnelError):
    """The daemon cannot start or keep running; the message says what the user can do."""


@dataclass(slots=True)
class StreamTunnel:
    """One running stream tunnel: its settings, provider, local proxies and health monitor."""

    settings: Socks5Tunnel | HttpTunnel
    provider: StreamProvider
    proxy: TunnelProxy
    monitor: HealthMonitor
    udp_proxy: TunnelProxy | None = None
    """For an HTTP tunnel with ``udp: direct``: a direct relay for its apps' UDP."""
    manual_down: bool = False

    def route_ports(self) -> tuple[int, int | None]:
        tcp_port = self.proxy.tcp_address[1]
        udp_source = self.udp_proxy or self.proxy
        udp_address = udp_source.udp_address
        return tcp_port, None if udp_address is None else udp_address[1]


def require_privileges() -> None:
    """Raise DaemonError unless running as root (POSIX) or Administrator (Windows)."""
    if sys.platform == "win32":
        import ctypes

        windll = getattr(ctypes, "windll", None)
        is_admin = bool(windll.shell32.IsUserAnAdmin()) if windll is not None else False
        if not is_admin:
            raise DaemonError("`run` needs Administrator rights: start it from an elevated prompt")
        return
    if os.geteuid() != 0:
        raise DaemonError("`run` needs root to divert packets: run it with sudo")


def load_divert(dataplane: str = "divert") -> Callable[..., Any]:
    """The router's handle factory (``event_handles`` alone for the kernel data path); DaemonError naming
    the cause when pydivert cannot load."""
    try:
        from awg_split_tunnel.platform.divert import event_handles, router_handles
    except (ImportError, OSError) as exc:
        raise DaemonError(
            f"pydivert cannot load ({type(exc).__name__}: {exc}); install it with `pip install pydivert` "
            "(it bundles WinDivert / eBPFDivert) and check that the kernel allows eBPF"
        ) from exc
    return event_handles if dataplane == "kernel" else router_handles


def default_dataplane() -> str:
    """The data path when the config names none (docs/DATAPATHS.md): ``kernel`` on Linux, ``divert``
    elsewhere."""
    return "kernel" if sys.platform.startswith("linux") else "divert"


def check_kernel_dataplane() -> None:
    """DaemonError when the kernel data path cannot run on this host, naming what is missing."""
    if not sys.platform.startswith("linux"):
        raise DaemonError("`dataplane: kernel` is Linux-only; use `dataplane: divert` here")
    from awg_split_tunnel.platform.linux.kernel_datapath import support_problem

    problem = support_problem()
    if problem is not None:
        raise DaemonError(f"the kernel data path cannot run here: {problem}; or set `dataplane: divert`")


def make_provider(tunnel: Socks5Tunnel | HttpTunnel) -> StreamProvider:
    """The provider for one stream tunnel's settings."""
    endpoint = tunnel.endpoint
    host = str(endpoint.host).strip("[]")
    if isinstance(tunnel, Socks5Tunnel):
        return Socks5Provider(
            host, endpoint.port, username=tunnel.username, password=tunnel.password, udp=tunnel.udp
        )
    return HttpProxyProvider(host, endpoint.port, username=tunnel.username, password=tunnel.password)


def configure_logging(level: str) -> None:
    """Component-prefixed log lines on stderr at the config's ``log_level``."""
    root = logging.getLogger("awg_split_tunnel")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(LOG_LEVELS.get(level, logging.INFO))


class Daemon:
    """The running client: ``await start()``, then ``await run_forever()`` until SIGINT/SIGTERM or
    ``request_stop()``; ``await stop()`` closes every handle and restores the network.

    ``handles`` is the router's handle factory (``platform.divert.router_handles`` by default; loading it
    proves pydivert works). ``control_path`` is where the control API listens (None: the platform default;
    ``serve_api=False`` turns it off).
    """

    def __init__(
        self,
        config_path: Path | str,
        *,
        control_path: Path | None = None,
        serve_api: bool = True,
        watch_interval: float = WATCH_INTERVAL,
        check_privileges: bool = True,
        handles: Callable[..., Any] | None = None,
        status_out: TextIO | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.bus = EventBus()
        self.manager = ConfigManager(self.config_path, self.bus)
        self.registry = TunnelRegistry(self.bus)
        self.tunnels: dict[str, StreamTunnel] = {}
        self.exit_code = EXIT_OK
        self._control_path = control_path
        self._serve_api = serve_api
        self._watch_interval = watch_interval
        self._check_privileges = check_privileges
        self._handles = handles
        self._status_out = status_out
        self._router: RouterProcess | None = None
        self._routes: dict[str, TunnelRoute | PacketTunnelRoute] = {}
        self._packet_routes: dict[str, PacketTunnelRoute] = {}
        self._packets_down_by_hand: set[str] = set()
        """Packet tunnels taken down with `tunnel down`: their devices are stopped until `tunnel up`."""
        self._control: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self._file_stamp: tuple[int, int] | None = None
        self._config: Config | None = None
        self._started = False
        self._stopped = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.dataplane = "divert"
        """``divert`` or ``kernel`` (docs/DATAPATHS.md): from the config, else ``default_dataplane()``."""

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the config, start proxies, the router process and health probes. Raises DaemonError or
        ConfigError (then everything already started is stopped again)."""
        if self._check_privileges:
            require_privileges()
        config = self.manager.load()
        self.dataplane = config.dataplane or default_dataplane()
        if self.dataplane == "kernel" and self._handles is None:
            check_kernel_dataplane()
        set_own_socket_mark(OWN_TRAFFIC_MARK if self.dataplane == "kernel" else 0)
        handles = self._handles or load_divert(self.dataplane)
        if self._serve_api:
            self._refuse_second_daemon()
        self._config = config
        self._file_stamp = self._stamp()
        configure_logging(config.log_level)
        log.info("[Core] starting with %s", self.config_path)
        self._started = True
        self._event_loop = asyncio.get_running_loop()
        try:
            await self._start(config, handles)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, config: Config, handles: Callable[..., Any]) -> None:
        for tunnel in config.tunnels:
            self.registry.register(tunnel.id, tunnel.tunnel_type)
            if isinstance(tunnel, Socks5Tunnel | HttpTunnel):
                self.tunnels[tunnel.id] = await self._open_stream_tunnel(tunnel)
        self._packet_routes, devices = packet_tunnel_devices(
            config.tunnels, self.config_path.parent, self.dataplane
        )
        for tunnel_id in devices:
            self.registry.set_state(tunnel_id, TunnelState.CONNECTING, "starting")
        self._routes = self._tunnel_routes()
        settings = RouterSettings(
            rules=tuple(engine_rules(config)),
            default=config.default,
            tunnels=dict(self._routes),
            states={tunnel_id: TunnelState.DOWN for tunnel_id in self.registry.ids()},
            default_fallback=default_fallback(config),
            own_pids=frozenset({os.getpid()}),
            log_level=LOG_LEVELS.get(config.log_level, logging.INFO),
            devices=devices,
            dataplane=self.dataplane,
        )
        router = RouterProcess(settings, handles, serve=self._router_body())
        router.on_exit = self._router_died
        router.on_tunnel_state = self._packet_tunnel_state
        try:
            await asyncio.to_thread(router.start)
        except RuntimeError as exc:
            raise DaemonError(f"cannot divert packets: {exc}") from None
        self._router = router
        self.bus.subscribe(TunnelStateChanged, self._on_tunnel_state)
        self.bus.subscribe(ConfigChanged, self._on_config_changed)
        await self.bus.start()
        for stream in self.tunnels.values():
            stream.monitor.start()
        if self._serve_api:
            await self._start_control()
        self._watcher = asyncio.get_running_loop().create_task(self._watch_config(), name="config-watch")
        await self._wait_first_probes()
        self._print_status(config)

    async def stop(self) -> None:
        """Stop diverting first (the network is restored at once), then proxies, probes and the API."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        router = self._router
        if router is not None:
            await asyncio.to_thread(router.stop)
            self._router = None
        if self.dataplane == "kernel" and self.exit_code == EXIT_OK:
            # The router process removes its rules when it stops; if it could not (killed, stuck), this does.
            await asyncio.to_thread(self._remove_kernel_state)
        for tunnel in list(self.tunnels.values()):
            await self._close_stream_tunnel(tunnel)
        self.tunnels.clear()
        if self._control is not None:
            await self._control.stop()
            self._control = None
        await self.bus.stop()
        if self.exit_code == EXIT_OK:
            log.info("[Core] stopped: divert handles closed, network restored")
        else:
            log.error("[Core] stopped after a failure (exit %d)", self.exit_code)

    def _router_body(self) -> Any:
        if self.dataplane != "kernel":
            return None
        from awg_split_tunnel.platform.linux.kernel_datapath import serve_kernel_gate

        return serve_kernel_gate

    @staticmethod
    def _remove_kernel_state() -> None:
        from awg_split_tunnel.platform.linux.kernel_datapath import remove_kernel_state

        try:
            remove_kernel_state()
        except AwgSplitTunnelError as exc:
            log.error("[Core] removing the kernel rules failed: %s (run `awg-split-tunnel cleanup`)", exc)

    def request_stop(self, code: int | None = None) -> None:
        """Ask ``run_forever`` to return (from a signal handler or a failure callback)."""
        if code is not None:
            self.exit_code = code
        self._stop_requested.set()

    async def run_forever(self) -> int:
        """Serve until SIGINT/SIGTERM or ``request_stop``; stop; return the exit code."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
        try:
            await self._stop_requested.wait()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            await self.stop()
        return self.exit_code

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("[Core] %s: stopping", signum.name)
        self.request_stop()

    def _router_died(self) -> None:
        # Called on the router pipe's reader thread: traffic now flows undiverted, so the daemon ends with an
        # error rather than pretend to route (the OS firewall is what holds a kill switch across this).
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.request_stop, EXIT_FAILURE)

    # -- stream tunnels ----------------------------------------------------------------------------------

    async def _open_stream_tunnel(self, settings: Socks5Tunnel | HttpTunnel) -> StreamTunnel:
        provider = make_provider(settings)
        monitor = HealthMonitor(settings.id, provider, self._on_health)
        carries_udp = isinstance(settings, Socks5Tunnel) and settings.udp
        proxy = await self._start_proxy(
            lambda hosts: TunnelProxy(
                settings.id,
                provider,
                self._nat_lookup,
                hosts,
                udp=carries_udp,
                on_flow_failed=monitor.flow_failed,
                redirected=self.dataplane == "kernel",
            )
        )
        udp_proxy = None
        if isinstance(settings, HttpTunnel) and settings.udp == "direct":
            # An HTTP proxy cannot carry UDP; with `udp: direct` the apps' datagrams are relayed directly.
            udp_proxy = await self._start_proxy(
                lambda hosts: TunnelProxy(
                    settings.id,
                    DirectProvider(),
                    self._nat_lookup,
                    hosts,
                    udp=True,
                    redirected=self.dataplane == "kernel",
                )
            )
        return StreamTunnel(settings, provider, proxy, monitor, udp_proxy)

    async def _start_proxy(self, make: Callable[[tuple[str, ...]], TunnelProxy]) -> TunnelProxy:
        """A started proxy on both families, or on IPv4 alone where the host has no IPv6."""
        hosts = KERNEL_PROXY_HOSTS if self.dataplane == "kernel" else PROXY_HOSTS
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

    async def _close_stream_tunnel(self, tunnel: StreamTunnel) -> None:
        await tunnel.monitor.stop()
        await tunnel.proxy.stop()
        if tunnel.udp_proxy is not None:
            await tunnel.udp_proxy.stop()
        tunnel.provider.close()

    def _tunnel_routes(self) -> dict[str, TunnelRoute | PacketTunnelRoute]:
        routes: dict[str, TunnelRoute | PacketTunnelRoute] = dict(self._packet_routes)
        for tunnel_id, tunnel in self.tunnels.items():
            tcp_port, udp_port = tunnel.route_ports()
            routes[tunnel_id] = TunnelRoute(tcp_port, udp_port, tunnel.settings.lan_bypass)
        return routes

    def _nat_lookup(
        self, proto: str, peer_ip: str, peer_port: int, dst: tuple[str, int] | None = None
    ) -> NatTarget | None:
        router = self._router
        if router is None:
            return None
        entry: NatTarget | None = router.nat_lookup(proto, peer_ip, peer_port, dst)
        return entry

    def _on_health(self, tunnel_id: str, state: TunnelState, reason: str) -> None:
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None or tunnel.manual_down or tunnel_id not in self.registry:
            return
        self.registry.set_state(tunnel_id, state, reason)

    def _packet_tunnel_state(self, tunnel_id: str, state: TunnelState, reason: str) -> None:
        # On the router pipe's reader thread: a device in the router process changed state.
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set_packet_state, tunnel_id, state, reason)

    def _set_packet_state(self, tunnel_id: str, state: TunnelState, reason: str) -> None:
        if tunnel_id in self._packets_down_by_hand:
            return  # its stopped device's last word; it stays DOWN "taken down by hand"
        if tunnel_id in self.registry and tunnel_id in self._packet_routes:
            self.registry.set_state(tunnel_id, state, reason)

    def _on_tunnel_state(self, event: TunnelStateChanged) -> None:
        router = self._router
        if router is not None:
            router.tunnel_state_changed(event.tunnel_id, event.new)
        tunnel = self.tunnels.get(event.tunnel_id)
        kernel_down = event.new is TunnelState.DOWN and self.dataplane == "kernel"
        if tunnel is not None and router is not None and kernel_down:
            # The divert router resets these flows itself; on the kernel path it never sees their packets,
            # so the proxy ends the fail-closed ones (`allow_direct` flows carry on as on the divert path).
            def fail_closed(proto: str, peer: tuple[str, int], dst: tuple[str, int]) -> bool:
                # TCP flows are known by their whole 4-tuple (TPROXY), UDP ones by the app's address.
                entry = router.nat_lookup(proto, peer[0], peer[1], dst if proto == "tcp" else None)
                return entry is None or bool(entry.fail_closed)

            for proxy in (tunnel.proxy, tunnel.udp_proxy):
                if proxy is not None:
                    proxy.reset_flows(fail_closed)

    # -- config changes ----------------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.config_path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(self._watch_interval)
            stamp = self._stamp()
            if stamp is None or stamp == self._file_stamp:
                continue
            self._file_stamp = stamp
            try:
                changed = self.manager.reload()
            except ConfigError as exc:
                log.error("[Core] config change ignored, the running config stays: %s", exc)
                continue
            if not changed:
                log.debug("[Core] %s touched, config unchanged", self.config_path)

    async def _on_config_changed(self, event: ConfigChanged) -> None:
        new = self.manager.config
        old = self._config
        if old is None or new == old:
            return
        try:
            await self._apply_config(old, new)
        except ConfigError as exc:
            # Found before anything changed (a packet tunnel whose settings make no working device).
            log.error("[Core] config change ignored, the running config stays: %s", exc)
        except (AwgSplitTunnelError, OSError) as exc:
            log.error("[Core] applying the config change (%s) failed: %s", event.what, exc)

    async def _apply_config(self, old: Config, new: Config) -> None:
        """Apply a config edit while running: log level, tunnels added/changed/removed (stream tunnels here,
        packet tunnels' devices in the router process), rules. ConfigError, with nothing changed, when an
        added or changed packet tunnel cannot make a working device (its endpoint does not resolve, bad
        AmneziaWG parameters)."""
        old_tunnels = {t.id: t for t in old.tunnels}
        new_tunnels = {t.id: t for t in new.tunnels}
        gone = [i for i in old_tunnels if i not in new_tunnels or new_tunnels[i] != old_tunnels[i]]
        added = [i for i in new_tunnels if i not in old_tunnels or new_tunnels[i] != old_tunnels[i]]
        # Endpoints resolve here (blocking) and settings are checked before anything is torn down.
        packet_routes, devices = await asyncio.to_thread(
            packet_tunnel_devices, [new_tunnels[i] for i in added], self.config_path.parent, self.dataplane
        )
        self._config = new
        router = self._router
        if new.log_level != old.log_level:
            configure_logging(new.log_level)
            log.info("[Core] log level %s", new.log_level)
        stopped = [i for i in gone if i in self._packet_routes and i not in self._packets_down_by_hand]
        for tunnel_id in gone:
            self._packets_down_by_hand.discard(tunnel_id)
            self._packet_routes.pop(tunnel_id, None)
            tunnel = self.tunnels.pop(tunnel_id, None)
            if tunnel is not None:
                await self._close_stream_tunnel(tunnel)
            self.registry.unregister(tunnel_id)
            if tunnel_id not in added:
                log.info("[Core] tunnel %s removed", tunnel_id)
        started: list[StreamTunnel] = []
        for tunnel_id in added:
            settings: AnyTunnel = new_tunnels[tunnel_id]
            self.registry.register(tunnel_id, settings.tunnel_type)
            verb = "changed" if tunnel_id in old_tunnels else "added"
            if isinstance(settings, Socks5Tunnel | HttpTunnel):
                tunnel = await self._open_stream_tunnel(settings)
                self.tunnels[tunnel_id] = tunnel
                started.append(tunnel)
                log.info("[Core] tunnel %s %s (%s %s)", tunnel_id, verb, settings.type, settings.server)
            elif tunnel_id in devices:
                self._packet_routes[tunnel_id] = packet_routes[tunnel_id]
                self.registry.set_state(tunnel_id, TunnelState.CONNECTING, f"{verb} while running")
                log.info("[Core] tunnel %s %s (%s): starting its device", tunnel_id, verb, settings.type)
        if router is not None:
            for tunnel_id in added:
                if tunnel_id not in devices:
                    router.tunnel_state_changed(tunnel_id, TunnelState.DOWN)
            # Rules first: the router process applies messages in order, and starting a device takes tens
            # of milliseconds (a divert handle is reopened). A rule naming a tunnel that is not up yet gets
            # its fallback policy meanwhile, so this order never lets a `block` app out directly.
            router.set_rules(engine_rules(new), new.default, default_fallback(new))
            self._routes = self._tunnel_routes()
            if devices or stopped:
                router.change_devices(self._routes, devices, stopped)
            else:
                router.set_tunnels(self._routes)
        for tunnel in started:
            tunnel.monitor.start()
        if new.rules != old.rules or new.default != old.default:
            rule_log.info(
                "[Rule] %d rules, default %s: applied to new connections", len(new.rules), new.default
            )

    # -- control API -------------------------------------------------------------------------------------

    def _refuse_second_daemon(self) -> None:
        """Two daemons would divert each other's flows and fight over the control socket."""
        from awg_split_tunnel.api.control import default_control_path, request

        path = self._control_path or default_control_path()
        if not path.exists():
            return
        try:
            request("status", path=path, timeout=1.0)
        except AwgSplitTunnelError:
            return  # a socket left behind by a daemon that died: ours replaces it
        raise DaemonError(f"another daemon is already running (it answers on {path}); stop it first")

    async def _start_control(self) -> None:
        from awg_split_tunnel.api.control import ControlServer

        self._control = ControlServer(
            {"status": self._api_status, "connections": self._api_connections, "tunnel": self._api_tunnel},
            self._control_path,
        )
        try:
            await self._control.start()
        except OSError as exc:
            log.warning("[API] control socket unavailable (%s): status/connections will not answer", exc)
            self._control = None

    async def _api_status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        tunnels = self.registry.snapshot()
        for row in tunnels:
            tunnel = self.tunnels.get(row["id"])
            if tunnel is not None:
                counters = tunnel.proxy.counters
                row["rx_bytes"], row["tx_bytes"] = counters.bytes_down, counters.bytes_up
                row["flows"] = len(tunnel.proxy.tcp_flows) + len(tunnel.proxy.udp_associations)
        router_stats: dict[str, Any] = {}
        router = self._router
        if router is not None:
            snapshot = await asyncio.to_thread(router.snapshot)
            if snapshot is not None:
                stats, flows = snapshot
                _merge_packet_tunnel_stats(tunnels, stats.get("packet_tunnels") or {}, flows)
                router_stats = {k: v for k, v in stats.items() if isinstance(v, int) and v}
                router_stats["flows"] = len(flows)
        return {"tunnels": tunnels, "router": router_stats}

    async def _api_connections(self, request: Mapping[str, Any]) -> dict[str, Any]:
        router = self._router
        snapshot = None if router is None else await asyncio.to_thread(router.snapshot)
        if snapshot is None:
            return {"flows": []}
        _, flows = snapshot
        return {"flows": [_connection(row) for row in flows]}

    async def _api_tunnel(self, request: Mapping[str, Any]) -> dict[str, Any]:
        tunnel_id, action = str(request.get("id", "")), request.get("action")
        if tunnel_id not in self.registry:
            raise TunnelError(
                f"no tunnel {tunnel_id!r} (tunnels: {', '.join(self.registry.ids()) or 'none'})"
            )
        tunnel = self.tunnels.get(tunnel_id)
        if tunnel is None:
            return await self._packet_tunnel_by_hand(tunnel_id, action)
        if action == "down":
            tunnel.manual_down = True
            await tunnel.monitor.stop()
            tunnel.monitor.state = None
            self.registry.set_state(tunnel_id, TunnelState.DOWN, "taken down by hand")
        elif action == "up":
            tunnel.manual_down = False
            tunnel.monitor.start()
            # Answer with the first probe's verdict rather than the DOWN it had a moment ago.
            deadline = time.monotonic() + FIRST_PROBE_WAIT
            while tunnel.monitor.state is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        else:
            raise TunnelError(f"unknown tunnel action {action!r} (up, down)")
        state = self.registry.state(tunnel_id)
        return {"id": tunnel_id, "state": None if state is None else state.value}

    async def _packet_tunnel_by_hand(self, tunnel_id: str, action: object) -> dict[str, Any]:
        """`tunnel down` stops a WireGuard/AmneziaWG tunnel's device (its flows are reset, its rules'
        fallback policies apply); `tunnel up` builds and connects it again and answers once it is UP, or
        with its state after a few seconds."""
        router, config = self._router, self._config
        if router is None or config is None or tunnel_id not in self._packet_routes:
            raise TunnelError(f"{tunnel_id} is not running in this daemon")
        if action == "down":
            if tunnel_id not in self._packets_down_by_hand:
                self._packets_down_by_hand.add(tunnel_id)
                router.change_devices(self._routes, {}, [tunnel_id])
            self.registry.set_state(tunnel_id, TunnelState.DOWN, "taken down by hand")
        elif action == "up":
            if tunnel_id in self._packets_down_by_hand:
                settings = next(t for t in config.tunnels if t.id == tunnel_id)
                try:
                    _, devices = await asyncio.to_thread(
                        packet_tunnel_devices, [settings], self.config_path.parent, self.dataplane
                    )
                except ConfigError as exc:
                    raise TunnelError(f"{tunnel_id} cannot start: {exc}") from None
                self._packets_down_by_hand.discard(tunnel_id)
                self.registry.set_state(tunnel_id, TunnelState.CONNECTING, "brought up by hand")
                router.change_devices(self._routes, devices, [])
            deadline = time.monotonic() + PACKET_TUNNEL_UP_WAIT
            while self.registry.state(tunnel_id) is not TunnelState.UP and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        else:
            raise TunnelError(f"unknown tunnel action {action!r} (up, down)")
        state = self.registry.state(tunnel_id)
        return {"id": tunnel_id, "state": None if state is None else state.value}

    # -- the status line ---------------------------------------------------------------------------------

    async def _wait_first_probes(self) -> None:
        deadline = time.monotonic() + FIRST_PROBE_WAIT
        while time.monotonic() < deadline:
            if all(t.monitor.state is not None for t in self.tunnels.values()):
                return
            await asyncio.sleep(0.05)

    def _print_status(self, config: Config) -> None:
        from rich.console import Console
        from rich.text import Text

        console = Console(file=self._status_out or sys.stdout, highlight=False, soft_wrap=True)
        line = Text()
        line.append("awg-split-tunnel ", style="bold")
        line.append("running", style="bold green")
        line.append(f" · {len(config.rules)} rules · default {config.default} · ")
        colours = {TunnelState.UP: "green", TunnelState.CONNECTING: "yellow"}
        for index, tunnel_id in enumerate(self.registry.ids()):
            state = self.registry.state(tunnel_id) or TunnelState.DOWN
            if index:
                line.append(", ")
            line.append(f"{tunnel_id} ")
            line.append(state.value.upper(), style=colours.get(state, "red"))
        if not self.registry.ids():
            line.append("no tunnels")
        line.append(" · Ctrl-C stops and restores the network")
        console.print(line)
        if self._status_out is None:
            sys.stdout.flush()


def _connection(row: FlowRow) -> dict[str, Any]:
    """One flow of the router's ``Snapshot`` as ``connections`` shows it."""
    proto = row.proto
    return {
        "proto": "tcp" if proto == 6 else "udp" if proto == 17 else str(proto),
        "pid": row.pid,
        "exe": row.exe,
        "src": _address(row.app_ip, row.app_port),
        "dst": _address(row.dst_ip, row.dst_port),
        "route": str(row.verdict).lower(),
        "tunnel": row.tunnel,
        "out": row.packets_out,
        "in": row.packets_in,
    }


def _merge_packet_tunnel_stats(
    rows: list[dict[str, Any]], packet_stats: Mapping[str, Any], flows: Sequence[FlowRow]
) -> None:
    """Fill the status rows of packet tunnels from the router process (their devices live there)."""
    for row in rows:
        stats = packet_stats.get(row["id"])
        if not isinstance(stats, Mapping):
            continue
        row["rx_bytes"] = stats.get("rx_bytes", 0)
        row["tx_bytes"] = stats.get("tx_bytes", 0)
        row["flows"] = sum(1 for flow in flows if flow.tunnel == row["id"])
        if stats.get("handshake_age") is not None:
            row["handshake_age"] = stats["handshake_age"]


def _address(ip: object, port: object) -> str:
    text = str(ip)
    with contextlib.suppress(ValueError):
        if isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address):
            return f"[{text}]:{port}"
    return f"{text}:{port}"


async def _run(config_path: Path, control_path: Path | None) -> int:
    daemon = Daemon(config_path, control_path=control_path)
    try:
        await daemon.start()
    except AwgSplitTunnelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # e.g. a proxy port or the control socket cannot be bound
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return await daemon.run_forever()


def run_daemon(config_path: Path | str, control_path: Path | None = None) -> int:
    """``awg-split-tunnel run``: the daemon in the foreground until Ctrl-C/SIGTERM; the exit code."""
    try:
        return asyncio.run(_run(Path(config_path), control_path))
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m awg_split_tunnel.daemon -c CONFIG``."""
    from awg_split_tunnel.core.config import default_config_path

    parser = argparse.ArgumentParser(prog="awg-split-tunnel run", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, default=None, help="config file (YAML)")
    parser.add_argument("--control", type=Path, default=None, help="control socket path")
    args = parser.parse_args(argv)
    return run_daemon(args.config or default_config_path(), args.control)


if __name__ == "__main__":
    sys.exit(main())
