"""The contract every stream tunnel (SOCKS5, HTTP CONNECT, direct) offers the per-tunnel proxy.

A stream provider opens TCP connections and UDP channels *through* its tunnel and tells whether its server
is alive. Everything it raises on purpose is a :class:`TunnelError` whose message names the server and the
reason, ready to be shown to a user.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections import deque
from dataclasses import dataclass

from awg_split_tunnel.errors import TunnelError

Address = tuple[str, int]
"""A host (IP literal or name) and a port."""

StreamPair = tuple[asyncio.StreamReader, asyncio.StreamWriter]

STREAM_LIMIT = 128 * 1024
"""StreamReader limit for tunnelled connections; reading pauses at twice this (back-pressure)."""

_LINGER_RESET = struct.pack("ii", 1, 0)

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class UdpChannel(abc.ABC):
    """Datagrams to and from any destination through one tunnel association."""

    @abc.abstractmethod
    def send_to(self, data: bytes, dst: Address) -> None:
        """Send one datagram towards ``dst``; never blocks (datagrams may be dropped, like UDP)."""

    @abc.abstractmethod
    async def recv(self) -> tuple[bytes, Address]:
        """The next datagram and its source; raises TunnelError once the channel is closed or lost."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the association; pending and later ``recv`` calls raise TunnelError."""

    @property
    @abc.abstractmethod
    def closed(self) -> bool: ...


@dataclass(slots=True)
class UdpChannelStats:
    """Datagram counters of one channel; hostile or unusable input is counted here and dropped."""

    sent: int = 0
    received: int = 0
    dropped_malformed: int = 0
    dropped_fragments: int = 0
    dropped_foreign: int = 0
    dropped_overflow: int = 0


class QueuedUdpChannel(UdpChannel):
    """A UdpChannel whose datagrams arrive through ``_deliver`` (from a DatagramProtocol) into a bounded
    queue; when the application falls behind, the newest datagrams are dropped, as a socket buffer would."""

    RECV_QUEUE = 1024

    def __init__(self, description: str) -> None:
        self.description = description
        self.stats = UdpChannelStats()
        self._queue: deque[tuple[bytes, Address]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed_reason: str | None = None

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def _deliver(self, data: bytes, src: Address) -> None:
        if self._closed_reason is not None:
            return
        if len(self._queue) >= self.RECV_QUEUE:
            self.stats.dropped_overflow += 1
            return
        self.stats.received += 1
        self._queue.append((data, src))
        self._wake()

    def _shutdown(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            self._queue.clear()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> tuple[bytes, Address]:
        while not self._queue:
            if self._closed_reason is not None:
                raise TunnelError(f"{self.description}: {self._closed_reason}")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()


class StreamProvider(abc.ABC):
    """A tunnel that carries whole TCP connections and (optionally) UDP datagrams."""

    kind: str = "stream"
    """Human name of the tunnel type, used in messages (``"SOCKS5"``, ``"HTTP proxy"``, ``"direct"``)."""

    @property
    @abc.abstractmethod
    def server(self) -> Address | None:
        """The proxy server this tunnel depends on; None when there is none (direct)."""

    @property
    def supports_udp(self) -> bool:
        return False

    @abc.abstractmethod
    async def open_tcp(self, host: str, port: int) -> StreamPair:
        """A connection to ``host:port`` through the tunnel, ready for payload bytes."""

    async def open_udp(self) -> UdpChannel:
        """A UDP channel through the tunnel; raises TunnelError when the tunnel cannot carry UDP."""
        raise TunnelError(f"{self.kind} tunnels cannot carry UDP")

    @abc.abstractmethod
    async def probe_connection(self) -> StreamPair:
        """Connect to the server and complete its greeting; the open connection is handed to the caller.

        The health monitor keeps it open: a server that dies closes it, which is noticed at once.
        """

    async def probe(self) -> None:
        """Raise TunnelError unless the server completes a handshake."""
        _, writer = await self.probe_connection()
        abort_stream(writer)

    def close(self) -> None:  # noqa: B027 - most providers hold nothing between flows
        """Release whatever the provider holds (UDP associations). Open TCP flows belong to their owner."""


class ProxyServerProvider(StreamProvider):
    """A tunnel through one proxy server (SOCKS5, HTTP CONNECT) with optional credentials."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        self._host = host
        self._port = port
        self._username = username
        self._password = password
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.label = format_address(host, port)

    @property
    def server(self) -> Address:
        return (self._host, self._port)

    async def _connect(self) -> StreamPair:
        """A TCP connection to the proxy server itself."""
        return await connect_to_server(self.kind, self._host, self._port, self.connect_timeout)


def abort_stream(writer: asyncio.StreamWriter, *, reset: bool = False) -> None:
    """Close a stream now, without waiting for buffered data; ``reset`` sends a TCP RST to the peer."""
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER with a zero timeout turns close() into an RST: the app sees "connection reset"
            # at once instead of a clean EOF it could mistake for a complete response.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalize_ip(host: str) -> str:
    """The canonical text of an IP literal (IPv4-mapped IPv6 unmapped); other strings unchanged."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


_own_socket_mark = 0


def set_own_socket_mark(mark: int) -> None:
    """Give every socket the providers open from now on this ``SO_MARK`` (0: none). The Linux kernel data
    path sets its DIRECT class here at start, so the daemon's own connections (to proxies, to direct
    destinations of relayed flows) are never queued for a verdict nor routed into a tunnel."""
    global _own_socket_mark
    _own_socket_mark = mark


def mark_own_socket(sock: socket.socket | None) -> None:
    """Apply ``set_own_socket_mark``'s mark to a socket of ours (before it sends anything)."""
    if sock is not None and _own_socket_mark and hasattr(socket, "SO_MARK"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, _own_socket_mark)


async def _open_marked(host: str, port: int, limit: int) -> StreamPair:
    """``asyncio.open_connection`` with the mark set before the SYN (each address in turn)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    failure: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            mark_own_socket(sock)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=limit)
    raise failure


async def connect_to_server(
    kind: str, host: str, port: int, timeout: float, *, limit: int = STREAM_LIMIT
) -> StreamPair:
    """A TCP connection to a tunnel's server (or a direct destination), with Nagle off (relayed data is
    already batched by the app), as a TunnelError when it fails."""
    where = format_address(host, port)
    try:
        async with asyncio.timeout(timeout):
            if _own_socket_mark:
                reader, writer = await _open_marked(host, port, limit)
            else:
                reader, writer = await asyncio.open_connection(host, port, limit=limit)
    except TimeoutError:
        raise TunnelError(f"{kind} {where} did not accept a connection within {timeout:g} s") from None
    except OSError as exc:
        raise TunnelError(f"{kind} {where} is unreachable: {describe_os_error(exc)}") from exc
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


def describe_os_error(exc: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('198.18.0.20', 1080)``."""
    return os.strerror(exc.errno) if exc.errno else str(exc)
