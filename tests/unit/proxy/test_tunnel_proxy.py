"""TunnelProxy on loopback with the direct provider and a fake NAT table standing in for the router."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.provider.direct import DirectProvider
from awg_split_tunnel.provider.interface import Address, StreamPair, StreamProvider, UdpChannel
from awg_split_tunnel.proxy.tunnel_proxy import Protocol, ProxyLimits, TunnelProxy


def Target(ip: str, port: int, pid: int | None = None, exe: str | None = None) -> SimpleNamespace:
    """A flow as the router answers the proxy's lookup (what ``proxy.tunnel_proxy.NatTarget`` asks)."""
    return SimpleNamespace(
        orig_dst_ip=ip, upstream_ip=ip, orig_dst_port=port, pid=pid, exe=exe, fail_closed=False
    )


pytestmark = pytest.mark.timeout(30)


def limits(**changes: Any) -> ProxyLimits:
    """Generous caps (as for a large open-file limit), with ``changes`` applied."""
    return dataclasses.replace(ProxyLimits.for_open_files(1 << 20), **changes)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeNat:
    """The router's NAT table: peer (as the proxy sees it) -> original destination."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str, int], SimpleNamespace] = {}
        self.lookups: list[tuple[str, str, int]] = []

    def __call__(self, proto: Protocol, ip: str, port: int) -> SimpleNamespace | None:
        self.lookups.append((proto, ip, port))
        return self.entries.get((proto, ip, port))


async def server(handler: Handler) -> tuple[asyncio.Server, Address]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[:2]


async def app_connect(
    proxy: TunnelProxy, nat: FakeNat, dst: Address, pid: int | None = None, exe: str | None = None
) -> StreamPair:
    """Connect like a redirected app: the NAT entry is keyed by the app socket's address."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    nat.entries[("tcp", *sock.getsockname())] = Target(dst[0], dst[1], pid, exe)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, proxy.tcp_address)
    return await asyncio.open_connection(sock=sock)


def on_proxy(body: Callable[[TunnelProxy, FakeNat], Awaitable[None]]) -> Callable[[bool], None]:
    """Run ``body`` in a fresh event loop with a started proxy (direct provider) and an empty NAT table,
    once relaying TCP with splice (where the OS has it) and once through asyncio streams."""

    @pytest.mark.parametrize("splice", [True, False], ids=["splice", "streams"])
    def test(splice: bool) -> None:
        async def main() -> None:
            nat = FakeNat()
            provider = DirectProvider(connect_timeout=2)
            proxy = TunnelProxy("office", provider, nat, "127.0.0.1", splice=splice)
            await proxy.start()
            try:
                await body(proxy, nat)
            finally:
                await proxy.stop()

        asyncio.run(main())

    test.__name__ = body.__name__
    return test


def in_loop(body: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    def test() -> None:
        asyncio.run(body())  # type: ignore[arg-type]

    return test


async def echo_upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


@on_proxy
async def test_flow_reaches_the_original_destination_and_is_counted(proxy: TunnelProxy, nat: FakeNat) -> None:
    srv, dst = await server(echo_upper)
    async with srv:
        reader, writer = await app_connect(proxy, nat, dst, pid=4242, exe="/usr/bin/app-socks")
        writer.write(b"hello through the tunnel")
        assert await reader.readexactly(24) == b"HELLO THROUGH THE TUNNEL"
        [flow] = proxy.tcp_flows
        assert (flow.dst, flow.pid, flow.exe) == (dst, 4242, "/usr/bin/app-socks")
        assert (flow.bytes_up, flow.bytes_down) == (24, 24)
        writer.close()
        await writer.wait_closed()
        await _until(lambda: not proxy.tcp_flows)
    assert nat.lookups[0][0] == "tcp" and nat.lookups[0][1] == "127.0.0.1"
    assert proxy.counters.tcp_flows == 1
    assert (proxy.counters.bytes_up, proxy.counters.bytes_down) == (24, 24)


@on_proxy
async def test_megabytes_both_ways_arrive_whole_and_in_order(proxy: TunnelProxy, nat: FakeNat) -> None:
    import hashlib
    import os

    payload = os.urandom(6 << 20)

    async def sink_then_send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = await reader.read()  # the app's whole upload, then its EOF
        writer.write(hashlib.sha256(got).digest() + payload)
        await writer.drain()
        writer.close()

    srv, dst = await server(sink_then_send)
    async with srv:
        reader, writer = await app_connect(proxy, nat, dst)
        writer.write(payload)  # sent at once: part of it waits in the proxy's buffers before the relay
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 20)
        assert answer[:32] == hashlib.sha256(payload).digest(), "the upload arrived whole"
        assert answer[32:] == payload, "the download arrived whole"
        writer.close()
        await _until(lambda: not proxy.tcp_flows)
    assert (proxy.counters.bytes_up, proxy.counters.bytes_down) == (len(payload), 32 + len(payload))


