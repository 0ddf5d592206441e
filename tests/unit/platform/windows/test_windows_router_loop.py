"""The router on Windows' loop: the real ``PacketRouter`` and ``AsyncRouterLoop``, the WinDivert handles of
``platform.windows`` read by their reader threads in batches, against a WinDivert that behaves as
documented (``fake_windivert``): events after packets, one CONNECT per UDP remote with the local port, a
missing event, the System process's events, a cancel racing a completed read, 64 packets in one read."""

from __future__ import annotations

import asyncio
import ipaddress
import multiprocessing
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from fake_windivert import FakeWinDivert, network_address, socket_address
from pydivert import Layer

from awg_split_tunnel.core.packet_router import ROUTER_FILTER, PacketRouter, TunnelRoute
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.router_messages import Ready, SetTunnelState, Stop
from awg_split_tunnel.core.rule_engine import Rule, RuleEngine
from awg_split_tunnel.net.packet import IPPROTO_TCP, IPPROTO_UDP, TCP_SYN, PacketView, build_packet
from awg_split_tunnel.platform.divert import SocketEventKind
from awg_split_tunnel.platform.windows.handles import windows_router_handles
from awg_split_tunnel.process.matcher import Platform
from awg_split_tunnel.router import service
from awg_split_tunnel.router.divert_loop import AsyncRouterLoop

pytestmark = pytest.mark.windows

APP = ipaddress.ip_address("198.18.0.1").packed
WEB = ipaddress.ip_address("198.18.0.10").packed
DNS = ipaddress.ip_address("198.18.0.53").packed
PROXY_TCP, PROXY_UDP = 15001, 15002
PIDS = {100: r"C:\Apps\app-socks.exe", 200: r"C:\Apps\app-direct.exe"}
CONNECT = int(SocketEventKind.CONNECT)

T = TypeVar("T")


class SocketTable:
    """The IP Helper tables as psutil returns them (``net_connections``), recording who read them."""

    def __init__(self) -> None:
        self.rows: list[SimpleNamespace] = []
        self.reads: list[tuple[str, str]] = []

    def add(self, kind: str, pid: int, local_port: int, remote: str = "", remote_port: int = 0) -> None:
        raddr = SimpleNamespace(ip=remote, port=remote_port) if remote else ()
        self.rows.append(
            SimpleNamespace(
                kind=kind, pid=pid, laddr=SimpleNamespace(ip="0.0.0.0", port=local_port), raddr=raddr
            )
        )

    def __call__(self, kind: str) -> list[SimpleNamespace]:
        self.reads.append((kind, threading.current_thread().name))
        return [row for row in self.rows if row.kind == kind]


class Env:
    """A PacketRouter (app-socks → a SOCKS5 tunnel's proxy, app-direct → direct) on Windows' handles."""

    def __init__(self, hold_timeout: float = 0.05) -> None:
        self.fake = FakeWinDivert()
        self.table = SocketTable()
        rules = [Rule("app-socks", "socks"), Rule("app-direct", "direct")]
        self.router = PacketRouter(
            RuleEngine(rules, "direct", Platform.WINDOWS),
            {"socks": TunnelState.UP}.get,
            {"socks": TunnelRoute(PROXY_TCP, PROXY_UDP)},
            own_pids={999},
            exe_of=PIDS.get,
            ancestors_of=None,
            owns=None,
            hold_timeout=hold_timeout,
        )
        network, events, accept_pid = self.handles()
        self.network = network
        self.loop = AsyncRouterLoop(self.router, network, events, accept_pid=accept_pid)

    def handles(self, ports: Sequence[int] = ()) -> Any:
        return windows_router_handles(self.fake, self.fake.opener, ROUTER_FILTER, self.table)

    def packets(self, *items: bytearray) -> None:
        self.fake.queue(Layer.NETWORK, [(bytes(p), network_address()) for p in items])

    def connect(self, pid: int, proto: int, local_port: int, remote: bytes, remote_port: int) -> None:
        self.fake.queue(
            Layer.SOCKET,
            [(b"", socket_address(CONNECT, pid, proto, bytes(4), local_port, remote, remote_port))],
        )

    async def sent(self, count: int) -> list[tuple[PacketView, bool]]:
        """The first ``count`` packets sent back through the NETWORK handle: (packet, injected inbound)."""
        handle = self.fake.handle(Layer.NETWORK)
        await until(lambda: len(handle.sent) >= count)
        return [(_view(data), not addr.Outbound) for data, addr in handle.sent[:count]]


