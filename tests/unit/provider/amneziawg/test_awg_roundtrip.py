"""Properties of AmneziaEnvelope over random valid parameter sets: what one side wraps the other side
unwraps to the same message, unwrap never raises, and an unset set behaves as WireGuard."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.amneziawg.envelope import AmneziaEnvelope
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams
from awg_split_tunnel.provider.wireguard.envelope import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    MessageType,
    PlainEnvelope,
    UdpWindow,
)
from awg_split_tunnel.provider.wireguard.value_range import Range

SIZES = {
    MessageType.INITIATION: INITIATION_SIZE,
    MessageType.RESPONSE: RESPONSE_SIZE,
    MessageType.COOKIE_REPLY: COOKIE_REPLY_SIZE,
}


@st.composite
def param_sets(draw: st.DrawFn) -> AmneziaParams:
    """Valid sets of every generation: disjoint narrow H ranges (≥ 5), prefixes, optional 3.x layers."""
    slots = draw(st.permutations(range(4)))
    headers = []
    for slot in slots:
        lo = 5 + slot * 2**30 + draw(st.integers(0, 2**29))
        headers.append(Range(lo, lo + draw(st.integers(0, 1000))))
    protected = draw(st.booleans())
    prefix = st.integers(12 if protected else 0, 80)
    jmin = draw(st.integers(0, 100))
    padding = draw(st.one_of(st.just(Range(0, 0)), st.integers(0, 40).map(lambda lo: Range(lo, lo + 20))))
    return AmneziaParams(
        jc=draw(st.integers(0, 4)),
        jmin=jmin,
        jmax=jmin + draw(st.integers(0, 50)),
        s1=draw(prefix),
        s2=draw(prefix),
        s3=draw(prefix),
        s4=draw(prefix),
        h1=headers[0],
        h2=headers[1],
        h3=headers[2],
        h4=headers[3],
        i1=draw(st.sampled_from([None, "", "<b 0xc0ffee><r 5><t>", "<rd 4><rc 3><dz 2>"])),
        header_protection_key=draw(st.binary(min_size=32, max_size=32)) if protected else b"",
        random_trailers=draw(st.booleans()),
        content_padding_addition=padding,
    )


def _envelope(params: AmneziaParams, seed: int) -> AmneziaEnvelope:
    rng = random.Random(seed)
    return AmneziaEnvelope(params, rng=rng, urandom=rng.randbytes)


@settings(max_examples=80, deadline=None)
@given(param_sets(), st.sampled_from(list(SIZES)), st.integers(0, 2**32), st.integers(100, 3000))
def test_handshake_messages_survive_the_trip(
    params: AmneziaParams, msg_type: MessageType, seed: int, window: int
) -> None:
    sender, receiver = _envelope(params, seed), _envelope(params, seed + 1)
    body = random.Random(seed).randbytes(SIZES[msg_type] - 4)
    message = struct.pack("<I", sender.type_value(msg_type)) + body
    datagram = sender.wrap_handshake(msg_type, message, UdpWindow(window))
    assert receiver.unwrap(datagram) == (msg_type, message)


@settings(max_examples=80, deadline=None)
@given(param_sets(), st.integers(0, 2**32), st.integers(0, 1500), st.sampled_from([0, 1280, 1420]))
def test_transport_messages_survive_the_trip(params: AmneziaParams, seed: int, ip_len: int, mtu: int) -> None:
    sender, receiver = _envelope(params, seed), _envelope(params, seed + 1)
    window = UdpWindow()
    plaintext_len = sender.transport_plaintext_length(ip_len, mtu, window)
    assert plaintext_len >= ip_len
    message = struct.pack("<I", sender.type_value(MessageType.TRANSPORT)) + random.Random(seed).randbytes(
        12 + plaintext_len + 16
    )
    datagram = sender.wrap_transport(message, window)
    assert len(datagram) == params.s4 + len(message)
    result = receiver.unwrap(datagram)
    if result is not None and result[0] is not MessageType.TRANSPORT:
        # Classification: a transport datagram of a handshake's size whose word at S_i falls in H_i is taken
        # for that handshake, as amneziawg-go does; with random bytes that needs |H| / 2^32 luck.
        raise AssertionError(f"transport misread as {result[0].name}")
    assert result == (MessageType.TRANSPORT, message)


@settings(max_examples=40, deadline=None)
@given(param_sets(), st.integers(0, 2**32))
def test_nothing_sent_before_an_initiation_is_taken_for_a_message(params: AmneziaParams, seed: int) -> None:
    sender, receiver = _envelope(params, seed), _envelope(params, seed + 1)
    for datagram in sender.before_initiation(now=1_700_000_000.0):
        assert receiver.unwrap(datagram) is None


@settings(max_examples=150, deadline=None)
@given(param_sets(), st.binary(max_size=600))
def test_unwrap_never_raises_on_arbitrary_bytes(params: AmneziaParams, datagram: bytes) -> None:
    result = _envelope(params, 0).unwrap(datagram)
    if result is not None:
        msg_type, message = result
        if msg_type in SIZES:
            assert len(message) == SIZES[msg_type]
        else:
            assert len(message) >= 32


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.tuples(st.integers(0, 6), st.sampled_from([31, 32, 33, 64, 92, 100, 148, 149])).map(
            lambda t: struct.pack("<I", t[0]) + bytes(t[1] - 4)
        ),
    )
)
def test_an_unset_envelope_classifies_exactly_like_wireguard(datagram: bytes) -> None:
    assert AmneziaEnvelope(AmneziaParams()).unwrap(datagram) == PlainEnvelope().unwrap(datagram)
