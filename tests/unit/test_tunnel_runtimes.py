"""A stream tunnel's runtime between the router process's flow table and its proxy: a flow the router
forgot, and a tunnel going DOWN, on each data path (the real ``RouterProcess`` mirror, given the messages
the router process sends; the proxy on loopback with the direct provider)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from awg_split_tunnel.core.config import ProxyBounds, Socks5Tunnel, parse_config
from awg_split_tunnel.core.events import EventBus
from awg_split_tunnel.core.packet_router import packed_address
from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.core.router_messages import FlowForgotten, FlowTunnelled
from awg_split_tunnel.core.tunnel_registry import TunnelRegistry
from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.net.packet import IPPROTO_TCP
from awg_split_tunnel.provider.direct import DirectProvider
from awg_split_tunnel.proxy.tunnel_proxy import ProxyLimits, TunnelProxy
from awg_split_tunnel.router.process import RouterProcess, RouterSettings
from awg_split_tunnel.tunnel_runtimes import RuntimeContext, StreamTunnelRuntime, proxy_limits

pytestmark = pytest.mark.timeout(30)

LOOPBACK = "127.0.0.1"


def socks_settings(tmp_path: Path) -> Socks5Tunnel:
    text = "default: direct\ntunnels:\n  - id: socks\n    type: socks5\n    server: 198.18.0.20:1080\n"
    tunnel = parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path).tunnels[0]
    assert isinstance(tunnel, Socks5Tunnel)
    return tunnel


class Tunnel:
    """A stream tunnel's runtime whose proxy relays to a loopback server; its router is a
    ``RouterProcess`` mirror that applies the messages the test gives it, as its pipe reader would."""

    def __init__(
        self, dataplane: str, tmp_path: Path, server: Address, limits: ProxyLimits | None = None
    ) -> None:
        self.server = server
        self.router = RouterProcess(RouterSettings((), "direct", {}, {}, dataplane=dataplane), tuple)
        registry = TunnelRegistry(EventBus())
        registry.register("socks", "socks5")
        context = RuntimeContext(
            registry, dataplane, tmp_path, lambda: self.router, self.router.nat_lookup, lambda *a: None
        )
        self.runtime = StreamTunnelRuntime(socks_settings(tmp_path), context)
        # What the daemon does on its loop when the mirror hears a flow was forgotten.
        self.router.on_flow_forgotten = self.runtime.flow_forgotten
        self.proxy = TunnelProxy(
            "socks", DirectProvider(connect_timeout=2), self.router.nat_lookup, LOOPBACK, limits=limits
        )
        self.runtime.proxy = self.proxy

    async def connect(self, fail_closed: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """An app connection the router announced (as the divert path keys it: the proxy's peer)."""
        sock = socket.socket()
        sock.bind((LOOPBACK, 0))
        key = packed_address(LOOPBACK) + sock.getsockname()[1].to_bytes(2, "big")
        announced = FlowTunnelled(
            IPPROTO_TCP,
            key,
            packed_address(self.server[0]),
            self.server[1],
            packed_address(LOOPBACK),
            sock.getsockname()[1],
            "socks",
            4242,
            "/usr/bin/app-block" if fail_closed else "/usr/bin/app-fallback",
            fail_closed,
        )
        self.router._apply(announced)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, self.proxy.tcp_address)
        reader, writer = await asyncio.open_connection(sock=sock)
        return reader, writer, key

    def forget(self, key: bytes) -> None:
        """The router process forgot the flow of ``key``."""
        self.router._apply(FlowForgotten(IPPROTO_TCP, key))
        assert self.router.nat_lookup("tcp", LOOPBACK, int.from_bytes(key[-2:], "big")) is None


Address = tuple[str, int]


def with_tunnel(
    dataplane: str, limits: ProxyLimits | None = None
) -> Callable[[Callable[[Tunnel], Awaitable[None]]], Callable[[Path], None]]:
    def decorate(body: Callable[[Tunnel], Awaitable[None]]) -> Callable[[Path], None]:
        def test(tmp_path: Path) -> None:
            async def main() -> None:
                async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                    with contextlib.suppress(ConnectionError):
                        while data := await reader.read(65536):
                            writer.write(data)
                            await writer.drain()
                    writer.close()

                srv = await asyncio.start_server(echo, LOOPBACK, 0)
                tunnel = Tunnel(dataplane, tmp_path, srv.sockets[0].getsockname()[:2], limits)
                await tunnel.proxy.start()
                try:
                    await body(tunnel)
                finally:
                    await tunnel.proxy.stop()
                    srv.close()

            asyncio.run(main())

        test.__name__ = body.__name__
        return test

    return decorate


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    try:
        writer.write(b"ping")
        return await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    except (ConnectionError, asyncio.IncompleteReadError):
        return False


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


@with_tunnel("divert")
async def test_divert_a_flow_the_router_forgot_is_closed_in_the_proxy(tunnel: Tunnel) -> None:
    reader, writer, key = await tunnel.connect(fail_closed=False)
    kept_reader, kept_writer, _ = await tunnel.connect(fail_closed=False)
    assert await echoes(reader, writer) and await echoes(kept_reader, kept_writer)
    tunnel.forget(key)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 5)
    assert len(tunnel.proxy.tcp_flows) == 1 and tunnel.proxy.counters.withdrawn == 1
    assert await echoes(kept_reader, kept_writer), "the other flow carries on"
    for w in (writer, kept_writer):
        w.close()


