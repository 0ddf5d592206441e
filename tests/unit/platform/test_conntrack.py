"""The kernel data path's conntrack deletions: done in the order asked, finished before ``close``
returns, and cheap to queue when thousands of sockets close at once."""

from __future__ import annotations

import ipaddress
import socket
import threading
import tracemalloc
from typing import Any

import pytest

from awg_split_tunnel.platform.linux.conntrack import ConntrackTable

pytest.importorskip("pyroute2")

WEB = ipaddress.ip_address("198.18.0.10").packed


class FakeConntrack:
    """pyroute2's ``Conntrack`` as the table uses it: dumps filtered entries, deletes them."""

    def __init__(self, family: int, done: list[tuple[Any, ...]], gate: threading.Event) -> None:
        self.family = family
        self.done = done
        self.gate = gate

    def dump_entries(self, **wanted: Any) -> list[tuple[Any, ...]]:
        self.gate.wait()
        tuple_orig = wanted.get("tuple_orig")
        if tuple_orig is not None:
            return [("flow", tuple_orig.proto, tuple_orig.daddr, tuple_orig.sport, tuple_orig.dport)]
        if self.family == socket.AF_INET:
            return [("marked", wanted["mark"], wanted["mark_mask"])]
        return []

    def delete(self, entry: tuple[Any, ...]) -> None:
        self.done.append(entry)

    def close(self) -> None:
        self.done.append(("closed", self.family))


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> tuple[ConntrackTable, list[tuple[Any, ...]], threading.Event]:
    done: list[tuple[Any, ...]] = []
    gate = threading.Event()
    sockets: dict[int, FakeConntrack] = {}

    def fake_socket(self: ConntrackTable, family: int) -> FakeConntrack:
        return sockets.setdefault(family, FakeConntrack(family, done, gate))

    monkeypatch.setattr(ConntrackTable, "_socket", fake_socket)
    monkeypatch.setattr(
        ConntrackTable,
        "_close_sockets",
        lambda self: done.extend(("closed", family) for family in sorted(sockets)),
    )
    return ConntrackTable(), done, gate


def test_deletions_are_done_in_order_and_finished_before_close_returns(
    table: tuple[ConntrackTable, list[tuple[Any, ...]], threading.Event],
) -> None:
    conntrack, done, gate = table
    conntrack.forget(socket.IPPROTO_UDP, 40000, WEB, 53)
    conntrack.forget_marked(0x30000, 0xFF0000)
    conntrack.forget(socket.IPPROTO_TCP, 40001, WEB, 443)
    gate.set()
    conntrack.close()
    assert done == [
        ("flow", socket.IPPROTO_UDP, "198.18.0.10", 40000, 53),
        ("marked", 0x30000, 0xFF0000),
        ("flow", socket.IPPROTO_TCP, "198.18.0.10", 40001, 443),
        ("closed", socket.AF_INET),
        ("closed", socket.AF_INET6),
    ]


def test_deletions_queued_behind_a_slow_one_cost_little_memory_each(
    table: tuple[ConntrackTable, list[tuple[Any, ...]], threading.Event],
) -> None:
    # An app exiting closes thousands of sockets at once: each queues a deletion (a netlink round trip)
    # while the worker is still at the first.
    conntrack, done, gate = table
    conntrack.forget(socket.IPPROTO_UDP, 39999, WEB, 7)
    count = 5000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            conntrack.forget(socket.IPPROTO_UDP, 40000 + n, WEB, 10000 + n)
        per_deletion = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
        gate.set()
        conntrack.close()
    assert len(done) == count + 1 + 1  # and the one socket closed
    assert per_deletion < 300, f"{per_deletion:.0f} B per queued deletion"
