"""The daemon behind ``awg-split-tunnel run``: the wiring of every level.

ConfigManager → TunnelRegistry → one runtime per tunnel (tunnel_runtimes.py: a stream tunnel's provider,
TunnelProxy and HealthMonitor; a packet tunnel's device factory and route) → the packet router in its own
process (``RouterProcess``, docs/DESIGN.md). State changes reach the router through the EventBus; config
edits (the file changed on disk, polled every second) are applied without a restart: new rules apply to
the next flow, tunnels are added and removed.

Packet tunnels (WireGuard, AmneziaWG) run inside the router process, next to the divert handles
(router/service.py): their devices connect at start, report UP after a handshake and DOWN when
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
import concurrent.futures
import contextlib
import ipaddress
import logging
import logging.handlers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from awg_split_tunnel.core.config import Config, ConfigManager, ConfigUnsettled, ProxyBounds
from awg_split_tunnel.core.events import ConfigChanged, EventBus, TunnelStateChanged
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.router_messages import FlowRow
from awg_split_tunnel.core.routing import default_fallback, engine_from_config, engine_rules
from awg_split_tunnel.core.rule_engine import Rule
from awg_split_tunnel.core.tunnel_registry import TunnelRegistry
from awg_split_tunnel.dns.route import exe_rule_pattern, system_rules
from awg_split_tunnel.errors import AwgSplitTunnelError, ConfigError, TunnelError
from awg_split_tunnel.net.nat import NatEntry
from awg_split_tunnel.packet_tunnels import OWN_TRAFFIC_MARK, packet_tunnel_devices
from awg_split_tunnel.platform.data_folder import check_data_folder, data_folder, secret_protection
from awg_split_tunnel.process.matcher import SERVICE_PREFIX
from awg_split_tunnel.provider.interface import set_own_socket_mark
from awg_split_tunnel.proxy.tunnel_proxy import NatTarget
from awg_split_tunnel.router.process import DeviceFactory, RouterProcess, RouterSettings
from awg_split_tunnel.tunnel_runtimes import (
    FIRST_PROBE_WAIT,
    AnyRoute,
    RouterChanges,
    RouterReport,
    RuntimeContext,
    TunnelRuntime,
    tunnel_runtime,
)

if TYPE_CHECKING:
    from awg_split_tunnel.platform.windows.kill_switch import RunningKillSwitch
    from awg_split_tunnel.platform.windows.wfp import FilterEngine

log = logging.getLogger("awg_split_tunnel.core")
rule_log = logging.getLogger("awg_split_tunnel.rule")

WATCH_INTERVAL = 1.0
"""Seconds between looks at the config file's modification time."""

ROUTER_ANSWER_TIMEOUT = 2.0
"""Seconds `status` and each page of `connections` wait for the router process."""

OPEN_FILES_IF_UNLIMITED = 65536
"""The soft open-file limit asked for when the hard limit is unlimited."""

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


def load_hold_every_packet() -> Callable[[], Any]:
    """``platform.divert.hold_every_packet``: the divert data path's fail-closed state (docs/DATAPATHS.md)."""
    from awg_split_tunnel.platform.divert import hold_every_packet

    return hold_every_packet


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


def raise_open_file_limit() -> int | None:
    """Raise the soft limit on open files to the hard limit; the new soft limit, or None when unchanged.

    Every relayed flow holds descriptors (a UDP flow through SOCKS5: its control connection and its
    relay socket), so the usual default of 1024 runs out at about a thousand concurrent flows. POSIX
    only; a failure is logged and never stops the daemon.
    """
    if sys.platform != "win32":
        import resource

        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            # An unlimited hard limit is not a valid soft limit for open files (Linux caps it at
            # fs.nr_open, macOS at OPEN_MAX): ask for a generous finite number instead.
            target = OPEN_FILES_IF_UNLIMITED if hard == resource.RLIM_INFINITY else hard
            if soft == resource.RLIM_INFINITY or soft >= target:
                return None
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("[Core] could not raise the open-file limit: %s", exc)
            return None
        log.debug("[Core] open-file limit raised from %d to %d", soft, target)
        return target
    return None


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file whose every new file (the first and each after a rotation) is created 0600."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, self.mode, encoding=self.encoding, errors=self.errors)


LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5
"""``--log-file``: rotated at 10 MiB, five old files kept (FILE.1 … FILE.5)."""


def configure_logging(level: str, log_file: Path | None = None) -> None:
    """Component-prefixed log lines on stderr at the config's ``log_level``, and in ``log_file`` (rotated,
    created 0600: it names apps and the addresses they reach) when given."""
    root = logging.getLogger("awg_split_tunnel")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    if log_file is not None and not any(isinstance(h, PrivateRotatingFileHandler) for h in root.handlers):
        rotating = PrivateRotatingFileHandler(log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS)
        rotating.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        root.addHandler(rotating)
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
        log_file: Path | None = None,
        hold_packets: Callable[[], Any] | None = None,
        serve_ui: bool | None = None,
        filter_engine: FilterEngine | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self._log_file = log_file
        self.bus = EventBus()
        self.manager = ConfigManager(
            self.config_path, self.bus, folder=data_folder(), secrets=secret_protection()
        )
        self.registry = TunnelRegistry(self.bus)
        self.runtimes: dict[str, TunnelRuntime] = {}
        """The running tunnels by id, in the order the router heard of them."""
        self.exit_code = EXIT_OK
        self._control_path = control_path
        self._serve_api = serve_api
        self._serve_ui = serve_api if serve_ui is None else serve_ui
        self._dashboard: Any = None
        self._log_tail: logging.Handler | None = None
        self._watch_interval = watch_interval
        self._check_privileges = check_privileges
        self._handles = handles
        self._status_out = status_out
        self._filter_engine = filter_engine
        self._kill_switch: RunningKillSwitch | None = None
        self._router: RouterProcess | None = None
        self._routes: dict[str, AnyRoute] = {}
        """The tunnels' routes as the router process last heard them."""
        self._control: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._stop_requested = asyncio.Event()
        self.stopped = threading.Event()
        """Set once ``run_forever`` has stopped everything (for threads waiting on the stop)."""
        self._file_stamp: tuple[int, int] | None = None
        self._config: Config | None = None
        self._started = False
        self._stopped = False
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._dns: Any = None
        """The DNS forwarder (``dns_forwarder.DnsForwarder``; Linux, ``dns.per_app``), else None."""
        self._resolver_exes: list[str] = []
        """The exes of the processes listening on loopback port 53 (the local resolver): ``dns.system``."""
        self.dataplane = "divert"
        """``divert`` or ``kernel`` (docs/DATAPATHS.md): from the config, else ``default_dataplane()``."""
        self._hold_packets = hold_packets
        """Opens what holds every outbound packet when the router process is lost on the divert data path
        (``platform.divert.hold_every_packet`` with the real handles)."""
        self._holding: Any = None
        self._failing = threading.Lock()
        self.failed_closed: str | None = None
        """Why the daemon failed closed (its router process stopped answering or ended), else None."""

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the config, start proxies, the router process and health probes. Raises DaemonError or
        ConfigError (then everything already started is stopped again)."""
        if self._check_privileges:
            require_privileges()
        check_data_folder(self.config_path.parent)
        config = self.manager.load()
        self.dataplane = config.dataplane or default_dataplane()
        if self.dataplane == "kernel" and self._handles is None:
            check_kernel_dataplane()
        set_own_socket_mark(OWN_TRAFFIC_MARK if self.dataplane == "kernel" else 0)
        handles = self._handles or load_divert(self.dataplane)
        if self.dataplane != "kernel" and self._hold_packets is None and self._handles is None:
            self._hold_packets = load_hold_every_packet()
        if self._serve_api:
            self._refuse_second_daemon()
        self._config = config
        self._file_stamp = self._stamp()
        configure_logging(config.log_level, self._log_file)
        if self._serve_ui and config.ui.listen is not None:
            self._keep_log_tail()
        log.info("[Core] starting with %s", self.config_path)
        raise_open_file_limit()
        self._started = True
        self._event_loop = asyncio.get_running_loop()
        try:
            await self._start(config, handles)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, config: Config, handles: Callable[..., Any]) -> None:
        await self._start_kill_switch(config)
        packets = packet_tunnel_devices(config.tunnels, self.config_path.parent, self.dataplane)
        context = self._runtime_context()
        changes = RouterChanges()
        for tunnel in config.tunnels:
            self.registry.register(tunnel.id, tunnel.tunnel_type)
            runtime = tunnel_runtime(tunnel, context, packets)
            await runtime.open("starting", changes)
            self.runtimes[tunnel.id] = runtime
        await self._start_dns(config)
        self._routes = self._tunnel_routes()
        settings = RouterSettings(
            rules=tuple(self._router_rules(config)),
            default=config.default,
            tunnels=dict(self._routes),
            states={tunnel_id: TunnelState.DOWN for tunnel_id in self.registry.ids()},
            default_fallback=default_fallback(config),
            own_pids=frozenset({os.getpid()}),
            log_level=LOG_LEVELS.get(config.log_level, logging.INFO),
            devices=changes.started,
            dataplane=self.dataplane,
            log_file=None if self._log_file is None else str(self._log_file),
        )
        router = RouterProcess(settings, handles, serve=self._router_body())
        router.on_exit = self._router_died
        router.on_unresponsive = self._router_unresponsive
        router.on_tunnel_state = self._packet_tunnel_state
        router.on_flow_forgotten = self._flow_forgotten
        try:
            await asyncio.to_thread(router.start)
        except RuntimeError as exc:
            raise DaemonError(f"cannot divert packets: {exc}") from None
        self._router = router
        self.bus.subscribe(TunnelStateChanged, self._on_tunnel_state)
        self.bus.subscribe(ConfigChanged, self._on_config_changed)
        await self.bus.start()
        for runtime in self.runtimes.values():
            runtime.start()
        if self._serve_api:
            await self._start_control()
        if self._serve_ui:
            await self._start_dashboard(config)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_config(), name="config-watch")
        await self._wait_first_probes()
        await self._router_synced()
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
        await self._stop_dns()
        for runtime in list(self.runtimes.values()):
            await runtime.stop(RouterChanges())  # the router process has stopped every device already
        self.runtimes.clear()
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self._dashboard is not None:
            await self._dashboard.stop()
            self._dashboard = None
        if self._log_tail is not None:
            logging.getLogger("awg_split_tunnel").removeHandler(self._log_tail)
            self._log_tail = None
        await self.bus.stop()
        if self._holding is not None:
            self._holding.close()
            self._holding = None
            log.info("[Core] packets no longer held")
        if self._kill_switch is not None:
            # Last: until the router has stopped, a `block` app must not get out; after a failure the
            # persistent blocks stay (docs/WINDOWS.md, Kill switch).
            await self._kill_switch.stop(keep_blocks=self.exit_code != EXIT_OK)
            self._kill_switch = None
        if self.exit_code == EXIT_OK:
            log.info("[Core] stopped: divert handles closed, network restored")
        else:
            log.error("[Core] stopped after a failure (exit %d)", self.exit_code)

    async def _start_kill_switch(self, config: Config) -> None:
        """Windows (or a given filter engine): the WFP kill switch, before anything is diverted. The daemon
        does not start without it: `block` would not hold across a crash."""
        engine = self._filter_engine
        if engine is None and sys.platform == "win32":
            from awg_split_tunnel.platform.windows.kill_switch import windows_filter_engine

            engine = windows_filter_engine()
        if engine is None:
            return
        from awg_split_tunnel.platform.windows.kill_switch import RunningKillSwitch, own_image

        # Never block the interpreter the daemon and its router process run in: the tunnels go through it.
        exempt = [sys.executable, own_image()]
        switch = RunningKillSwitch(engine, engine_from_config(config), exempt=exempt)
        try:
            await switch.start()
        except (AwgSplitTunnelError, OSError) as exc:
            await switch.stop(keep_blocks=False)
            raise DaemonError(f"the kill switch (Windows Filtering Platform) cannot start: {exc}") from None
        self._kill_switch = switch

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
        with self._console_stop(loop):
            try:
                await self._stop_requested.wait()
            finally:
                for signum in installed:
                    loop.remove_signal_handler(signum)
                await self.stop()
                self.stopped.set()
        return self.exit_code

    def _console_stop(self, loop: asyncio.AbstractEventLoop) -> contextlib.AbstractContextManager[Any]:
        """Windows has no SIGTERM: closing the console, logging off and shutting down arrive as console
        control events (platform/windows/console.py); elsewhere nothing."""
        if sys.platform != "win32":
            return contextlib.nullcontext()
        from awg_split_tunnel.platform.windows.console import ConsoleStop

        def request_stop() -> None:
            loop.call_soon_threadsafe(self.request_stop)

        return ConsoleStop(request_stop, self.stopped)

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("[Core] %s: stopping", signum.name)
        self.request_stop()

    def _router_died(self) -> None:
        # On the router pipe's reader thread.
        self._fail_closed("the packet router process ended unexpectedly")

    def _router_unresponsive(self, silent: float) -> None:
        # On the router's watchdog thread.
        self._fail_closed(f"the packet router process stopped answering ({silent:.1f} s without an answer)")

    def _fail_closed(self, why: str) -> None:
        """The router process is lost (ended, or stopped answering: docs/DATAPATHS.md, "When the router
        process stops answering"). Divert: hold every outbound packet first (a stopped divert handle lets
        packets pass after ~3 s, a closed one at once), then kill the router process; the daemon keeps
        running, failed closed, until it is stopped. Kernel: kill the router process and stop with an
        error; the kernel's rules stay and hold every new connection until the next `run` or `cleanup`."""
        if not self._failing.acquire(blocking=False):
            return  # already failing closed (the kill ends the pipe too)
        try:
            if self.failed_closed is not None:
                return
            self.failed_closed = why
            self.exit_code = EXIT_FAILURE
            if self.dataplane != "kernel" and self._hold_packets is not None:
                try:
                    self._holding = self._hold_packets()
                except Exception as exc:
                    log.error("[Core] cannot hold packets: %s: %s", type(exc).__name__, exc)
            router, self._router = self._router, None
            if router is not None:
                router.kill()
        finally:
            self._failing.release()
        stop = True
        if self.dataplane == "kernel":
            log.error(
                "[Core] %s: killed it and stopping; the kernel's rules stay and hold every new connection "
                "(fail closed) until `run` starts again or `awg-split-tunnel cleanup` removes them",
                why,
            )
        elif self._holding is not None:
            stop = False
            log.error(
                "[Core] %s: killed it; every outbound packet is held (fail closed) until the daemon stops",
                why,
            )
        else:
            log.error("[Core] %s: traffic is not diverted; stopping", why)
        loop = self._event_loop
        if stop and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.request_stop, EXIT_FAILURE)

    # -- tunnel runtimes ---------------------------------------------------------------------------------

    def _runtime_context(self) -> RuntimeContext:
        return RuntimeContext(
            self.registry,
            self.dataplane,
            self.config_path.parent,
            lambda: self._router,
            self._nat_lookup,
            self._change_devices,
            self._config.proxy if self._config is not None else ProxyBounds(),
        )

    def _tunnel_routes(self) -> dict[str, AnyRoute]:
        routes = {tunnel_id: runtime.route() for tunnel_id, runtime in self.runtimes.items()}
        return routes if self._dns is None else self._dns.pin_routes(routes)

    # -- DNS (docs/DNS.md) -------------------------------------------------------------------------------

    async def _start_dns(self, config: Config) -> None:
        """Linux: answer apps' queries to the local resolver through their own routes."""
        if sys.platform == "win32":
            return  # dns.system: a rule for the Dnscache service (``_router_rules``)
        if not sys.platform.startswith("linux"):
            return
        from awg_split_tunnel.dns_forwarder import DnsForwarder, find_local_resolvers, resolver_exes
        from awg_split_tunnel.platform.linux.dns_redirect import install_redirect, remove_redirect

        resolvers = await asyncio.to_thread(find_local_resolvers)
        self._resolver_exes = resolver_exes(resolvers)
        if not config.dns.per_app or not resolvers:
            if config.dns.per_app:
                log.info("[DNS] no resolver listens on loopback: apps' lookups go their own way")
            await asyncio.to_thread(remove_redirect)  # one a daemon that died left behind
            return
        forwarder = DnsForwarder(self.registry.state, self._stream_provider, OWN_TRAFFIC_MARK)
        forwarder.set_config(config)
        listeners = await forwarder.start(resolvers)
        self._dns = forwarder
        await asyncio.to_thread(install_redirect, listeners)
        log.info("[DNS] lookups to %s follow each app's route", ", ".join(listeners))

    async def _stop_dns(self) -> None:
        if not sys.platform.startswith("linux"):
            return
        if self._dns is None:
            return
        from awg_split_tunnel.platform.linux.dns_redirect import remove_redirect

        if self.exit_code == EXIT_OK or self.dataplane != "kernel":
            # After a failure on the kernel data path the redirect stays, as the gate does: lookups fail
            # rather than leave directly until the next `run` or `cleanup` (docs/DNS.md).
            await asyncio.to_thread(remove_redirect)
        await self._dns.stop()
        self._dns = None

    def _router_rules(self, config: Config) -> list[Rule]:
        """The config's rules, after those of ``dns.system`` for the local resolver's own lookups: on
        Windows the DNS Client service's (docs/DNS.md), elsewhere those of the resolvers found at start."""
        if sys.platform == "win32":
            from awg_split_tunnel.platform.windows.services import DNSCACHE_SERVICE

            resolvers = [f"{SERVICE_PREFIX}{DNSCACHE_SERVICE}"]
        else:
            resolvers = [exe_rule_pattern(exe) for exe in self._resolver_exes]
        return system_rules(resolvers, config.dns.system) + engine_rules(config)

    def _stream_provider(self, tunnel_id: str) -> Any:
        return getattr(self.runtimes.get(tunnel_id), "provider", None)

    def _change_devices(self, started: Mapping[str, DeviceFactory], stopped: Sequence[str]) -> None:
        router = self._router
        if router is not None:
            router.change_devices(self._routes, started, stopped)

    def _nat_lookup(
        self, proto: str, peer_ip: str, peer_port: int, dst: tuple[str, int] | None = None
    ) -> NatTarget | None:
        router = self._router
        if router is None:
            return None
        entry: NatTarget | None = router.nat_lookup(proto, peer_ip, peer_port, dst)
        return entry

    def _packet_tunnel_state(self, tunnel_id: str, state: TunnelState, reason: str) -> None:
        # On the router pipe's reader thread: a device in the router process changed state.
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._device_state, tunnel_id, state, reason)

    def _flow_forgotten(self, entry: NatEntry) -> None:
        # On the router pipe's reader thread (or in a nat_lookup): the router forgot a tunnelled flow. These
        # come with every flow's end, so one may well meet the loop closing at shutdown: nothing to do then.
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._withdraw_flow, entry)

    def _withdraw_flow(self, entry: NatEntry) -> None:
        runtime = None if entry.tunnel_id is None else self.runtimes.get(entry.tunnel_id)
        if runtime is not None:
            runtime.flow_forgotten(entry)

    def _device_state(self, tunnel_id: str, state: TunnelState, reason: str) -> None:
        runtime = self.runtimes.get(tunnel_id)
        if runtime is not None:
            runtime.device_state(state, reason)

    def _on_tunnel_state(self, event: TunnelStateChanged) -> None:
        router = self._router
        if router is not None:
            router.tunnel_state_changed(event.tunnel_id, event.new)
        runtime = self.runtimes.get(event.tunnel_id)
        if runtime is not None:
            runtime.state_changed(event.new)

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
            except ConfigUnsettled as exc:
                # Still being written: read it again at the next look, whatever its stamp says then.
                self._file_stamp = None
                log.info("[Core] %s", exc)
                continue
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
        packets = await asyncio.to_thread(
            packet_tunnel_devices, [new_tunnels[i] for i in added], self.config_path.parent, self.dataplane
        )
        self._config = new
        router = self._router
        if self._dns is not None:
            self._dns.set_config(new)
        if new.log_level != old.log_level:
            configure_logging(new.log_level, self._log_file)
            log.info("[Core] log level %s", new.log_level)
        if new.proxy != old.proxy:
            for running in self.runtimes.values():
                running.proxy_bounds_changed(new.proxy)
            log.info("[Core] stream tunnels' proxy bounds changed: new flows meet them")
        changes = RouterChanges()
        for tunnel_id in gone:
            runtime = self.runtimes.pop(tunnel_id, None)
            if runtime is not None:
                await runtime.stop(changes)
            self.registry.unregister(tunnel_id)
            if tunnel_id not in added:
                log.info("[Core] tunnel %s removed", tunnel_id)
        context = self._runtime_context()
        opened: list[TunnelRuntime] = []
        for tunnel_id in added:
            settings = new_tunnels[tunnel_id]
            self.registry.register(tunnel_id, settings.tunnel_type)
            verb = "changed" if tunnel_id in old_tunnels else "added"
            runtime = tunnel_runtime(settings, context, packets)
            await runtime.open(f"{verb} while running", changes)
            self.runtimes[tunnel_id] = runtime
            opened.append(runtime)
            log.info("[Core] tunnel %s %s %s", tunnel_id, verb, runtime.added_note)
        if router is not None:
            for tunnel_id in changes.down:
                router.tunnel_state_changed(tunnel_id, TunnelState.DOWN)
            # Rules first: the router process applies messages in order, and starting a device takes tens
            # of milliseconds (a divert handle is reopened). A rule naming a tunnel that is not up yet gets
            # its fallback policy meanwhile, so this order never lets a `block` app out directly.
            router.set_rules(self._router_rules(new), new.default, default_fallback(new))
            self._routes = self._tunnel_routes()
            if changes.started or changes.stopped:
                router.change_devices(self._routes, changes.started, changes.stopped)
            else:
                router.set_tunnels(self._routes)
        for runtime in opened:
            runtime.start()
        if self._kill_switch is not None and (new.rules != old.rules or new.default != old.default):
            await self._kill_switch.rules_changed(engine_from_config(new))
        if new.rules != old.rules or new.default != old.default:
            rule_log.info(
                "[Rule] %d rules, default %s: applied to new connections", len(new.rules), new.default
            )

    # -- control API -------------------------------------------------------------------------------------

    def _refuse_second_daemon(self) -> None:
        """Two daemons would divert each other's flows and fight over the control socket."""
        from awg_split_tunnel.api.control import default_control_path, request

        path = self._control_path or default_control_path()
        try:
            request("status", path=path, timeout=1.0)
        except AwgSplitTunnelError:
            return  # nothing listens, or a socket left behind by a daemon that died: ours replaces it
        raise DaemonError(f"another daemon is already running (it answers on {path}); stop it first")

    async def _start_control(self) -> None:
        from awg_split_tunnel.api.control import ControlServer

        self._control = ControlServer({**self._api_handlers(), "ui": self._api_ui}, self._control_path)
        try:
            await self._control.start()
        except OSError as exc:
            log.warning("[API] control socket unavailable (%s): status/connections will not answer", exc)
            self._control = None

    def _api_handlers(self) -> dict[str, Any]:
        """What the control socket and the dashboard both ask the daemon."""
        return {"status": self._api_status, "connections": self._api_connections, "tunnel": self._api_tunnel}

    async def _start_dashboard(self, config: Config) -> None:
        """The web dashboard (docs/DASHBOARD.md) on the config's loopback address; a taken port is logged,
        the daemon runs on without it."""
        listen = config.ui.host_port
        if listen is None:
            return
        from awg_split_tunnel.ui.listener import DashboardListener

        dashboard = DashboardListener(
            self._api_handlers(),
            self.config_path,
            *listen,
            self._keep_log_tail(),
            secrets=self.manager.secrets,
        )
        try:
            await dashboard.start()
        except OSError as exc:
            log.warning(
                "[UI] dashboard unavailable on %s (%s); set ui: listen in the config", config.ui.listen, exc
            )
            return
        self._dashboard = dashboard

    def _keep_log_tail(self) -> Any:
        """The daemon's last log lines, kept from the start for the dashboard's log view."""
        if self._log_tail is None:
            from awg_split_tunnel.ui.log_tail import LogTail

            self._log_tail = LogTail()
            logging.getLogger("awg_split_tunnel").addHandler(self._log_tail)
        return self._log_tail

    async def _api_ui(self, request: Mapping[str, Any]) -> dict[str, Any]:
        dashboard = self._dashboard
        if dashboard is None:
            raise DaemonError(
                "the dashboard is off (`ui: off` in the config, or its address was taken: see the log)"
            )
        return {"url": dashboard.url}

    async def _api_status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        tunnels = self.registry.snapshot()
        router_stats: dict[str, Any] = {}
        report: RouterReport | None = None
        # The states just read are handed to the router process before it is asked (it answers in
        # order): what `status` says UP, the router already treats as UP (``_router_synced``).
        await self._events_handled()
        router = self._router
        status = None if router is None else await _answer(router.request_status())
        if status is not None:
            stats = status.stats
            report = RouterReport(stats.get("packet_tunnels") or {}, status.flows_by_tunnel)
            router_stats = {k: v for k, v in stats.items() if isinstance(v, int) and v}
            router_stats["flows"] = status.flows
        for row in tunnels:
            runtime = self.runtimes.get(row["id"])
            if runtime is not None:
                runtime.report(row, report)
            if self._dns is not None:
                row["dns"] = self._dns.tunnel_report(row["id"])
        result: dict[str, Any] = {"tunnels": tunnels, "router": router_stats}
        if self._dns is not None:
            result["dns"] = self._dns.summary()
        if self.failed_closed is not None:
            result["failed_closed"] = self.failed_closed
        return result

    async def _api_connections(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One page of flows: ``{"flows", "total", "next"}``; ``next`` (``listing`` and ``offset``) goes
        into the request for the following page, None after the last one."""
        listing, offset = request.get("listing", 0), request.get("offset", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (listing, offset)):
            raise TunnelError("connections: listing and offset must be whole numbers >= 0")
        router = self._router
        # The latest DNS lookups (docs/DNS.md) come with the first page.
        lookups = [] if self._dns is None or listing else self._dns.lookups()
        if router is None:
            return {"flows": lookups, "total": len(lookups), "next": None}
        page = await _answer(router.request_connections(listing, offset))
        if page is None:
            raise TunnelError("the packet router process did not answer")
        if listing and page.listing != listing:
            raise TunnelError("this connections listing expired (its client was idle too long): ask again")
        following = None if page.done else {"listing": page.listing, "offset": page.offset + len(page.flows)}
        counted = self.dataplane != "kernel"
        flows = [_connection(row, counted) for row in page.flows] + lookups
        return {"flows": flows, "total": page.total + len(lookups), "next": following}

    async def _api_tunnel(self, request: Mapping[str, Any]) -> dict[str, Any]:
        tunnel_id, action = str(request.get("id", "")), request.get("action")
        if tunnel_id not in self.registry:
            raise TunnelError(
                f"no tunnel {tunnel_id!r} (tunnels: {', '.join(self.registry.ids()) or 'none'})"
            )
        runtime = self.runtimes.get(tunnel_id)
        if runtime is None:
            raise TunnelError(f"{tunnel_id} is not running in this daemon")
        if action == "down":
            await runtime.down()
        elif action == "up":
            await runtime.up()
        else:
            raise TunnelError(f"unknown tunnel action {action!r} (up, down)")
        await self._router_synced()
        state = self.registry.state(tunnel_id)
        return {"id": tunnel_id, "state": None if state is None else state.value}

    async def _router_synced(self) -> None:
        """Until the router process has applied every tunnel state the daemon knows: the state changes
        published so far are handled (sent down the pipe), then one request is answered — the router
        process applies its messages in order. So the status line, or `tunnel up|down`'s answer, never
        says UP while the router still refuses a block app's connection (or the other way round)."""
        await self._events_handled()
        router = self._router
        if router is not None:
            await _answer(router.request_status())

    async def _events_handled(self) -> None:
        """Until the events published so far are handled (tunnel states sent down the pipe), at most
        ``ROUTER_ANSWER_TIMEOUT``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.bus.settled(), ROUTER_ANSWER_TIMEOUT)

    # -- the status line ---------------------------------------------------------------------------------

    async def _wait_first_probes(self) -> None:
        deadline = time.monotonic() + FIRST_PROBE_WAIT
        while time.monotonic() < deadline:
            if all(runtime.settled for runtime in self.runtimes.values()):
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


async def _answer(future: concurrent.futures.Future[Any]) -> Any:
    """The router process's answer to a request, or None after ``ROUTER_ANSWER_TIMEOUT`` (or when it is
    gone); the event loop waits without blocking."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), ROUTER_ANSWER_TIMEOUT)
    except TimeoutError:
        return None
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return None  # the router process ended: its requests were cancelled


