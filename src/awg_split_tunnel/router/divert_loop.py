"""The divert data path's I/O loops: divert handles → ``PacketRouter`` → reinjection.

``RouterLoop`` runs the handles on one thread (a blocking poll; Linux); ``AsyncRouterLoop`` reads them in
an asyncio loop's callbacks — reader callbacks of their descriptors on Linux, callbacks their reader threads
schedule on Windows (``FedPort``) — with the packet tunnels' devices on the same loop. Both are thin: the
router decides (``core.packet_router``), they receive, send what it says and run its timers.

Where a packet tunnel's device runs: in the router's process, on the router's own thread and event loop.
Packets then never cross a pipe (each hop costs a copy and a wake-up per batch), and nothing else
competes for that process's GIL — a second busy thread would stall the divert loop by the switch interval
(ARCHITECTURE.md: pydivert costs). Encryption (~1.1 µs per 1420-byte packet) is small next to the divert
cost per packet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from awg_split_tunnel.core.packet_router import ConnectEvent, PacketAction, PacketRouter
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.net.packet import IPPROTO_UDP

log = logging.getLogger("awg_split_tunnel.router")


class NetworkPort(Protocol):
    """The NETWORK handle as the loop uses it (``platform.divert.NetworkHandle``)."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int | None: ...
    def recv_into(self, buf: bytearray, c_buf: Any, addr: Any, timeout_ms: int = 0) -> int: ...
    def send(self, c_buf: Any, length: int, addr: Any) -> bool: ...
    def refresh(self) -> bool: ...
    def new_buffer(self) -> tuple[bytearray, Any, Any]: ...
    def copy_address(self, addr: Any) -> Any: ...
    def set_inbound(self, addr: Any, inbound: bool = True) -> None: ...
    def c_buffer(self, data: bytearray) -> Any: ...


@runtime_checkable
class FedPort(Protocol):
    """A handle that is no descriptor (Windows: ``platform.windows.handles``): a thread of its own reads it
    and calls ``on_ready`` on the loop whenever packets or events wait."""

    def watch(self, loop: asyncio.AbstractEventLoop, on_ready: Callable[[], None]) -> None: ...
    def unwatch(self) -> None: ...


@runtime_checkable
class OwnerLookup(Protocol):
    """An event handle that also finds a flow's owner when no event named it (Windows:
    ``platform.windows.owners.SocketOwners``): the router's ``os_lookup``; its answers come as events."""

    def lookup(
        self, proto: int, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
    ) -> int | None: ...


class ConnectEventLike(Protocol):
    kind: int
    pid: int
    proto: int
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int


class EventPort(Protocol):
    """A SOCKET/FLOW handle as the loop uses it (``platform.divert.SocketEventHandle``)."""

    def open(self) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int | None: ...
    def recv(self, timeout_ms: int = 0) -> ConnectEventLike | None: ...


EVENT_CONNECT = 4
EVENT_ESTABLISHED = 1
EVENT_DELETED = 2
BATCH = 64
"""Packets (and events) taken per wake-up before timers and the other handle get their turn."""
REFRESH_INTERVAL = 2.0


def pending_events(
    router: PacketRouter,
    handles: Iterable[EventPort],
    accept_pid: Callable[[int], bool],
    deleted: Callable[[ConnectEventLike], None] | None = None,
) -> Iterator[ConnectEvent]:
    """The connect events waiting on the handles, of processes in this network namespace. FLOW DELETED
    events (a UDP socket closed) end their flow on the way (``PacketRouter.flow_deleted``, then
    ``deleted``)."""
    for handle in handles:
        for _ in range(BATCH):
            event = handle.recv(0)
            if event is None:
                break
            kind = event.kind
            if kind in (EVENT_CONNECT, EVENT_ESTABLISHED) and accept_pid(event.pid):
                # Linux CONNECT events carry local port 0 (matched by remote); Windows ones and FLOW
                # ESTABLISHED events carry the real port (matched exactly).
                yield event.proto, event.remote_addr, event.remote_port, event.pid, event.local_port
            elif kind == EVENT_DELETED and event.proto == IPPROTO_UDP and accept_pid(event.pid):
                router.flow_deleted(
                    event.proto, event.local_addr, event.local_port, event.remote_addr, event.remote_port
                )
                if deleted is not None:
                    deleted(event)


