"""The replay window behaves as wireguard-go's (window 8128, RFC 6479 ring)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from awg_split_tunnel.provider.wireguard.replay import WINDOW_SIZE, ReplayWindow
from awg_split_tunnel.provider.wireguard.session import REJECT_AFTER_MESSAGES

LIMIT = REJECT_AFTER_MESSAGES


def test_window_is_8128() -> None:
    assert WINDOW_SIZE == 8128


def test_each_counter_once_in_any_order() -> None:
    w = ReplayWindow()
    order = list(range(2000))
    random.Random(1).shuffle(order)
    assert all(w.validate(c, LIMIT) for c in order)
    assert not any(w.validate(c, LIMIT) for c in order)


def test_wireguard_go_table() -> None:
    """The sequence of wireguard-go's replay_test.go (ported from the Linux kernel), with its limit."""
    limit = (1 << 64) - (1 << 4) - 1
    t = WINDOW_SIZE + 1
    w = ReplayWindow()
    steps = [
        (0, True), (1, True), (1, False), (9, True), (8, True), (7, True), (7, False),
        (t, True), (t - 1, True), (t - 1, False), (t - 2, True), (2, True), (2, False),
        (t + 16, True), (3, False), (t + 16, False), (t * 4, True), (t * 4 - (t - 1), True),
        (10, False), (t * 4 - t, False), (t * 4 - (t + 1), False), (t * 4 - (t - 2), True),
        (t * 4 + 1 - t, False), (0, False), (limit, False), (limit - 1, True), (limit, False),
        (limit - 1, False), (limit - 2, True), (limit + 1, False), (limit + 2, False),
        (limit - 2, False), (limit - 3, True), (0, False),
    ]  # fmt: skip
    for number, (counter, accepted) in enumerate(steps, 1):
        assert w.validate(counter, limit) is accepted, number


def test_wireguard_go_bulk_sequences() -> None:
    w = ReplayWindow()
    assert all(w.validate(i, LIMIT) for i in range(1, WINDOW_SIZE + 1))
    assert w.validate(0, LIMIT) and not w.validate(0, LIMIT)
    w = ReplayWindow()
    assert all(w.validate(i, LIMIT) for i in range(2, WINDOW_SIZE + 2))
    assert w.validate(1, LIMIT) and not w.validate(0, LIMIT)
    w = ReplayWindow()
    assert all(w.validate(i, LIMIT) for i in range(WINDOW_SIZE + 2, 1, -1))
    assert not w.validate(0, LIMIT)
    w = ReplayWindow()
    assert all(w.validate(i, LIMIT) for i in range(WINDOW_SIZE, 0, -1))
    assert w.validate(0, LIMIT) and w.validate(WINDOW_SIZE + 1, LIMIT)


def test_edge_of_the_window() -> None:
    w = ReplayWindow()
    assert w.validate(WINDOW_SIZE + 100, LIMIT)
    assert w.validate(100, LIMIT)  # exactly WINDOW_SIZE behind
    assert not w.validate(99, LIMIT)  # one more is too old


@settings(max_examples=100)
@given(st.lists(st.integers(0, 20_000), max_size=200))
def test_never_accepts_a_counter_twice(counters: list[int]) -> None:
    w = ReplayWindow()
    seen: set[int] = set()
    for c in counters:
        if w.validate(c, LIMIT):
            assert c not in seen
            seen.add(c)
