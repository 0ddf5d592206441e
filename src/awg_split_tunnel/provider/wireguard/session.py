"""Transport sessions: a `Keypair` seals and opens transport messages; `Keypairs` holds a peer's
previous, current and next keypair and rotates them as wireguard-go does (docs/PROTOCOL.md: Keypairs)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from awg_split_tunnel.provider.wireguard.envelope import MIN_TRANSPORT_SIZE, TRANSPORT_HEADER_SIZE
from awg_split_tunnel.provider.wireguard.replay import ReplayWindow

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1

TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver index, counter
COUNTER = struct.Struct("<Q")


class Keypair:
    """One direction pair of transport keys with its counters. AEAD objects and nonce buffers are
    created once here, so sealing and opening a packet allocates only the message itself. The batch paths
    of `WireGuardProtocol` use `send_aead`/`seal_nonce` and `receive_aead`/`open_nonce` directly."""

    __slots__ = (
        "created",
        "is_initiator",
        "local_index",
        "open_nonce",
        "receive_aead",
        "remote_index",
        "replay",
        "seal_nonce",
        "send_aead",
        "send_counter",
    )

    def __init__(
        self,
        send_key: bytes,
        receive_key: bytes,
        local_index: int,
        remote_index: int,
        is_initiator: bool,
        now: float,
    ) -> None:
        self.send_aead = ChaCha20Poly1305(send_key)
        self.receive_aead = ChaCha20Poly1305(receive_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.is_initiator = is_initiator
        self.created = now
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.seal_nonce = bytearray(12)
        self.open_nonce = bytearray(12)

    def age(self, now: float) -> float:
        return now - self.created

    def seal(self, type_value: int, plaintext: bytes) -> bytes | None:
        """The transport message for `plaintext` (already padded), or None once the counter is spent."""
        counter = self.send_counter
        if counter >= REJECT_AFTER_MESSAGES:
            return None
        self.send_counter = counter + 1
        nonce = self.seal_nonce
        COUNTER.pack_into(nonce, 4, counter)
        return TRANSPORT_HEADER.pack(type_value, self.remote_index, counter) + self.send_aead.encrypt(
            nonce, plaintext, None
        )

    def open(self, message: bytes) -> bytes | None:
        """The plaintext of a transport message to this keypair, or None if it does not authenticate.
        The caller then checks the counter with `accept_counter` (authentic messages only)."""
        if len(message) < MIN_TRANSPORT_SIZE:
            return None
        nonce = self.open_nonce
        nonce[4:12] = message[8:16]
        try:
            return self.receive_aead.decrypt(nonce, memoryview(message)[TRANSPORT_HEADER_SIZE:], None)
        except InvalidTag:
            return None

    def accept_counter(self, message: bytes) -> bool:
        """Record the counter of an authentic message; False if replayed or too old."""
        counter: int = COUNTER.unpack_from(message, 8)[0]
        return self.replay.validate(counter, REJECT_AFTER_MESSAGES)


@dataclass(slots=True)
class Keypairs:
    """previous / current / next. The initiator's new keypair becomes current at once; the responder's
    waits as next until the first transport message under it arrives."""

    previous: Keypair | None = None
    current: Keypair | None = None
    next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Add a freshly derived keypair; returns the keypairs that fell out (their indices are freed)."""
        dropped: list[Keypair] = []
        if keypair.is_initiator:
            if self.next is not None:
                if self.current is not None:
                    dropped.append(self.current)
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous, self.next = self.next, None
            else:
                if self.previous is not None:
                    dropped.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            if self.next is not None:
                dropped.append(self.next)
            if self.previous is not None:
                dropped.append(self.previous)
            self.next, self.previous = keypair, None
        return dropped

    def received_with(self, keypair: Keypair) -> list[Keypair] | None:
        """Promote `next` on its first authentic message: returns dropped keypairs, or None if
        `keypair` was not the pending next one."""
        if keypair is not self.next:
            return None
        dropped = [self.previous] if self.previous is not None else []
        self.previous, self.current, self.next = self.current, self.next, None
        return dropped

    def all(self) -> list[Keypair]:
        return [k for k in (self.previous, self.current, self.next) if k is not None]

    def clear(self) -> list[Keypair]:
        dropped = self.all()
        self.previous = self.current = self.next = None
        return dropped
