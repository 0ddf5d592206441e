"""Packet tunnels added, changed and removed while the router process runs (``RouterService``).

The service runs on a real asyncio loop with a real pipe to the test (the control plane's side), a fake
divert handle (a pipe descriptor, packets queued by the test) and fake devices.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import multiprocessing
import time
from collections.abc import Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from awg_split_tunnel.core.packet_router import PacketRouter, TunnelRoute
from awg_split_tunnel.core.packet_tunnel import PacketTunnelRoute
from awg_split_tunnel.core.policy import FallbackPolicy, TunnelState
from awg_split_tunnel.core.router_messages import (
    ChangeDevices,
    DeviceStateChanged,
    FromRouter,
    Ready,
    RouterStatus,
    SetRules,
    SetTunnelState,
    StatusRequest,
    Stop,
)
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.packet import IPPROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN, PacketView, build_packet
from awg_split_tunnel.process.matcher import Platform
from awg_split_tunnel.router.service import RouterService


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


APP, WEB, TUN, TUN2 = ip("198.18.0.1"), ip("198.18.0.10"), ip("198.19.0.2"), ip("198.19.5.2")
PIDS = {100: "/usr/bin/app-wg", 200: "/usr/bin/app-direct"}
ROUTE = PacketTunnelRoute(TUN, None, 1420)
SOCKS = TunnelRoute(1080)


class FakeNetwork:
    """A NETWORK handle: packets pushed by the test come out of ``recv_into``; ``send`` records."""

    def __init__(self, ports: Sequence[int], journal: list[str]) -> None:
        import os

        self.ports = list(ports)
        self.priority = 1041
        self.journal = journal
        self._r, self._w = os.pipe()
        self.queue: list[bytes] = []
        self.sent: list[tuple[bytes, bool]] = []

    def push(self, packet: bytes) -> None:
        import os

        self.queue.append(packet)
        os.write(self._w, b"x")

    def open(self) -> None:
        self.journal.append(f"open {self.ports} at {self.priority}")

    def close(self) -> None:
        self.journal.append(f"close {self.ports}")

    def fileno(self) -> int:
        return self._r

    def recv_into(self, buf: bytearray, c_buf: object, addr: SimpleNamespace, timeout_ms: int = 0) -> int:
        import os

        if not self.queue:
            return 0
        packet = self.queue.pop(0)
        os.read(self._r, 1)
        buf[: len(packet)] = packet
        addr.inbound = False
        return len(packet)

    def send(self, c_buf: bytearray, length: int, addr: SimpleNamespace) -> bool:
        self.sent.append((bytes(c_buf[:length]), addr.inbound))
        return True

    def refresh(self) -> bool:
        return False

    def new_buffer(self) -> tuple[bytearray, bytearray, SimpleNamespace]:
        buf = bytearray(65535)
        return buf, buf, SimpleNamespace(inbound=False)

    def copy_address(self, addr: SimpleNamespace) -> SimpleNamespace:
        return SimpleNamespace(**vars(addr))

    def set_inbound(self, addr: SimpleNamespace, inbound: bool = True) -> None:
        addr.inbound = inbound

    def c_buffer(self, data: bytearray) -> bytearray:
        return data


class Handles:
    """The handle factory: a new ``FakeNetwork`` per call, leaving out the ports it was given."""

    def __init__(self) -> None:
        self.journal: list[str] = []
        self.networks: list[FakeNetwork] = []

    def __call__(self, ports: Sequence[int] = ()) -> tuple[FakeNetwork, list[Any], Callable[[int], bool]]:
        network = FakeNetwork(ports, self.journal)
        self.networks.append(network)
        return network, [], lambda pid: True

    @property
    def current(self) -> FakeNetwork:
        return self.networks[-1]

    def all_sent(self) -> list[tuple[bytes, bool]]:
        return [sent for network in self.networks for sent in network.sent]


class FakeDevice:
    """A ``ManagedDevice``: CONNECTING once started, UP on ``handshake()``, DOWN when stopped."""

    def __init__(self, port: int, fail: str | None = None) -> None:
        self.port = port
        self.fail = fail
        self.state = TunnelState.DOWN
        self.state_listeners: list[Callable[[TunnelState, str], None]] = []
        self.on_packets: Callable[[list[bytes]], None] = lambda packets: None
        self.sent: list[bytes] = []
        self.started = self.stopped = False
        self.connects = 0

    async def start(self) -> None:
        if self.fail is not None:
            raise OSError(98, self.fail)
        self.started = True
        self._set(TunnelState.CONNECTING, "device started")

    async def stop(self) -> None:
        self.stopped = True
        self._set(TunnelState.DOWN, "device stopped")

    def connect(self) -> None:
        self.connects += 1

    def handshake(self) -> None:
        self._set(TunnelState.UP, "handshake completed")

    def statistics(self) -> SimpleNamespace:
        sent = self.sent
        return SimpleNamespace(
            rx_bytes=0, tx_bytes=sum(map(len, sent)), datagrams_in=0, datagrams_out=len(sent), peers={}
        )

    @property
    def dropped(self) -> dict[str, int]:
        return {}

    def send_packets(self, packets: Sequence[bytes]) -> None:
        self.sent.extend(packets)

    def _set(self, state: TunnelState, reason: str) -> None:
        if state is not self.state:
            self.state = state
            for listener in list(self.state_listeners):
                listener(state, reason)


DEVICES: dict[str, FakeDevice] = {}
"""Devices by name, for factories that must pickle (they cross the pipe, as the daemon's do)."""


def _registered(name: str) -> FakeDevice:
    return DEVICES[name]


def factory(device: FakeDevice) -> Callable[[], FakeDevice]:
    name = f"device-{id(device)}"
    DEVICES[name] = device
    return functools.partial(_registered, name)


class World:
    """A running ``RouterService`` (no packet tunnel at start, a SOCKS5 route), the control plane's end
    of its pipe, and what it received."""

    def __init__(self, factories: dict[str, Callable[[], Any]] | None = None, serve_uapi: Any = None) -> None:
        self.control, child = multiprocessing.Pipe()
        self.states: dict[str, TunnelState] = {"socks": TunnelState.UP}
        rules = [
            Rule("app-wg", "wg", FallbackPolicy.BLOCK),
            Rule("app-direct", "direct"),
        ]
        tunnels: dict[str, Any] = {"socks": SOCKS}
        if factories:
            tunnels["wg"] = ROUTE
        self.router = PacketRouter(
            RuleEngine(rules, "direct", Platform.POSIX),
            self.states.get,
            tunnels,
            own_pids={999},
            exe_of=PIDS.get,
            os_lookup=lambda *a: None,
        )
        self.handles = Handles()
        self.service = RouterService(self.router, self.states, self.handles, child, serve_uapi=serve_uapi)
        self.factories = factories or {}
        self.received: list[FromRouter] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> World:
        await self.service.open(self.factories)
        self._task = asyncio.get_running_loop().create_task(self.service.serve())
        await self.until(lambda: Ready() in self.received, "ready")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.control.send(Stop())
        assert self._task is not None
        await asyncio.wait_for(self._task, 5.0)
        self.control.close()

    def drain(self) -> None:
        while self.control.poll(0):
            self.received.append(self.control.recv())

    async def until(self, condition: Callable[[], object], what: str, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if condition():
                return
            await asyncio.sleep(0.01)
        pytest.fail(f"not within {timeout}s: {what}; received {self.received}")

    def snapshot(self) -> RouterStatus | None:
        """The first ``RouterStatus`` received."""
        return next((m for m in self.received if isinstance(m, RouterStatus)), None)

    def states_told(self, tunnel_id: str) -> list[tuple[TunnelState, str]]:
        self.drain()
        return [
            (m.state, m.reason)
            for m in self.received
            if isinstance(m, DeviceStateChanged) and m.tunnel_id == tunnel_id
        ]

    def connect(self, pid: int, sport: int) -> None:
        self.router.connect_event(IPPROTO_TCP, WEB, 80, pid, time.monotonic())

    def send_syn(self, sport: int) -> None:
        self.handles.current.push(bytes(build_packet(APP, WEB, IPPROTO_TCP, sport, 80, tcp_flags=TCP_SYN)))

    def send_ack(self, sport: int) -> None:
        packet = build_packet(APP, WEB, IPPROTO_TCP, sport, 80, tcp_flags=TCP_ACK, seq=78, ack=5)
        self.handles.current.push(bytes(packet))


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 20.0))


