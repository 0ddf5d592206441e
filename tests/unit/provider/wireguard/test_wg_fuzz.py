"""Hostile input: `receive_datagram` never raises, whatever arrives (random bytes, mutated messages).

FUZZ_EXAMPLES=N raises the number of examples per message type (default 300).
"""

from __future__ import annotations

import functools
import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.wireguard.cookie import CookieGenerator
from awg_split_tunnel.provider.wireguard.envelope import HANDSHAKE_SIZES, MessageType
from awg_split_tunnel.provider.wireguard.noise import StaticIdentity
from awg_split_tunnel.provider.wireguard.protocol import PeerConfig, WireGuardProtocol

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SK_A, SK_B = bytes(range(1, 33)), bytes(range(101, 133))
EP_A, EP_B = ("198.18.0.1", 51820), ("198.18.0.2", 51821)
PK_A, PK_B = StaticIdentity.from_private(SK_A).public, StaticIdentity.from_private(SK_B).public


def _pair() -> tuple[WireGuardProtocol, WireGuardProtocol]:
    """A and B, fully deterministic: two calls produce byte-identical exchanges."""
    rnd = random.Random(3)

    def device(private: bytes, seed: int, ephemeral: bytes) -> WireGuardProtocol:
        return WireGuardProtocol(
            private,
            rng=random.Random(seed),
            random_bytes=rnd.randbytes,
            new_ephemeral=lambda: ephemeral,
            wall_clock=lambda: 1_700_000_000.0,
            under_load_handshakes=10**9,  # a flood would otherwise only meet cookie replies
        )

    a, b = device(SK_A, 1, b"\x11" * 32), device(SK_B, 2, b"\x22" * 32)
    a.add_peer(PeerConfig(PK_B, endpoint=EP_B), 0.0)
    b.add_peer(PeerConfig(PK_A, endpoint=EP_A), 0.0)
    return a, b


@functools.cache
def _world() -> tuple[dict[MessageType, bytes], dict[MessageType, WireGuardProtocol]]:
    """One valid datagram of each type, and a device in the state that would accept it."""
    a_pending, b_fresh = _pair()
    a_pending.initiate_handshake(PK_B, 0.0)
    a_pending.datagrams_to_send()
    a, b = _pair()
    a.initiate_handshake(PK_B, 0.0)
    ((initiation, _),) = a.datagrams_to_send()
    b.receive_datagram(initiation, EP_A, 0.0)
    ((response, _),) = b.datagrams_to_send()
    a.receive_datagram(response, EP_B, 0.0)
    ((keepalive, _),) = a.datagrams_to_send()
    b.receive_datagram(keepalive, EP_A, 0.0)
    b.set_under_load(0.0)
    b.receive_datagram(initiation, EP_A, 0.0)
    ((cookie_reply, _),) = b.datagrams_to_send()
    b._under_load_until = None
    a.send_packet(PK_B, bytes([0x45, 0, 0, 24]) + bytes(20), 0.0)
    ((transport, _),) = a.datagrams_to_send()
    assert len(keepalive) == 32 and len(cookie_reply) == 64
    samples = {
        MessageType.INITIATION: initiation,
        MessageType.RESPONSE: response,
        MessageType.COOKIE_REPLY: cookie_reply,
        MessageType.TRANSPORT: transport,
    }
    receivers = {
        MessageType.INITIATION: b_fresh,
        MessageType.RESPONSE: a_pending,
        MessageType.COOKIE_REPLY: a_pending,
        MessageType.TRANSPORT: b,
    }
    return samples, receivers


def test_the_samples_are_accepted_by_their_receivers() -> None:
    a, b = _pair()
    samples, _ = _world()
    b.receive_datagram(samples[MessageType.INITIATION], EP_A, 0.0)
    assert len(b.datagrams_to_send()) == 1 and not b.dropped
    a.initiate_handshake(PK_B, 0.0)
    a.datagrams_to_send()
    assert a.receive_datagram(samples[MessageType.RESPONSE], EP_B, 0.0)
    a2, _ = _pair()
    a2.initiate_handshake(PK_B, 0.0)
    a2.receive_datagram(samples[MessageType.COOKIE_REPLY], EP_B, 0.0)
    assert a2.peers[PK_B].cookies.cookie_time == 0.0


def remac(data: bytes, kind: MessageType) -> bytes:
    """Recompute mac1 as an attacker can (it needs only the receiver's public key), so that mutated
    handshakes get past the mac1 check into the Noise code."""
    if len(data) != HANDSHAKE_SIZES.get(kind):
        return data
    receiver = PK_B if kind is MessageType.INITIATION else PK_A
    return CookieGenerator.for_public_key(receiver).add_macs(data, 0.0)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """Flip, overwrite, truncate, extend or retype a datagram."""
    buf = bytearray(data)
    choice = rnd.randrange(6)
    if choice == 0 and buf:
        for _ in range(rnd.randint(1, 4)):
            buf[rnd.randrange(len(buf))] ^= 1 << rnd.randrange(8)
    elif choice == 1 and buf:
        i = rnd.randrange(len(buf))
        buf[i : i + rnd.randint(1, 16)] = rnd.randbytes(rnd.randint(1, 16))
    elif choice == 2:
        del buf[rnd.randrange(len(buf) + 1) :]
    elif choice == 3:
        buf += rnd.randbytes(rnd.randint(1, 64))
    elif choice == 4 and len(buf) >= 4:
        buf[0:4] = rnd.choice([1, 2, 3, 4, 0, 5, 0xFFFFFFFF]).to_bytes(4, "little")
    else:
        buf = bytearray(rnd.randbytes(len(buf)))
    return bytes(buf)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    device = _world()[1][MessageType.TRANSPORT]
    before = sum(device.dropped.values())
    assert device.receive_datagram(data, EP_A, 1.0) == []
    assert sum(device.dropped.values()) == before + 1


def _fuzz_kind(kind: MessageType, seed: int) -> None:
    # One live device per type takes the whole hostile stream, as a real one would.
    samples, receivers = _world()
    device = receivers[kind]
    before = sum(device.dropped.values())
    rnd = random.Random(seed)
    datagram = mutate(samples[kind], rnd)
    if rnd.random() < 0.5:
        datagram = remac(datagram, kind)
    events = device.receive_datagram(datagram, EP_A, 1.0)
    outgoing = device.datagrams_to_send()
    assert sum(device.dropped.values()) > before or events or outgoing or datagram == samples[kind]


@FUZZ
@given(st.integers(0, 2**32))
def test_mutated_initiations_never_raise(seed: int) -> None:
    _fuzz_kind(MessageType.INITIATION, seed)


@FUZZ
@given(st.integers(0, 2**32))
def test_mutated_responses_never_raise(seed: int) -> None:
    _fuzz_kind(MessageType.RESPONSE, seed)


@FUZZ
@given(st.integers(0, 2**32))
def test_mutated_cookie_replies_never_raise(seed: int) -> None:
    _fuzz_kind(MessageType.COOKIE_REPLY, seed)


@FUZZ
@given(st.integers(0, 2**32))
def test_mutated_transport_never_raises(seed: int) -> None:
    _fuzz_kind(MessageType.TRANSPORT, seed)


def test_every_datagram_is_accounted_for() -> None:
    """Each datagram either produces an effect or is counted as dropped exactly once."""
    _, device = _pair()
    rnd = random.Random(7)
    for n in range(200):
        device.receive_datagram(rnd.randbytes(rnd.randrange(200)), EP_A, 1.0)
        assert sum(device.dropped.values()) == n + 1
