"""The lab's web server: tells every client the address it came from ("what is my IP").

HTTP/1.1 on TCP (IPv4 and IPv6, keep-alive):

- ``GET <anything>`` → ``200``, body ``<client ip>\\n<client ip>:<port>\\n`` (IPv6 as ``[ip]:port``);
- ``GET /bytes/N`` → N deterministic bytes (:func:`pattern_bytes`), streamed;
- ``POST /sha256`` → the hex SHA-256 of the request body (``Content-Length`` or chunked).

UDP echo (default port 7): each datagram is answered with ``<client ip>:<port>\\n`` followed by the payload.

Run it as ``python -m awg_split_tunnel.lab.echo_server [--port 80] [--udp-port 7]``; it prints ``ready``
once every socket listens.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import sys
from dataclasses import dataclass
from typing import cast

PATTERN_PERIOD = 251  # prime, so the pattern does not line up with power-of-two buffer sizes
_PATTERN_BLOCK = bytes(i % PATTERN_PERIOD for i in range(PATTERN_PERIOD * 261))  # 65,511 bytes
MAX_HEADER_BYTES = 16 * 1024
MAX_BYTES_REQUEST = 1 << 40


def pattern_bytes(n: int, offset: int = 0) -> bytes:
    """Bytes ``offset .. offset+n`` of the deterministic stream served by ``/bytes/N``."""
    start = offset % PATTERN_PERIOD
    out = bytearray()
    while len(out) < n:
        out += _PATTERN_BLOCK[start : start + (n - len(out))]
        start = 0
    return bytes(out)


def pattern_sha256(n: int) -> str:
    """Hex SHA-256 of the first ``n`` bytes of the deterministic stream."""
    digest = hashlib.sha256()
    full, rest = divmod(n, len(_PATTERN_BLOCK))
    for _ in range(full):
        digest.update(_PATTERN_BLOCK)
    digest.update(_PATTERN_BLOCK[:rest])
    return digest.hexdigest()


def format_peer(host: str, port: int) -> tuple[str, str]:
    """``(ip, ip:port)`` for a peer address; IPv4-mapped IPv6 shown as IPv4, IPv6 bracketed."""
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    host = host.split("%", 1)[0]
    return host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(slots=True)
class ServerStats:
    """Counters of what the server saw; malformed input is counted, never raised."""

    requests: int = 0
    bad_requests: int = 0
    datagrams: int = 0


class BadRequest(Exception):
    """A request the server cannot parse; answered with 400 and the connection closed."""


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], sink: hashlib._Hash) -> None:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise BadRequest("bad chunk size") from exc
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            while size:
                chunk = await reader.read(min(size, 1 << 16))
                if not chunk:
                    raise BadRequest("body truncated")
                sink.update(chunk)
                size -= len(chunk)
            await reader.readline()
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit():
        raise BadRequest("bad Content-Length")
    remaining = int(length_text)
    while remaining:
        chunk = await reader.read(min(remaining, 1 << 16))
        if not chunk:
            raise BadRequest("body truncated")
        sink.update(chunk)
        remaining -= len(chunk)


def _response_head(status: str, length: int, content_type: str = "text/plain") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n"
        "Server: awg-lab-echo\r\n\r\n"
    ).encode()


class EchoHttpServer:
    """The HTTP side: one coroutine per connection, keep-alive, bounded header size."""

    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip, ip_port = format_peer(str(peer[0]), int(peer[1]))
        try:
            while await self._one_request(reader, writer, ip, ip_port):
                pass
        except BadRequest as exc:
            self.stats.bad_requests += 1
            body = f"bad request: {exc}\n".encode()
            writer.write(_response_head("400 Bad Request", len(body)) + body)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.stats.bad_requests += 1
        finally:
            try:
                writer.close()
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str, ip_port: str
    ) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise BadRequest("incomplete request head") from exc
            return False
        if len(head) > MAX_HEADER_BYTES:
            raise BadRequest("request head too large")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest("bad request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, sep, value = line.partition(":")
                if not sep:
                    raise BadRequest("bad header line")
                headers[name.strip().lower()] = value.strip()
        self.stats.requests += 1
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if method == "POST" and target == "/sha256":
            digest = hashlib.sha256()
            await _read_body(reader, headers, digest)
            body = f"{digest.hexdigest()}\n".encode()
            writer.write(_response_head("200 OK", len(body)) + body)
        elif method in ("GET", "HEAD") and target.startswith("/bytes/"):
            count_text = target[len("/bytes/") :]
            if not count_text.isdigit() or int(count_text) > MAX_BYTES_REQUEST:
                raise BadRequest("bad byte count")
            count = int(count_text)
            writer.write(_response_head("200 OK", count, "application/octet-stream"))
            if method == "GET":
                await self._stream_pattern(writer, count)
        elif method in ("GET", "HEAD"):
            body = f"{ip}\n{ip_port}\n".encode()
            writer.write(_response_head("200 OK", len(body)) + (body if method == "GET" else b""))
        else:
            # Drain the body so the connection stays in sync, then refuse.
            await _read_body(reader, headers, hashlib.sha256())
            body = b"unsupported\n"
            writer.write(_response_head("405 Method Not Allowed", len(body)) + body)
        await writer.drain()
        return keep_alive

    @staticmethod
    async def _stream_pattern(writer: asyncio.StreamWriter, count: int) -> None:
        block = _PATTERN_BLOCK
        sent = 0
        while sent < count:
            # The block length is a multiple of the period, so every chunk starts at phase 0.
            chunk = block if count - sent >= len(block) else block[: count - sent]
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()


class UdpEcho(asyncio.DatagramProtocol):
    """UDP echo that prefixes each reply with the sender's address."""

    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.stats.datagrams += 1
        if self.transport is None:
            return
        _, ip_port = format_peer(str(addr[0]), int(addr[1]))
        self.transport.sendto(f"{ip_port}\n".encode() + data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies; nothing to do but keep serving.
        self.stats.bad_requests += 1


def _bound_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, address: str, port: int
) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    return sock


async def serve(port: int = 80, udp_port: int = 7, *, v4: str = "0.0.0.0", v6: str | None = "::") -> None:
    """Serve HTTP on ``port`` and UDP echo on ``udp_port`` (0 disables) until cancelled."""
    stats = ServerStats()
    http = EchoHttpServer(stats)
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    transports: list[asyncio.BaseTransport] = []
    families = [(socket.AF_INET, v4)] + ([(socket.AF_INET6, v6)] if v6 else [])
    for family, address in families:
        sock = _bound_socket(family, socket.SOCK_STREAM, address, port)
        servers.append(await asyncio.start_server(http.handle, sock=sock, backlog=512))
        if udp_port:
            udp = _bound_socket(family, socket.SOCK_DGRAM, address, udp_port)
            datagram_transport, _ = await loop.create_datagram_endpoint(lambda: UdpEcho(stats), sock=udp)
            transports.append(datagram_transport)
    print("ready", flush=True)
    try:
        await asyncio.gather(*(server.serve_forever() for server in servers))
    finally:
        for each in transports:
            each.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=80, help="HTTP port (default 80)")
    parser.add_argument("--udp-port", type=int, default=7, help="UDP echo port, 0 to disable (default 7)")
    parser.add_argument("--bind", default="0.0.0.0", help="IPv4 address to listen on")
    parser.add_argument("--bind6", default="::", help="IPv6 address to listen on, '' to disable")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.port, args.udp_port, v4=args.bind, v6=args.bind6 or None))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        print(f"echo_server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
