"""Stream providers against real SOCKS5 / HTTP proxy servers on loopback, and the health monitor.

microsocks, dante (danted) and tinyproxy are started by the tests on random free ports of 127.0.0.1 with
generated configs; a test skips with the reason when its server binary is missing. No traffic leaves
loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from awg_split_tunnel.core.policy import TunnelState
from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.provider.health import HealthMonitor
from awg_split_tunnel.provider.httpproxy.protocol import HttpProxyRefused
from awg_split_tunnel.provider.httpproxy.provider import HttpProxyProvider
from awg_split_tunnel.provider.interface import Address, StreamProvider
from awg_split_tunnel.provider.socks5.protocol import Socks5AuthError, Socks5ReplyError
from awg_split_tunnel.provider.socks5.provider import Socks5Provider
from awg_split_tunnel.proxy.tunnel_proxy import Protocol, TunnelProxy


def Target(ip: str, port: int, pid: int | None = None, exe: str | None = None) -> SimpleNamespace:
    """A flow as the router answers the proxy's lookup (what ``proxy.tunnel_proxy.NatTarget`` asks)."""
    return SimpleNamespace(
        orig_dst_ip=ip, upstream_ip=ip, orig_dst_port=port, pid=pid, exe=exe, fail_closed=False
    )


pytestmark = pytest.mark.timeout(60)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package})")
    return path


class ServerProcess:
    """A proxy server process listening on ``port``; ``start`` waits until it accepts connections."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.argv = argv
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        # A session of its own: dante forks helper processes, and killing the server must kill them too.
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.argv[0]} did not listen on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def microsocks(servers: list[ServerProcess], *auth: str, port: int | None = None) -> ServerProcess:
    binary = need("microsocks", "microsocks")
    port = port or free_port()
    argv = [binary, "-i", LOOPBACK, "-p", str(port)]
    if auth:
        argv += ["-u", auth[0], "-P", auth[1]]
    server = ServerProcess(argv, port)
    servers.append(server)
    return server.start()


def dante(servers: list[ServerProcess], tmp_path: Path) -> ServerProcess:
    binary = need("danted", "dante-server")
    port = free_port()
    users = "user.privileged: root\nuser.unprivileged: nobody\n" if os.geteuid() == 0 else ""
    conf = tmp_path / "danted.conf"
    conf.write_text(
        f"logoutput: stderr\ninternal: {LOOPBACK} port = {port}\nexternal: {LOOPBACK}\n"
        f"clientmethod: none\nsocksmethod: none\n{users}"
        "client pass { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"
        "socks pass { from: 127.0.0.0/8 to: 127.0.0.0/8 command: connect udpassociate udpreply }\n"
    )
    server = ServerProcess([binary, "-f", str(conf), "-N", "1"], port)
    servers.append(server)
    return server.start()


def tinyproxy(
    servers: list[ServerProcess],
    tmp_path: Path,
    *,
    auth: tuple[str, str] | None = None,
    port: int | None = None,
) -> ServerProcess:
    binary = need("tinyproxy", "tinyproxy")
    port = free_port()
    conf = tmp_path / f"tinyproxy-{port}.conf"
    lines = [f"Port {port}", f"Listen {LOOPBACK}", "Timeout 60", f"Allow {LOOPBACK}", "MaxClients 50"]
    if auth is not None:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf.write_text("\n".join(lines) + "\n")  # no ConnectPort line: CONNECT to any port
    server = ServerProcess([binary, "-d", "-c", str(conf)], port)
    servers.append(server)
    return server.start()


def run(body: Callable[[], Awaitable[object]]) -> None:
    async def main() -> None:
        await body()

    asyncio.run(main())


async def echo_server(banner: bytes = b"", host: str = LOOPBACK) -> tuple[asyncio.Server, Address]:
    """TCP server on loopback: sends ``banner`` at once (server-first protocols), then echoes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, host, 0)
    return server, server.sockets[0].getsockname()[:2]