def parse(packet: bytes) -> PacketView:
    v = PacketView()
    data = bytearray(packet)
    assert v.parse(data, len(data))
    return v


def app_packets_sent_out(handles: Handles, sport: int) -> list[bytes]:
    """What of the app's flow left unchanged (outbound): a leak when the app is routed into a tunnel."""
    return [
        data
        for data, inbound in handles.all_sent()
        if not inbound and parse(data).src_addr == APP and parse(data).ports()[0] == sport
    ]


def resets_to_app(handles: Handles, sport: int) -> int:
    count = 0
    for data, inbound in handles.all_sent():
        v = parse(data)
        if inbound and v.dst_addr == APP and v.ports()[1] == sport and data[v.l4 + 13] & TCP_RST:
            count += 1
    return count


async def add_wg(world: World, device: FakeDevice, route: PacketTunnelRoute = ROUTE) -> None:
    world.control.send(ChangeDevices({"socks": SOCKS, "wg": route}, {"wg": factory(device)}, ()))
    await world.until(lambda: device.connects == 1, "the new device connected")


# -- added ---------------------------------------------------------------------------------------------


def test_tunnel_added_while_running_starts_its_device_and_carries_the_next_connection_once_up() -> None:
    async def scenario() -> None:
        async with World() as world:
            device = FakeDevice(51900)
            await add_wg(world, device)
            assert device.started
            # Its port is left out of the capture: a new handle, opened before the old one closed, at
            # the other priority.
            assert world.handles.journal == ["open [] at 1041", "open [51900] at 1042", "close []"]
            assert world.service.excluded_ports == {51900}
            assert world.states_told("wg") == [(TunnelState.CONNECTING, "device started")]
            # Not UP yet: the block app's SYN is refused, nothing of it leaves directly.
            world.connect(100, 40000)
            world.send_syn(40000)
            await world.until(lambda: resets_to_app(world.handles, 40000) == 1, "refused while CONNECTING")
            device.handshake()
            await world.until(lambda: world.states_told("wg")[-1][0] is TunnelState.UP, "UP told")
            world.connect(100, 40001)
            world.send_syn(40001)
            await world.until(lambda: device.sent, "the SYN reached the device")
            assert parse(device.sent[0]).src_addr == TUN
            assert app_packets_sent_out(world.handles, 40000) == []
            assert app_packets_sent_out(world.handles, 40001) == []
            # The route now knows the device's port: its datagrams would pass unrouted even if captured.
            route = world.router.routes["wg"]
            assert isinstance(route, PacketTunnelRoute) and route.listen_port == 51900

    run(scenario)


