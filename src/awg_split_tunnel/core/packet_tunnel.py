"""The router's side of a packet tunnel (WireGuard/AmneziaWG): app packets in, tunnel packets out.

As docs/ARCHITECTURE.md says, the router SNATs the app's packets to the tunnel address, clamps TCP MSS to
the tunnel MTU, segments oversize (offloaded) packets, and injects decrypted replies inbound after DNAT.
``PacketTunnelPath`` does exactly that for one tunnel, sans-I/O: ``send`` takes an app's captured packet
(parsed in a ``PacketView``) and queues what the device must encrypt; ``receive`` takes a decrypted
packet and returns it rewritten for the app. ``PacketRouter`` owns one path per packet tunnel and does
the flow bookkeeping; ``AsyncRouterLoop`` is the I/O adapter that runs the divert handles and the
tunnels' devices on one asyncio loop; ``RouterService`` is the router process's body around it: it
starts, replaces and stops devices as the control plane says (packet tunnels edited while running).

Where the device runs: in the router's process, on the router's own thread and event loop. Packets then
never cross a pipe (each hop costs a copy and a wake-up per batch), and nothing else competes for that
process's GIL — a second busy thread would stall the divert loop by the switch interval (ARCHITECTURE.md:
pydivert costs). Encryption (~1.1 µs per 1420-byte packet) is small next to the divert cost per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.router_messages import (
    ChangeDevices,
    DeviceStateChanged,
    FlowRow,
    FromRouter,
    Ready,
    SetRoutes,
    SetRules,
    SetTunnelState,
    Snapshot,
    SnapshotRequest,
    StartFailed,
    Stop,
    ToRouter,
)
from awg_split_tunnel.net.icmp import too_big_reply
from awg_split_tunnel.net.packet import IPPROTO_TCP, TCP_SYN, PacketView
from awg_split_tunnel.net.segment import Rejected, clamp_mss, mss_for_mtu, segment_tcp
from awg_split_tunnel.net.tunnel_nat import NatResult, TunnelNat

log = logging.getLogger("awg_split_tunnel.router")

DEFAULT_TUNNEL_MTU = 1420


@dataclass(frozen=True, slots=True)
class PacketTunnelRoute:
    """How the router reaches one packet tunnel: the addresses its peer knows us by, and its MTU.

    ``listen_port`` is the device's own UDP port: its datagrams to the endpoint are never diverted
    (``platform.divert.router_handles`` also leaves them out of the capture filter).
    """

    address_v4: bytes | None
    address_v6: bytes | None = None
    mtu: int = DEFAULT_TUNNEL_MTU
    lan_bypass: bool = True
    listen_port: int = 0

    @classmethod
    def from_addresses(
        cls,
        addresses: Iterable[str],
        mtu: int = DEFAULT_TUNNEL_MTU,
        *,
        lan_bypass: bool = True,
        listen_port: int = 0,
    ) -> PacketTunnelRoute:
        """From a ``.conf``'s ``Address`` entries (``198.19.0.2/24``, ``2001:2:1::2/64``): first of each
        version."""
        import ipaddress

        v4: bytes | None = None
        v6: bytes | None = None
        for text in addresses:
            address = ipaddress.ip_interface(text.strip()).ip
            if address.version == 4 and v4 is None:
                v4 = address.packed
            elif address.version == 6 and v6 is None:
                v6 = address.packed
        return cls(v4, v6, mtu, lan_bypass, listen_port)


@dataclass(slots=True)
class PacketTunnelStats:
    """Per tunnel, what the status page shows; every dropped packet is counted under its reason."""

    packets_out: int = 0
    packets_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    segmented: int = 0
    """Oversize TCP packets cut into MTU-sized segments."""
    mss_clamped: int = 0
    too_big: int = 0
    """Oversize UDP (or unsegmentable) packets answered with ICMP too-big and dropped."""
    nat_failed: int = 0
    orphans: int = 0
    """Decrypted packets for no known flow (or not for our tunnel address): dropped."""
    malformed: int = 0


class PacketTunnelPath:
    """SNAT + MSS clamp + segmentation + too-big towards one tunnel's device, and DNAT back.

    ``send`` queues packets in ``pending`` (taken by the I/O side with ``take_pending``) and returns
    an ICMP error to inject inbound to the app, if one is due.
    """

    __slots__ = (
        "_in_view",
        "_seg_view",
        "last_meta",
        "mss_v4",
        "mss_v6",
        "mtu",
        "nat",
        "pending",
        "route",
        "stats",
        "tunnel_id",
    )

    def __init__(self, tunnel_id: str, route: PacketTunnelRoute) -> None:
        self.tunnel_id = tunnel_id
        self.route = route
        self.mtu = route.mtu
        self.mss_v4 = mss_for_mtu(route.mtu, 4)
        self.mss_v6 = mss_for_mtu(route.mtu, 6)
        self.nat = TunnelNat(route.address_v4, route.address_v6)
        self.pending: list[bytes] = []
        self.stats = PacketTunnelStats()
        self._in_view = PacketView()
        self._seg_view = PacketView()
        self.last_meta: object = None
        """The I/O side's address record of a recent flow: where replies without ports (later
        fragments) are injected."""

    def has_address(self, version: int) -> bool:
        return (self.route.address_v4 if version == 4 else self.route.address_v6) is not None

    def take_pending(self) -> list[bytes]:
        out, self.pending = self.pending, []
        return out

    def send(self, v: PacketView, now: float) -> bytearray | None:
        """Rewrite the app's packet in ``v`` (its receive buffer) and queue it for the device.

        Returns an ICMP too-big error for the app (the packet is then dropped), or None.
        """
        stats = self.stats
        length = v.length
        if length > self.mtu:
            if v.proto == IPPROTO_TCP and not v.fragment:
                return self._send_segmented(v, now)
            # UDP cannot be cut; the app's stack lowers its path MTU on the error and sends smaller
            # datagrams (or fragments them itself) from then on. Quoted before NAT: the app must
            # recognise its own packet.
            stats.too_big += 1
            return _too_big(v, self.mtu)
        if self.nat.outbound(v, now) is not NatResult.REWRITTEN:
            stats.nat_failed += 1
            return None
        if v.has_ports and not v.fragment:
            if v.proto == IPPROTO_TCP and v.buf[v.l4 + 13] & TCP_SYN:
                self._clamp(v)
            # The captured packet may carry only a partial (offloaded) checksum; the peer's side checks
            # the real one.
            v.compute_checksums()
        self.pending.append(bytes(v.buf[:length]))
        stats.packets_out += 1
        stats.bytes_out += length
        return None

    def _send_segmented(self, v: PacketView, now: float) -> bytearray | None:
        stats = self.stats
        original = bytes(v.buf[: v.length])
        if self.nat.outbound(v, now) is not NatResult.REWRITTEN:
            stats.nat_failed += 1
            return None
        # segment_tcp recomputes every checksum, so the partial one of an offloaded packet does not matter.
        segments = segment_tcp(memoryview(v.buf)[: v.length], self.mtu, self._seg_view)
        if isinstance(segments, Rejected):
            stats.too_big += 1
            view = PacketView()
            view.parse(bytearray(original), len(original))
            return _too_big(view, self.mtu)
        stats.segmented += 1
        for segment in segments:
            self.pending.append(bytes(segment))
            stats.bytes_out += len(segment)
        stats.packets_out += len(segments)
        return None

    def _clamp(self, v: PacketView) -> None:
        if clamp_mss(v, self.mss_v4 if v.version == 4 else self.mss_v6).name == "CLAMPED":
            self.stats.mss_clamped += 1

    def receive(self, packet: bytes | bytearray, now: float) -> bytearray | None:
        """A decrypted packet from the device, rewritten back to the app's address and port; None
        (counted) when it belongs to no flow of ours or is malformed."""
        data = bytearray(packet)
        v = self._in_view
        if not v.parse(data, len(data)):
            self.stats.malformed += 1
            return None
        if self.nat.inbound(v, now) is not NatResult.REWRITTEN:
            self.stats.orphans += 1
            return None
        if v.has_ports and v.proto == IPPROTO_TCP and data[v.l4 + 13] & TCP_SYN:
            self._clamp(v)  # the SYN-ACK's MSS: the remote's segments must fit the tunnel as well
        self.stats.packets_in += 1
        self.stats.bytes_in += v.length
        if v.length < len(data):
            del data[v.length :]
        return data

    def expire(self, now: float) -> None:
        self.nat.expire(now)


def _too_big(v: PacketView, mtu: int) -> bytearray | None:
    try:
        return too_big_reply(v.buf[: v.length], mtu)
    except ValueError:
        return None  # an IPv6 tunnel MTU below 1280 cannot be announced; the packet is just dropped


class PacketDevice(Protocol):
    """What the router needs of a packet tunnel's device (``provider.wireguard.device.WireGuardDevice``):
    IP packets in through ``send_packets``, decrypted ones out through the ``on_packets`` callback."""

    on_packets: Callable[[list[bytes]], None]

    def send_packets(self, packets: Sequence[bytes]) -> None: ...


# The loop is imported late: packet_router imports this module for the path.
def _router_loop_base() -> type[Any]:
    from awg_split_tunnel.core.packet_router import RouterLoop

    return RouterLoop


TICK = 0.2
"""Seconds between timer runs of the router (held flows get an earlier tick when they need one)."""


class AsyncRouterLoop:
    """The router's I/O adapter on an asyncio loop, with packet tunnels' devices on the same loop.

    Divert handles are read in ``add_reader`` callbacks; packets a route sends to a packet tunnel go to its
    device after each batch; the device's decrypted packets come back through ``on_packets``, are DNATed
    and injected inbound on the interface the flow left by. One thread does it all: no locks, and no
    second thread competing for the GIL. Linux only (the handles must be pollable descriptors).
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
        base = _router_loop_base()
        self.router = router
        self._io = base(router, network, events, accept_pid=accept_pid, clock=clock)
        self.network = network
        self._clock = clock
        self._devices: dict[str, PacketDevice] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fds: list[int] = []
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
        loop = self._loop
        assert loop is not None
        fd = self.network.fileno()
        if fd is None:
            raise OSError("the divert handle has no pollable descriptor on this platform")
        loop.add_reader(fd, self._on_network)
        self._fds = [fd]
        for handle in self._io.events:
            efd = handle.fileno()
            if efd is not None:
                loop.add_reader(efd, self._on_events)
                self._fds.append(efd)

    def _unwatch(self) -> None:
        if self._loop is not None:
            for fd in self._fds:
                self._loop.remove_reader(fd)
        self._fds = []

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
        from awg_split_tunnel.core.packet_router import BATCH, Verdict

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
            if verdict is Verdict.REINJECT:
                send(c_buf, n, addr)
            elif verdict is Verdict.INJECT_INBOUND:
                net.set_inbound(addr, True)
                send(c_buf, n, addr)
        self._flush()
        return full

    def _on_events(self) -> None:
        def drain() -> None:
            self._io._drain_events(self._clock())
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
        if router._outgoing:
            self._io._send_outgoing()
        for tunnel_id, packets in router.take_tunnel_packets():
            device = self._devices.get(tunnel_id)
            if device is None:
                router.stats.unroutable += len(packets)
                continue
            device.send_packets(packets)
        if router._outgoing:
            self._io._send_outgoing()
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


