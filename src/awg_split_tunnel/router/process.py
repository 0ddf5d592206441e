"""The router in its own process: ``RouterProcess`` (the control plane's side: the process and its pipe)
and the process's body (``RouterSettings`` in, ``router_messages`` both ways).

The divert loop runs in its own process, as a busy Python thread in the control plane would otherwise
stall it by the GIL switch interval (docs/ARCHITECTURE.md). The child builds its ``PacketRouter``
(``process_router``), applies the control messages every data path shares (``apply_router_message``) and
runs the divert data path (``RouterService`` on asyncio; on Windows reader threads feed its loop) or the
kernel data path's body (``platform.linux.kernel_datapath.serve_kernel_gate``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import queue
import sys
import threading
import time
import types
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from awg_split_tunnel.core.packet_router import (
    HOLD_TIMEOUT,
    AnyTunnelRoute,
    PacketRouter,
    packed_address,
    proto_number,
)
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.router_messages import (
    CONNECTIONS_PAGE,
    Alive,
    ChangeDevices,
    ConnectionsPage,
    ConnectionsRequest,
    DeviceStateChanged,
    FlowForgotten,
    FlowRow,
    FlowTunnelled,
    FromRouter,
    Heartbeat,
    Ready,
    RouterStatus,
    SetRoutes,
    SetRules,
    SetTunnelState,
    StartFailed,
    StatusRequest,
    Stop,
    ToRouter,
)
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.nat import FlowVerdict, NatEntry
from awg_split_tunnel.net.packet import IPPROTO_TCP
from awg_split_tunnel.router.divert_loop import EventPort, NetworkPort
from awg_split_tunnel.router.reports import FlowListings, router_status
from awg_split_tunnel.router.service import run_with_devices

log = logging.getLogger("awg_split_tunnel.router")


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """Everything the router process starts from (sent to it once, pickled)."""

    rules: tuple[Rule, ...]
    default: str
    tunnels: Mapping[str, AnyTunnelRoute]
    states: Mapping[str, TunnelState]
    default_fallback: FallbackPolicy = FallbackPolicy.ALLOW_DIRECT
    own_pids: frozenset[int] = frozenset()
    hold_timeout: float = HOLD_TIMEOUT
    log_level: int = logging.INFO
    devices: Mapping[str, DeviceFactory] = field(default_factory=dict)
    """Packet tunnels' devices, built and run inside the router process (one per ``PacketTunnelRoute``
    in ``tunnels``)."""
    dataplane: str = "divert"
    """``divert`` (every packet through the router) or ``kernel`` (first packets only)."""
    log_file: str | None = None
    """Also log to this file (``run --log-file``)."""


DeviceFactory = Callable[[], Any]
"""Builds a packet tunnel's device (``router.divert_loop.PacketDevice``) inside the router process; must
pickle, e.g. ``functools.partial(WireGuardDevice, device_settings, tunnel_id="nl-awg")``."""

HandleFactory = Callable[..., tuple[NetworkPort, Sequence[EventPort], Callable[[int], bool]]]
"""Builds (unopened) NETWORK handle, event handles and the namespace filter inside the router process;
``platform.divert.router_handles``. A module-level function, so it can be pickled. With packet tunnels
it is called with their devices' UDP ports, to leave out of the capture."""

ProcessBody = Callable[[RouterSettings, Callable[..., Any], Any], None]
"""The router process's body: (settings, handle factory, pipe). ``_router_process_main`` (the divert data
path) by default; the kernel data path passes its own (``platform.linux.kernel_datapath``). Module-level,
so it pickles."""

START_TIMEOUT = 20.0

HEARTBEAT_INTERVAL = 0.25
"""Seconds between two ``Heartbeat`` messages to a running router process."""
WATCHDOG_DEADLINE = 1.5
"""Seconds without an ``Alive`` answer after which the router process counts as frozen
(``RouterProcess.on_unresponsive``). Well below the ~3 s after which a stopped divert handle's owner
lets packets pass (``scripts/repro/stalled_handle_fails_open.py``): the daemon acts first
(docs/DATAPATHS.md)."""
NAT_CATCH_UP = 0.5
"""Most seconds ``nat_lookup`` waits on a miss for the pipe's reader to apply messages already sent. The
flow's announcement is in the pipe before its first packet reaches a proxy, so a real flow is found as
soon as the reader thread runs; on a busy machine that thread can wait for a core for tens of
milliseconds (50 ms was too short on two loaded cores: the app's connection was reset). Only a
connection nobody announced while the pipe stays busy waits this long."""