def test_device_that_cannot_start_is_reported_down_with_the_reason_and_the_rest_keeps_running() -> None:
    async def scenario() -> None:
        async with World() as world:
            device = FakeDevice(51900, fail="Address already in use")
            world.control.send(ChangeDevices({"socks": SOCKS, "wg": ROUTE}, {"wg": factory(device)}, ()))
            await world.until(lambda: world.states_told("wg"), "a state for wg")
            ((state, reason),) = world.states_told("wg")
            assert state is TunnelState.DOWN and "Address already in use" in reason
            assert world.handles.journal == ["open [] at 1041"], (
                "no new handle for a device that is not there"
            )
            world.control.send(StatusRequest(1))
            await world.until(lambda: world.snapshot() is not None, "snapshot answered")
            # The block app stays blocked.
            world.connect(100, 40000)
            world.send_syn(40000)
            await world.until(lambda: resets_to_app(world.handles, 40000) == 1, "refused")
            assert app_packets_sent_out(world.handles, 40000) == []

    run(scenario)


# -- removed -------------------------------------------------------------------------------------------


def test_tunnel_removed_while_running_resets_its_flows_stops_its_device_and_leaks_nothing() -> None:
    async def scenario() -> None:
        device = FakeDevice(51900)
        async with World({"wg": factory(device)}) as world:
            assert world.handles.journal == ["open [51900] at 1041"]
            device.handshake()
            await world.until(lambda: world.states["wg"] is TunnelState.UP, "UP")
            world.connect(100, 40000)
            world.send_syn(40000)
            world.send_ack(40000)  # established: the router knows what to reset it with
            await world.until(lambda: len(device.sent) == 2, "SYN and ACK reached the device")
            world.control.send(ChangeDevices({"socks": SOCKS}, {}, ("wg",)))
            await world.until(lambda: device.stopped, "the device stopped")
            # The app is reset at once (not at its next packet) and what it still sends is dropped.
            await world.until(lambda: resets_to_app(world.handles, 40000) == 1, "RST to the app")
            world.send_ack(40000)
            world.connect(100, 40001)
            world.send_syn(40001)
            await world.until(lambda: resets_to_app(world.handles, 40001) == 1, "the next SYN refused")
            assert app_packets_sent_out(world.handles, 40000) == []
            assert app_packets_sent_out(world.handles, 40001) == []
            assert len(device.sent) == 2
            assert world.states_told("wg")[-1] == (TunnelState.DOWN, "removed")
            # Its port is captured again (an app may be given it next).
            assert world.handles.journal[-2:] == ["open [] at 1042", "close [51900]"]
            assert "wg" not in world.router.routes and "wg" not in world.service.devices

    run(scenario)