@with_tunnel("kernel")
async def test_kernel_a_flow_the_router_stopped_tracking_carries_on(tunnel: Tunnel) -> None:
    # The kernel path's router keeps a flow 75 s after its first packet; conntrack goes on routing it.
    reader, writer, key = await tunnel.connect(fail_closed=True)
    assert await echoes(reader, writer)
    tunnel.forget(key)
    await asyncio.sleep(0.1)
    assert await echoes(reader, writer)
    assert tunnel.proxy.counters.withdrawn == 0
    writer.close()


@pytest.mark.parametrize("dataplane", ["divert", "kernel"])
def test_tunnel_down_resets_fail_closed_flows_and_keeps_allow_direct_ones(
    tmp_path: Path, dataplane: str
) -> None:
    @with_tunnel(dataplane)
    async def body(tunnel: Tunnel) -> None:
        block_reader, block_writer, block_key = await tunnel.connect(fail_closed=True)
        direct_reader, direct_writer, direct_key = await tunnel.connect(fail_closed=False)
        assert await echoes(block_reader, block_writer) and await echoes(direct_reader, direct_writer)
        # Judged by the entry each flow was accepted with, even once the router no longer tracks it.
        tunnel.router.on_flow_forgotten = None  # forgotten, here, without closing anything
        for key in (block_key, direct_key):
            tunnel.forget(key)
        tunnel.runtime.state_changed(TunnelState.DOWN)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(block_reader.read(1), 5)
        assert await echoes(direct_reader, direct_writer), "allow_direct carries on"
        await until(lambda: len(tunnel.proxy.tcp_flows) == 1)
        for w in (block_writer, direct_writer):
            w.close()

    body(tmp_path)


@with_tunnel(
    "divert",
    ProxyLimits(
        max_tcp_flows=8, max_tcp_flows_per_app=1, max_udp_associations=8, max_udp_associations_per_app=8
    ),
)
async def test_flows_refused_over_a_cap_show_in_status(tunnel: Tunnel) -> None:
    from typer.testing import CliRunner

    from awg_split_tunnel.api import control
    from awg_split_tunnel.cli import app

    reader, writer, _ = await tunnel.connect(fail_closed=True)
    assert await echoes(reader, writer)
    refused_reader, refused_writer, _ = await tunnel.connect(fail_closed=True)  # the same app again
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(refused_reader.read(1), 5)
    row: dict[str, Any] = {"id": "socks", "type": "socks5", "state": "up"}
    tunnel.runtime.report(row, None)
    assert row["flows"] == 1
    assert row["proxy"]["tcp_refused"] == 1 and row["proxy"]["tcp_flows"] == 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(control, "request", lambda command, **_: {"tunnels": [row], "router": {}})
        shown = CliRunner().invoke(app, ["status"], terminal_width=200)
    assert "socks: refused over the proxy's caps: tcp_refused 1" in shown.output, shown.output
    for w in (writer, refused_writer):
        w.close()


def bounds_of(tmp_path: Path, block: str) -> ProxyBounds:
    text = "default: direct\nproxy:\n" + block
    return parse_config(text, file=str(tmp_path / "config.yaml"), base_dir=tmp_path).proxy


def test_the_config_proxy_block_sets_caps_and_timeouts_and_the_rest_follow_the_defaults(
    tmp_path: Path,
) -> None:
    default = ProxyLimits.default()
    assert proxy_limits(ProxyBounds()) == default
    limits = proxy_limits(bounds_of(tmp_path, "  max_flows: 100\n  half_close_timeout: 15\n"))
    assert (limits.max_tcp_flows, limits.max_tcp_flows_per_app, limits.half_close_timeout) == (100, 50, 15.0)
    assert limits.max_udp_associations == default.max_udp_associations
    assert limits.tcp_idle_timeout == default.tcp_idle_timeout
    limits = proxy_limits(bounds_of(tmp_path, "  max_udp_associations_per_app: 3\n"))
    assert limits.max_udp_associations_per_app == 3


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ("  max_flows: 0\n", "config.yaml:3, key 'proxy.max_flows': Input should be greater than 0"),
        ("  udp_idle_timeout: soon\n", "key 'proxy.udp_idle_timeout': Input should be a valid number"),
        ("  max_flow: 10\n", "key 'proxy.max_flow': unknown key"),
    ],
)
def test_a_bad_proxy_block_is_refused_naming_the_line_and_key(
    tmp_path: Path, block: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        bounds_of(tmp_path, block)


@with_tunnel("divert", ProxyLimits.for_open_files(1 << 20))
async def test_a_changed_proxy_block_caps_the_next_flows(tunnel: Tunnel) -> None:
    reader, writer, _ = await tunnel.connect(fail_closed=True)
    assert await echoes(reader, writer)
    tunnel.runtime.proxy_bounds_changed(ProxyBounds(max_flows_per_app=1))
    refused_reader, refused_writer, _ = await tunnel.connect(fail_closed=True)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(refused_reader.read(1), 5)
    assert await echoes(reader, writer), "the flow already open stays"
    assert tunnel.proxy.counters.tcp_refused == 1
    for w in (writer, refused_writer):
        w.close()
