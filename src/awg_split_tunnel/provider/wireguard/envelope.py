"""How WireGuard messages are put on the wire: the seam between the WireGuard core and AmneziaWG.

The WireGuard protocol core (handshake, cookies, transport, timers) builds and consumes standard
messages. An `Envelope` decides everything AmneziaWG changes around them: the u32 type value written at
offset 0, what is sent before each initiation (I-packets, junk), prefixes, header protection, trailers,
transport padding, keepalive detection, and the classification of received datagrams. `PlainEnvelope` is
WireGuard exactly; `provider.amneziawg` provides the obfuscating one. Nothing here does I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class MessageType(enum.IntEnum):
    INITIATION = 1
    RESPONSE = 2
    COOKIE_REPLY = 3
    TRANSPORT = 4


INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
MIN_TRANSPORT_SIZE = 32  # header + Poly1305 tag: a keepalive
HANDSHAKE_SIZES = {
    MessageType.INITIATION: INITIATION_SIZE,
    MessageType.RESPONSE: RESPONSE_SIZE,
    MessageType.COOKIE_REPLY: COOKIE_REPLY_SIZE,
}
PADDING_MULTIPLE = 16
DEFAULT_UDP_WINDOW = 500


@dataclass(slots=True)
class UdpWindow:
    """Per-peer state some envelopes keep (AmneziaWG 3.x random trailers fill datagrams up to it)."""

    value: int = DEFAULT_UDP_WINDOW


@dataclass(frozen=True, slots=True)
class TransportForm:
    """A transport framing simple enough for the core to apply itself, a batch at a time: `prefix` random
    bytes, then the WireGuard message with a type value from [`type_lo`, `type_hi`] and WireGuard's
    padding, nothing after it. A received datagram whose size is in `handshake_sizes` goes through
    `Envelope.unwrap` (it may be a handshake message)."""

    prefix: int
    type_lo: int
    type_hi: int
    handshake_sizes: frozenset[int] = frozenset()


PLAIN_TRANSPORT = TransportForm(0, int(MessageType.TRANSPORT), int(MessageType.TRANSPORT))


def padded_plaintext_length(ip_len: int, mtu: int) -> int:
    """WireGuard's transport padding: round up to 16, capped at the MTU (wireguard-go send.go)."""
    if ip_len == 0:
        return 0
    if mtu == 0:
        return -(-ip_len // PADDING_MULTIPLE) * PADDING_MULTIPLE
    last = ip_len % mtu if ip_len > mtu else ip_len
    padded = min(-(-last // PADDING_MULTIPLE) * PADDING_MULTIPLE, mtu)
    return ip_len + (padded - last)


class Envelope(Protocol):
    """The wire format around WireGuard messages. One instance per device; per-peer state lives in the
    `UdpWindow` the core keeps for each peer and passes in."""

    def type_value(self, msg_type: MessageType) -> int:
        """The u32 (little-endian) to write at offset 0 of a message being built."""
        ...

    def before_initiation(self, now: float) -> list[bytes]:
        """Datagrams to send, in order, before each handshake initiation (I-packets, then junk)."""
        ...

    def wrap_handshake(self, msg_type: MessageType, message: bytes, window: UdpWindow) -> bytes:
        """The datagram for a complete handshake message (initiation, response or cookie reply) whose
        MACs are already computed over these exact bytes."""
        ...

    def transport_plaintext_length(self, ip_len: int, mtu: int, window: UdpWindow) -> int:
        """Length to zero-pad a transport plaintext of `ip_len` bytes to (0 = keepalive)."""
        ...

    def wrap_transport(self, message: bytes, window: UdpWindow) -> bytes:
        """The datagram for a sealed transport message (header + ciphertext + tag)."""
        ...

    def unwrap(self, datagram: bytes) -> tuple[MessageType, bytes] | None:
        """Classify a received datagram. Returns the WireGuard message as its sender built it (prefix
        stripped, header unmasked, trailer dropped, the type bytes as sent), or None to drop it."""
        ...

    def note_received(self, window: UdpWindow, plaintext_len: int) -> None:
        """Called after a transport message from the peer of `window` decrypted."""
        ...

    def is_keepalive(self, plaintext: bytes) -> bool:
        """Whether a decrypted transport plaintext is a keepalive rather than an IP packet."""
        ...

    def transport_form(self) -> TransportForm | None:
        """The transport framing when it is a `TransportForm` (the core then frames transport messages
        itself with `transport_randomness`); None when the core must call `transport_plaintext_length`,
        `type_value`, `wrap_transport`, `unwrap` and `note_received` per message."""
        ...

    def transport_randomness(self, count: int) -> tuple[list[int], bytes]:
        """For `count` transport messages framed by `transport_form`: their type values, and their
        prefixes' random bytes end to end, drawn as `count` messages one after the other would draw them."""
        ...


class PlainEnvelope:
    """WireGuard on the wire, exactly (AmneziaWG with every parameter unset)."""

    def type_value(self, msg_type: MessageType) -> int:
        return int(msg_type)

    def before_initiation(self, now: float) -> list[bytes]:
        return []

    def wrap_handshake(self, msg_type: MessageType, message: bytes, window: UdpWindow) -> bytes:
        return message

    def transport_plaintext_length(self, ip_len: int, mtu: int, window: UdpWindow) -> int:
        return padded_plaintext_length(ip_len, mtu)

    def wrap_transport(self, message: bytes, window: UdpWindow) -> bytes:
        return message

    def unwrap(self, datagram: bytes) -> tuple[MessageType, bytes] | None:
        n = len(datagram)
        if n < MIN_TRANSPORT_SIZE:
            return None
        kind = int.from_bytes(datagram[0:4], "little")
        if kind == MessageType.TRANSPORT:
            return MessageType.TRANSPORT, datagram
        if kind in (1, 2, 3) and n == HANDSHAKE_SIZES[MessageType(kind)]:
            return MessageType(kind), datagram
        return None

    def note_received(self, window: UdpWindow, plaintext_len: int) -> None:
        return None

    def is_keepalive(self, plaintext: bytes) -> bool:
        return len(plaintext) == 0

    def transport_form(self) -> TransportForm:
        return PLAIN_TRANSPORT

    def transport_randomness(self, count: int) -> tuple[list[int], bytes]:
        return [PLAIN_TRANSPORT.type_lo] * count, b""
