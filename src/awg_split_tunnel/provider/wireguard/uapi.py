"""The WireGuard cross-platform configuration protocol (UAPI), sans-I/O: what `wg` and `awg` speak to a
userspace device over its control socket (docs/UAPI.md).

A client sends ``get=1\\n\\n`` or ``set=1\\n`` followed by ``key=value`` lines and a blank line; the device
answers a get with its state as ``key=value`` lines, and every request with ``errno=N`` and a blank line
(0, or a negative errno as wireguard-go sends it, which `wg` turns into its message).

`UapiConnection` turns the bytes of one connection into requests (`GetRequest`, `SetRequest`, and
`BadRequest` for anything malformed, which never raises); `format_get` and `format_errno` build the
answers. Applying a `SetRequest` to a device is the device's business (`WireGuardDevice.apply_uapi`).
The parser follows wireguard-go and amneziawg-go 1b86b2a (`device/uapi.go`): device keys first, then one
block per ``public_key``; values are checked as they do, with the AmneziaWG keys those peers accept.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from dataclasses import dataclass, field

from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.amneziawg.params import (
    BOOL_KEYS,
    HEADER_KEYS,
    INT_KEYS,
    TEMPLATE_KEYS,
    TIMER_KEYS,
    UNSET,
    AmneziaParams,
)
from awg_split_tunnel.provider.wireguard.allowed_ips import Network
from awg_split_tunnel.provider.wireguard.value_range import Range

Endpoint = tuple[str, int]

KEY_SIZE = 32
MAX_LINE = 8192
"""Longest request line accepted; an I1–I5 template is the longest legitimate value."""
MAX_SET_LINES = 100_000
"""Lines of one set request (a peer with many allowed IPs is a line per prefix)."""

# The errno values wireguard-go answers, negative as it sends them (ipc/uapi_unix.go); `wg` negates them.
ERRNO_IO = -errno.EIO
ERRNO_PROTOCOL = -errno.EPROTO
ERRNO_INVALID = -errno.EINVAL
ERRNO_PORT_IN_USE = -errno.EADDRINUSE
ERRNO_UNKNOWN = -55  # ENOANO: wireguard-go's answer to an error it did not expect

AMNEZIA_DEVICE_KEYS = (
    *INT_KEYS,
    *HEADER_KEYS,
    *TEMPLATE_KEYS,
    "header_protection_key",
    "content_padding_addition",
    *TIMER_KEYS,
    *BOOL_KEYS,
)
"""The AmneziaWG device keys amneziawg-go's UAPI reads and writes, in the order it writes them."""

_UNSIGNED = re.compile(r"[0-9]+")
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


class UapiError(Exception):
    """A request the device refuses: `code` is the (negative) errno answered; the message is for the
    device's log and never holds a key."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- requests -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetRequest:
    """``get=1``: answer with `format_get` of the device's state."""


@dataclass(frozen=True, slots=True)
class PeerChange:
    """One ``public_key=`` block of a set request, its keys folded in the order they came."""

    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: Endpoint | None = None
    persistent_keepalive: Range | None = None
    """None: unchanged; Range(0, 0): off."""
    replace_allowed_ips: bool = False
    allowed_ips: tuple[tuple[bool, Network], ...] = ()
    """(add, prefix) in order: ``allowed_ip=-PREFIX`` removes (amneziawg-go)."""