@on_proxy
async def test_unknown_peer_is_reset(proxy: TunnelProxy, _nat: FakeNat) -> None:
    reader, _ = await asyncio.open_connection(*proxy.tcp_address)
    with pytest.raises(ConnectionResetError):
        await reader.read(1)
    assert proxy.counters.nat_misses == 1


@in_loop
async def test_unreachable_destination_resets_the_app_and_reports_the_failure() -> None:
    nat = FakeNat()
    failures: list[BaseException] = []
    p = TunnelProxy("office", DirectProvider(connect_timeout=2), nat, on_flow_failed=failures.append)
    await p.start()
    try:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        reader, _ = await app_connect(p, nat, closed.getsockname())
        with pytest.raises(ConnectionResetError):
            await reader.read(1)
        closed.close()
    finally:
        await p.stop()
    assert p.counters.tcp_failed == 1
    assert len(failures) == 1 and isinstance(failures[0], TunnelError)
    assert "Connection refused" in str(failures[0])


def test_repeated_flow_failures_are_logged_once_a_minute_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        nat = FakeNat()
        proxy = TunnelProxy("office", DirectProvider(connect_timeout=2), nat)
        now = [1000.0]
        proxy.clock = lambda: now[0]
        await proxy.start()
        try:
            closed = socket.socket()
            closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
            for _ in range(20):
                reader, _ = await app_connect(proxy, nat, closed.getsockname())
                with pytest.raises(ConnectionResetError):
                    await reader.read(1)
                now[0] += 1.0
            now[0] += 60.0
            reader, _ = await app_connect(proxy, nat, closed.getsockname())
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
            closed.close()
        finally:
            await proxy.stop()

    with caplog.at_level(logging.DEBUG, logger="awg_split_tunnel.proxy"):
        asyncio.run(main())
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "fail" in r.getMessage()]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "flow of" in r.getMessage()]
    assert len(debug) == 19, "all but the first failure of the minute at debug"
    assert len(info) == 3, info  # the first failure, the summary, the first failure of the next minute
    assert "19 more flow failures" in info[1] and "Connection refused" in info[1]


@on_proxy
async def test_app_half_close_reaches_the_server_and_the_reply_still_arrives(
    proxy: TunnelProxy, nat: FakeNat
) -> None:
    async def count_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # only returns at EOF: needs the proxy to pass on SHUT_WR
        writer.write(f"got {len(data)} bytes".encode())
        await writer.drain()
        writer.close()

    srv, dst = await server(count_until_eof)
    async with srv:
        reader, writer = await app_connect(proxy, nat, dst)
        writer.write(b"x" * 100_000)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"got 100000 bytes"
        writer.close()


@on_proxy
async def test_server_half_close_still_lets_the_app_send(proxy: TunnelProxy, nat: FakeNat) -> None:
    received = asyncio.get_running_loop().create_future()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    srv, dst = await server(greet_then_listen)
    async with srv:
        reader, writer = await app_connect(proxy, nat, dst)
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"  # EOF arrives, the flow stays
        writer.write(b"late request")
        writer.write_eof()
        assert await asyncio.wait_for(received, 5) == b"late request"
        writer.close()


