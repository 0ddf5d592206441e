"""HTTP CONNECT negotiation with an HTTP proxy (RFC 9110 §9.3.6), optional Basic auth, sans-I/O.

:class:`HttpConnectClient` builds the request (``outgoing``) and parses the proxy's response
(``receive``) without touching a socket. It consumes exactly the response header: bytes after the blank
line belong to the tunnel and come back as ``Established.leftover``.
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass

from awg_split_tunnel.errors import ProtocolError, TunnelError, shown_text

MAX_HEADER_BYTES = 32 * 1024
"""A proxy's response header larger than this is refused (a sane proxy sends a few hundred bytes)."""

MAX_HEADER_LINES = 100

_STATUS_LINE = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: (.*))?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class HttpProxyRefused(TunnelError):
    """The proxy answered CONNECT with a non-2xx status; ``status`` is the code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    """A parsed response header: status, reason and header fields (names lower-cased)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((value for key, value in self.headers if key == name), None)


@dataclass(frozen=True, slots=True)
class Established:
    """The proxy opened the tunnel; ``leftover`` are bytes after the header that belong to it."""

    response: Response
    leftover: bytes


def format_authority(host: str, port: int) -> str:
    """``host:port`` as a request target, with IPv6 literals in brackets."""
    if not 0 <= port <= 0xFFFF:
        raise TunnelError(f"port {port} is out of range")
    if any(c in host for c in "\r\n \t/@") or not host:
        raise TunnelError(f"destination {host!r} is not a valid host")
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def basic_credentials(username: str, password: str) -> str:
    """The ``Proxy-Authorization`` value for Basic auth (RFC 7617, UTF-8)."""
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def parse_response_header(block: bytes, server: str) -> Response:
    """Parse a response header block (status line and fields, without the blank line)."""
    lines = block.split(b"\n")
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError(f'HTTP proxy {server} sent a malformed status line: "{shown_text(lines[0])}"')
    if match.group(1) != b"1":
        raise ProtocolError(f"HTTP proxy {server} answered with unsupported HTTP/{match.group(1).decode()}")
    status = int(match.group(3))
    reason = (match.group(4) or b"").decode("latin-1").strip()
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise ProtocolError(f"HTTP proxy {server} sent more than {MAX_HEADER_LINES} header lines")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            # Obsolete line folding (RFC 9112 §5.2): a proxy may not send it; refusing is allowed.
            raise ProtocolError(f"HTTP proxy {server} sent a folded header line")
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise ProtocolError(f'HTTP proxy {server} sent a malformed header line: "{shown_text(line)}"')
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return Response(status, reason, tuple(headers))


class _State(enum.Enum):
    WAITING = "waiting"
    DONE = "done"


class HttpConnectClient:
    """The client side of one CONNECT exchange.

    ``server`` labels error messages. ``receive`` raises ProtocolError for malformed or oversized
    responses, HttpProxyRefused (a TunnelError) for non-2xx replies.
    """

    def __init__(
        self,
        server: str,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
    ) -> None:
        self.server = server
        self.target = format_authority(host, port)
        self._max_header_bytes = max_header_bytes
        self._state = _State.WAITING
        self._buffer = bytearray()
        self._scanned = 0
        self._authenticating = username is not None
        lines = [f"CONNECT {self.target} HTTP/1.1", f"Host: {self.target}"]
        if username is not None:
            lines.append(f"Proxy-Authorization: {basic_credentials(username, password or '')}")
        self._out = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def outgoing(self) -> bytes:
        """The request, once; empty afterwards."""
        data, self._out = self._out, b""
        return data

    def receive(self, data: bytes) -> list[Established]:
        """Feed bytes from the proxy; returns ``[Established]`` once a 2xx header is complete."""
        if self._state is _State.DONE:
            raise RuntimeError("CONNECT already established; the bytes belong to the tunnel")
        self._buffer += data
        while True:
            end, body_start = self._header_end()
            if end < 0:
                if len(self._buffer) > self._max_header_bytes:
                    raise ProtocolError(
                        f"HTTP proxy {self.server} sent a response header over {self._max_header_bytes} bytes"
                    )
                return []
            if end > self._max_header_bytes:
                raise ProtocolError(
                    f"HTTP proxy {self.server} sent a response header over {self._max_header_bytes} bytes"
                )
            response = parse_response_header(bytes(self._buffer[:end]), self.server)
            del self._buffer[:body_start]
            self._scanned = 0
            if 100 <= response.status < 200:
                continue  # an interim response; the final one follows
            if 200 <= response.status < 300:
                self._state = _State.DONE
                leftover = bytes(self._buffer)
                self._buffer.clear()
                return [Established(response, leftover)]
            raise self._refused(response)

    def _header_end(self) -> tuple[int, int]:
        """(end of the header block, start of what follows) or (-1, -1) while incomplete.

        Accepts bare LF line endings, as RFC 9112 §2.2 allows a recipient to.
        """
        buf = self._buffer
        start = max(self._scanned - 3, 0)
        crlf = buf.find(b"\r\n\r\n", start)
        lf = buf.find(b"\n\n", start)
        self._scanned = len(buf)
        candidates = []
        if crlf >= 0:
            candidates.append((crlf, crlf + 4))
        if lf >= 0:
            candidates.append((lf, lf + 2))
        return min(candidates) if candidates else (-1, -1)

    def _refused(self, response: Response) -> HttpProxyRefused:
        status = f"{response.status} {shown_text(response.reason)}".strip()
        if response.status == 407:
            why = (
                "rejected the credentials"
                if self._authenticating
                else "requires authentication; set username and password"
            )
            return HttpProxyRefused(f"HTTP proxy {self.server} {why} ({status})", response.status)
        return HttpProxyRefused(
            f"HTTP proxy {self.server} refused CONNECT {self.target}: {status}", response.status
        )


class HttpProbe:
    """Checks that something at the server speaks HTTP: any well-formed status line will do."""

    # An origin-form request without Host names nothing a forward proxy could fetch, so it answers
    # (typically 400) without any outbound connection or DNS lookup of its own.
    REQUEST = b"GET / HTTP/1.0\r\n\r\n"

    def __init__(self, server: str) -> None:
        self.server = server
        self._buffer = bytearray()

    def receive(self, data: bytes) -> bool:
        """True once a status line arrived; ProtocolError when it is not HTTP."""
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > 1024 or (self._buffer and not b"HTTP/".startswith(self._buffer[:5])):
                raise ProtocolError(f"HTTP proxy {self.server} does not answer in HTTP")
            return False
        parse_response_header(bytes(self._buffer[:end]).rstrip(b"\r"), self.server)
        return True