@dataclass(frozen=True, slots=True)
class SetRequest:
    """``set=1``: the device keys given (None: not given) and the peer blocks, in order."""

    private_key: bytes | None = field(default=None, repr=False)
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    amnezia: tuple[tuple[str, str], ...] = ()
    """AmneziaWG keys as sent (key, value): checked by `AmneziaParams` against the device's own set."""
    peers: tuple[PeerChange, ...] = ()


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A malformed request: answer ``errno=code``; when `fatal`, the stream cannot be followed any
    further and the connection is closed after the answer."""

    code: int
    reason: str
    fatal: bool = False


UapiRequest = GetRequest | SetRequest | BadRequest


# -- answers --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerState:
    """What a get reports of one peer."""

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: Endpoint | None = None
    last_handshake: float | None = None
    """Wall-clock time (`time.time()`) of the last completed handshake; None: never."""
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: Range | None = None
    allowed_ips: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceState:
    """What a get reports of the device; `amnezia` None for a plain WireGuard device."""

    private_key: bytes = field(repr=False)
    listen_port: int = 0
    fwmark: int = 0
    amnezia: AmneziaParams | None = None
    peers: tuple[PeerState, ...] = ()


def format_errno(code: int) -> bytes:
    """The status line that ends every answer."""
    return f"errno={code}\n\n".encode()


def format_get(state: DeviceState) -> bytes:
    """The answer to a get: the device's keys, the AmneziaWG ones as amneziawg-go writes them (for a
    device that has them), then each peer, and ``errno=0``."""
    lines: list[str] = []
    if any(state.private_key):
        lines.append(f"private_key={state.private_key.hex()}")
    if state.listen_port:
        lines.append(f"listen_port={state.listen_port}")
    if state.fwmark:
        lines.append(f"fwmark={state.fwmark}")
    if state.amnezia is not None:
        lines += _amnezia_lines(state.amnezia)
    for peer in state.peers:
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append(f"preshared_key={(peer.preshared_key or bytes(KEY_SIZE)).hex()}")
        lines.append("protocol_version=1")
        if peer.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(peer.endpoint)}")
        seconds, nanoseconds = _split_time(peer.last_handshake)
        lines.append(f"last_handshake_time_sec={seconds}")
        lines.append(f"last_handshake_time_nsec={nanoseconds}")
        lines.append(f"tx_bytes={peer.tx_bytes}")
        lines.append(f"rx_bytes={peer.rx_bytes}")
        if peer.persistent_keepalive is not None and peer.persistent_keepalive != UNSET:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines += [f"allowed_ip={network}" for network in peer.allowed_ips]
    body = "".join(line + "\n" for line in lines)
    return body.encode() + format_errno(0)


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_time(wall: float | None) -> tuple[int, int]:
    if wall is None or wall <= 0:
        return 0, 0
    seconds = int(wall)
    return seconds, min(round((wall - seconds) * 1e9), 999_999_999)


def _amnezia_lines(params: AmneziaParams) -> list[str]:
    lines = []
    for key in INT_KEYS:
        value = getattr(params, key)
        if value:
            lines.append(f"{key}={value}")
    for key in HEADER_KEYS:
        header: Range = getattr(params, key)
        if header != UNSET:
            lines.append(f"{key}={header}")
    for key in TEMPLATE_KEYS:
        template = getattr(params, key)
        if template is not None:
            lines.append(f"{key}={template}")
    if params.header_protection:
        lines.append(f"header_protection_key={params.header_protection_key.hex()}")
    for key in ("content_padding_addition", *TIMER_KEYS):
        value = getattr(params, key)
        if value != UNSET:
            lines.append(f"{key}={value}")
    lines += [f"{key}={int(getattr(params, key))}" for key in BOOL_KEYS]
    return lines


# -- parsing --------------------------------------------------------------------------------------------


class UapiConnection:
    """One control connection: bytes in (`receive`), requests out, in order. Never raises: malformed
    input becomes a `BadRequest`; after a fatal one the rest of the stream is ignored (`closed`)."""

    def __init__(self, *, max_line: int = MAX_LINE, max_set_lines: int = MAX_SET_LINES) -> None:
        self.max_line = max_line
        self.max_set_lines = max_set_lines
        self.closed = False
        self._buffer = bytearray()
        self._mode = "operation"
        self._set: _SetParser | None = None

    def receive(self, data: bytes) -> list[UapiRequest]:
        """Feed bytes; returns the requests they complete."""
        out: list[UapiRequest] = []
        if self.closed:
            return out
        self._buffer += data
        while not self.closed:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    out.append(self._fail(ERRNO_PROTOCOL, "request line too long"))
                break
            if end > self.max_line:
                out.append(self._fail(ERRNO_PROTOCOL, "request line too long"))
                break
            raw = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            request = self._line(raw)
            if request is not None:
                out.append(request)
        return out

    def _fail(self, code: int, reason: str) -> BadRequest:
        self.closed = True
        self._buffer.clear()
        return BadRequest(code, reason, fatal=True)

    def _line(self, raw: bytes) -> UapiRequest | None:
        if self._mode == "operation":
            if raw == b"get=1":
                self._mode = "get"
                return None
            if raw == b"set=1":
                self._mode = "set"
                self._set = _SetParser(self.max_set_lines)
                return None
            return self._fail(ERRNO_PROTOCOL, "unknown operation (expected get=1 or set=1)")
        if self._mode == "get":
            self._mode = "operation"
            if raw:
                return self._fail(ERRNO_INVALID, "trailing characters after get=1")
            return GetRequest()
        parser = self._set
        assert parser is not None
        if raw:
            if not parser.line(raw):
                return self._fail(ERRNO_PROTOCOL, "set request too long")
            return None
        self._mode = "operation"
        self._set = None
        return parser.finish()


class _SetParser:
    """The lines of one set request up to its blank line. The first error is kept and the rest of the
    request read (so the stream stays in step) before it is answered."""

    def __init__(self, max_lines: int) -> None:
        self.max_lines = max_lines
        self.lines = 0
        self.error: BadRequest | None = None
        self.device: dict[str, object] = {}
        self.amnezia: list[tuple[str, str]] = []
        self.peers: list[PeerChange] = []
        self.peer: dict[str, object] | None = None
        self.allowed: list[tuple[bool, Network]] = []

    def line(self, raw: bytes) -> bool:
        self.lines += 1
        if self.lines > self.max_lines:
            return False
        if self.error is not None:
            return True
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.error = BadRequest(ERRNO_INVALID, "a line is not UTF-8 text")
            return True
        key, sep, value = text.partition("=")
        if not sep:
            self.error = BadRequest(ERRNO_PROTOCOL, "a line without '='")
            return True
        try:
            if key == "public_key":
                self._end_peer()
                self.peer = {"public_key": _key(value, key)}
                self.allowed = []
            elif self.peer is None:
                self._device_line(key, value)
            else:
                self._peer_line(self.peer, key, value)
        except UapiError as exc:
            self.error = BadRequest(exc.code, str(exc))
        return True

    def finish(self) -> UapiRequest:
        if self.error is not None:
            return self.error
        self._end_peer()
        return SetRequest(
            private_key=self.device.get("private_key"),  # type: ignore[arg-type]
            listen_port=self.device.get("listen_port"),  # type: ignore[arg-type]
            fwmark=self.device.get("fwmark"),  # type: ignore[arg-type]
            replace_peers=bool(self.device.get("replace_peers", False)),
            amnezia=tuple(self.amnezia),
            peers=tuple(self.peers),
        )

    def _end_peer(self) -> None:
        if self.peer is not None:
            self.peers.append(PeerChange(**self.peer, allowed_ips=tuple(self.allowed)))  # type: ignore[arg-type]
            self.peer = None

    def _device_line(self, key: str, value: str) -> None:
        if key == "private_key":
            private = _key(value, key)
            if not any(private):
                raise UapiError(ERRNO_INVALID, "private_key: an all-zero key cannot run a device")
            self.device[key] = private
        elif key == "listen_port":
            self.device[key] = _unsigned(value, key, 0xFFFF)
        elif key == "fwmark":
            self.device[key] = _unsigned(value, key, 0xFFFFFFFF)
        elif key == "replace_peers":
            self.device[key] = _true(value, key)
        elif key in AMNEZIA_DEVICE_KEYS:
            try:
                AmneziaParams.from_mapping({key: value})
            except ConfigError as exc:
                raise UapiError(ERRNO_INVALID, exc.reason) from None
            self.amnezia.append((key, value))
        else:
            raise UapiError(ERRNO_INVALID, f"invalid UAPI device key: {_shown(key)}")

    def _peer_line(self, peer: dict[str, object], key: str, value: str) -> None:
        if key in ("remove", "update_only"):
            peer[key] = _true(value, key)
        elif key == "preshared_key":
            peer[key] = _key(value, key)
        elif key == "endpoint":
            peer[key] = parse_endpoint(value)
        elif key == "persistent_keepalive_interval":
            peer["persistent_keepalive"] = _keepalive(value)
        elif key == "replace_allowed_ips":
            peer[key] = _true(value, key)
            self.allowed = []  # prefixes given before it are replaced too, as the line order says
        elif key == "allowed_ip":
            add = not value.startswith("-")
            self.allowed.append((add, _prefix(value if add else value[1:])))
        elif key == "protocol_version":
            if value != "1":
                raise UapiError(ERRNO_INVALID, f"invalid protocol version: {_shown(value)}")
        else:
            raise UapiError(ERRNO_INVALID, f"invalid UAPI peer key: {_shown(key)}")


def _key(value: str, name: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        raise UapiError(ERRNO_INVALID, f"{name}: expected 64 lower-case hex digits")
    return bytes.fromhex(value)


def _keepalive(value: str) -> Range:
    try:
        interval = Range.parse(value)
    except ValueError:
        interval = None
    if interval is None or value != value.strip() or interval.hi > 0xFFFF:
        raise UapiError(ERRNO_INVALID, "persistent_keepalive_interval: expected seconds (0-65535) or A-B")
    return interval


def _unsigned(value: str, name: str, maximum: int) -> int:
    if not _UNSIGNED.fullmatch(value) or int(value) > maximum:
        raise UapiError(ERRNO_INVALID, f"{name}: expected a number from 0 to {maximum}")
    return int(value)


def _true(value: str, name: str) -> bool:
    if value != "true":
        raise UapiError(ERRNO_INVALID, f"{name}: the only value is 'true'")
    return True


def _prefix(value: str) -> Network:
    address, slash, length = value.partition("/")
    if not slash or not _UNSIGNED.fullmatch(length):
        raise UapiError(ERRNO_INVALID, f"allowed_ip: expected ADDRESS/LENGTH, got {_shown(value)}")
    try:
        return ipaddress.ip_network(f"{address}/{int(length)}", strict=False)
    except ValueError:
        raise UapiError(ERRNO_INVALID, f"allowed_ip: not a prefix: {_shown(value)}") from None


def parse_endpoint(value: str) -> Endpoint:
    """``A.B.C.D:PORT`` or ``[V6]:PORT`` (numeric, as wireguard-go's ParseEndpoint takes them)."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    try:
        if not sep or not _UNSIGNED.fullmatch(port) or int(port) > 0xFFFF:
            raise ValueError
        address = ipaddress.ip_address(host)
        if (address.version == 6) != value.startswith("["):
            raise ValueError
    except ValueError:
        raise UapiError(
            ERRNO_INVALID, f"endpoint: expected IP:PORT or [IPv6]:PORT, got {_shown(value)}"
        ) from None
    return str(address), int(port)


def _shown(text: str) -> str:
    """A client's text in a log message: short and printable (it is never a key: keys are checked
    for their form before anything echoes them)."""
    cut = text[:60]
    return "".join(c if c.isprintable() else "?" for c in cut) + ("…" if len(text) > 60 else "")
