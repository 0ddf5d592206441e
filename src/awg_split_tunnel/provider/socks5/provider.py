"""The SOCKS5 stream provider: the asyncio adapter around :mod:`.protocol`.

Every wait on the server has a deadline; anything the server does wrong ends as a TunnelError whose
message names the server. UDP goes through UDP ASSOCIATE and lives as long as its TCP control connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any

from awg_split_tunnel.errors import ProtocolError, TunnelError
from awg_split_tunnel.provider.interface import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    Address,
    ProxyServerProvider,
    QueuedUdpChannel,
    StreamPair,
    UdpChannel,
    abort_stream,
    describe_os_error,
    mark_own_socket,
    normalize_ip,
)
from awg_split_tunnel.provider.socks5.protocol import (
    Command,
    Established,
    FragmentedDatagram,
    Socks5Client,
    decode_udp_datagram,
    encode_udp_datagram,
)

log = logging.getLogger("awg_split_tunnel.proxy")


class Socks5Provider(ProxyServerProvider):
    """A SOCKS5 server as a tunnel: CONNECT for TCP, UDP ASSOCIATE for UDP (when ``udp`` is on)."""

    kind = "SOCKS5 server"

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        udp: bool = True,
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
        self._udp = udp
        self._channels: set[Socks5UdpChannel] = set()
        # Validate the credentials now, so a bad config fails at start and not at the first flow.
        Socks5Client(self.label, username=username, password=password)

    @property
    def supports_udp(self) -> bool:
        return self._udp

    async def open_tcp(self, host: str, port: int) -> StreamPair:
        reader, writer, client = await self._greet()
        try:
            await self._request(client, reader, writer, Command.CONNECT, host, port)
        except BaseException:
            abort_stream(writer)
            raise
        return reader, writer

    async def probe_connection(self) -> StreamPair:
        """Connect and finish method negotiation (and authentication); the server then waits for a request."""
        reader, writer, _ = await self._greet()
        return reader, writer

    async def open_udp(self) -> UdpChannel:
        if not self._udp:
            raise TunnelError(f"UDP is turned off for SOCKS5 server {self.label}")
        reader, writer, client = await self._greet()
        transport: asyncio.DatagramTransport | None = None
        try:
            local_ip = writer.get_extra_info("sockname")[0]
            server_ip = normalize_ip(writer.get_extra_info("peername")[0])
            loop = asyncio.get_running_loop()
            channel = Socks5UdpChannel(self, writer)
            # Bind on the address the control connection uses and announce it: servers (dante among them)
            # accept datagrams only from the address given in the request.
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _RelayProtocol(channel), local_addr=(local_ip, 0)
            )
            mark_own_socket(transport.get_extra_info("socket"))
            udp_port = transport.get_extra_info("sockname")[1]
            established = await self._request(
                client, reader, writer, Command.UDP_ASSOCIATE, normalize_ip(local_ip), udp_port
            )
        except BaseException:
            if transport is not None:
                transport.close()
            abort_stream(writer)
            raise
        relay_host, relay_port = established.bound
        relay_ip = normalize_ip(relay_host)
        try:
            if ipaddress.ip_address(relay_ip).is_unspecified:
                relay_ip = server_ip  # "send to the address you reached me on"
        except ValueError:
            relay_ip = server_ip  # a name as BND.ADDR: the server is the only sensible relay
        channel.attach(transport, (relay_ip, relay_port), reader)
        self._channels.add(channel)
        return channel

    def close(self) -> None:
        for channel in list(self._channels):
            channel.close()

    def _forget(self, channel: Socks5UdpChannel) -> None:
        self._channels.discard(channel)

    async def _greet(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Socks5Client]:
        reader, writer = await self._connect()
        client = Socks5Client(self.label, username=self._username, password=self._password)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                writer.write(client.outgoing())
                while not client.ready:
                    client.receive(await reader.readexactly(client.bytes_needed()))
                    out = client.outgoing()
                    if out:
                        writer.write(out)
        except BaseException as exc:
            abort_stream(writer)
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        return reader, writer, client

    async def _request(
        self,
        client: Socks5Client,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        command: Command,
        host: str,
        port: int,
    ) -> Established:
        client.request(command, host, port)
        try:
            async with asyncio.timeout(self.handshake_timeout):
                writer.write(client.outgoing())
                while True:
                    events = client.receive(await reader.readexactly(client.bytes_needed()))
                    for event in events:
                        if isinstance(event, Established):
                            return event
        except BaseException as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    def _translate(self, exc: BaseException) -> BaseException:
        """The error a caller should see for a failed negotiation."""
        if isinstance(exc, TunnelError):
            return exc
        if isinstance(exc, ProtocolError):
            return TunnelError(str(exc))
        if isinstance(exc, TimeoutError):
            return TunnelError(
                f"SOCKS5 server {self.label} did not answer within {self.handshake_timeout:g} s"
            )
        if isinstance(exc, asyncio.IncompleteReadError):
            return TunnelError(f"SOCKS5 server {self.label} closed the connection during negotiation")
        if isinstance(exc, OSError):
            return TunnelError(f"SOCKS5 server {self.label}: {describe_os_error(exc)} during negotiation")
        return exc


class Socks5UdpChannel(QueuedUdpChannel):
    """One UDP ASSOCIATE: datagrams go to the server's relay with the SOCKS UDP header; the association
    ends when its TCP control connection closes (RFC 1928 §7), and so does the channel."""

    def __init__(self, provider: Socks5Provider, control: asyncio.StreamWriter) -> None:
        super().__init__(f"SOCKS5 UDP association via {provider.label}")
        self._provider = provider
        self._control = control
        self._transport: asyncio.DatagramTransport | None = None
        self._relay: Address = ("", 0)
        self._watch: asyncio.Task[None] | None = None

    @property
    def relay(self) -> Address:
        return self._relay

    def attach(
        self, transport: asyncio.DatagramTransport, relay: Address, control_reader: asyncio.StreamReader
    ) -> None:
        self._transport = transport
        self._relay = relay
        self._watch = asyncio.get_running_loop().create_task(self._watch_control(control_reader))

    async def _watch_control(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(4096):
                pass  # the server has nothing to say on the control connection; ignore chatter
            reason = "the server closed the control connection"
        except OSError as exc:
            reason = f"control connection lost: {describe_os_error(exc)}"
        self._close(reason)

    def send_to(self, data: bytes, dst: Address) -> None:
        if self._transport is None or self.closed:
            raise TunnelError(f"{self.description}: closed")
        try:
            datagram = encode_udp_datagram(data, dst[0], dst[1])
        except TunnelError:
            self.stats.dropped_malformed += 1
            return
        self._transport.sendto(datagram, self._relay)
        self.stats.sent += 1

    def datagram_from(self, data: bytes, addr: tuple[str, int]) -> None:
        if (normalize_ip(addr[0]), addr[1]) != self._relay:
            self.stats.dropped_foreign += 1  # only the relay may speak for the association
            return
        try:
            datagram = decode_udp_datagram(data)
        except FragmentedDatagram:
            self.stats.dropped_fragments += 1
            return
        except ProtocolError:
            self.stats.dropped_malformed += 1
            return
        self._deliver(datagram.payload, (normalize_ip(datagram.host), datagram.port))

    def close(self) -> None:
        self._close("closed")

    def _close(self, reason: str) -> None:
        if self.closed:
            return
        self._shutdown(reason)
        if self._transport is not None:
            self._transport.close()
        self._control.close()
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self._provider._forget(self)
        log.debug("[Proxy] %s ended: %s", self.description, reason)


class _RelayProtocol(asyncio.DatagramProtocol):
    def __init__(self, channel: Socks5UdpChannel) -> None:
        self._channel = channel

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._channel.datagram_from(data, (str(addr[0]), addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (e.g. port unreachable at the relay) arrive here; they are per datagram, not fatal.
        log.debug("[Proxy] %s: %s", self._channel.description, exc)
