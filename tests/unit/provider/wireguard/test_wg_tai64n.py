"""TAI64N as WireGuard whitens it (docs/PROTOCOL.md: TAI64N)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.wireguard.tai64n import is_after, tai64n, tai64n_from_ns


def test_known_answers() -> None:
    assert tai64n(1700000000.0).hex() == "400000006553f10a00000000"
    assert tai64n(1700000000.123456789).hex() == "400000006553f10a07000000"
    assert tai64n_from_ns(1700000000_123456789).hex() == "400000006553f10a07000000"


def test_nanoseconds_round_down_to_2_pow_24() -> None:
    assert tai64n_from_ns(16_777_215)[8:] == bytes(4)  # one below 2^24 ns → 0
    assert tai64n_from_ns(16_777_216)[8:] == (16_777_216).to_bytes(4, "big")
    assert tai64n_from_ns(999_999_999)[8:] == (999_999_999 & ~0xFFFFFF).to_bytes(4, "big")


@settings(max_examples=200)
@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_order_follows_time_at_whitening_resolution(a: int, b: int) -> None:
    ta, tb = tai64n_from_ns(a), tai64n_from_ns(b)
    if a >> 24 == b >> 24 and a // 10**9 == b // 10**9:
        assert ta == tb
    elif a < b:
        assert not is_after(ta, tb)
    assert is_after(ta, tb) == (ta > tb)


def test_timestamps_17ms_apart_are_strictly_increasing() -> None:
    assert is_after(tai64n(1700000000.0 + 0.017), tai64n(1700000000.0))
    assert not is_after(tai64n(1700000000.0 + 0.010), tai64n(1700000000.0))