def run(env: Env, scenario: Callable[[], Awaitable[T]]) -> T:
    """``scenario`` with the router loop started on a selector loop (the router process's), then stopped."""

    async def main() -> T:
        await env.loop.start()
        try:
            return await scenario()
        finally:
            await env.loop.stop()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


async def until(condition: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


def syn(sport: int = 40000, dst: bytes = WEB, dport: int = 443) -> bytearray:
    return build_packet(APP, dst, IPPROTO_TCP, sport, dport, tcp_flags=TCP_SYN, seq=77)


def datagram(sport: int, dst: bytes, dport: int = 53, payload: bytes = b"query") -> bytearray:
    return build_packet(APP, dst, IPPROTO_UDP, sport, dport, payload=payload)


def test_a_syn_whose_connect_event_comes_after_it_waits_then_goes_to_its_tunnel() -> None:
    env = Env(hold_timeout=5.0)

    async def scenario() -> list[tuple[PacketView, bool]]:
        env.packets(syn())
        await until(lambda: env.router.stats.held == 1)
        assert env.fake.handle(Layer.NETWORK).sent == []  # held: nothing left, nothing leaked
        env.connect(100, IPPROTO_TCP, 40000, WEB, 443)
        return await env.sent(1)

    ((packet, inbound),) = run(env, scenario)
    # Hairpinned to the SOCKS5 tunnel's proxy, injected inbound, checksums valid.
    assert inbound and (packet.dst_port, packet.src_addr, packet.dst_addr) == (PROXY_TCP, WEB, APP)
    assert packet.checksums_valid()
    assert env.table.reads == []


def test_one_udp_socket_to_two_remotes_has_one_connect_each_with_its_local_port() -> None:
    env = Env(hold_timeout=5.0)

    async def scenario() -> list[tuple[PacketView, bool]]:
        # sendto() on one unconnected socket: Windows raises one CONNECT per new remote, each carrying the
        # socket's local port; the second datagram to a remote raises none.
        env.connect(100, IPPROTO_UDP, 5353, DNS, 53)
        env.packets(datagram(5353, DNS), datagram(5353, DNS, payload=b"again"))
        await until(lambda: len(env.fake.handle(Layer.NETWORK).sent) == 2)
        env.packets(datagram(5353, WEB))
        await until(lambda: env.router.stats.held == 1)
        env.connect(100, IPPROTO_UDP, 5353, WEB, 53)
        return await env.sent(3)

    sent = run(env, scenario)
    assert [(p.dst_port, inbound) for p, inbound in sent] == [(PROXY_UDP, True)] * 3
    assert [p.src_addr for p, _ in sent] == [DNS, DNS, WEB]  # the proxy sees each original remote
    assert env.table.reads == []


def test_a_flow_without_any_event_is_decided_by_a_lookup_off_the_packet_loop() -> None:
    env = Env()
    env.table.add("tcp", 100, 40001, "198.18.0.10", 443)

    async def scenario() -> list[tuple[PacketView, bool]]:
        env.packets(syn(40001))
        return await env.sent(1)

    ((packet, inbound),) = run(env, scenario)
    assert inbound and packet.dst_port == PROXY_TCP
    # One read of the TCP table, by the lookup's own thread: the packet loop never scans it.
    assert env.table.reads == [("tcp", "socket-owners")]
    assert env.router.stats.os_lookups == 1


def test_a_flow_whose_owner_no_lookup_finds_goes_by_the_default_after_the_lookup_timeout() -> None:
    env = Env()

    async def scenario() -> list[tuple[PacketView, bool]]:
        env.packets(syn(40005, dport=8443))
        return await env.sent(1)

    ((packet, inbound),) = run(env, scenario)
    assert not inbound and packet.dst_port == 8443  # default: direct, passed back unchanged
    assert env.table.reads == [("tcp", "socket-owners")]


def test_an_event_of_the_system_process_never_names_a_flows_owner() -> None:
    env = Env()
    env.table.add("tcp", 100, 40002, "198.18.0.10", 443)

    async def scenario() -> list[tuple[PacketView, bool]]:
        # pid 4 (System) reports the flow's exact tuple; the app's own event never comes.
        env.connect(4, IPPROTO_TCP, 40002, WEB, 443)
        env.packets(syn(40002))
        return await env.sent(1)

    ((packet, inbound),) = run(env, scenario)
    # Taken for the System process's, the flow would have gone direct (no rule, no exe); it went to the
    # app's tunnel, whose owner the lookup found.
    assert inbound and packet.dst_port == PROXY_TCP
    assert env.table.reads == [("tcp", "socket-owners")]


def test_a_packet_read_while_its_read_was_being_cancelled_is_routed_not_lost() -> None:
    env = Env(hold_timeout=5.0)

    async def scenario() -> list[tuple[bytes, Any]]:
        env.connect(100, IPPROTO_TCP, 40003, WEB, 443)
        await until(lambda: len(env.router.events) == 1)
        env.fake.wait_reading(Layer.NETWORK)
        old = env.fake.handle(Layer.NETWORK)
        # The NETWORK handle is replaced (as when a device's port is to be left out): the old handle's
        # reader cancels its pending read — and the SYN completes that read in the same instant.
        env.fake.arrive_on_cancel.append((Layer.NETWORK, bytes(syn(40003)), network_address()))
        env.loop.replace_network(env.handles()[0])
        assert env.fake.cancels[0] == (Layer.NETWORK, "completed")
        return old.sent

    sent = run(env, scenario)
    assert len(sent) == 1
    packet, inbound = _view(sent[0][0]), not sent[0][1].Outbound
    assert inbound and packet.dst_port == PROXY_TCP and packet.src_port == 40003


def test_a_reader_that_fails_stops_the_loop_loudly_not_silently() -> None:
    env = Env()

    async def scenario() -> BaseException | None:
        env.fake.wait_reading(Layer.NETWORK)
        env.fake.fail_reading(Layer.NETWORK, 6)  # ERROR_INVALID_HANDLE
        await until(lambda: env.loop.error is not None)
        return env.loop.error

    error = run(env, scenario)
    assert isinstance(error, OSError) and "Windows error 6" in str(error)


def test_64_packets_are_read_in_one_call_and_sent_back_in_one() -> None:
    env = Env(hold_timeout=5.0)

    async def scenario() -> tuple[list[int], list[int], int]:
        env.connect(200, IPPROTO_UDP, 6000, DNS, 53)
        await until(lambda: len(env.router.events) == 1)
        env.fake.wait_reading(Layer.NETWORK)
        env.packets(*(datagram(6000, DNS, payload=bytes([i]) * 1200) for i in range(64)))
        sent = await env.sent(64)
        assert all(not inbound for _, inbound in sent)  # a direct app's: passed back unchanged
        handle = env.fake.handle(Layer.NETWORK)
        return handle.reads, handle.sends, env.router.stats.packets

    reads, sends, routed = run(env, scenario)
    assert reads[0] == 64 and sends == [64] and routed == 64


def _view(data: bytes) -> PacketView:
    v = PacketView()
    buf = bytearray(data)
    assert v.parse(buf, len(buf))
    return v


def test_the_router_process_body_runs_on_windows_loop_fed_by_its_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run_with_devices`` as the router process runs it on Windows: a selector loop, the divert handles
    and the control pipe read by threads (the pipe as a Windows pipe: no ``add_reader``)."""
    env = Env(hold_timeout=5.0)
    monkeypatch.setattr(service, "sys", SimpleNamespace(platform="win32"))
    parent, child = multiprocessing.Pipe()
    states = {"socks": TunnelState.UP}

    body = threading.Thread(
        target=service.run_with_devices, args=(env.router, states, env.handles, {}, child), daemon=True
    )
    body.start()
    try:
        assert parent.poll(5.0) and isinstance(parent.recv(), Ready)
        env.connect(100, IPPROTO_TCP, 40004, WEB, 443)
        env.packets(syn(40004))
        deadline = time.monotonic() + 5.0
        while not env.fake.handle(Layer.NETWORK).sent:
            assert time.monotonic() < deadline, "nothing routed"
            time.sleep(0.005)
        packet = _view(env.fake.handle(Layer.NETWORK).sent[0][0])
        assert packet.dst_port == PROXY_TCP
        parent.send(SetTunnelState("socks", TunnelState.DOWN))
        parent.send(Stop())
        body.join(5.0)
        assert not body.is_alive()
    finally:
        parent.close()
        body.join(5.0)
    assert all(handle.closed for handle in env.fake.handles.values())