async def assert_tcp_through(
    provider: StreamProvider, banner: bytes = b"", host: str = LOOPBACK, name: str | None = None
) -> None:
    """Echo through the tunnel; ``name`` (resolved by the server) replaces the IP in the request."""
    server, dst = await echo_server(banner, host)
    async with server:
        reader, writer = await provider.open_tcp(name or dst[0], dst[1])
        if banner:
            assert await asyncio.wait_for(reader.readexactly(len(banner)), 5) == banner
        payload = os.urandom(300_000)
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        writer.close()


# --- SOCKS5 ------------------------------------------------------------------------------------------


def test_microsocks_connect_without_auth(servers: list[ServerProcess]) -> None:
    server = microsocks(servers)
    provider = Socks5Provider(LOOPBACK, server.port)
    run(lambda: assert_tcp_through(provider, banner=b"SSH-2.0-test\r\n"))


def test_microsocks_connect_with_username_password(servers: list[ServerProcess]) -> None:
    server = microsocks(servers, "alice", "s3cret")
    run(
        lambda: assert_tcp_through(Socks5Provider(LOOPBACK, server.port, username="alice", password="s3cret"))
    )


def test_microsocks_connect_to_ipv6_and_named_destinations(servers: list[ServerProcess]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    server = microsocks(servers)
    provider = Socks5Provider(LOOPBACK, server.port)
    run(lambda: assert_tcp_through(provider, host="::1"))  # ATYP 4
    # ATYP 3: "localhost" is resolved by the server from its hosts file, never by DNS.
    run(lambda: assert_tcp_through(provider, name="localhost"))


def test_microsocks_wrong_password_is_a_clear_error(servers: list[ServerProcess]) -> None:
    server = microsocks(servers, "alice", "s3cret")
    wrong = Socks5Provider(LOOPBACK, server.port, username="alice", password="nope")
    with pytest.raises(Socks5AuthError, match=f"{LOOPBACK}:{server.port} rejected the username/password"):
        run(lambda: wrong.open_tcp(LOOPBACK, 9))
    anonymous = Socks5Provider(LOOPBACK, server.port)
    with pytest.raises(Socks5AuthError, match="requires authentication"):
        run(anonymous.probe)


def test_microsocks_refused_destination_is_reported_with_its_reply_code(servers: list[ServerProcess]) -> None:
    server = microsocks(servers)
    closed_port = free_port()
    with pytest.raises(Socks5ReplyError) as caught:
        run(lambda: Socks5Provider(LOOPBACK, server.port).open_tcp(LOOPBACK, closed_port))
    assert caught.value.reply == 0x05
    assert str(caught.value).endswith(
        f"refused CONNECT 127.0.0.1:{closed_port}: connection refused (reply 0x05)"
    )


def test_dante_connect_and_udp_associate(servers: list[ServerProcess], tmp_path: Path) -> None:
    server = dante(servers, tmp_path)
    provider = Socks5Provider(LOOPBACK, server.port)

    async def body() -> None:
        await assert_tcp_through(provider)
        loop = asyncio.get_running_loop()
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind((LOOPBACK, 0))
        echo.setblocking(False)
        seen: list[Address] = []

        async def serve() -> None:
            while True:
                data, addr = await loop.sock_recvfrom(echo, 65535)
                seen.append(addr)
                await loop.sock_sendto(echo, b"re:" + data, addr)

        task = loop.create_task(serve())
        channel = await provider.open_udp()
        try:
            for size in (1, 512, 1400, 8000):
                channel.send_to(b"d" * size, echo.getsockname())
                data, src = await asyncio.wait_for(channel.recv(), 5)
                assert data == b"re:" + b"d" * size
                assert src == echo.getsockname()
            assert len(set(seen)) == 1  # one association, one relay socket at the server
            # The association lives with its TCP control connection: the server going away ends it.
            server.kill()
            with pytest.raises(TunnelError, match="control connection"):
                await asyncio.wait_for(channel.recv(), 5)
        finally:
            channel.close()
            task.cancel()
            echo.close()

    run(body)


def test_socks5_tunnel_proxy_end_to_end(servers: list[ServerProcess]) -> None:
    """An app's redirected connection goes app -> TunnelProxy -> microsocks -> destination."""
    server = microsocks(servers)

    async def body() -> None:
        target, dst = await echo_server()
        nat: dict[tuple[str, str, int], SimpleNamespace] = {}

        def lookup(proto: Protocol, ip: str, port: int) -> SimpleNamespace | None:
            return nat.get((proto, ip, port))

        proxy = TunnelProxy("office", Socks5Provider(LOOPBACK, server.port), lookup, LOOPBACK)
        await proxy.start()
        try:
            async with target:
                sock = socket.socket()
                sock.bind((LOOPBACK, 0))
                nat[("tcp", *sock.getsockname())] = Target(dst[0], dst[1], pid=1, exe="app-socks")
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, proxy.tcp_address)
                reader, writer = await asyncio.open_connection(sock=sock)
                writer.write(b"ping" * 1000)
                assert await asyncio.wait_for(reader.readexactly(4000), 5) == b"ping" * 1000
                writer.close()
            assert proxy.counters.tcp_flows == 1 and proxy.counters.bytes_down == 4000
        finally:
            await proxy.stop()

    run(body)