class RouterLoop:
    """The thin I/O side: divert handles → ``PacketRouter`` → reinjection, on one thread.

    ``start()`` opens the handles (raises if the backend refuses) and runs the loop on a new thread;
    ``stop()`` ends it and closes the handles, after which traffic flows undiverted. ``run()`` does the
    same on the calling thread until ``request_stop()`` (``RouterProcess`` uses it). ``accept_pid``
    filters connect events to this network namespace (``process.lookup.NamespaceFilter``). ``control``
    is an optional ``multiprocessing`` connection whose messages (``router_messages.ToRouter``) go to
    ``on_control`` on the loop's thread.
    """

    def __init__(
        self,
        router: PacketRouter,
        network: NetworkPort,
        events: Iterable[EventPort] = (),
        *,
        accept_pid: Callable[[int], bool] = lambda pid: True,
        clock: Callable[[], float] = time.monotonic,
        control: Any = None,
        on_control: Callable[[Any], None] | None = None,
    ) -> None:
        self.router = router
        self.network = network
        self.events = list(events)
        self._accept_pid = accept_pid
        self._clock = clock
        self._control = control
        self._on_control = on_control
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._opened = False
        self.error: BaseException | None = None
        router.event_source = self._pending_events
        for handle in self.events:
            if isinstance(handle, OwnerLookup):
                router.os_lookup = handle.lookup  # the data path's own, off the packet loop

    def open(self) -> None:
        """Open the handles: event handles first, so no SYN can arrive before its CONNECT could."""
        opened: list[EventPort] = []
        try:
            for handle in self.events:
                handle.open()
                opened.append(handle)
            self.network.open()
        except BaseException:
            for handle in opened:
                handle.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._stop.clear()
        self._opened = True
        log.info("[Router] diverting outbound TCP/UDP (%d event handles)", len(self.events))

    def close(self) -> None:
        if not self._opened:
            return
        self._opened = False
        handles: list[EventPort | NetworkPort] = [self.network, *self.events]
        for handle in handles:
            try:
                handle.close()
            except Exception:
                log.exception("[Router] closing a divert handle failed")
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("[Router] stopped: %s", self.router.stats)

    def start(self) -> None:
        self.open()
        self._thread = threading.Thread(target=self._run, name="packet-router", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self.request_stop()
            thread.join(5.0)
        self.close()

    def run(self) -> None:
        """Open (unless open), loop on this thread until ``request_stop()``, close."""
        if not self._opened:
            self.open()
        try:
            self._loop()
        finally:
            self.close()

    def request_stop(self) -> None:
        self._stop.set()
        if self._opened:
            os.write(self._wake_w, b"x")

    def __enter__(self) -> RouterLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the loop must not die silently: traffic would flow undiverted
            self.error = exc
            log.exception("[Router] packet loop failed")

    def _poller(self) -> Any:
        """A poll object over every handle, or None where there is none (Windows: no poll(), and WinDivert
        handles are not descriptors; the router process there runs ``AsyncRouterLoop``) — the loop then
        blocks briefly in the NETWORK handle's receive."""
        if sys.platform == "win32":
            return None
        handles: list[EventPort | NetworkPort] = [self.network, *self.events]
        fds = [handle.fileno() for handle in handles]
        if None in fds:
            return None
        poller = select.poll()
        for fd in (self._wake_r, *fds, *([self._control.fileno()] if self._control is not None else [])):
            poller.register(fd, select.POLLIN)
        return poller

    def _loop(self) -> None:
        router, net = self.router, self.network
        buf, c_buf, addr = net.new_buffer()
        send = net.send
        set_inbound = net.set_inbound
        route = router.route

        def copy_meta() -> object:
            return net.copy_address(addr)

        poller = self._poller()
        next_refresh = self._clock() + REFRESH_INTERVAL
        while not self._stop.is_set():
            deadline = router.next_deadline()
            now = self._clock()
            timeout = 200 if deadline is None else max(0, min(200, int((deadline - now) * 1000) + 1))
            if poller is not None:
                poller.poll(timeout)
                wait_ms = 0
            else:
                wait_ms = min(timeout, 2)
            now = self._clock()
            if self._control is not None:
                self._drain_control()
            self.drain_events(now)
            for _ in range(BATCH):
                n = net.recv_into(buf, c_buf, addr, wait_ms)
                if not n:
                    break
                wait_ms = 0
                verdict = route(buf, n, now, copy_meta)
                if verdict is PacketAction.REINJECT:
                    send(c_buf, n, addr)
                elif verdict is PacketAction.INJECT_INBOUND:
                    set_inbound(addr, True)
                    send(c_buf, n, addr)
                if router.has_outgoing:
                    self.send_outgoing()
            router.poll(now)
            if router.has_outgoing:
                self.send_outgoing()
            if now >= next_refresh:
                next_refresh = now + REFRESH_INTERVAL
                if net.refresh():
                    poller = self._poller()

    def _drain_control(self) -> None:
        control, handler = self._control, self._on_control
        try:
            while control.poll(0):
                message = control.recv()
                if handler is not None:
                    handler(message)
        except (EOFError, OSError):
            # The control plane is gone: stop diverting (the OS firewall holds the kill switch).
            log.error("[Router] control connection lost: stopping")
            self._stop.set()

    def drain_events(self, now: float) -> None:
        """Give the connect events waiting on the event handles to the router."""
        connect_event = self.router.connect_event
        for proto, remote_addr, remote_port, pid, local_port in self._pending_events():
            connect_event(proto, remote_addr, remote_port, pid, now, local_port)

    def _pending_events(self) -> Iterator[ConnectEvent]:
        return pending_events(self.router, self.events, self._accept_pid)

    def send_outgoing(self) -> None:
        """Send what the router queued (held packets now decided, crafted ones), each in its direction."""
        net = self.network
        for packet in self.router.take_outgoing():
            net.set_inbound(packet.meta, packet.inbound)
            net.send(net.c_buffer(packet.data), len(packet.data), packet.meta)


class PacketDevice(Protocol):
    """What the router needs of a packet tunnel's device (``provider.wireguard.device.WireGuardDevice``):
    IP packets in through ``send_packets``, decrypted ones out through the ``on_packets`` callback."""

    on_packets: Callable[[list[bytes]], None]

    def send_packets(self, packets: Sequence[bytes]) -> None: ...


TICK = 0.2
"""Seconds between timer runs of the router (held flows get an earlier tick when they need one)."""


class AsyncRouterLoop:
    """The router's I/O adapter on an asyncio loop, with packet tunnels' devices on the same loop.

    Divert handles are read in ``add_reader`` callbacks (Linux: they are descriptors) or, on Windows, in
    callbacks their reader threads schedule after each batch (``FedPort``); packets a route sends to a
    packet tunnel go to its device after each batch; the device's decrypted packets come back through
    ``on_packets``, are DNATed and injected inbound on the interface the flow left by. One thread routes
    it all: no locks; on Windows the reader threads only wait in WinDivertRecvEx (no GIL held there).
    """

    def __init__(
        self,
        router: Any,
        network: Any,
        events: Iterable[Any] = (),
        *,
        accept_pid: Callable[[int], bool] = lambda pid: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self._io = RouterLoop(router, network, events, accept_pid=accept_pid, clock=clock)
        self.network = network
        self._clock = clock
        self._devices: dict[str, PacketDevice] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []
        self._fed: list[FedPort] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._next_refresh = 0.0
        self._buf: Any = None
        self._c_buf: Any = None
        self._addr: Any = None
        self.error: BaseException | None = None

    def attach_device(self, tunnel_id: str, device: PacketDevice) -> None:
        """Packets routed to ``tunnel_id`` go to ``device``; what it decrypts goes back to the apps."""
        self._devices[tunnel_id] = device

        def received(packets: list[bytes]) -> None:
            self._from_device(tunnel_id, packets)

        device.on_packets = received

    def tunnel_state_changed(self, tunnel_id: str, state: TunnelState) -> None:
        """Tell the router (flows reset or re-decided) and let it act at once, not at the next tick."""
        self.router.tunnel_state_changed(tunnel_id, state)
        if self._loop is not None:
            self._schedule(self._clock())

    def apply_now(self) -> None:
        """Apply the router's queued control commands (rules, routes, states) and run its timers now, so
        that a change from the control plane holds for the very next packet routed (the tick may be up to
        TICK away). Call on the loop's thread, outside the router's own callbacks."""

        def step() -> None:
            self.router.poll(self._clock())
            self._flush()

        if self._loop is not None:
            self._guard(step)

    def detach_device(self, tunnel_id: str) -> None:
        device = self._devices.pop(tunnel_id, None)
        if device is not None:
            device.on_packets = _discard

    def device_ifname(self, tunnel_id: str) -> str | None:
        """None: on this data path a device has no interface of its own."""
        return None

    def routes_changed(self, routes: Mapping[str, Any]) -> None:
        """Nothing to do: the router holds the routes."""

    def control_lost(self) -> None:
        """Nothing to keep: a divert handle fails open whatever happens."""

    async def start(self) -> None:
        """Open the handles and start reading them on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._io.open()
        self._buf, self._c_buf, self._addr = self.network.new_buffer()
        self._watch()
        self._next_refresh = self._clock() + 2.0
        self._schedule(self._clock() + TICK)

    async def stop(self) -> None:
        """Stop reading and close the handles (traffic then flows undiverted)."""
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._io.close()
        self._loop = None

    async def __aenter__(self) -> AsyncRouterLoop:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _watch(self) -> None:
        """Read every handle when it has something: by its descriptor (Linux), or fed by its own reader
        thread where it has none (Windows: ``FedPort``)."""
        loop = self._loop
        assert loop is not None
        self._fds = []
        self._fed = []
        handles: list[tuple[Any, Callable[[], None]]] = [(self.network, self._on_network)]
        handles += [(handle, self._on_events) for handle in self._io.events]
        for handle, on_ready in handles:
            fd = handle.fileno()
            if fd is not None:
                loop.add_reader(fd, on_ready)
                self._fds.append(fd)
            elif isinstance(handle, FedPort):
                handle.watch(loop, on_ready)
                self._fed.append(handle)
            elif handle is self.network:
                raise OSError("the divert handle can neither be polled nor read by a thread of its own")

    def _unwatch(self) -> None:
        if self._loop is not None:
            for fd in self._fds:
                self._loop.remove_reader(fd)
        for handle in self._fed:
            handle.unwatch()
        self._fds = []
        self._fed = []

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:  # a failing callback must not leave traffic half-routed silently
            self.error = exc
            log.exception("[Router] packet loop step failed")

    def _on_network(self) -> None:
        full = False

        def batch() -> None:
            nonlocal full
            full = self._network_batch()

        self._guard(batch)
        if full and self._loop is not None:
            # More may wait: come back after the other callbacks (the device's) had their turn, without
            # relying on the handle's descriptor staying readable.
            self._loop.call_soon(self._on_network)

    def replace_network(self, network: Any) -> None:
        """Divert through ``network`` from now on (e.g. a filter that leaves out a new device's port).

        The new handle opens before the old one closes, so no packet slips past undiverted (as
        ``NetworkHandle.refresh`` does); what already waits in the old one is routed first.
        """
        network.open()
        old = self.network
        self._unwatch()
        try:
            if self._loop is not None:
                for _ in range(64):  # bounded: the old handle keeps capturing until it is closed
                    if not self._network_batch():
                        break
        finally:
            self.network = self._io.network = network
            if self._loop is not None:
                self._watch()
            try:
                old.close()
            except Exception:
                log.exception("[Router] closing the replaced divert handle failed")

    def _network_batch(self) -> bool:
        """Route one batch from the NETWORK handle; True if the batch was full (more may wait)."""
        router, net = self.router, self.network
        buf, c_buf, addr = self._buf, self._c_buf, self._addr
        route, send = router.route, net.send
        now = self._clock()

        def copy_meta() -> object:
            return net.copy_address(addr)

        full = True
        for _ in range(BATCH):
            n = net.recv_into(buf, c_buf, addr, 0)
            if not n:
                full = False
                break
            verdict = route(buf, n, now, copy_meta)
            if verdict is PacketAction.REINJECT:
                send(c_buf, n, addr)
            elif verdict is PacketAction.INJECT_INBOUND:
                net.set_inbound(addr, True)
                send(c_buf, n, addr)
        self._flush()
        return full

    def _on_events(self) -> None:
        def drain() -> None:
            self._io.drain_events(self._clock())
            self._flush()

        self._guard(drain)

    def _from_device(self, tunnel_id: str, packets: list[bytes]) -> None:
        def deliver() -> None:
            self.router.from_tunnel(tunnel_id, packets, self._clock())
            self._flush()

        self._guard(deliver)

    def _flush(self) -> None:
        """Send what the router queued: held/crafted packets, and each tunnel's packets to its device."""
        router = self.router
        if router.has_outgoing:
            self._io.send_outgoing()
        for tunnel_id, packets in router.take_tunnel_packets():
            device = self._devices.get(tunnel_id)
            if device is None:
                router.stats.unroutable += len(packets)
                continue
            device.send_packets(packets)
        if router.has_outgoing:
            self._io.send_outgoing()
        deadline = router.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            self._schedule(deadline)

    def _schedule(self, at: float) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_later(max(0.0, at - self._clock()), self._on_tick)

    def _on_tick(self) -> None:
        self._timer = None
        self._timer_at = float("inf")

        def tick() -> None:
            now = self._clock()
            self.router.poll(now)
            self._flush()
            if now >= self._next_refresh:
                self._next_refresh = now + 2.0
                if self.network.refresh():
                    self._unwatch()
                    self._watch()

        self._guard(tick)
        deadline = self.router.next_deadline()
        now = self._clock()
        self._schedule(min(now + TICK, deadline) if deadline is not None else now + TICK)


def _discard(packets: list[bytes]) -> None:
    return None
