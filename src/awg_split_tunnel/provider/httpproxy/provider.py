"""The HTTP CONNECT stream provider: the asyncio adapter around :mod:`.protocol`.

An HTTP proxy carries TCP only; ``open_udp`` raises TunnelError (docs/DESIGN.md: Stream tunnels: UDP of
apps routed to an HTTP tunnel is dropped by default, browsers then fall back from QUIC to TCP).
"""

from __future__ import annotations

import asyncio

from awg_split_tunnel.errors import ProtocolError, TunnelError
from awg_split_tunnel.provider.httpproxy.protocol import HttpConnectClient, HttpProbe
from awg_split_tunnel.provider.interface import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    Address,
    ProxyServerProvider,
    StreamPair,
    UdpChannel,
    abort_stream,
    describe_os_error,
)


class HttpProxyProvider(ProxyServerProvider):
    """An HTTP proxy as a tunnel: one CONNECT per TCP flow, optional Basic auth.

    ``check_target`` (host, port), when given, is what the health probe CONNECTs to; without it the probe
    only checks that the proxy accepts a TCP connection, and ``probe()`` that it answers in HTTP.
    """

    kind = "HTTP proxy"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        check_target: Address | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    ) -> None:
        super().__init__(
            host,
            port,
            username=username,
            password=password,
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
        )
        self.check_target = check_target

    async def open_udp(self) -> UdpChannel:
        raise TunnelError(f"HTTP proxy {self.label} cannot carry UDP (CONNECT is TCP only)")

    async def open_tcp(self, host: str, port: int) -> StreamPair:
        client = HttpConnectClient(self.label, host, port, username=self._username, password=self._password)
        reader, writer = await self._connect()
        try:
            async with asyncio.timeout(self.handshake_timeout):
                writer.write(client.outgoing())
                while not client.done:
                    # Line by line, so nothing after the blank line is taken from the tunnel's bytes.
                    events = client.receive(await reader.readuntil(b"\n"))
                    assert not events or not events[0].leftover
        except BaseException as exc:
            abort_stream(writer)
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        return reader, writer

    async def probe_connection(self) -> StreamPair:
        if self.check_target is not None:
            return await self.open_tcp(*self.check_target)
        return await self._connect()

    async def probe(self) -> None:
        if self.check_target is not None:
            _, writer = await self.open_tcp(*self.check_target)
            abort_stream(writer)
            return
        reader, writer = await self._connect()
        probe = HttpProbe(self.label)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                writer.write(HttpProbe.REQUEST)
                while not probe.receive(await reader.read(1024) or _eof()):
                    pass
        except BaseException as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            abort_stream(writer)

    def _translate(self, exc: BaseException) -> BaseException:
        if isinstance(exc, TunnelError):
            return exc
        if isinstance(exc, ProtocolError):
            return TunnelError(str(exc))
        if isinstance(exc, TimeoutError):
            return TunnelError(f"HTTP proxy {self.label} did not answer within {self.handshake_timeout:g} s")
        if isinstance(exc, asyncio.IncompleteReadError):
            return TunnelError(f"HTTP proxy {self.label} closed the connection before answering")
        if isinstance(exc, asyncio.LimitOverrunError | ValueError):
            return TunnelError(f"HTTP proxy {self.label} sent an oversized header line")
        if isinstance(exc, OSError):
            return TunnelError(f"HTTP proxy {self.label}: {describe_os_error(exc)} before answering")
        return exc


def _eof() -> bytes:
    raise asyncio.IncompleteReadError(b"", None)
