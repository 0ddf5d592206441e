"""The router process on asyncio: ``RouterService`` runs a data path's I/O adapter (``RouterIO``), the
packet tunnels' devices and the pipe to the control plane, and starts, replaces and stops devices as the
control plane says (packet tunnels edited while running). ``run_with_devices`` is its entry point.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.router_messages import (
    Alive,
    ChangeDevices,
    ConnectionsRequest,
    DeviceStateChanged,
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
from awg_split_tunnel.core.rule_engine import RuleEngine
from awg_split_tunnel.errors import AwgSplitTunnelError
from awg_split_tunnel.provider.wireguard.device import WireGuardDevice
from awg_split_tunnel.provider.wireguard.uapi_socket import UapiSocket, serve_uapi
from awg_split_tunnel.router.divert_loop import AsyncRouterLoop, PacketDevice
from awg_split_tunnel.router.reports import FlowListings, router_status

log = logging.getLogger("awg_split_tunnel.router")


class RouterIO(Protocol):
    """A data path's I/O adapter as ``RouterService`` drives it: ``AsyncRouterLoop`` (divert: every packet
    through the router) or the kernel data path's (first packets only; ``platform.linux.kernel_datapath``)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def attach_device(self, tunnel_id: str, device: Any) -> None: ...
    def detach_device(self, tunnel_id: str) -> None: ...
    def device_ifname(self, tunnel_id: str) -> str | None:
        """The interface the tunnel's device is attached to, if the data path gives it one."""

    def tunnel_state_changed(self, tunnel_id: str, state: TunnelState) -> None: ...
    def apply_now(self) -> None: ...
    def routes_changed(self, routes: Mapping[str, Any]) -> None:
        """The tunnels' routes from the control plane (before the router routes by them)."""

    def control_lost(self) -> None:
        """The control plane is gone (not a clean stop): keep whatever fails closed."""


class ManagedDevice(PacketDevice, Protocol):
    """A device the router process runs itself (``WireGuardDevice``): started, watched, retried."""

    state: TunnelState
    state_listeners: list[Callable[[TunnelState, str], None]]

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def connect(self) -> None: ...

    def statistics(self) -> Any: ...

    @property
    def dropped(self) -> Mapping[str, int]: ...


def device_report(device: ManagedDevice) -> dict[str, Any]:
    """A device's state and counters for ``status``: JSON-ready, ages in seconds (None: no handshake)."""
    counters = device.statistics()
    handshakes = [p.last_handshake for p in counters.peers.values() if p.last_handshake is not None]
    return {
        "state": str(device.state),
        "handshake_age": max(0.0, time.time() - max(handshakes)) if handshakes else None,
        "rx_bytes": counters.rx_bytes,
        "tx_bytes": counters.tx_bytes,
        "datagrams_in": counters.datagrams_in,
        "datagrams_out": counters.datagrams_out,
        "dropped": {str(reason): count for reason, count in device.dropped.items()},
    }


RETRY_INTERVAL = 1.0
"""Seconds before the first new handshake attempt of a device that went DOWN; each further attempt
waits twice as long, up to RETRY_INTERVAL_MAX (a peer that comes back is used again)."""
RETRY_INTERVAL_MAX = 5.0
"""REKEY_TIMEOUT: the core never sends initiations to a peer more often than this anyway."""


UapiServe = Callable[[Any, str], Awaitable[Any]]
"""Starts answering `wg`/`awg` for a device under a name; returns what to ``await .stop()`` later, or None
(``serve_device_uapi``)."""


async def serve_device_uapi(device: Any, name: str) -> UapiSocket | None:
    """The control socket of a daemon device (docs/UAPI.md): named after its TUN on the kernel data path,
    after its tunnel id on the divert path; `awg`'s directory for a device with AmneziaWG parameters."""
    if sys.platform == "win32" or not isinstance(device, WireGuardDevice):
        return None
    return await serve_uapi(device, name, amnezia=device.settings.amnezia is not None)


