"""The direct provider: flows leave the host unchanged, through ordinary sockets.

Used for ``direct``-routed flows that still pass through a proxy, and as the reference provider in tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.provider.interface import (
    DEFAULT_CONNECT_TIMEOUT,
    Address,
    QueuedUdpChannel,
    StreamPair,
    StreamProvider,
    UdpChannel,
    connect_to_server,
    mark_own_socket,
    normalize_ip,
)

log = logging.getLogger("awg_split_tunnel.proxy")


class DirectProvider(StreamProvider):
    """No server: TCP connects straight to the destination, UDP goes out of a local socket."""

    kind = "destination"

    def __init__(self, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.connect_timeout = connect_timeout

    @property
    def server(self) -> None:
        return None

    @property
    def supports_udp(self) -> bool:
        return True

    async def open_tcp(self, host: str, port: int) -> StreamPair:
        return await connect_to_server(self.kind, host, port, self.connect_timeout)

    async def open_udp(self) -> UdpChannel:
        channel = DirectUdpChannel()
        loop = asyncio.get_running_loop()
        for family, wildcard in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _DirectProtocol(channel), local_addr=(wildcard, 0), family=family
                )
            except OSError as exc:  # e.g. IPv6 disabled on this host
                log.debug("[Proxy] direct UDP: no %s socket: %s", family.name, exc)
                continue
            mark_own_socket(transport.get_extra_info("socket"))
            channel.add_transport(family, transport)
        if not channel.families:
            raise TunnelError("direct UDP: no socket could be opened")
        return channel

    async def probe_connection(self) -> StreamPair:
        raise TunnelError("the direct tunnel has no server to probe")

    async def probe(self) -> None:
        return None


class DirectUdpChannel(QueuedUdpChannel):
    """One IPv4 and one IPv6 socket, unconnected: datagrams to any destination, replies from any."""

    def __init__(self) -> None:
        super().__init__("direct UDP")
        self._transports: dict[int, asyncio.DatagramTransport] = {}

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(self._transports)

    def add_transport(self, family: int, transport: asyncio.DatagramTransport) -> None:
        self._transports[family] = transport

    def send_to(self, data: bytes, dst: Address) -> None:
        if self.closed:
            raise TunnelError("direct UDP: closed")
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        transport = self._transports.get(family)
        if transport is None:
            self.stats.dropped_malformed += 1
            return
        transport.sendto(data, dst)
        self.stats.sent += 1

    def close(self) -> None:
        if self.closed:
            return
        self._shutdown("closed")
        for transport in self._transports.values():
            transport.close()


class _DirectProtocol(asyncio.DatagramProtocol):
    def __init__(self, channel: DirectUdpChannel) -> None:
        self._channel = channel

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._channel._deliver(data, (normalize_ip(str(addr[0])), addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("[Proxy] direct UDP: %s", exc)