def test_udp_through_tunnel_proxy_and_dante(servers: list[ServerProcess], tmp_path: Path) -> None:
    """An app's datagrams go app -> TunnelProxy -> dante (UDP ASSOCIATE) -> destination and back."""
    server = dante(servers, tmp_path)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind((LOOPBACK, 0))
        echo.setblocking(False)

        async def serve() -> None:
            while True:
                data, addr = await loop.sock_recvfrom(echo, 65535)
                await loop.sock_sendto(echo, data[::-1], addr)

        task = loop.create_task(serve())
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app.bind((LOOPBACK, 0))
        app.setblocking(False)
        echo_ip, echo_port = echo.getsockname()
        entry = Target(echo_ip, echo_port, pid=2, exe="app-socks")
        proxy = TunnelProxy(
            "office",
            Socks5Provider(LOOPBACK, server.port),
            lambda proto, ip, port: entry if (proto, ip, port) == ("udp", *app.getsockname()) else None,
        )
        await proxy.start()
        try:
            udp_address = proxy.udp_address
            assert udp_address is not None
            for i in range(5):
                await loop.sock_sendto(app, b"datagram-%d" % i, udp_address)
                data, _ = await asyncio.wait_for(loop.sock_recvfrom(app, 2048), 5)
                assert data == (b"datagram-%d" % i)[::-1]
            assert proxy.counters.udp_associations == 1
            assert proxy.counters.datagrams_up == 5 and proxy.counters.datagrams_down == 5
        finally:
            await proxy.stop()
            task.cancel()
            app.close()
            echo.close()

    run(body)


# --- HTTP CONNECT ------------------------------------------------------------------------------------


def test_tinyproxy_connect_keeps_server_first_bytes(servers: list[ServerProcess], tmp_path: Path) -> None:
    server = tinyproxy(servers, tmp_path)
    provider = HttpProxyProvider(LOOPBACK, server.port)
    run(lambda: assert_tcp_through(provider, banner=b"220 smtp ready\r\n"))
    run(provider.probe)


def test_tinyproxy_basic_auth(servers: list[ServerProcess], tmp_path: Path) -> None:
    server = tinyproxy(servers, tmp_path, auth=("alice", "s3cret"))
    run(
        lambda: assert_tcp_through(
            HttpProxyProvider(LOOPBACK, server.port, username="alice", password="s3cret")
        )
    )
    with pytest.raises(HttpProxyRefused, match="requires authentication") as caught:
        run(lambda: assert_tcp_through(HttpProxyProvider(LOOPBACK, server.port)))
    assert caught.value.status == 407


