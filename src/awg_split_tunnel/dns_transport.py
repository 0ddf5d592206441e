"""How the DNS forwarder's queries reach a server (asyncio): the local resolver from a socket the
redirect leaves alone, a packet tunnel's DNS port, a stream tunnel's proxy (docs/DNS.md). Each returns the
answer's bytes, or None when no answer came in time (the forwarder then tries the next server)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import secrets
import socket
import struct

from awg_split_tunnel.dns.message import MAX_MESSAGE, Query, message_id, tcp_frame, with_id
from awg_split_tunnel.dns.upstream import DNS_PORT
from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.provider.interface import StreamProvider, abort_stream

log = logging.getLogger("awg_split_tunnel.dns")

UDP_TIMEOUT = 2.0
"""Seconds one server has to answer a UDP query before the next server (or SERVFAIL)."""
TCP_TIMEOUT = 5.0
_LINGER_RESET = struct.pack("ii", 1, 0)
_ICMP_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EMSGSIZE})
"""Errors a UDP socket reports once for an ICMP answer to an earlier datagram."""


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _mapped(address: str) -> str:
    """An address as a dual-stack IPv6 socket sends to it."""
    return address if ":" in address else f"::ffff:{address}"


def _address(text: str) -> ipaddress.IPv6Address | None:
    """An address a dual-stack socket reports (scope dropped), for comparing."""
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(text.partition("%")[0])
        if isinstance(address, ipaddress.IPv6Address):
            return address
    return None


class TunnelPort:
    """A packet tunnel's DNS port: one UDP socket (queries multiplexed by ID) and TCP connections from the
    same port number, whose flows the router sends into the tunnel."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self._udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self._udp.setblocking(False)
        self._udp.bind(("::", 0))
        self.port: int = self._udp.getsockname()[1]
        self._pending: dict[int, tuple[ipaddress.IPv6Address | None, asyncio.Future[bytes]]] = {}
        """Wire ID → the server asked (IPv4 as mapped) and the waiting query."""
        self._tcp_lock = asyncio.Lock()
        loop.add_reader(self._udp.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, source = self._udp.recvfrom(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ICMP_ERRNOS:
                    continue  # an ICMP error of an earlier datagram: that query times out
                return
            wire_id = message_id(data)
            pending = self._pending.get(wire_id) if wire_id is not None else None
            if pending is None or pending[1].done():
                continue
            asked, waiter = pending
            # Only the server asked may answer (another sender would have to guess the ID and the port).
            if asked is not None and asked == _address(source[0]):
                waiter.set_result(data)

    async def ask_udp(self, query: Query, server: str) -> bytes | None:
        """Send ``query`` to ``server`` under an ID of its own on this socket; the answer (with the
        query's ID again) or None after ``UDP_TIMEOUT``."""
        wire_id = secrets.randbelow(0x10000)
        while wire_id in self._pending:
            wire_id = secrets.randbelow(0x10000)
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        self._pending[wire_id] = (_address(_mapped(server)), waiter)
        try:
            await self._loop.sock_sendto(self._udp, with_id(query.wire, wire_id), (_mapped(server), DNS_PORT))
            data = await asyncio.wait_for(waiter, UDP_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            log.debug("[DNS] %s to %s over UDP from port %d: %s", query.name, server, self.port, _why(exc))
            return None
        finally:
            del self._pending[wire_id]
        return with_id(data, query.id)

    async def ask_tcp(self, query: Query, server: str) -> bytes | None:
        """``query`` over TCP from this port number (one connection at a time, closed with a reset so the
        port is free again at once)."""
        async with self._tcp_lock:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                sock.setblocking(False)
                sock.bind(("::", self.port))
                await asyncio.wait_for(
                    self._loop.sock_connect(sock, (_mapped(server), DNS_PORT)), TCP_TIMEOUT
                )
                reader, writer = await asyncio.open_connection(sock=sock)
            except (OSError, TimeoutError) as exc:
                sock.close()
                log.debug(
                    "[DNS] %s to %s over TCP from port %d: %s", query.name, server, self.port, _why(exc)
                )
                return None
            try:
                answer = await _tcp_exchange(reader, writer, query.wire)
            finally:
                writer.transport.abort()
            if answer is None:
                log.debug("[DNS] %s to %s over TCP from port %d: no answer", query.name, server, self.port)
            return answer

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._udp.fileno())
        self._udp.close()
        for _, waiter in self._pending.values():
            if not waiter.done():
                waiter.cancel()


async def _tcp_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wire: bytes
) -> bytes | None:
    """One query over an open DNS-over-TCP connection; the answer or None."""
    try:
        writer.write(tcp_frame(wire))
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(2), TCP_TIMEOUT)
        return await asyncio.wait_for(reader.readexactly(struct.unpack("!H", header)[0]), TCP_TIMEOUT)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None


async def ask_resolver(query: Query, resolver: str, mark: int, *, tcp: bool) -> bytes | None:
    """Ask the local resolver itself, from a socket carrying ``mark`` (the redirect leaves it alone)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(resolver), socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    try:
        if mark and hasattr(socket, "SO_MARK"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (resolver, DNS_PORT)), TCP_TIMEOUT)
        if tcp:
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                return await _tcp_exchange(reader, writer, query.wire)
            finally:
                writer.transport.abort()
        await loop.sock_sendall(sock, query.wire)
        return await asyncio.wait_for(loop.sock_recv(sock, MAX_MESSAGE), UDP_TIMEOUT)
    except (OSError, TimeoutError):
        return None
    finally:
        sock.close()


async def ask_through_proxy(
    provider: StreamProvider, query: Query, server: str, *, tcp: bool, udp: bool
) -> bytes | None:
    """Ask ``server`` through a stream tunnel: a UDP association when the tunnel carries UDP (``udp``),
    else nothing over UDP (the forwarder asks again over TCP); DNS over TCP through CONNECT."""
    if not tcp and not (udp and provider.supports_udp):
        return None
    try:
        if tcp:
            reader, writer = await asyncio.wait_for(provider.open_tcp(server, DNS_PORT), TCP_TIMEOUT)
            try:
                return await _tcp_exchange(reader, writer, query.wire)
            finally:
                abort_stream(writer)
        channel = await asyncio.wait_for(provider.open_udp(), TCP_TIMEOUT)
        try:
            channel.send_to(query.wire, (server, DNS_PORT))
            data, _source = await asyncio.wait_for(channel.recv(), UDP_TIMEOUT)
            return data
        finally:
            channel.close()
    except (TunnelError, OSError, TimeoutError) as exc:
        log.debug("[DNS] %s through %s failed: %s", query.name, provider.kind, exc)
        return None


def _why(exc: BaseException) -> str:
    """An upstream failure in a few words (a timeout's str() is empty)."""
    return "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
