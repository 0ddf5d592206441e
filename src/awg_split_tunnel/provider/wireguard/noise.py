"""Noise_IKpsk2 as WireGuard uses it: initiation and response, both sides (docs/PROTOCOL.md: Handshake).

Pure functions over a per-peer `Handshake`; the caller supplies ephemeral keys, indices, the
timestamp and the time, so a handshake is reproducible byte for byte. Messages come out without MACs
(`cookie.CookieGenerator.add_macs` writes them) and go in after mac1 was checked.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from awg_split_tunnel.errors import ProtocolError
from awg_split_tunnel.provider.wireguard import crypto
from awg_split_tunnel.provider.wireguard.messages import HandshakeInitiation, HandshakeResponse
from awg_split_tunnel.provider.wireguard.tai64n import TAI64N_SIZE

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAINING_KEY = crypto.hash_(CONSTRUCTION)
INITIAL_HASH = crypto.hash_(INITIAL_CHAINING_KEY, IDENTIFIER)
HANDSHAKE_INITIATION_RATE = 1.0 / 50  # initiations from one peer closer than 20 ms are floods
_ZERO_KEY = bytes(32)
_ZERO_TIMESTAMP = bytes(TAI64N_SIZE)


class HandshakeRejected(ProtocolError):
    """A handshake message that does not authenticate or is not acceptable now; `reason` names why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HandshakeState(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


@dataclass(frozen=True, slots=True)
class StaticIdentity:
    """Our long-term X25519 key pair. Secret fields stay out of repr() (it ends up in logs and reports)."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def from_private(cls, private: bytes) -> StaticIdentity:
        clamped = crypto.clamp(private)
        return cls(clamped, crypto.public_key(clamped))


@dataclass(slots=True)
class Handshake:
    """The handshake state kept for one peer."""

    remote_static: bytes
    preshared_key: bytes = field(default=_ZERO_KEY, repr=False)
    precomputed_static_static: bytes = field(default=_ZERO_KEY, repr=False)
    state: HandshakeState = HandshakeState.ZEROED
    chaining_key: bytes = field(default=_ZERO_KEY, repr=False)
    hash: bytes = _ZERO_KEY
    local_ephemeral: bytes = field(default=_ZERO_KEY, repr=False)
    remote_ephemeral: bytes = _ZERO_KEY
    local_index: int = 0
    remote_index: int = 0
    latest_timestamp: bytes = _ZERO_TIMESTAMP
    last_initiation_consumed: float | None = None

    @classmethod
    def for_peer(cls, local: StaticIdentity, remote_static: bytes, preshared_key: bytes) -> Handshake:
        """Precompute DH(S_local, S_remote); a low-order remote key is refused (ProtocolError)."""
        return cls(remote_static, preshared_key, crypto.dh(local.private, remote_static))

    def clear(self) -> None:
        self.state = HandshakeState.ZEROED
        self.chaining_key = self.hash = self.local_ephemeral = self.remote_ephemeral = _ZERO_KEY
        self.local_index = 0


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return crypto.hash_(h, data)


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        return crypto.dh(private, public)
    except ProtocolError as exc:
        raise HandshakeRejected("low-order public key") from exc


def create_initiation(
    hs: Handshake,
    local: StaticIdentity,
    ephemeral_private: bytes,
    local_index: int,
    timestamp: bytes,
    type_value: int,
) -> HandshakeInitiation:
    """Build our initiation to the peer of `hs` (MACs left zero) and move `hs` to INITIATION_CREATED."""
    if hs.precomputed_static_static == _ZERO_KEY:
        raise HandshakeRejected("peer public key gives the all-zero static secret")
    h = _mix_hash(INITIAL_HASH, hs.remote_static)
    ephemeral_public = crypto.public_key(ephemeral_private)
    c = crypto.kdf1(INITIAL_CHAINING_KEY, ephemeral_public)
    h = _mix_hash(h, ephemeral_public)
    c, key = crypto.kdf2(c, _dh(ephemeral_private, hs.remote_static))
    encrypted_static = crypto.aead_seal(key, 0, local.public, h)
    h = _mix_hash(h, encrypted_static)
    c, key = crypto.kdf2(c, hs.precomputed_static_static)
    encrypted_timestamp = crypto.aead_seal(key, 0, timestamp, h)
    h = _mix_hash(h, encrypted_timestamp)
    hs.chaining_key, hs.hash = c, h
    hs.local_ephemeral = ephemeral_private
    hs.local_index = local_index
    hs.state = HandshakeState.INITIATION_CREATED
    return HandshakeInitiation(
        type_value, local_index, ephemeral_public, encrypted_static, encrypted_timestamp
    )


def consume_initiation(
    msg: HandshakeInitiation,
    local: StaticIdentity,
    find_peer: Callable[[bytes], Handshake | None],
    now: float,
) -> Handshake:
    """Authenticate an initiation to us and record it in its peer's `Handshake` (returned).

    Raises HandshakeRejected for an unknown peer, a failed decryption, a timestamp not later than the
    peer's latest, or an initiation less than 20 ms after the previous one (`now` is monotonic).
    """
    h = _mix_hash(INITIAL_HASH, local.public)
    h = _mix_hash(h, msg.ephemeral)
    c = crypto.kdf1(INITIAL_CHAINING_KEY, msg.ephemeral)
    c, key = crypto.kdf2(c, _dh(local.private, msg.ephemeral))
    try:
        peer_static = crypto.aead_open(key, 0, msg.encrypted_static, h)
    except crypto.InvalidTag:
        raise HandshakeRejected("initiation does not decrypt") from None
    h = _mix_hash(h, msg.encrypted_static)
    hs = find_peer(peer_static)
    if hs is None:
        raise HandshakeRejected("initiation from an unknown peer")
    if hs.precomputed_static_static == _ZERO_KEY:
        raise HandshakeRejected("peer public key gives the all-zero static secret")
    c, key = crypto.kdf2(c, hs.precomputed_static_static)
    try:
        timestamp = crypto.aead_open(key, 0, msg.encrypted_timestamp, h)
    except crypto.InvalidTag:
        raise HandshakeRejected("initiation timestamp does not decrypt") from None
    h = _mix_hash(h, msg.encrypted_timestamp)
    if not timestamp > hs.latest_timestamp:
        raise HandshakeRejected("replayed initiation timestamp")
    last = hs.last_initiation_consumed
    if last is not None and now - last <= HANDSHAKE_INITIATION_RATE:
        raise HandshakeRejected("initiation flood")
    hs.chaining_key, hs.hash = c, h
    hs.remote_ephemeral = msg.ephemeral
    hs.remote_index = msg.sender
    hs.latest_timestamp = timestamp
    hs.last_initiation_consumed = now
    hs.state = HandshakeState.INITIATION_CONSUMED
    return hs


def create_response(
    hs: Handshake, ephemeral_private: bytes, local_index: int, type_value: int
) -> HandshakeResponse:
    """Build our response to the initiation recorded in `hs` (MACs left zero)."""
    if hs.state is not HandshakeState.INITIATION_CONSUMED:
        raise HandshakeRejected("no initiation to respond to")
    ephemeral_public = crypto.public_key(ephemeral_private)
    h = _mix_hash(hs.hash, ephemeral_public)
    c = crypto.kdf1(hs.chaining_key, ephemeral_public)
    c = crypto.kdf1(c, _dh(ephemeral_private, hs.remote_ephemeral))
    c = crypto.kdf1(c, _dh(ephemeral_private, hs.remote_static))
    c, tau, key = crypto.kdf3(c, hs.preshared_key)
    h = _mix_hash(h, tau)
    encrypted_nothing = crypto.aead_seal(key, 0, b"", h)
    h = _mix_hash(h, encrypted_nothing)
    hs.chaining_key, hs.hash = c, h
    hs.local_ephemeral = ephemeral_private
    hs.local_index = local_index
    hs.state = HandshakeState.RESPONSE_CREATED
    return HandshakeResponse(type_value, local_index, hs.remote_index, ephemeral_public, encrypted_nothing)


def consume_response(msg: HandshakeResponse, local: StaticIdentity, hs: Handshake) -> None:
    """Authenticate the response to our initiation in `hs` (found by `msg.receiver`)."""
    if hs.state is not HandshakeState.INITIATION_CREATED or hs.local_index != msg.receiver:
        raise HandshakeRejected("response without a pending initiation")
    h = _mix_hash(hs.hash, msg.ephemeral)
    c = crypto.kdf1(hs.chaining_key, msg.ephemeral)
    c = crypto.kdf1(c, _dh(hs.local_ephemeral, msg.ephemeral))
    c = crypto.kdf1(c, _dh(local.private, msg.ephemeral))
    c, tau, key = crypto.kdf3(c, hs.preshared_key)
    h = _mix_hash(h, tau)
    try:
        crypto.aead_open(key, 0, msg.encrypted_nothing, h)
    except crypto.InvalidTag:
        raise HandshakeRejected("response does not decrypt") from None
    h = _mix_hash(h, msg.encrypted_nothing)
    hs.chaining_key, hs.hash = c, h
    hs.remote_index = msg.sender
    hs.remote_ephemeral = msg.ephemeral
    hs.state = HandshakeState.RESPONSE_CONSUMED


@dataclass(frozen=True, slots=True)
class TransportKeys:
    send: bytes = field(repr=False)
    receive: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool


def derive_transport_keys(hs: Handshake) -> TransportKeys:
    """Split the finished handshake into transport keys and zero its secrets."""
    if hs.state is HandshakeState.RESPONSE_CONSUMED:
        is_initiator = True
    elif hs.state is HandshakeState.RESPONSE_CREATED:
        is_initiator = False
    else:
        raise HandshakeRejected("handshake not finished")
    first, second = crypto.kdf2(hs.chaining_key, b"")
    send, receive = (first, second) if is_initiator else (second, first)
    keys = TransportKeys(send, receive, hs.local_index, hs.remote_index, is_initiator)
    hs.clear()
    return keys