class RouterProcess:
    """The divert loop in its own process (docs/DESIGN.md): a busy control plane cannot stall packets.

    The child owns the handles, the PacketRouter and its tables; the control plane talks to it over one
    pipe (``core.router_messages``). Down (``ToRouter``): every caller, on any thread, only queues its
    message; one sender thread writes them to the pipe in order, so no caller ever blocks on the pipe, even
    when the router process is stopped and the pipe full. Up (``FromRouter``): one reader thread applies
    what comes — every tunnelled flow's NAT entry (``FlowTunnelled``) *before* its first packet is
    reinjected, so ``nat_lookup`` (called by the proxies when they accept) finds it (on a miss it waits up
    to ``NAT_CATCH_UP`` for messages already sent); ``FlowForgotten``; the answers to ``request_status`` and
    ``request_connections`` (futures); ``DeviceStateChanged``. The child's first message is ``Ready``, or
    ``StartFailed`` with the reason. A watchdog thread sends a ``Heartbeat`` every ``heartbeat_interval``;
    when no ``Alive`` came back for ``watchdog_deadline`` seconds it calls ``on_unresponsive`` once.
    """

    def __init__(
        self, settings: RouterSettings, open_handles: Callable[..., Any], serve: ProcessBody | None = None
    ) -> None:
        self.settings = settings
        self._open_handles = open_handles
        self._serve: ProcessBody = serve or _router_process_main
        self._process: Any = None
        self._conn: Any = None
        self._threads: list[threading.Thread] = []
        self._outbox: queue.SimpleQueue[ToRouter | None] = queue.SimpleQueue()
        self._nat: tuple[dict[bytes, NatEntry], dict[bytes, NatEntry]] = ({}, {})
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._request_ids = itertools.count(1)
        self._applied = threading.Condition()
        self._received = 0
        self._applied_count = 0
        self._receiving = False
        """The reader thread is taking a message off the pipe (read, not yet counted in ``_received``)."""
        self._last_alive = 0.0
        self._stopping = False
        self._ended = threading.Event()
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        self.watchdog_deadline = WATCHDOG_DEADLINE
        self.on_tunnel_state: Callable[[str, TunnelState, str], None] | None = None
        """Called (on the reader thread) when a packet tunnel's device, which lives in the router process,
        changes state: (tunnel id, state, reason); e.g. hop to the daemon's loop and set the registry."""
        self.on_flow_forgotten: Callable[[NatEntry], None] | None = None
        """Called (on the reader thread, or on the thread of a ``nat_lookup`` that drained the pipe) with
        the mirror's entry of a tunnelled flow the router forgot."""
        self.on_exit: Callable[[], None] | None = None
        """Called (on the reader thread) if the router process ends without being stopped: traffic then
        flows undiverted, so the daemon should restart it or fail closed."""
        self.on_unresponsive: Callable[[float], None] | None = None
        """Called once (on the watchdog thread) with the seconds since the router process last answered a
        ``Heartbeat``, when that exceeds ``watchdog_deadline``: it is stopped or hung, and its packets wait
        (docs/DATAPATHS.md, "When the router process stops answering")."""

    @property
    def alive(self) -> bool:
        return self._process is not None and bool(self._process.is_alive())

    @property
    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.pid)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the router process; returns once its handles are open. RuntimeError if they cannot be."""
        import multiprocessing

        # spawn, not fork: the control plane has threads and an event loop a forked child must not inherit.
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        settings = RouterSettings(
            self.settings.rules,
            self.settings.default,
            dict(self.settings.tunnels),
            dict(self.settings.states),
            self.settings.default_fallback,
            frozenset({*self.settings.own_pids, os.getpid()}),
            self.settings.hold_timeout,
            self.settings.log_level,
            dict(self.settings.devices),
            self.settings.dataplane,
            self.settings.log_file,
        )
        self._process = context.Process(
            target=self._serve,
            args=(settings, self._open_handles, child_conn),
            name="awg-packet-router",
            daemon=True,
        )
        with _main_module_hidden():
            self._process.start()
        child_conn.close()
        if not self._conn.poll(timeout):
            self.kill()
            raise RuntimeError(f"the packet router process did not start within {timeout:.0f}s")
        first: FromRouter = self._conn.recv()
        match first:
            case Ready():
                pass
            case StartFailed(reason=reason):
                self.kill()
                raise RuntimeError(f"the packet router process failed: {reason}")
            case _:
                self.kill()
                raise RuntimeError(f"the packet router process failed: {first!r} before it was ready")
        self.attach(self._conn)

    def attach(self, conn: Any) -> None:
        """Start the pipe's reader, sender and watchdog threads on ``conn`` (done by ``start``)."""
        self._conn = conn
        self._last_alive = time.monotonic()
        for target, name in (
            (self._read, "packet-router-pipe"),
            (self._write, "packet-router-send"),
            (self._watch, "packet-router-watchdog"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the router process to stop (it closes its handles and removes what it set up), wait up to
        ``timeout`` seconds, then kill it."""
        if self._process is None:
            return
        self._stopping = True
        self._ended.set()
        self._outbox.put(Stop())
        self._process.join(timeout)
        self.kill()

    def kill(self) -> None:
        """End the router process now (SIGTERM, then SIGKILL: a stopped process ignores SIGTERM until it
        is continued) and close the pipe; nothing it held is cleaned up."""
        self._ended.set()
        process, self._process = self._process, None
        if process is not None and process.is_alive():
            process.terminate()
            process.join(0.5)
            if process.is_alive():
                process.kill()
                process.join(2.0)
        self._outbox.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(1.0)  # the reader sees the pipe's end once the process is gone
        if self._conn is not None:
            self._conn.close()
        for future in list(self._pending.values()):
            future.cancel()

    # -- control plane side --------------------------------------------------------------------------------

    def tunnel_state_changed(self, tunnel_id: str, state: TunnelState) -> None:
        if self._ended.is_set():
            # Stopping (its devices report DOWN as it stops them) or gone: no router is left to tell.
            return
        self._send(SetTunnelState(tunnel_id, state))

    def set_tunnels(self, tunnels: Mapping[str, AnyTunnelRoute]) -> None:
        self._send(SetRoutes(dict(tunnels)))

    def set_rules(
        self, rules: Iterable[Rule], default: str, default_fallback: FallbackPolicy | None = None
    ) -> None:
        self._send(SetRules(tuple(rules), default, default_fallback or self.settings.default_fallback))

    def change_devices(
        self,
        tunnels: Mapping[str, AnyTunnelRoute],
        started: Mapping[str, DeviceFactory],
        stopped: Iterable[str] = (),
    ) -> None:
        """Packet tunnels added, changed or removed while running: stop the devices of ``stopped`` (their
        flows are reset as for a tunnel going DOWN), start those of ``started`` (a running one of the same
        id is replaced), then route by ``tunnels`` (every tunnel's route, as ``set_tunnels`` takes them).
        The new devices' states come back through ``on_tunnel_state``."""
        self._send(ChangeDevices(dict(tunnels), dict(started), tuple(stopped)))

    def request_status(self) -> concurrent.futures.Future[RouterStatus]:
        """The router's counters and flow counts, later (a future; cancel it to stop waiting)."""
        return self._request(StatusRequest)

    def request_connections(
        self, listing: int = 0, offset: int = 0, limit: int = CONNECTIONS_PAGE
    ) -> concurrent.futures.Future[ConnectionsPage]:
        """A page of flows, later (``ConnectionsRequest``; a future, cancel it to stop waiting)."""
        return self._request(lambda request_id: ConnectionsRequest(request_id, listing, offset, limit))

    def status(self, timeout: float = 2.0) -> RouterStatus | None:
        """``request_status`` waited for (from a thread that may block); None if no answer in time."""
        status: RouterStatus | None = self._wait(self.request_status(), timeout)
        return status

    def connections(self, timeout: float = 2.0) -> list[FlowRow] | None:
        """Every flow, page after page (from a thread that may block); None if a page did not come."""
        rows: list[FlowRow] = []
        listing = 0
        while True:
            page = self._wait(self.request_connections(listing, len(rows)), timeout)
            if page is None or (listing and page.listing != listing):
                return None
            rows.extend(page.flows)
            listing = page.listing
            if page.done:
                return rows

    def nat_lookup(
        self, proto: int | str, peer_ip: str, peer_port: int, dst: tuple[str, int] | None = None
    ) -> NatEntry | None:
        """Like ``PacketRouter.nat_lookup``, from the control plane's mirror of the router's NAT. ``dst``:
        the connection's own (original) destination where the proxy knows it (kernel data path, TCP).
        Never reads the pipe itself: on a miss it waits (``NAT_CATCH_UP`` at most) while messages already
        in the pipe are being applied — the flow's announcement may be among them."""
        number = proto_number(proto)
        key = packed_address(peer_ip) + peer_port.to_bytes(2, "big")
        if dst is not None:
            key += packed_address(dst[0]) + dst[1].to_bytes(2, "big")
        table = self._nat[0 if number == IPPROTO_TCP else 1]
        entry = table.get(key)
        if entry is None:
            deadline = time.monotonic() + NAT_CATCH_UP
            with self._applied:
                while entry is None and self._unread():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._applied.wait(left)
                    entry = table.get(key)
        return entry

    def _unread(self) -> bool:
        """Messages sent to us that are not applied yet (in the pipe, or being applied)."""
        if self._receiving or self._received != self._applied_count:
            return True
        conn = self._conn
        try:
            return conn is not None and bool(conn.poll(0))
        except (EOFError, OSError, ValueError):
            return False

    def _request(self, make: Callable[[int], ToRouter]) -> concurrent.futures.Future[Any]:
        request_id = next(self._request_ids)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._pending[request_id] = future
        future.add_done_callback(lambda _: self._pending.pop(request_id, None))
        self._send(make(request_id))
        return future

    @staticmethod
    def _wait(future: concurrent.futures.Future[Any], timeout: float) -> Any:
        try:
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            return None

    def _send(self, message: ToRouter) -> None:
        """Queue ``message`` for the sender thread: never blocks, whatever the router process does."""
        if self._conn is None or self._ended.is_set():
            raise RuntimeError("the packet router process is not running")
        self._outbox.put(message)

    def _write(self) -> None:
        """The sender thread: the pipe's only writer, in the order messages were queued."""
        conn = self._conn
        while (message := self._outbox.get()) is not None:
            try:
                conn.send(message)
            except (OSError, ValueError):
                return  # the router process is gone: the reader reports it

    def _watch(self) -> None:
        """The watchdog thread: a ``Heartbeat`` every interval; ``on_unresponsive`` once when no answer
        came for ``watchdog_deadline`` seconds."""
        seq = 0
        while not self._ended.wait(self.heartbeat_interval):
            silent = time.monotonic() - self._last_alive
            if silent > self.watchdog_deadline:
                log.error("[Router] the packet router process has not answered for %.1f s", silent)
                if self.on_unresponsive is not None:
                    self.on_unresponsive(silent)
                return
            seq += 1
            self._outbox.put(Heartbeat(seq))

    def _read(self) -> None:
        """The reader thread: the pipe's only reader."""
        conn = self._conn
        while True:
            try:
                conn.poll(None)  # until a message (or the end) is in the pipe
                # From here until it is counted the message is neither in the pipe nor received: a
                # ``nat_lookup`` missing its flow meanwhile must still wait for it (``_unread``).
                self._receiving = True
                message = conn.recv()
            except (EOFError, OSError, ValueError):
                self._receiving = False
                break
            with self._applied:
                self._received += 1
                self._receiving = False
            try:
                self._apply(message)
            except Exception:
                log.exception("[Router] applying %s from the router process failed", type(message).__name__)
            finally:
                with self._applied:
                    self._applied_count += 1
                    self._applied.notify_all()
        self._ended.set()
        self._outbox.put(None)
        for future in list(self._pending.values()):
            future.cancel()
        if not self._stopping:
            if self.settings.dataplane == "kernel":
                log.error(
                    "[Router] the packet router process ended unexpectedly: the kernel holds every new "
                    "connection until `run` starts again or `awg-split-tunnel cleanup` removes its rules"
                )
            else:
                log.error("[Router] the packet router process ended unexpectedly: traffic is not diverted")
            if self.on_exit is not None:
                self.on_exit()

    def _apply(self, message: FromRouter) -> None:
        match message:
            case FlowTunnelled():
                self._nat[0 if message.proto == IPPROTO_TCP else 1][message.key] = NatEntry(
                    message.proto,
                    message.app_addr,
                    message.app_port,
                    message.dst_addr,
                    message.dst_port,
                    FlowVerdict.TUNNEL,
                    message.tunnel_id,
                    pid=message.pid,
                    exe=message.exe,
                    fail_closed=message.fail_closed,
                    dns_server=message.dns_server,
                )
            case FlowForgotten(proto=proto, key=key):
                entry = self._nat[0 if proto == IPPROTO_TCP else 1].pop(key, None)
                if entry is not None and self.on_flow_forgotten is not None:
                    self.on_flow_forgotten(entry)
            case Alive():
                self._last_alive = time.monotonic()
            case RouterStatus(request_id=request_id) | ConnectionsPage(request_id=request_id):
                future = self._pending.get(request_id)
                if future is not None and future.set_running_or_notify_cancel():
                    future.set_result(message)
            case DeviceStateChanged(tunnel_id=tunnel_id, state=state, reason=reason):
                if self.on_tunnel_state is not None:
                    self.on_tunnel_state(tunnel_id, state, reason)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """While a child is started: ``spawn`` runs the parent's main module again in the child (as
    ``__mp_main__``), so that what was defined there unpickles. Nothing the router process is given is
    defined there, and the daemon's main module (the CLI, or ``daemon.py``) would load the config, CLI
    and DNS stack into it: ~15 MB of RSS it never uses (docs/ARCHITECTURE.md, Memory). With a bare
    module as ``__main__`` (no spec, no file) ``spawn`` leaves the child's alone."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def nat_announcement(entry: NatEntry, key: bytes | None = None) -> FlowTunnelled:
    """The router process's message for a new tunnelled flow (``RouterProcess`` mirrors it). ``key`` is how
    the proxy sees the flow's peer: the hairpin's ``peer_key`` (divert), the app's own address and port
    (kernel: a redirected connection keeps its source)."""
    return FlowTunnelled(
        proto=entry.proto,
        key=entry.peer_key if key is None else key,
        dst_addr=entry.orig_dst_addr,
        dst_port=entry.orig_dst_port,
        app_addr=entry.app_addr,
        app_port=entry.app_port,
        tunnel_id=entry.tunnel_id,
        pid=entry.pid,
        exe=entry.exe,
        fail_closed=entry.fail_closed,
        dns_server=entry.dns_server,
    )


def nat_withdrawal(entry: NatEntry, key: bytes | None = None) -> FlowForgotten:
    """The router process's message for a tunnelled flow it forgot (``RouterProcess`` drops its mirror)."""
    return FlowForgotten(entry.proto, entry.peer_key if key is None else key)


def configure_process_logging(level: int, log_file: str | None = None) -> None:
    """A router process's log: the control plane's line format (daemon.configure_logging), one log to
    read; Ctrl-C reaches the whole process group, but the control plane decides when the router stops.
    With ``log_file`` the lines also go there; the control plane rotates that file, this process follows
    the rename (``WatchedFileHandler``) instead of rotating it a second time."""
    import logging.handlers
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    if log_file:
        handler = logging.handlers.WatchedFileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        logging.getLogger().addHandler(handler)
    # Libraries log every netlink message at debug level: only their warnings belong in our log. A filter
    # on the handlers, not the loggers' levels: importing pyroute2 resets its logger's level
    # (scripts/repro/pyroute2_log_level.py).
    for each in logging.getLogger().handlers:
        each.addFilter(LibraryDebugFilter())


class LibraryDebugFilter(logging.Filter):
    """Keeps library records (pyroute2, asyncio) only from WARNING up; our own at every level."""

    LIBRARIES = ("pyroute2", "asyncio")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(self.LIBRARIES)


def platform_service_pids() -> Callable[[str], Collection[int]] | None:
    """Windows: a service's name → the pids hosting it, for ``service:`` rules
    (``platform.windows.services``); None elsewhere (config refuses such rules there)."""
    if sys.platform != "win32":
        return None
    from awg_split_tunnel.platform.windows.services import service_pids

    return service_pids


def process_router(
    settings: RouterSettings,
    states: dict[str, TunnelState],
    conn: Any,
    *,
    peer_key: Callable[[NatEntry], bytes] | None = None,
    **options: Any,
) -> PacketRouter:
    """The PacketRouter of a router process: its tunnelled flows announced over ``conn`` (keyed by
    ``peer_key``: how the proxies see them) so the control plane's ``nat_lookup`` finds them."""

    def tunnelled(entry: NatEntry) -> None:
        conn.send(nat_announcement(entry, None if peer_key is None else peer_key(entry)))

    def forgotten(entry: NatEntry) -> None:
        conn.send(nat_withdrawal(entry, None if peer_key is None else peer_key(entry)))

    engine = RuleEngine(settings.rules, settings.default, default_fallback=settings.default_fallback)
    options.setdefault("service_pids", platform_service_pids())
    return PacketRouter(
        engine,
        states.get,
        settings.tunnels,
        own_pids={*settings.own_pids, os.getpid()},
        hold_timeout=settings.hold_timeout,
        on_tunnelled=tunnelled,
        on_forgotten=forgotten,
        **options,
    )


def apply_router_message(
    router: PacketRouter,
    states: dict[str, TunnelState],
    conn: Any,
    message: ToRouter,
    listings: FlowListings | None = None,
) -> bool:
    """The control messages every data path handles the same way (``SetTunnelState``, ``SetRoutes``,
    ``SetRules``, ``StatusRequest``, ``ConnectionsRequest`` with ``listings``, ``Heartbeat``); False for the
    others (``Stop``, ``ChangeDevices``), which are the data path's own."""
    match message:
        case SetTunnelState(tunnel_id=tunnel_id, state=state):
            states[tunnel_id] = state
            router.tunnel_state_changed(tunnel_id, state)
        case SetRoutes(routes=routes):
            router.set_tunnels(routes)
        case SetRules(rules=rules, default=default, default_fallback=default_fallback):
            router.set_rules(RuleEngine(rules, default, default_fallback=default_fallback))
        case StatusRequest(request_id=request_id):
            conn.send(router_status(router, request_id))
        case ConnectionsRequest() if listings is not None:
            conn.send(listings.page(message, time.monotonic()))
        case Heartbeat(seq=seq):
            conn.send(Alive(seq))
        case _:
            return False
    return True


def _router_process_main(settings: RouterSettings, open_handles: HandleFactory, conn: Any) -> None:
    """The router process: build router and loop, report ready, loop until told to stop."""
    configure_process_logging(settings.log_level, settings.log_file)
    states = dict(settings.states)
    try:
        router = process_router(settings, states, conn)
        # The asyncio loop whether packet tunnels run at start or not: one may be added at any time, and
        # its device needs that loop. Stream tunnels lose nothing to it: benchmarks/split_tcp.py gave the
        # same ratios and connect latencies with this loop and the synchronous one (two alternating runs
        # each). On Windows reader threads feed it the WinDivert handles and the pipe (docs/WINDOWS.md).
        run_with_devices(router, states, open_handles, settings.devices, conn)
    except Exception as exc:
        conn.send(StartFailed(f"{type(exc).__name__}: {exc}"))