def _connection(row: FlowRow, counted: bool = True) -> dict[str, Any]:
    """One flow of a router ``ConnectionsPage`` as ``connections`` shows it; ``counted`` False where the
    kernel carries the flow's packets after the first (its bytes are then not known: None)."""
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
        "bytes_out": row.bytes_out if counted else None,
        "bytes_in": row.bytes_in if counted else None,
        # The router's clock is this machine's monotonic clock (FlowRow.created).
        "age": round(max(0.0, time.monotonic() - row.created), 1) if row.created else None,
    }


def _address(ip: object, port: object) -> str:
    text = str(ip)
    with contextlib.suppress(ValueError):
        if isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address):
            return f"[{text}]:{port}"
    return f"{text}:{port}"


async def _run(
    config_path: Path,
    control_path: Path | None,
    log_file: Path | None = None,
    on_daemon: Callable[[Daemon], None] | None = None,
) -> int:
    daemon = Daemon(config_path, control_path=control_path, log_file=log_file)
    if on_daemon is not None:
        on_daemon(daemon)  # the Windows service keeps it to stop it from the service control thread
    try:
        await daemon.start()
    except AwgSplitTunnelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # e.g. a proxy port or the control socket cannot be bound
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return await daemon.run_forever()


def run_daemon(
    config_path: Path | str,
    control_path: Path | None = None,
    log_file: Path | None = None,
    *,
    on_daemon: Callable[[Daemon], None] | None = None,
) -> int:
    """``awg-split-tunnel run``: the daemon in the foreground until Ctrl-C/SIGTERM; the exit code."""
    try:
        return asyncio.run(_run(Path(config_path), control_path, log_file, on_daemon))
    except KeyboardInterrupt:
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``python -m awg_split_tunnel.daemon -c CONFIG``."""
    from awg_split_tunnel.core.config import default_config_path

    parser = argparse.ArgumentParser(prog="awg-split-tunnel run", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, default=None, help="config file (YAML)")
    parser.add_argument("--control", type=Path, default=None, help="control socket path")
    parser.add_argument("--log-file", type=Path, default=None, help="also log here (rotated at 10 MiB)")
    args = parser.parse_args(argv)
    return run_daemon(args.config or default_config_path(), args.control, args.log_file)


if __name__ == "__main__":
    sys.exit(main())