def test_tinyproxy_unreachable_destination_is_a_clear_error(
    servers: list[ServerProcess], tmp_path: Path
) -> None:
    server = tinyproxy(servers, tmp_path)
    closed_port = free_port()
    with pytest.raises(HttpProxyRefused, match=f"refused CONNECT 127.0.0.1:{closed_port}: 5"):
        run(lambda: HttpProxyProvider(LOOPBACK, server.port).open_tcp(LOOPBACK, closed_port))


def test_http_proxy_cannot_carry_udp() -> None:
    with pytest.raises(TunnelError, match="cannot carry UDP"):
        run(HttpProxyProvider(LOOPBACK, 9).open_udp)


def test_http_probe_rejects_a_socks_server(servers: list[ServerProcess]) -> None:
    server = microsocks(servers)
    with pytest.raises(TunnelError):
        run(HttpProxyProvider(LOOPBACK, server.port, handshake_timeout=2).probe)


# --- misbehaving servers: errors, never hangs --------------------------------------------------------


async def fake_server(behaviour: bytes | None) -> tuple[asyncio.Server, int]:
    """Sends ``behaviour`` then holds the connection; None closes at once."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour is None:
            writer.close()
            return
        writer.write(behaviour)
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (b"", "did not answer within 0.5 s"),
        (None, "closed the connection|Connection reset"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "is it a SOCKS5 server"),
        (b"\x05\x00\x05\x00\x00\x01\xc6", "did not answer"),  # truncated reply, then silence
        (b"\x05\x00\x05\x00\x00\x07\x00\x00", "address type"),
    ],
)
def test_socks5_against_a_broken_server(behaviour: bytes | None, message: str) -> None:
    async def body() -> None:
        server, port = await fake_server(behaviour)
        async with server:
            provider = Socks5Provider(LOOPBACK, port, handshake_timeout=0.5)
            with pytest.raises(TunnelError, match=message):
                await asyncio.wait_for(provider.open_tcp("198.18.0.10", 80), 5)

    run(body)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (b"", "did not answer within 0.5 s"),
        (None, "closed the connection|Connection reset"),
        (b"\x05\x00", "did not answer"),  # no line ending ever comes
        (b"SSH-2.0-x\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 200_000, "oversized"),
    ],
)
def test_http_against_a_broken_server(behaviour: bytes | None, message: str) -> None:
    async def body() -> None:
        server, port = await fake_server(behaviour)
        async with server:
            provider = HttpProxyProvider(LOOPBACK, port, handshake_timeout=0.5)
            with pytest.raises(TunnelError, match=message):
                await asyncio.wait_for(provider.open_tcp("198.18.0.10", 443), 5)

    run(body)


# --- health ------------------------------------------------------------------------------------------


def _health_cycle(
    provider: StreamProvider, kill: Callable[[], object], restart: Callable[[], object]
) -> list[tuple[TunnelState, float]]:
    """Start monitoring, kill the server, restart it; returns the time from each event to its report."""
    timings: list[tuple[TunnelState, float]] = []

    async def body() -> None:
        states: asyncio.Queue[tuple[TunnelState, float, str]] = asyncio.Queue()
        monitor = HealthMonitor(
            "office",
            provider,
            lambda _id, state, reason: states.put_nowait((state, time.monotonic(), reason)),
        )
        monitor.start()
        try:
            state, _, _ = await asyncio.wait_for(states.get(), 5)
            assert state is TunnelState.UP
            await asyncio.sleep(0.3)
            killed = time.monotonic()
            kill()
            state, at, reason = await asyncio.wait_for(states.get(), 5)
            assert state is TunnelState.DOWN and reason
            timings.append((state, at - killed))
            await asyncio.sleep(1.5)
            restarted = time.monotonic()
            await asyncio.to_thread(restart)
            state, at, _ = await asyncio.wait_for(states.get(), 8)
            assert state is TunnelState.UP
            timings.append((state, at - restarted))
        finally:
            await monitor.stop()

    run(body)
    return timings


def test_health_socks5_down_within_2s_and_up_within_5s(servers: list[ServerProcess]) -> None:
    server = microsocks(servers)
    provider = Socks5Provider(LOOPBACK, server.port)
    (_, down_after), (_, up_after) = _health_cycle(provider, server.kill, server.start)
    print(f"DOWN after {down_after:.3f} s, UP after {up_after:.3f} s")
    assert down_after < 2.0, f"DOWN noticed after {down_after:.2f} s"
    assert up_after < 5.0, f"UP noticed after {up_after:.2f} s"


def test_health_http_down_within_2s_and_up_within_5s(servers: list[ServerProcess], tmp_path: Path) -> None:
    server = tinyproxy(servers, tmp_path)
    provider = HttpProxyProvider(LOOPBACK, server.port)
    (_, down_after), (_, up_after) = _health_cycle(provider, server.kill, server.start)
    print(f"DOWN after {down_after:.3f} s, UP after {up_after:.3f} s")
    assert down_after < 2.0, f"DOWN noticed after {down_after:.2f} s"
    assert up_after < 5.0, f"UP noticed after {up_after:.2f} s"


def test_health_reports_wrong_credentials_as_down(servers: list[ServerProcess]) -> None:
    server = microsocks(servers, "alice", "s3cret")
    provider = Socks5Provider(LOOPBACK, server.port, username="alice", password="wrong")

    async def body() -> None:
        reports: list[tuple[TunnelState, str]] = []
        monitor = HealthMonitor(
            "office", provider, lambda _id, state, reason: reports.append((state, reason))
        )
        monitor.start()
        try:
            async with asyncio.timeout(5):
                while not reports:
                    await asyncio.sleep(0.05)
        finally:
            await monitor.stop()
        assert reports[0][0] is TunnelState.DOWN
        assert "rejected the username/password" in reports[0][1]

    run(body)


def test_health_probes_at_once_after_a_flow_failed() -> None:
    """A failed flow wakes the monitor: a server that died between periodic probes is noticed now."""

    async def body() -> None:
        server, port = await fake_server(b"\x05\x00")  # answers the greeting, like a SOCKS5 server
        provider = Socks5Provider(LOOPBACK, port)
        reports: list[TunnelState] = []
        monitor = HealthMonitor(
            "office", provider, lambda _id, state, _why: reports.append(state), interval_up=30.0
        )
        monitor.start()
        try:
            async with asyncio.timeout(5):
                while reports != [TunnelState.UP]:
                    await asyncio.sleep(0.02)
            probes = monitor.probes
            monitor.flow_failed(TunnelError("flow failed"))
            async with asyncio.timeout(2):
                while monitor.probes == probes:
                    await asyncio.sleep(0.02)
            assert reports == [TunnelState.UP]  # still answering: stays UP
        finally:
            await monitor.stop()
            server.close()

    run(body)


def test_health_hung_server_goes_down_by_timeout() -> None:
    """A server that accepts TCP but never answers the greeting is DOWN, with the reason."""

    async def body() -> None:
        server, port = await fake_server(b"")
        reports: list[tuple[TunnelState, str]] = []
        monitor = HealthMonitor(
            "office", Socks5Provider(LOOPBACK, port), lambda _id, state, why: reports.append((state, why))
        )
        started = time.monotonic()
        monitor.start()
        try:
            async with asyncio.timeout(5):
                while not reports:
                    await asyncio.sleep(0.02)
        finally:
            await monitor.stop()
            server.close()
        assert reports[0][0] is TunnelState.DOWN
        assert "did not complete a handshake" in reports[0][1]
        assert time.monotonic() - started < 2.5

    run(body)
