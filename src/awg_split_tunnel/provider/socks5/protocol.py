"""SOCKS5 client negotiation (RFC 1928) with username/password authentication (RFC 1929), sans-I/O.

:class:`Socks5Client` takes the server's bytes in (``receive``) and gives bytes to send out (``outgoing``);
it never touches a socket. ``bytes_needed`` says how many more bytes complete the message the client
waits for, so an adapter can read exactly the negotiation and leave the tunnel's first bytes unread.
The UDP ASSOCIATE datagram header (RFC 1928 §7) is encoded and decoded by the functions at the end.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from awg_split_tunnel.errors import ConfigError, ProtocolError, TunnelError

SOCKS_VERSION = 5
AUTH_VERSION = 1
"""Version byte of the RFC 1929 username/password sub-negotiation."""

MAX_FIELD = 255


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class Method(enum.IntEnum):
    NO_AUTHENTICATION_REQUIRED = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAINNAME = 0x03
    IPV6 = 0x04


class Reply(enum.IntEnum):
    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


REPLY_MESSAGES = {
    Reply.GENERAL_FAILURE: "general SOCKS server failure",
    Reply.NOT_ALLOWED: "connection not allowed by ruleset",
    Reply.NETWORK_UNREACHABLE: "network unreachable",
    Reply.HOST_UNREACHABLE: "host unreachable",
    Reply.CONNECTION_REFUSED: "connection refused",
    Reply.TTL_EXPIRED: "TTL expired",
    Reply.COMMAND_NOT_SUPPORTED: "command not supported",
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


class Socks5ReplyError(TunnelError):
    """The server answered a request with a failure reply; ``reply`` is the code it sent."""

    def __init__(self, message: str, reply: int) -> None:
        super().__init__(message)
        self.reply = reply


class Socks5AuthError(TunnelError):
    """The server rejected our credentials, or wants an authentication we cannot offer."""


class FragmentedDatagram(ProtocolError):
    """A UDP datagram with FRAG != 0: fragmentation is optional in RFC 1928 and not supported here."""


# --- addresses ---------------------------------------------------------------------------------------


def encode_address(host: str, port: int) -> bytes:
    """ATYP, DST.ADDR and DST.PORT for ``host:port``; IP literals become IPv4/IPv6, anything else a name."""
    if not 0 <= port <= 0xFFFF:
        raise TunnelError(f"port {port} is out of range")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is None:
        try:
            name = host.encode("ascii")
        except UnicodeEncodeError:
            try:
                name = host.encode("idna")
            except UnicodeError as exc:
                raise TunnelError(f"destination name {host!r} is not a valid host name") from exc
        if not 0 < len(name) <= MAX_FIELD:
            raise TunnelError(f"destination name {host[:40]!r}... does not fit SOCKS5 (1-255 bytes)")
        return bytes((AddressType.DOMAINNAME, len(name))) + name + port.to_bytes(2, "big")
    atyp = AddressType.IPV4 if ip.version == 4 else AddressType.IPV6
    return bytes((atyp,)) + ip.packed + port.to_bytes(2, "big")


def address_length(data: bytes | bytearray | memoryview, offset: int = 0) -> int | None:
    """Length of the ATYP+ADDR+PORT block at ``offset``; None while too short to tell.

    Raises ProtocolError for an unknown address type.
    """
    if len(data) <= offset:
        return None
    atyp = data[offset]
    if atyp == AddressType.IPV4:
        return 1 + 4 + 2
    if atyp == AddressType.IPV6:
        return 1 + 16 + 2
    if atyp == AddressType.DOMAINNAME:
        if len(data) <= offset + 1:
            return None
        return 1 + 1 + data[offset + 1] + 2
    raise ProtocolError(f"unknown SOCKS5 address type 0x{atyp:02x}")


def decode_address(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[str, int, int]:
    """(host, port, end offset) of the address block at ``offset``; ProtocolError when malformed."""
    length = address_length(data, offset)
    if length is None or len(data) < offset + length:
        raise ProtocolError("truncated SOCKS5 address")
    atyp = data[offset]
    end = offset + length
    raw = bytes(data[offset + 1 : end - 2])
    port = int.from_bytes(data[end - 2 : end], "big")
    if atyp == AddressType.IPV4:
        host = str(ipaddress.IPv4Address(raw))
    elif atyp == AddressType.IPV6:
        host = str(ipaddress.IPv6Address(raw))
    else:
        name = raw[1:]
        if not name:
            raise ProtocolError("empty SOCKS5 domain name")
        # surrogateescape keeps a hostile name's bytes intact without failing on them.
        host = name.decode("ascii", "surrogateescape")
    return host, port, end


# --- negotiation ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Method negotiation (and authentication, if any) finished; a request may be sent."""

    method: Method


