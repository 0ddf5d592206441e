"""The owner lookup for flows no event named (Windows): bounded, off the packet loop, one table read for
every lookup waiting."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from awg_split_tunnel.core.packet_router import OWNER_PENDING
from awg_split_tunnel.net.packet import IPPROTO_UDP
from awg_split_tunnel.platform.divert import SocketEventKind
from awg_split_tunnel.platform.windows.owners import MAX_PENDING, SocketOwners

pytestmark = pytest.mark.windows

REMOTE = bytes([198, 18, 0, 53])


class Loop:
    """The loop's side: what ``call_soon_threadsafe`` was given."""

    def __init__(self) -> None:
        self.woken = threading.Event()

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        callback()


class GatedTable:
    """A socket table whose first read waits until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reads = 0

    def __call__(self, kind: str) -> list[SimpleNamespace]:
        self.reads += 1
        self.gate.wait(5.0)
        return [
            SimpleNamespace(pid=1000 + port, laddr=SimpleNamespace(ip="0.0.0.0", port=port), raddr=())
            for port in range(50000, 50000 + MAX_PENDING)
        ]


def test_lookups_wait_for_one_table_read_each_batch_and_beyond_the_bound_are_answered_unknown() -> None:
    table = GatedTable()
    owners = SocketOwners(table)
    woken: list[int] = []
    owners.open()
    owners.watch(Loop(), lambda: woken.append(1))
    try:
        ports = range(50000, 50000 + MAX_PENDING)
        assert owners.lookup(IPPROTO_UDP, bytes(4), ports[0], REMOTE, 53) == OWNER_PENDING
        deadline = time.monotonic() + 5.0
        while table.reads == 0:  # the worker is reading the table for the first lookup
            assert time.monotonic() < deadline
            time.sleep(0.001)
        answers = [owners.lookup(IPPROTO_UDP, bytes(4), port, REMOTE, 53) for port in ports[1:]]
        assert answers == [OWNER_PENDING] * (MAX_PENDING - 1)
        # One more while MAX_PENDING wait: "unknown" at once, the packet loop never waits for the table.
        assert owners.lookup(IPPROTO_UDP, bytes(4), 60000, REMOTE, 53) is None and owners.refused == 1
        table.gate.set()
        deadline = time.monotonic() + 5.0
        events = []
        while len(events) < MAX_PENDING:
            assert time.monotonic() < deadline, len(events)
            event = owners.recv()
            if event is None:
                time.sleep(0.005)
            else:
                events.append(event)
    finally:
        owners.close()
    # The first lookup's read, then one read for all the lookups that waited meanwhile.
    assert table.reads == 2
    assert {(e.kind, e.pid - e.local_port, e.remote_port) for e in events} == {
        (SocketEventKind.CONNECT, 1000, 53)
    }
    assert woken


def test_without_a_loop_to_answer_to_the_owner_is_unknown_at_once() -> None:
    owners = SocketOwners(GatedTable())
    owners.open()
    try:
        assert owners.lookup(IPPROTO_UDP, bytes(4), 50000, REMOTE, 53) is None
    finally:
        owners.close()
