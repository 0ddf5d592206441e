"""Everything on the wire goes through the Envelope: an obfuscating one still handshakes and carries data."""

from __future__ import annotations

import itertools
import random

from awg_split_tunnel.provider.wireguard.envelope import (
    HANDSHAKE_SIZES,
    MIN_TRANSPORT_SIZE,
    MessageType,
    TransportForm,
    UdpWindow,
    padded_plaintext_length,
)
from awg_split_tunnel.provider.wireguard.noise import StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import (
    HandshakeCompleted,
    PacketReceived,
    PeerConfig,
    WireGuardEvent,
    WireGuardProtocol,
)
from awg_split_tunnel.provider.wireguard.timers import TimerSettings
from awg_split_tunnel.provider.wireguard.value_range import Range

SK_A, SK_B = bytes(range(1, 33)), bytes(range(101, 133))
PK_A, PK_B = StaticIdentity.from_private(SK_A).public, StaticIdentity.from_private(SK_B).public
EP_A, EP_B = ("198.18.0.1", 51820), ("198.18.0.2", 51821)
PREFIX = b"\xaa\xbb\xcc"
TYPES = {MessageType.INITIATION: 1001, MessageType.RESPONSE: 1002, MessageType.COOKIE_REPLY: 1003}


class PrefixEnvelope:
    """A toy AmneziaWG: random type values per message, a prefix, junk before initiations, padding to 64."""

    def __init__(self) -> None:
        self.rng = random.Random(5)
        self.received: list[int] = []

    def type_value(self, msg_type: MessageType) -> int:
        if msg_type is MessageType.TRANSPORT:
            return self.rng.randint(2000, 2999)
        return TYPES[msg_type]

    def before_initiation(self, now: float) -> list[bytes]:
        return [b"junk-1", b"junk-2"]

    def wrap_handshake(self, msg_type: MessageType, message: bytes, window: UdpWindow) -> bytes:
        return PREFIX + message

    def transport_plaintext_length(self, ip_len: int, mtu: int, window: UdpWindow) -> int:
        return max(64, padded_plaintext_length(ip_len, mtu)) if ip_len else 0

    def wrap_transport(self, message: bytes, window: UdpWindow) -> bytes:
        return PREFIX + message

    def unwrap(self, datagram: bytes) -> tuple[MessageType, bytes] | None:
        if not datagram.startswith(PREFIX) or len(datagram) < 3 + MIN_TRANSPORT_SIZE:
            return None
        message = datagram[3:]
        value = int.from_bytes(message[:4], "little")
        for kind, type_value in TYPES.items():
            if value == type_value and len(message) == HANDSHAKE_SIZES[kind]:
                return kind, message
        if 2000 <= value <= 2999:
            return MessageType.TRANSPORT, message
        return None

    def note_received(self, window: UdpWindow, plaintext_len: int) -> None:
        self.received.append(plaintext_len)

    def is_keepalive(self, plaintext: bytes) -> bool:
        return len(plaintext) == 0

    def transport_form(self) -> TransportForm | None:
        return None  # padding to 64: the core must ask per message

    def transport_randomness(self, count: int) -> tuple[list[int], bytes]:
        raise AssertionError("never called without a transport form")


def ipv4(payload: bytes) -> bytes:
    total = 20 + len(payload)
    return (
        bytes([0x45, 0]) + total.to_bytes(2, "big") + bytes(8) + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + payload
    )


def test_handshake_and_data_through_an_obfuscating_envelope() -> None:
    env_a, env_b = PrefixEnvelope(), PrefixEnvelope()
    a = WireGuardProtocol(SK_A, envelope=env_a, rng=random.Random(1))
    b = WireGuardProtocol(SK_B, envelope=env_b, rng=random.Random(2))
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), 0.0)
    b.add_peer(PeerConfig(PK_A, endpoint=EP_A), 0.0)
    a.send_packet(PK_B, ipv4(b"through"), 0.0)
    out = [d for d, _ in a.datagrams_to_send()]
    assert out[:2] == [b"junk-1", b"junk-2"]  # before the initiation, in order
    assert out[2][:3] == PREFIX and int.from_bytes(out[2][3:7], "little") == 1001 and len(out[2]) == 151
    for d in out:
        b.receive_datagram(d, EP_A, 0.0)
    assert b.dropped["malformed"] == 2  # the junk
    events: list[WireGuardEvent] = []
    for d, _ in b.datagrams_to_send():
        assert int.from_bytes(d[3:7], "little") == 1002
        events += a.receive_datagram(d, EP_B, 0.0)
    assert events == [HandshakeCompleted(PK_B)]
    (data, _), *_ = a.datagrams_to_send()
    assert 2000 <= int.from_bytes(data[3:7], "little") <= 2999
    assert len(data) == 3 + 16 + 64 + 16  # padded by the envelope's rule
    got = b.receive_datagram(data, EP_A, 0.0)
    assert PacketReceived(PK_A, ipv4(b"through")) in got
    assert env_b.received == [64]


def test_junk_precedes_every_retry_too() -> None:
    a = WireGuardProtocol(SK_A, envelope=PrefixEnvelope(), rng=random.Random(1))
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), 0.0)
    a.initiate_handshake(PK_B, 0.0)
    a.datagrams_to_send()
    deadline = a.next_timer_deadline()
    assert deadline is not None
    a.handle_timers(deadline)
    assert [d for d, _ in a.datagrams_to_send()][:2] == [b"junk-1", b"junk-2"]


def test_timer_ranges_are_picked_per_use() -> None:
    settings = TimerSettings(rekey_timeout=Range(2, 4), max_handshake_attempts=Range(3, 3))
    a = WireGuardProtocol(SK_A, timers=settings, rng=random.Random(9))
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), 0.0)
    a.initiate_handshake(PK_B, 0.0)
    times = [0.0]
    now = 0.0
    while True:
        deadline = a.next_timer_deadline()
        assert deadline is not None
        now = deadline
        if a.handle_timers(now):
            break
        if any(len(d) == 148 for d, _ in a.datagrams_to_send()):
            times.append(now)
    gaps = [y - x for x, y in itertools.pairwise(times)]
    assert len(times) == 3 + 2 and all(2.0 <= g <= 4.334 for g in gaps)
    assert len({int(g) for g in gaps}) > 1  # not one value fixed for the peer