DeviceFactories = Mapping[str, Callable[[], Any]]
"""Tunnel id → a picklable callable building its ``ManagedDevice`` (``router.process.DeviceFactory``)."""


class RouterService:
    """The router process on one asyncio loop: divert loop (``AsyncRouterLoop``), the packet tunnels'
    devices, and the pipe to the control plane (``RouterProcess``'s messages, ``router_messages.ToRouter``
    down and ``FromRouter`` up).

    Devices come and go while it runs: ``ChangeDevices(routes, started, stopped)`` carries the tunnels'
    routes, the factories of devices to start (a new tunnel, or a changed one replacing its old device)
    and the ids of devices to stop. A stopped device is detached and its tunnel reported DOWN first, so
    its flows are reset as for any tunnel going down (a ``block`` app's packets are dropped, never sent
    direct); a started one is built, started, attached and connected. Whenever the devices' ports change,
    the NETWORK handle is reopened with a filter that leaves them out (new handle first, then the old one
    closed): diverting a device's own datagrams and passing them back costs about half of a tunnel's
    upload rate. Device states go up the pipe as ``DeviceStateChanged(tunnel_id, state, reason)``.
    """

    def __init__(
        self,
        router: Any,
        states: dict[str, TunnelState],
        open_handles: Callable[..., Any],
        conn: Any,
        make_io: Callable[[Any, list[int]], RouterIO] | None = None,
        serve_uapi: UapiServe | None = None,
    ) -> None:
        self.router = router
        self.states = states
        self.conn = conn
        self.devices: dict[str, ManagedDevice] = {}
        self.io: RouterIO | None = None
        self._make_io = make_io
        """Builds the data path's I/O adapter (router, the devices' UDP ports); None: the divert one."""
        self.excluded_ports: frozenset[int] = frozenset()
        """The UDP ports the current NETWORK handle's filter leaves out."""
        self._open_handles = open_handles
        self._routes: dict[str, Any] = dict(router.routes)
        """The tunnels' routes as the control plane sent them (without the devices' ports)."""
        self._listeners: dict[str, Callable[[TunnelState, str], None]] = {}
        self._retry_due: dict[str, tuple[float, float]] = {}
        self._announce = False
        self._stopping = asyncio.Event()
        self._messages: asyncio.Queue[ToRouter] = asyncio.Queue()
        self.listings = FlowListings(router)
        """Open ``connections`` listings (one page per ``ConnectionsRequest``)."""
        self._serve_uapi = serve_uapi
        """Gives each running device its `wg`/`awg` control socket; None: none (tests)."""
        self._uapi: dict[str, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def open(self, factories: DeviceFactories) -> None:
        """Start the devices of ``factories``, open the handles (leaving the devices' ports out) and start
        reading them. Raises what fails; then nothing stays open."""
        try:
            for tunnel_id, factory in factories.items():
                await self._start_device(tunnel_id, factory)
            # Now that the devices have their ports: their datagrams are never diverted, nor even captured.
            self.router.set_tunnels(self._with_device_ports(self._routes))
            self.router.poll(time.monotonic())
            ports = self._device_ports()
            if self._make_io is not None:
                self.io = self._make_io(self.router, sorted(ports))
            else:
                network, events, accept_pid = self._open_handles(sorted(ports))
                self.io = AsyncRouterLoop(self.router, network, events, accept_pid=accept_pid)
            for tunnel_id, device in self.devices.items():
                self.io.attach_device(tunnel_id, device)
            await self.io.start()
            self.excluded_ports = ports
        except BaseException:
            await self.close()
            raise
        for tunnel_id, device in self.devices.items():
            await self._start_uapi(tunnel_id)
            device.connect()

    async def close(self) -> None:
        """Stop reading and close the handles, then stop every device."""
        io, self.io = self.io, None
        if io is not None:
            await io.stop()
        for tunnel_id in list(self.devices):
            await self._stop_device(tunnel_id, "router process stopping")

    async def serve(self) -> None:
        """Report ``Ready`` and the devices' states, then apply the control plane's messages until ``Stop``
        (or the pipe closes); close everything on the way out."""
        loop = asyncio.get_running_loop()
        self._send(Ready())
        self._announce = True  # Ready must be the first message; states are told from here on
        for tunnel_id, device in self.devices.items():
            self._send(DeviceStateChanged(tunnel_id, device.state, "router process started"))
        unwatch = watch_connection(loop, self.conn, self._on_control)
        tasks = [loop.create_task(self._apply_messages()), loop.create_task(self._retry())]
        try:
            await self._stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            unwatch()
            await self.close()

    def _on_control(self) -> None:
        try:
            while self.conn.poll(0):
                message = self.conn.recv()
                if isinstance(message, Heartbeat):
                    self._send(Alive(message.seq))  # at once: it tells this loop runs, not what waits
                else:
                    self._messages.put_nowait(message)
        except (EOFError, OSError):
            log.error("[Router] control connection lost: stopping")
            if self.io is not None:
                self.io.control_lost()
            self._stopping.set()

    async def _apply_messages(self) -> None:
        # One at a time, in order: a device change completes before the next message is looked at.
        while True:
            message = await self._messages.get()
            try:
                await self.handle(message)
            except Exception:
                log.exception("[Router] control message %s failed", type(message).__name__)

    # -- control messages --------------------------------------------------------------------------------

    async def handle(self, message: ToRouter) -> None:
        """Apply one message of the control plane (``RouterProcess``)."""
        match message:
            case Stop():
                self._stopping.set()
            case SetTunnelState(tunnel_id=tunnel_id, state=state):
                if tunnel_id in self.devices:
                    return  # the device in this process is the authority on its own state
                self.states[tunnel_id] = state
                self._tell_router(tunnel_id, state)
            case SetRoutes(routes=routes):
                self._routes = dict(routes)
                if self.io is not None:
                    self.io.routes_changed(self._routes)
                self.router.set_tunnels(self._with_device_ports(self._routes))
            case ChangeDevices(routes=routes, started=started, stopped=stopped):
                await self.change_devices(routes, started, stopped)
            case SetRules(rules=rules, default=default, default_fallback=default_fallback):
                self.router.set_rules(RuleEngine(rules, default, default_fallback=default_fallback))
            case StatusRequest(request_id=request_id):
                self._send(self.status(request_id))
            case ConnectionsRequest():
                self._send(self.listings.page(message, time.monotonic()))
            case Heartbeat(seq=seq):
                self._send(Alive(seq))
        if self.io is not None and isinstance(message, SetTunnelState | SetRoutes | SetRules):
            self.io.apply_now()

    async def change_devices(
        self, routes: Mapping[str, Any], started: DeviceFactories, stopped: Iterable[str]
    ) -> None:
        """Stop the devices of ``stopped`` (and those ``started`` replaces), start those of ``started``,
        and route by ``routes`` from then on."""
        for tunnel_id in [*stopped, *started]:
            if tunnel_id in self.devices:
                await self._stop_device(tunnel_id, "replaced" if tunnel_id in started else "removed")
        fresh: list[str] = []
        for tunnel_id, factory in started.items():
            try:
                await self._start_device(tunnel_id, factory)
            except Exception as exc:
                reason = f"cannot start: {type(exc).__name__}: {exc}"
                log.error("[Router] packet tunnel %s %s", tunnel_id, reason)
                self.states[tunnel_id] = TunnelState.DOWN
                self._send(DeviceStateChanged(tunnel_id, TunnelState.DOWN, reason))
            else:
                fresh.append(tunnel_id)
        self._routes = dict(routes)
        if self.io is not None:
            self.io.routes_changed(self._routes)
        self.router.set_tunnels(self._with_device_ports(self._routes))
        self._exclude_device_ports()
        io = self.io
        for tunnel_id in fresh:
            device = self.devices[tunnel_id]
            if io is not None:
                io.attach_device(tunnel_id, device)
            await self._start_uapi(tunnel_id)
            device.connect()
        if io is not None:
            io.apply_now()
        running = ", ".join(f"{t} (port {d.port})" for t, d in self.devices.items())
        log.info("[Router] packet tunnels now: %s", running or "none")

    def status(self, request_id: int) -> RouterStatus:
        """The answer to a ``StatusRequest``: router stats with per packet tunnel counters, and the flow
        counts the router keeps (no flow is visited)."""
        stats = dataclasses.asdict(self.router.stats)
        stats["packet_tunnels"] = self.router.packet_tunnel_stats()
        for tunnel_id, device in self.devices.items():
            stats["packet_tunnels"].setdefault(tunnel_id, {}).update(device_report(device))
        return router_status(self.router, request_id, stats)

    # -- devices -----------------------------------------------------------------------------------------

    async def _start_device(self, tunnel_id: str, factory: Callable[[], Any]) -> None:
        device: ManagedDevice = factory()

        def changed(state: TunnelState, reason: str) -> None:
            self.states[tunnel_id] = state
            self._tell_router(tunnel_id, state)
            if self._announce:
                self._send(DeviceStateChanged(tunnel_id, state, reason))

        device.state_listeners.append(changed)
        self._listeners[tunnel_id] = changed
        self.devices[tunnel_id] = device
        try:
            await device.start()
        except BaseException:
            self.devices.pop(tunnel_id, None)
            device.state_listeners.remove(changed)
            del self._listeners[tunnel_id]
            raise

    async def _stop_device(self, tunnel_id: str, reason: str) -> None:
        """Detach and report DOWN first (its flows are reset, nothing of it goes direct), then stop."""
        await self._stop_uapi(tunnel_id)
        device = self.devices.pop(tunnel_id)
        if self.io is not None:
            self.io.detach_device(tunnel_id)
        listener = self._listeners.pop(tunnel_id, None)
        if listener is not None and listener in device.state_listeners:
            device.state_listeners.remove(listener)
        self._retry_due.pop(tunnel_id, None)
        self.states[tunnel_id] = TunnelState.DOWN
        self._tell_router(tunnel_id, TunnelState.DOWN)
        if self.io is not None:
            self.io.apply_now()  # its flows are reset before anything else is routed
        if self._announce:
            self._send(DeviceStateChanged(tunnel_id, TunnelState.DOWN, reason))
        try:
            await device.stop()
        except Exception:
            log.exception("[Router] stopping packet tunnel %s failed", tunnel_id)

    async def _start_uapi(self, tunnel_id: str) -> None:
        if self._serve_uapi is None:
            return
        name = (self.io.device_ifname(tunnel_id) if self.io is not None else None) or tunnel_id
        try:
            uapi = await self._serve_uapi(self.devices[tunnel_id], name)
        except Exception:
            log.exception("[Router] packet tunnel %s: its control socket failed", tunnel_id)
            return
        if uapi is not None:
            self._uapi[tunnel_id] = uapi

    async def _stop_uapi(self, tunnel_id: str) -> None:
        uapi = self._uapi.pop(tunnel_id, None)
        if uapi is not None:
            try:
                await uapi.stop()
            except Exception:
                log.exception("[Router] packet tunnel %s: closing its control socket failed", tunnel_id)

    def _device_ports(self) -> frozenset[int]:
        return frozenset(device.port for device in self.devices.values() if device.port)

    def _with_device_ports(self, routes: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(routes)
        for tunnel_id, device in self.devices.items():
            route = out.get(tunnel_id)
            if isinstance(route, PacketTunnelRoute):
                out[tunnel_id] = dataclasses.replace(route, listen_port=device.port)
        return out

    def _exclude_device_ports(self) -> None:
        """Reopen the NETWORK handle when the devices' ports changed: a new device's datagrams are not
        diverted, and a stopped device's port (which an app may get next) is diverted again. Until then
        (or if the reopen fails) the router passes a device's datagrams back unrouted (``_device_ports``)."""
        io = self.io
        ports = self._device_ports()
        if not isinstance(io, AsyncRouterLoop) or ports == self.excluded_ports:
            return  # the kernel data path never queues the devices' datagrams (their sockets' mark)
        try:
            network = self._open_handles(sorted(ports))[0]
            # Two NETWORK handles of one priority misbehave (ARCHITECTURE.md): the new one takes the other
            # of the two, as NetworkHandle.refresh does.
            old_priority = getattr(io.network, "priority", None)
            if isinstance(old_priority, int) and getattr(network, "priority", None) == old_priority:
                network.priority = old_priority + 1
            io.replace_network(network)
        except Exception:
            log.exception("[Router] reopening the divert handle for the devices' ports failed")
            return
        self.excluded_ports = ports

    async def _retry(self) -> None:
        """While a device is DOWN, handshake again: after RETRY_INTERVAL, doubling to RETRY_INTERVAL_MAX."""
        loop = asyncio.get_running_loop()
        due = self._retry_due
        while True:
            await asyncio.sleep(RETRY_INTERVAL / 4)
            now = loop.time()
            for tunnel_id, device in list(self.devices.items()):
                if device.state is not TunnelState.DOWN:
                    due.pop(tunnel_id, None)
                    continue
                at, interval = due.setdefault(tunnel_id, (now + RETRY_INTERVAL, RETRY_INTERVAL))
                if now >= at:
                    device.connect()
                    interval = min(interval * 2, RETRY_INTERVAL_MAX)
                    due[tunnel_id] = (now + interval, interval)

    # -- helpers -----------------------------------------------------------------------------------------

    def _tell_router(self, tunnel_id: str, state: TunnelState) -> None:
        if self.io is not None:
            self.io.tunnel_state_changed(tunnel_id, state)
        else:
            self.router.tunnel_state_changed(tunnel_id, state)

    def _send(self, message: FromRouter) -> None:
        # The control plane may be gone: the pipe's reader then notices and stops the service.
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(message)


def run_with_devices(
    router: Any,
    states: dict[str, TunnelState],
    open_handles: Callable[..., Any],
    factories: DeviceFactories,
    conn: Any,
    make_io: Callable[[Any, list[int]], RouterIO] | None = None,
) -> None:
    """The router process on asyncio (``RouterService``) until told to stop over ``conn``; an
    ``StartFailed`` message instead of ``Ready`` when it cannot start.

    The loop is a selector loop on every platform: the devices' UDP sockets are read with ``add_reader``,
    which Windows' default (proactor) loop does not have. What a selector cannot wait on there — WinDivert
    handles, the pipe — is read by threads that feed the loop (docs/WINDOWS.md, "The router's event
    loop")."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(_serve(router, states, open_handles, factories, conn, make_io))


def watch_connection(
    loop: asyncio.AbstractEventLoop, conn: Any, on_readable: Callable[[], None]
) -> Callable[[], None]:
    """Call ``on_readable`` on ``loop`` whenever the pipe ``conn`` has something to read; returns the
    function that stops it. Linux: the pipe is a socket, ``add_reader``. Windows: a named pipe, which no
    selector can wait on: a thread waits for it (``platform.windows.reader.ConnectionWatcher``)."""
    if sys.platform == "win32":
        from awg_split_tunnel.platform.windows.reader import ConnectionWatcher

        return ConnectionWatcher(loop, conn, on_readable).stop
    fd = conn.fileno()
    loop.add_reader(fd, on_readable)

    def unwatch() -> None:
        loop.remove_reader(fd)

    return unwatch


async def _serve(
    router: Any,
    states: dict[str, TunnelState],
    open_handles: Callable[..., Any],
    factories: DeviceFactories,
    conn: Any,
    make_io: Callable[[Any, list[int]], RouterIO] | None,
) -> None:
    service = RouterService(router, states, open_handles, conn, make_io, serve_device_uapi)
    try:
        await service.open(factories)
    except Exception as exc:
        known = isinstance(exc, AwgSplitTunnelError)
        conn.send(StartFailed(str(exc) if known else f"{type(exc).__name__}: {exc}"))
        return
    await service.serve()