class RouterIO(Protocol):
    """A data path's I/O adapter as ``RouterService`` drives it: ``AsyncRouterLoop`` (divert: every packet
    through the router) or the kernel data path's (first packets only; ``platform.linux.kernel_datapath``)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def attach_device(self, tunnel_id: str, device: Any) -> None: ...
    def detach_device(self, tunnel_id: str) -> None: ...
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


DeviceFactories = Mapping[str, Callable[[], Any]]
"""Tunnel id → a picklable callable building its ``ManagedDevice`` (``packet_router.DeviceFactory``)."""


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
        for device in self.devices.values():
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
        fd = self.conn.fileno()
        loop.add_reader(fd, self._on_control)
        tasks = [loop.create_task(self._apply_messages()), loop.create_task(self._retry())]
        try:
            await self._stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            loop.remove_reader(fd)
            await self.close()

    def _on_control(self) -> None:
        try:
            while self.conn.poll(0):
                self._messages.put_nowait(self.conn.recv())
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
        from awg_split_tunnel.core.rule_engine import RuleEngine

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
            case SnapshotRequest():
                stats, flows = self.snapshot()
                self._send(Snapshot(stats, tuple(flows)))
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
            device.connect()
        if io is not None:
            io.apply_now()
        running = ", ".join(f"{t} (port {d.port})" for t, d in self.devices.items())
        log.info("[Router] packet tunnels now: %s", running or "none")

    def snapshot(self) -> tuple[dict[str, Any], list[FlowRow]]:
        """(router stats with per packet tunnel counters, flows as rows) for ``status``/``connections``."""
        import dataclasses

        from awg_split_tunnel.core.packet_router import flow_row

        stats = dataclasses.asdict(self.router.stats)
        stats["packet_tunnels"] = self.router.packet_tunnel_stats()
        for tunnel_id, device in self.devices.items():
            stats["packet_tunnels"].setdefault(tunnel_id, {}).update(device_report(device))
        return stats, [flow_row(e) for e in self.router.connections()]

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

    def _device_ports(self) -> frozenset[int]:
        return frozenset(device.port for device in self.devices.values() if device.port)

    def _with_device_ports(self, routes: Mapping[str, Any]) -> dict[str, Any]:
        import dataclasses

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
    ``StartFailed`` message instead of ``Ready`` when it cannot start."""
    asyncio.run(_serve(router, states, open_handles, factories, conn, make_io))


async def _serve(
    router: Any,
    states: dict[str, TunnelState],
    open_handles: Callable[..., Any],
    factories: DeviceFactories,
    conn: Any,
    make_io: Callable[[Any, list[int]], RouterIO] | None,
) -> None:
    from awg_split_tunnel.errors import AwgSplitTunnelError

    service = RouterService(router, states, open_handles, conn, make_io)
    try:
        await service.open(factories)
    except Exception as exc:
        known = isinstance(exc, AwgSplitTunnelError)
        conn.send(StartFailed(str(exc) if known else f"{type(exc).__name__}: {exc}"))
        return
    await service.serve()
