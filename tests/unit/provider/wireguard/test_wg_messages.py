"""Message layouts round-trip, and wrongly sized input is refused (docs/PROTOCOL.md: Message layouts)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.wireguard.messages import (
    CookieReply,
    HandshakeInitiation,
    HandshakeResponse,
    TransportHeader,
)

u32 = st.integers(0, 2**32 - 1)


def blob(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


@settings(max_examples=100)
@given(u32, u32, blob(32), blob(48), blob(28), blob(16), blob(16))
def test_initiation_round_trip(t: int, s: int, e: bytes, st_: bytes, ts: bytes, m1: bytes, m2: bytes) -> None:
    msg = HandshakeInitiation(t, s, e, st_, ts, m1, m2)
    packed = msg.pack()
    assert len(packed) == 148 and packed[:4] == t.to_bytes(4, "little") and packed[116:132] == m1
    assert HandshakeInitiation.parse(packed) == msg
    assert (
        HandshakeInitiation.parse(packed[:-1]) is None and HandshakeInitiation.parse(packed + b"\0") is None
    )


@settings(max_examples=100)
@given(u32, u32, u32, blob(32), blob(16), blob(16), blob(16))
def test_response_round_trip(t: int, s: int, r: int, e: bytes, n: bytes, m1: bytes, m2: bytes) -> None:
    msg = HandshakeResponse(t, s, r, e, n, m1, m2)
    packed = msg.pack()
    assert len(packed) == 92 and packed[8:12] == r.to_bytes(4, "little") and packed[60:76] == m1
    assert HandshakeResponse.parse(packed) == msg
    assert HandshakeResponse.parse(packed[:91]) is None


@settings(max_examples=100)
@given(u32, u32, blob(24), blob(32))
def test_cookie_reply_round_trip(t: int, r: int, nonce: bytes, cookie: bytes) -> None:
    msg = CookieReply(t, r, nonce, cookie)
    packed = msg.pack()
    assert len(packed) == 64 and CookieReply.parse(packed) == msg and CookieReply.parse(packed[:63]) is None


@settings(max_examples=100)
@given(u32, u32, st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=64))
def test_transport_header_round_trip(t: int, r: int, counter: int, body: bytes) -> None:
    header = TransportHeader(t, r, counter)
    packed = header.pack()
    assert packed[8:16] == counter.to_bytes(8, "little")
    assert TransportHeader.parse(packed + body) == header
    assert TransportHeader.parse(packed + body[:15]) is None