@on_proxy
async def test_slow_reader_applies_back_pressure_to_the_server(proxy: TunnelProxy, nat: FakeNat) -> None:
    sent = 0
    chunk = b"z" * 65536

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            while sent < 512 * 1024 * 1024:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except ConnectionError:
            pass
        writer.close()

    srv, dst = await server(flood)
    async with srv:
        reader, writer = await app_connect(proxy, nat, dst)
        await asyncio.sleep(1.0)
        stalled_at = sent
        await asyncio.sleep(0.5)
        # The app reads nothing: the server must be held back (socket buffers + bounded proxy buffers),
        # not allowed to push hundreds of megabytes into the proxy's memory.
        assert sent == stalled_at
        assert sent < 64 * 1024 * 1024
        [flow] = proxy.tcp_flows
        assert flow.bytes_down <= sent
        total = 0
        while total < 8 * 1024 * 1024:
            total += len(await reader.read(1 << 20))
        await _until(lambda: sent > stalled_at)  # reading resumes the flow
        writer.close()


@on_proxy
async def test_close_all_resets_every_flow_of_the_tunnel(proxy: TunnelProxy, nat: FakeNat) -> None:
    upstream_closed = asyncio.get_running_loop().create_future()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        upstream_closed.set_result(True)
        writer.close()

    srv, dst = await server(hold)
    async with srv:
        apps = [await app_connect(proxy, nat, dst) for _ in range(3)]
        await _until(lambda: len(proxy.tcp_flows) == 3)
        assert proxy.close_all() == 3
        for reader, _ in apps:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(1), 5)
        assert await asyncio.wait_for(upstream_closed, 5)
        assert proxy.tcp_flows == []
        assert proxy.counters.resets == 3


@on_proxy
async def test_udp_is_relayed_and_replies_come_back_to_the_app(proxy: TunnelProxy, nat: FakeNat) -> None:
    loop = asyncio.get_running_loop()
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)

    async def serve_echo() -> None:
        while True:
            data, addr = await loop.sock_recvfrom(echo, 2048)
            await loop.sock_sendto(echo, b"re:" + data, addr)

    echo_task = loop.create_task(serve_echo())
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))
    app.setblocking(False)
    echo_ip, echo_port = echo.getsockname()
    nat.entries[("udp", *app.getsockname())] = Target(echo_ip, echo_port, pid=7, exe="app-udp")
    udp_address = proxy.udp_address
    assert udp_address is not None
    try:
        for i in range(3):
            await loop.sock_sendto(app, b"ping%d" % i, udp_address)
            data, src = await asyncio.wait_for(loop.sock_recvfrom(app, 2048), 5)
            assert data == b"re:ping%d" % i
            assert src == udp_address  # the router turns this into the original destination
        [assoc] = proxy.udp_associations
        assert (assoc.dst, assoc.pid) == (echo.getsockname(), 7)
        assert proxy.counters.datagrams_up == 3 and proxy.counters.datagrams_down == 3
        assert proxy.close_all() == 1
        assert proxy.udp_associations == []
    finally:
        echo_task.cancel()
        app.close()
        echo.close()


class TcpOnlyProvider(DirectProvider):
    @property
    def supports_udp(self) -> bool:
        return False

    async def open_udp(self) -> object:  # type: ignore[override]
        raise AssertionError("must not be asked")


@in_loop
async def test_udp_for_a_tcp_only_tunnel_is_dropped_and_counted() -> None:
    nat = FakeNat()
    p = TunnelProxy("corp", TcpOnlyProvider(), nat)
    await p.start()
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp_address = p.udp_address
        assert udp_address is not None
        app.sendto(b"quic initial", udp_address)
        await _until(lambda: p.counters.datagrams_dropped == 1)
        assert p.udp_associations == [] and nat.lookups == []
    finally:
        app.close()
        await p.stop()


@in_loop
async def test_stop_resets_open_flows() -> None:
    nat = FakeNat()
    provider: StreamProvider = DirectProvider()
    p = TunnelProxy("office", provider, nat)
    await p.start()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    srv, dst = await server(hold)
    async with srv:
        reader, _ = await app_connect(p, nat, dst)
        await _until(lambda: len(p.tcp_flows) == 1)
        await p.stop()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