def test_direct_app_keeps_working_while_a_tunnel_is_removed() -> None:
    async def scenario() -> None:
        device = FakeDevice(51900)
        async with World({"wg": factory(device)}) as world:
            world.control.send(ChangeDevices({"socks": SOCKS}, {}, ("wg",)))
            await world.until(lambda: device.stopped, "the device stopped")
            world.connect(200, 40005)
            world.send_syn(40005)
            await world.until(
                lambda: app_packets_sent_out(world.handles, 40005), "the direct app's SYN passed"
            )

    run(scenario)


# -- changed -------------------------------------------------------------------------------------------


def test_changed_tunnel_replaces_its_device_and_new_connections_use_the_new_address() -> None:
    async def scenario() -> None:
        old = FakeDevice(51900)
        async with World({"wg": factory(old)}) as world:
            old.handshake()
            await world.until(lambda: world.states["wg"] is TunnelState.UP, "UP")
            world.connect(100, 40000)
            world.send_syn(40000)
            world.send_ack(40000)
            await world.until(lambda: len(old.sent) == 2, "SYN and ACK reached the old device")
            new = FakeDevice(51901)
            await add_wg(world, new, PacketTunnelRoute(TUN2, None, 1380))
            assert old.stopped and new.started
            await world.until(lambda: resets_to_app(world.handles, 40000) == 1, "the old flow reset")
            told = world.states_told("wg")
            assert told[-2:] == [(TunnelState.DOWN, "replaced"), (TunnelState.CONNECTING, "device started")]
            assert world.handles.journal[-2:] == ["open [51901] at 1042", "close [51900]"]
            new.handshake()
            await world.until(lambda: world.states["wg"] is TunnelState.UP, "UP again")
            world.connect(100, 40001)
            world.send_syn(40001)
            await world.until(lambda: new.sent, "the SYN reached the new device")
            assert parse(new.sent[0]).src_addr == TUN2
            assert len(old.sent) == 2
            assert app_packets_sent_out(world.handles, 40000) == []
            assert app_packets_sent_out(world.handles, 40001) == []

    run(scenario)


class ControlSockets:
    """Stands in for ``serve_device_uapi``: which devices got a control socket, under which name, and
    which sockets were closed."""

    def __init__(self) -> None:
        self.served: list[tuple[Any, str]] = []
        self.stopped: list[str] = []

    async def __call__(self, device: Any, name: str) -> Any:
        self.served.append((device, name))
        sockets = self

        class Socket:
            async def stop(self) -> None:
                sockets.stopped.append(name)

        return Socket()


def test_each_device_answers_wg_under_its_tunnel_id_until_it_stops() -> None:
    async def scenario() -> None:
        sockets = ControlSockets()
        first = FakeDevice(51900)
        async with World({"wg": factory(first)}, serve_uapi=sockets) as world:
            assert sockets.served == [(first, "wg")]  # the divert path: no interface, the tunnel id
            second = FakeDevice(51901)
            await add_wg(world, second)
            assert sockets.served == [(first, "wg"), (second, "wg")] and sockets.stopped == ["wg"]
            world.control.send(ChangeDevices({"socks": SOCKS}, {}, ("wg",)))
            await world.until(lambda: second.stopped, "the device stopped")
            assert sockets.stopped == ["wg", "wg"]

    run(scenario)


def test_state_messages_of_the_control_plane_do_not_override_a_running_devices_own_state() -> None:
    async def scenario() -> None:
        device = FakeDevice(51900)
        async with World({"wg": factory(device)}) as world:
            device.handshake()
            world.control.send(SetTunnelState("wg", TunnelState.DOWN))
            world.control.send(StatusRequest(1))
            await world.until(lambda: world.snapshot() is not None, "snapshot answered")
            assert world.states["wg"] is TunnelState.UP
            snapshot = world.snapshot()
            assert snapshot is not None
            assert snapshot.stats["packet_tunnels"]["wg"]["state"] == str(TunnelState.UP)

    run(scenario)


def test_rules_from_the_control_plane_hold_for_the_very_next_connection() -> None:
    async def scenario() -> None:
        async with World() as world:
            await world.service.handle(
                SetRules((Rule("app-direct", "drop"),), "direct", FallbackPolicy.ALLOW_DIRECT)
            )
            world.connect(200, 40007)
            world.send_syn(40007)
            await world.until(lambda: resets_to_app(world.handles, 40007) == 1, "the SYN refused")
            assert app_packets_sent_out(world.handles, 40007) == []

    run(scenario)
