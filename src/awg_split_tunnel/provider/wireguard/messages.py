"""The four WireGuard messages: layouts, pack and parse (docs/PROTOCOL.md: Message layouts).

The u32 at offset 0 is kept as the sender wrote it (`type_value`): with AmneziaWG it is a random value
from a range, and mac1 covers it exactly as sent.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from awg_split_tunnel.provider.wireguard.envelope import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MIN_TRANSPORT_SIZE,
    RESPONSE_SIZE,
    TRANSPORT_HEADER_SIZE,
)

_INITIATION = struct.Struct("<II32s48s28s16s16s")
_RESPONSE = struct.Struct("<III32s16s16s16s")
_COOKIE_REPLY = struct.Struct("<II24s32s")
_TRANSPORT_HEADER = struct.Struct("<IIQ")

MAC1_OFFSET_INITIATION = 116
MAC1_OFFSET_RESPONSE = 60
ZERO_MAC = bytes(16)

assert _INITIATION.size == INITIATION_SIZE
assert _RESPONSE.size == RESPONSE_SIZE
assert _COOKIE_REPLY.size == COOKIE_REPLY_SIZE
assert _TRANSPORT_HEADER.size == TRANSPORT_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class HandshakeInitiation:
    type_value: int
    sender: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes = ZERO_MAC
    mac2: bytes = ZERO_MAC

    def pack(self) -> bytes:
        return _INITIATION.pack(
            self.type_value,
            self.sender,
            self.ephemeral,
            self.encrypted_static,
            self.encrypted_timestamp,
            self.mac1,
            self.mac2,
        )

    @classmethod
    def parse(cls, data: bytes) -> HandshakeInitiation | None:
        if len(data) != INITIATION_SIZE:
            return None
        return cls(*_INITIATION.unpack(data))


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    type_value: int
    sender: int
    receiver: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes = ZERO_MAC
    mac2: bytes = ZERO_MAC

    def pack(self) -> bytes:
        return _RESPONSE.pack(
            self.type_value,
            self.sender,
            self.receiver,
            self.ephemeral,
            self.encrypted_nothing,
            self.mac1,
            self.mac2,
        )

    @classmethod
    def parse(cls, data: bytes) -> HandshakeResponse | None:
        if len(data) != RESPONSE_SIZE:
            return None
        return cls(*_RESPONSE.unpack(data))


@dataclass(frozen=True, slots=True)
class CookieReply:
    type_value: int
    receiver: int
    nonce: bytes
    encrypted_cookie: bytes

    def pack(self) -> bytes:
        return _COOKIE_REPLY.pack(self.type_value, self.receiver, self.nonce, self.encrypted_cookie)

    @classmethod
    def parse(cls, data: bytes) -> CookieReply | None:
        if len(data) != COOKIE_REPLY_SIZE:
            return None
        return cls(*_COOKIE_REPLY.unpack(data))


@dataclass(frozen=True, slots=True)
class TransportHeader:
    type_value: int
    receiver: int
    counter: int

    def pack(self) -> bytes:
        return _TRANSPORT_HEADER.pack(self.type_value, self.receiver, self.counter)

    @classmethod
    def parse(cls, data: bytes) -> TransportHeader | None:
        if len(data) < MIN_TRANSPORT_SIZE:
            return None
        return cls(*_TRANSPORT_HEADER.unpack_from(data))