class FakeUdpChannel(UdpChannel):
    """An in-memory association: what the app sent, and replies the test injects."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []
        self.replies: asyncio.Queue[tuple[bytes, Address] | None] = asyncio.Queue()
        self._closed = False

    def send_to(self, data: bytes, dst: Address) -> None:
        self.sent.append((data, dst))

    async def recv(self) -> tuple[bytes, Address]:
        item = await self.replies.get()
        if item is None or self._closed:
            raise TunnelError("fake association closed")
        return item

    def close(self) -> None:
        self._closed = True
        self.replies.put_nowait(None)

    @property
    def closed(self) -> bool:
        return self._closed


class FakeUdpProvider(DirectProvider):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.opened: list[FakeUdpChannel] = []

    async def open_udp(self) -> UdpChannel:
        if self.fail:
            raise TunnelError("SOCKS5 server 198.18.0.20:1080 is unreachable: Connection refused")
        channel = FakeUdpChannel()
        self.opened.append(channel)
        return channel


def udp_app(nat: FakeNat, dst: Address) -> socket.socket:
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    app.bind(("127.0.0.1", 0))
    app.setblocking(False)
    nat.entries[("udp", *app.getsockname())] = Target(dst[0], dst[1])
    return app


@in_loop
async def test_udp_replies_from_another_source_are_dropped() -> None:
    nat = FakeNat()
    provider = FakeUdpProvider()
    p = TunnelProxy("office", provider, nat)
    await p.start()
    app = udp_app(nat, ("198.18.0.10", 53))
    loop = asyncio.get_running_loop()
    try:
        udp_address = p.udp_address
        assert udp_address is not None
        await loop.sock_sendto(app, b"query", udp_address)
        await _until(lambda: bool(provider.opened) and bool(provider.opened[0].sent))
        channel = provider.opened[0]
        assert channel.sent == [(b"query", ("198.18.0.10", 53))]
        channel.replies.put_nowait((b"spoofed", ("198.18.0.66", 53)))
        channel.replies.put_nowait((b"answer", ("198.18.0.10", 53)))
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(app, 2048), 5)
        assert data == b"answer"  # the spoofed one never reached the app
        assert p.counters.datagrams_dropped == 1 and p.counters.datagrams_down == 1
    finally:
        app.close()
        await p.stop()


@in_loop
async def test_idle_udp_association_is_closed() -> None:
    nat = FakeNat()
    provider = FakeUdpProvider()
    p = TunnelProxy("office", provider, nat, limits=limits(udp_idle_timeout=0.2))
    await p.start()
    app = udp_app(nat, ("198.18.0.10", 53))
    try:
        udp_address = p.udp_address
        assert udp_address is not None
        app.sendto(b"x", udp_address)
        await _until(lambda: len(p.udp_associations) == 1)
        await _until(lambda: not p.udp_associations, timeout=3)
        assert provider.opened[0].closed
    finally:
        app.close()
        await p.stop()


@in_loop
async def test_failed_udp_open_is_not_retried_for_every_datagram() -> None:
    nat = FakeNat()
    failures: list[BaseException] = []
    provider = FakeUdpProvider(fail=True)
    p = TunnelProxy("office", provider, nat, on_flow_failed=failures.append)
    await p.start()
    app = udp_app(nat, ("198.18.0.10", 443))
    try:
        udp_address = p.udp_address
        assert udp_address is not None
        for _ in range(20):
            app.sendto(b"quic", udp_address)
        await _until(lambda: p.counters.datagrams_dropped == 20)
        assert len(failures) == 1 and p.counters.udp_failed == 1
        assert "unreachable" in str(failures[0])
    finally:
        app.close()
        await p.stop()


@in_loop
async def test_listens_on_ipv4_and_ipv6_for_apps_of_either_family() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    nat = FakeNat()
    p = TunnelProxy("office", DirectProvider(), nat, ["127.0.0.1", "::1"])
    await p.start()
    srv, dst = await server(echo_upper)
    try:
        v6_listener = next(a for a in p.tcp_addresses if ":" in a[0])
        sock = socket.socket(socket.AF_INET6)
        sock.bind(("::1", 0))
        nat.entries[("tcp", "::1", sock.getsockname()[1])] = Target(dst[0], dst[1])
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, v6_listener)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"six")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"SIX"
        writer.close()
        assert len(p.udp_addresses) == 2
    finally:
        srv.close()
        await p.stop()


@in_loop
async def test_v4_and_v6_listeners_share_one_port_per_protocol() -> None:
    # The router redirects both address families of a tunnel to one TCP and one UDP port number.
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    p = TunnelProxy("office", DirectProvider(), FakeNat(), ["127.0.0.1", "::1"])
    try:
        await p.start()
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 here: {exc}")
    try:
        assert len({port for _, port in p.tcp_addresses}) == 1
        assert len(p.udp_addresses) == 2 and len({port for _, port in p.udp_addresses}) == 1
    finally:
        await p.stop()


# -- bounds: caps, timeouts, withdrawn flows -------------------------------------------------------------


def test_default_caps_follow_the_open_file_limit() -> None:
    # 1024 open files: (1024 - 256) / 2 = 384 for one proxy; TCP gets 3/4 of it at 8 descriptors a spliced
    # flow (2 through streams), UDP 1/4 at 2 an association; one app half of its proxy's.
    assert caps(ProxyLimits.for_open_files(1024, splice=True)) == (36, 18, 48, 24)
    assert caps(ProxyLimits.for_open_files(1024, splice=False)) == (144, 72, 48, 24)
    assert caps(ProxyLimits.for_open_files(1 << 20, splice=True)) == (8192, 4096, 4096, 2048)
    assert caps(ProxyLimits.for_open_files(64, splice=True)) == (16, 8, 8, 4), "never below a usable floor"
    assert ProxyLimits.default().tcp_idle_timeout == 7440.0, "the router's established-flow timeout"


def caps(limits: ProxyLimits) -> tuple[int, int, int, int]:
    return (
        limits.max_tcp_flows,
        limits.max_tcp_flows_per_app,
        limits.max_udp_associations,
        limits.max_udp_associations_per_app,
    )


async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that reads until the connection ends, never answering."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    writer.close()


async def assert_reset(reader: asyncio.StreamReader, timeout: float = 5.0) -> None:
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), timeout)


def with_limits(
    **changes: Any,
) -> Callable[[Callable[[TunnelProxy, FakeNat], Awaitable[None]]], Callable[[bool], None]]:
    """Like ``on_proxy``, the proxy built with ``limits(**changes)``."""

    def decorate(body: Callable[[TunnelProxy, FakeNat], Awaitable[None]]) -> Callable[[bool], None]:
        @pytest.mark.parametrize("splice", [True, False], ids=["splice", "streams"])
        def test(splice: bool) -> None:
            async def main() -> None:
                nat = FakeNat()
                provider = DirectProvider(connect_timeout=2)
                proxy = TunnelProxy(
                    "office", provider, nat, "127.0.0.1", splice=splice, limits=limits(**changes)
                )
                await proxy.start()
                try:
                    await body(proxy, nat)
                finally:
                    await proxy.stop()

            asyncio.run(main())

        test.__name__ = body.__name__
        return test

    return decorate


@with_limits(max_tcp_flows=3, max_tcp_flows_per_app=2)
async def test_flows_beyond_the_app_cap_and_the_tunnel_cap_are_reset_and_counted(
    proxy: TunnelProxy, nat: FakeNat
) -> None:
    srv, dst = await server(hold)
    async with srv:
        browser = [await app_connect(proxy, nat, dst, pid=10, exe="/usr/bin/browser") for _ in range(2)]
        await _until(lambda: len(proxy.tcp_flows) == 2)
        reader, _ = await app_connect(proxy, nat, dst, pid=10, exe="/usr/bin/browser")
        await assert_reset(reader)
        assert proxy.counters.tcp_refused == 1, "the app's third flow: over its cap of 2"
        mail, mail_writer = await app_connect(proxy, nat, dst, pid=11, exe="/usr/bin/mail")
        mail_writer.write(b"still carried")
        await _until(lambda: len(proxy.tcp_flows) == 3)
        reader, _ = await app_connect(proxy, nat, dst, pid=12, exe="/usr/bin/chat")
        await assert_reset(reader)
        assert proxy.counters.tcp_refused == 2, "a fourth flow of the tunnel: over its cap of 3"
        _, writer = browser[0]
        writer.close()
        await _until(lambda: len(proxy.tcp_flows) == 2)
        reader, writer = await app_connect(proxy, nat, dst, pid=10, exe="/usr/bin/browser")
        await _until(lambda: len(proxy.tcp_flows) == 3)
        assert proxy.counters.tcp_refused == 2, "a closed flow frees its place"
        for _, w in [*browser[1:], (mail, mail_writer), (reader, writer)]:
            w.close()


def test_refusals_are_logged_once_a_minute_not_per_flow(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        nat = FakeNat()
        proxy = TunnelProxy("office", DirectProvider(), nat, limits=limits(max_tcp_flows=1))
        now = [1000.0]
        proxy.clock = lambda: now[0]
        await proxy.start()
        srv, dst = await server(hold)
        try:
            _, held = await app_connect(proxy, nat, dst, exe="app-socks")
            await _until(lambda: len(proxy.tcp_flows) == 1)
            for _ in range(10):
                reader, _ = await app_connect(proxy, nat, dst, exe="app-socks")
                await assert_reset(reader)
            now[0] += 61.0
            reader, _ = await app_connect(proxy, nat, dst, exe="app-socks")
            await assert_reset(reader)
            held.close()
        finally:
            srv.close()
            await proxy.stop()
        assert proxy.counters.tcp_refused == 11

    with caplog.at_level(logging.DEBUG, logger="awg_split_tunnel.proxy"):
        asyncio.run(main())
    info = [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "refused" in r.getMessage()
    ]
    assert len(info) == 3, info  # the first refusal, the summary of the minute, the next minute's first
    assert "the tunnel's 1 flows are open" in info[0] and "app-socks" in info[0]
    assert "9 more flows refused" in info[1]


@in_loop
async def test_udp_associations_beyond_the_app_cap_are_dropped_and_counted() -> None:
    nat = FakeNat()
    provider = FakeUdpProvider()
    p = TunnelProxy("office", provider, nat, limits=limits(max_udp_associations_per_app=2))
    await p.start()
    apps = [udp_app(nat, ("198.18.0.10", 53)) for _ in range(3)]
    other = udp_app(nat, ("198.18.0.10", 53))
    nat.entries[("udp", *other.getsockname())].exe = "other-app"
    for app in apps:
        nat.entries[("udp", *app.getsockname())].exe = "dns-flooder"
    try:
        udp_address = p.udp_address
        assert udp_address is not None
        for app in apps:
            app.sendto(b"query", udp_address)
        await _until(lambda: p.counters.udp_refused == 1)
        assert len(p.udp_associations) == 2 and len(provider.opened) == 2
        other.sendto(b"query", udp_address)
        await _until(lambda: len(p.udp_associations) == 3)
        assert p.counters.udp_refused == 1 and p.counters.datagrams_dropped == 1
    finally:
        for app in [*apps, other]:
            app.close()
        await p.stop()


@with_limits(tcp_idle_timeout=0.5)
async def test_an_idle_flow_is_reset_and_one_with_traffic_is_kept(proxy: TunnelProxy, nat: FakeNat) -> None:
    srv, dst = await server(echo_upper)
    async with srv:
        idle_reader, idle_writer = await app_connect(proxy, nat, dst)
        busy_reader, busy_writer = await app_connect(proxy, nat, dst)
        started = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - started < 1.5:  # three idle timeouts
            busy_writer.write(b"ping")
            assert await asyncio.wait_for(busy_reader.readexactly(4), 5) == b"PING"
            await asyncio.sleep(0.1)
        await assert_reset(idle_reader, timeout=0.1)
        assert proxy.counters.tcp_idle_closed == 1
        [flow] = proxy.tcp_flows
        assert flow.bytes_up == flow.bytes_down > 0, "the busy flow is still relayed"
        for writer in (idle_writer, busy_writer):
            writer.close()


@with_limits(half_close_timeout=0.5)
async def test_a_half_closed_flow_whose_server_never_answers_is_reset(
    proxy: TunnelProxy, nat: FakeNat
) -> None:
    got_request = asyncio.get_running_loop().create_future()
    forever = asyncio.get_running_loop().create_future()
    held: list[asyncio.StreamWriter] = []

    async def never_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The test holds the connection: a handler waiting on nothing else (its reader done at EOF) would
        # be garbage, and the collector would close its socket whenever it ran.
        held.append(writer)
        got_request.set_result(await reader.readexactly(7))
        await reader.read()  # up to the app's EOF; then silence, the connection left open
        await forever

    srv, dst = await server(never_close)
    async with srv:
        reader, writer = await app_connect(proxy, nat, dst)
        writer.write(b"request")
        await asyncio.wait_for(got_request, 5)
        writer.write_eof()  # once the relay runs: its own end of the direction, not the opening's
        await _until(lambda: bool(proxy.tcp_flows) and proxy.tcp_flows[0].half_closed)
        await assert_reset(reader, timeout=3.0)
        assert proxy.counters.tcp_idle_closed == 1 and proxy.tcp_flows == []
        writer.close()


@with_limits(half_close_timeout=0.5)
async def test_a_half_closed_flow_is_kept_while_the_reply_still_streams(
    proxy: TunnelProxy, nat: FakeNat
) -> None:
    async def slow_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the request, up to the app's EOF
        for _ in range(10):  # 2 s of reply, each piece well within the half-close timeout
            writer.write(b"piece ")
            await writer.drain()
            await asyncio.sleep(0.2)
        writer.close()

    srv, dst = await server(slow_reply)
    async with srv:
        reader, writer = await app_connect(proxy, nat, dst)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"piece " * 10
        assert proxy.counters.tcp_idle_closed == 0
        writer.close()


@on_proxy
async def test_withdrawing_a_nat_entry_resets_its_flow_only(proxy: TunnelProxy, nat: FakeNat) -> None:
    upstream_closed = asyncio.get_running_loop().create_future()

    async def report_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold(reader, writer)
        if not upstream_closed.done():
            upstream_closed.set_result(True)

    srv, dst = await server(report_close)
    async with srv:
        gone_reader, gone_writer = await app_connect(proxy, nat, dst)
        kept_reader, kept_writer = await app_connect(proxy, nat, dst)
        await _until(lambda: len(proxy.tcp_flows) == 2)
        gone = proxy.tcp_flows[0]
        assert gone.entry is not None
        assert proxy.withdraw(gone.entry)
        first = gone_reader if gone.peer[1] == gone_writer.get_extra_info("sockname")[1] else kept_reader
        await assert_reset(first)
        assert await asyncio.wait_for(upstream_closed, 5), "the upstream connection is closed too"
        assert len(proxy.tcp_flows) == 1 and proxy.counters.withdrawn == 1
        assert not proxy.withdraw(gone.entry), "withdrawn once"
        assert not proxy.withdraw(Target(*dst)), "an entry no flow has"
        for writer in (gone_writer, kept_writer):
            writer.close()


@in_loop
async def test_withdrawing_a_nat_entry_ends_its_udp_association() -> None:
    nat = FakeNat()
    provider = FakeUdpProvider()
    p = TunnelProxy("office", provider, nat)
    await p.start()
    app = udp_app(nat, ("198.18.0.10", 53))
    try:
        udp_address = p.udp_address
        assert udp_address is not None
        app.sendto(b"query", udp_address)
        await _until(lambda: bool(provider.opened) and bool(provider.opened[0].sent))
        assert p.withdraw(nat.entries[("udp", *app.getsockname())])
        assert p.udp_associations == [] and provider.opened[0].closed
    finally:
        app.close()
        await p.stop()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "streams"])
def test_flows_reset_by_the_proxy_end_without_an_error_in_the_log(
    splice: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # A reset (tunnel down, a withdrawn entry, a timeout) ends a flow; it is no error of the event loop.
    async def main() -> None:
        nat = FakeNat()
        proxy = TunnelProxy("office", DirectProvider(), nat, "127.0.0.1", splice=splice, limits=limits())
        await proxy.start()
        srv, dst = await server(hold)
        try:
            apps = [await app_connect(proxy, nat, dst) for _ in range(3)]
            await _until(lambda: len(proxy.tcp_flows) == 3)
            for _, writer in apps:
                writer.write(b"x")
            await asyncio.sleep(0.1)
            assert proxy.close_all() == 3
            for reader, _ in apps:
                await assert_reset(reader)
            await asyncio.sleep(0.1)
        finally:
            srv.close()
            await proxy.stop()

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


@on_proxy
async def test_a_flow_with_an_upstream_of_its_own_is_connected_there(
    proxy: TunnelProxy, nat: FakeNat
) -> None:
    # dns.system (docs/DNS.md): the local resolver asked 127.0.0.2:port; its tunnel's DNS server answers.
    srv, dst = await server(echo_upper)
    async with srv:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        target = Target("127.0.0.2", dst[1])
        target.upstream_ip = dst[0]
        nat.entries[("tcp", *sock.getsockname())] = target
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, proxy.tcp_address)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"query")
        assert await reader.readexactly(5) == b"QUERY"
        writer.close()
        await writer.wait_closed()