@dataclass(frozen=True, slots=True)
class Established:
    """The server accepted the request. ``bound`` is BND.ADDR/BND.PORT (the UDP relay for UDP ASSOCIATE);
    ``leftover`` are bytes that followed the reply and belong to the tunnel."""

    command: Command
    bound: tuple[str, int]
    leftover: bytes


Event = Authenticated | Established


class _State(enum.Enum):
    METHOD = "method"
    AUTH = "auth"
    READY = "ready"
    REPLY = "reply"
    DONE = "done"


class Socks5Client:
    """One client side of a SOCKS5 negotiation: greeting, optional RFC 1929 auth, one request.

    ``server`` only labels error messages (e.g. ``"198.18.0.20:1080"``). Errors: ProtocolError when the
    server breaks the protocol, Socks5AuthError / Socks5ReplyError (TunnelErrors) when it refuses.
    """

    def __init__(self, server: str, *, username: str | None = None, password: str | None = None) -> None:
        self.server = server
        self._credentials: tuple[bytes, bytes] | None = None
        if username is not None or password is not None:
            user = (username or "").encode()
            secret = (password or "").encode()
            if not 0 < len(user) <= MAX_FIELD:
                raise ConfigError("SOCKS5 username must be 1-255 bytes", key="username")
            if len(secret) > MAX_FIELD:
                raise ConfigError("SOCKS5 password must be at most 255 bytes", key="password")
            self._credentials = (user, secret)
        self._state = _State.METHOD
        self._buffer = bytearray()
        self._out = bytearray()
        self._command = Command.CONNECT
        self._target = ""
        methods = [Method.NO_AUTHENTICATION_REQUIRED]
        if self._credentials is not None:
            methods.append(Method.USERNAME_PASSWORD)
        self._offered = frozenset(methods)
        self._out += bytes((SOCKS_VERSION, len(methods), *methods))

    @property
    def ready(self) -> bool:
        """True once a request may be sent."""
        return self._state is _State.READY

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def outgoing(self) -> bytes:
        """Bytes to send to the server now (possibly empty)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def bytes_needed(self) -> int:
        """How many more bytes finish the message being waited for; 0 when none is awaited."""
        have = len(self._buffer)
        if self._state in (_State.METHOD, _State.AUTH):
            return max(2 - have, 0)
        if self._state is _State.REPLY:
            if have < 5:
                return 5 - have
            length = address_length(self._buffer, 3)
            assert length is not None  # five bytes always tell the length
            return max(3 + length - have, 0)
        return 0

    def request(self, command: Command, host: str, port: int) -> None:
        """Queue a CONNECT / UDP ASSOCIATE request for ``host:port``."""
        if self._state is not _State.READY:
            raise RuntimeError(f"SOCKS5 request sent in state {self._state.value}")
        self._out += bytes((SOCKS_VERSION, command, 0)) + encode_address(host, port)
        self._command = command
        self._target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._state = _State.REPLY

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; returns the events they complete."""
        if self._state is _State.DONE:
            raise RuntimeError("SOCKS5 negotiation already finished; the bytes belong to the tunnel")
        self._buffer += data
        events: list[Event] = []
        while True:
            event = self._step()
            if event is None:
                break
            events.append(event)
            if isinstance(event, Established):
                break
        if self._state is _State.READY and self._buffer:
            raise ProtocolError(f"SOCKS5 server {self.server} sent data before a request")
        return events

    def _step(self) -> Event | None:
        buf = self._buffer
        if self._state is _State.METHOD:
            if len(buf) < 2:
                return None
            self._check_version(buf[0], SOCKS_VERSION, "method selection")
            method = buf[1]
            del buf[:2]
            return self._method_selected(method)
        if self._state is _State.AUTH:
            if len(buf) < 2:
                return None
            # Some servers answer the RFC 1929 sub-negotiation with the SOCKS version (5) instead of 1.
            if buf[0] not in (AUTH_VERSION, SOCKS_VERSION):
                raise ProtocolError(
                    f"SOCKS5 server {self.server} sent authentication reply version {buf[0]} (expected 1)"
                )
            status = buf[1]
            del buf[:2]
            if status != 0:
                raise Socks5AuthError(
                    f"SOCKS5 server {self.server} rejected the username/password (status 0x{status:02x})"
                )
            self._state = _State.READY
            return Authenticated(Method.USERNAME_PASSWORD)
        if self._state is _State.REPLY:
            if len(buf) < 5:
                return None
            self._check_version(buf[0], SOCKS_VERSION, "reply")
            reply = buf[1]
            if reply != Reply.SUCCEEDED:
                raise self._reply_error(reply)
            length = address_length(buf, 3)
            assert length is not None
            if len(buf) < 3 + length:
                return None
            host, port, end = decode_address(buf, 3)
            leftover = bytes(buf[end:])
            buf.clear()
            self._state = _State.DONE
            return Established(self._command, (host, port), leftover)
        return None

    def _method_selected(self, method: int) -> Event | None:
        if method == Method.NO_ACCEPTABLE_METHODS:
            if self._credentials is None:
                raise Socks5AuthError(
                    f"SOCKS5 server {self.server} requires authentication; set username and password"
                )
            raise Socks5AuthError(f"SOCKS5 server {self.server} accepts none of our authentication methods")
        if method not in self._offered:
            raise ProtocolError(
                f"SOCKS5 server {self.server} chose authentication method 0x{method:02x},"
                " which was not offered"
            )
        if method == Method.USERNAME_PASSWORD:
            assert self._credentials is not None
            user, secret = self._credentials
            self._out += bytes((AUTH_VERSION, len(user))) + user + bytes((len(secret),)) + secret
            self._state = _State.AUTH
            return None
        self._state = _State.READY
        return Authenticated(Method.NO_AUTHENTICATION_REQUIRED)

    def _check_version(self, got: int, expected: int, what: str) -> None:
        if got != expected:
            raise ProtocolError(
                f"SOCKS5 server {self.server} sent {what} with version {got} (expected {expected});"
                " is it a SOCKS5 server?"
            )

    def _reply_error(self, reply: int) -> Socks5ReplyError:
        try:
            reason = REPLY_MESSAGES[Reply(reply)]
        except (ValueError, KeyError):
            reason = "unknown reply"
        what = "UDP ASSOCIATE" if self._command is Command.UDP_ASSOCIATE else f"CONNECT {self._target}"
        return Socks5ReplyError(
            f"SOCKS5 server {self.server} refused {what}: {reason} (reply 0x{reply:02x})", reply
        )


# --- UDP ASSOCIATE datagrams -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One datagram relayed by a SOCKS5 server: its remote address and payload."""

    host: str
    port: int
    payload: bytes


def encode_udp_datagram(payload: bytes, host: str, port: int) -> bytes:
    """RSV(2) FRAG(1)=0 ATYP DST.ADDR DST.PORT DATA."""
    return b"\x00\x00\x00" + encode_address(host, port) + payload


def decode_udp_datagram(data: bytes) -> UdpDatagram:
    """Parse a datagram from the relay; ProtocolError (FragmentedDatagram for FRAG != 0) when unusable."""
    if len(data) < 4:
        raise ProtocolError("truncated SOCKS5 UDP header")
    if data[2] != 0:
        raise FragmentedDatagram(f"fragmented SOCKS5 UDP datagram (FRAG 0x{data[2]:02x})")
    host, port, end = decode_address(data, 3)
    return UdpDatagram(host, port, data[end:])
