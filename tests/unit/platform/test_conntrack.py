"""The kernel data path's conntrack deletions: the ctnetlink messages as the kernel speaks them, the
deletions done in the order asked and finished before ``close`` returns, many of them waiting together
done with one dump, and cheap to queue when thousands of sockets close at once."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import tracemalloc
from typing import Any

import pytest

from awg_split_tunnel.platform.linux.conntrack import (
    ConntrackEntry,
    ConntrackTable,
    delete_request,
    dump_request,
    parse_entry,
)

WEB = ipaddress.ip_address("198.18.0.10").packed
APP = ipaddress.ip_address("198.18.0.1").packed
WEB6 = ipaddress.ip_address("2001:2::10").packed


def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (0x8000 if nested else 0))
    return head + payload + bytes(-len(payload) % 4)


def tuple_orig(src: bytes, dst: bytes, proto: int, sport: int, dport: int) -> bytes:
    v4 = len(src) == 4
    ip = nla(1 if v4 else 3, src) + nla(2 if v4 else 4, dst)
    ports = nla(1, bytes([proto])) + nla(2, struct.pack("!H", sport)) + nla(3, struct.pack("!H", dport))
    return nla(1, nla(1, ip, nested=True) + nla(2, ports, nested=True), nested=True)


def new_message(family: int, *attrs: bytes) -> bytes:
    """An IPCTNL_MSG_CT_NEW message of a dump, as the kernel sends it."""
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (1 << 8) | 0, 2, 7, 0) + body


def test_an_entry_of_a_dump_is_read_with_the_identity_a_delete_names_it_by() -> None:
    orig = tuple_orig(APP, WEB, socket.IPPROTO_UDP, 40000, 53)
    reply = tuple_orig(WEB, APP, socket.IPPROTO_UDP, 53, 40000).replace(b"\x01\x80", b"\x02\x80", 1)
    zone = nla(18, struct.pack("!H", 3))
    message = new_message(
        socket.AF_INET, orig, reply, nla(3, struct.pack("!I", 0x8)), nla(8, b"\x00\x03\x00\x00"), zone
    )
    entry = parse_entry(message, 0, len(message))
    assert entry == ConntrackEntry(socket.AF_INET, socket.IPPROTO_UDP, WEB, 40000, 53, 0x30000, orig + zone)
    # The delete: IPCTNL_MSG_CT_DELETE of the subsystem, request + ack, the entry's family, its identity.
    request = delete_request(9, entry)
    assert struct.unpack_from("=IHHII", request) == (len(request), (1 << 8) | 2, 0x05, 9, 0)
    assert request[16:20] == struct.pack("=BBH", socket.AF_INET, 0, 0)
    assert request[20:] == orig + zone


def test_an_ipv6_entry_is_read_and_one_without_ports_is_skipped() -> None:
    message = new_message(socket.AF_INET6, tuple_orig(APP + bytes(12), WEB6, socket.IPPROTO_TCP, 40001, 443))
    entry = parse_entry(message, 0, len(message))
    assert entry is not None
    assert (entry.family, entry.proto, entry.dst, entry.sport, entry.dport) == (
        socket.AF_INET6,
        socket.IPPROTO_TCP,
        WEB6,
        40001,
        443,
    )
    assert parse_entry(new_message(socket.AF_INET, nla(8, b"\x00\x00\x00\x01")), 0, 28) is None


def test_a_dump_by_mark_asks_the_kernel_to_filter_by_mark_and_mask() -> None:
    request = dump_request(5, socket.AF_INET6, 0x30000, 0xFF0000)
    assert struct.unpack_from("=IHHII", request) == (len(request), (1 << 8) | 1, 0x301, 5, 0)
    assert request[16:20] == struct.pack("=BBH", socket.AF_INET6, 0, 0)
    assert request[20:] == nla(8, struct.pack("!I", 0x30000)) + nla(21, struct.pack("!I", 0xFF0000))
    assert dump_request(6, socket.AF_INET)[20:] == b""


def entry(proto: int, dst: bytes, sport: int, dport: int, mark: int = 0) -> ConntrackEntry:
    return ConntrackEntry(
        socket.AF_INET if len(dst) == 4 else socket.AF_INET6, proto, dst, sport, dport, mark, b""
    )


class FakeKernel:
    """The kernel's conntrack table as ``ConntrackTable`` reaches it (``_dump``, ``_delete``)."""

    def __init__(self, entries: list[ConntrackEntry]) -> None:
        self.entries = list(entries)
        self.dumps: list[tuple[int, int | None]] = []
        self.deleted: list[ConntrackEntry] = []
        self.gate = threading.Event()
        self.gate.set()

    def dump(self, family: int, mark: int | None = None, mask: int = 0xFFFFFFFF) -> list[ConntrackEntry]:
        self.gate.wait()
        self.dumps.append((family, mark))
        # Like an old kernel: the mark filter is left to the caller.
        return [e for e in self.entries if e.family == family]

    def delete(self, found: ConntrackEntry) -> int:
        self.entries.remove(found)
        self.deleted.append(found)
        return 1


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel(
        [
            entry(socket.IPPROTO_UDP, WEB, 40000, 53, mark=0x30000),
            entry(socket.IPPROTO_UDP, WEB, 40001, 53, mark=0x40000),
            entry(socket.IPPROTO_TCP, WEB, 40000, 53, mark=0x30000),
            entry(socket.IPPROTO_UDP, WEB6, 40002, 53, mark=0x30000),
        ]
    )
    monkeypatch.setattr(ConntrackTable, "_dump", fake.dump)
    monkeypatch.setattr(ConntrackTable, "_delete", fake.delete)
    return fake


def test_deletions_are_done_in_the_order_asked_and_finished_before_close_returns(kernel: FakeKernel) -> None:
    kernel.gate.clear()
    conntrack = ConntrackTable()
    conntrack.forget(socket.IPPROTO_UDP, 40000, WEB, 53)
    conntrack.forget_marked(0x30000, 0xFF0000)
    conntrack.forget(socket.IPPROTO_UDP, 40001, WEB, 53)
    kernel.gate.set()
    conntrack.close()
    assert kernel.deleted == [
        entry(socket.IPPROTO_UDP, WEB, 40000, 53, mark=0x30000),  # exactly the flow asked for
        entry(socket.IPPROTO_TCP, WEB, 40000, 53, mark=0x30000),  # every entry of the mark, both families
        entry(socket.IPPROTO_UDP, WEB6, 40002, 53, mark=0x30000),
        entry(socket.IPPROTO_UDP, WEB, 40001, 53, mark=0x40000),
    ]
    assert kernel.entries == []


def test_deletions_waiting_together_take_one_dump_and_cost_little_memory_each(kernel: FakeKernel) -> None:
    # An app exiting closes thousands of sockets at once: each queues a deletion while the worker is busy.
    kernel.gate.clear()
    conntrack = ConntrackTable()
    conntrack.forget(socket.IPPROTO_UDP, 40001, WEB, 53)
    count = 5000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            conntrack.forget(socket.IPPROTO_UDP, 41000 + n, WEB, 10000 + n)
        conntrack.forget(socket.IPPROTO_UDP, 40000, WEB, 53)
        per_deletion = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
        kernel.gate.set()
        conntrack.close()
    assert sorted(e.sport for e in kernel.deleted) == [40000, 40001]
    assert len(kernel.dumps) <= 2, "the ones waiting behind the first are done with one dump"
    assert per_deletion < 300, f"{per_deletion:.0f} B per queued deletion"


def test_a_netlink_error_is_logged_and_the_next_deletion_still_runs(
    kernel: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def failing_once(table: ConntrackTable, family: int, mark: int | None = None, mask: int = 0) -> Any:
        calls.append(family)
        if len(calls) == 1:
            raise OSError(105, "No buffer space available")
        return kernel.dump(family, mark, mask)

    monkeypatch.setattr(ConntrackTable, "_dump", failing_once)
    conntrack = ConntrackTable()
    conntrack.forget(socket.IPPROTO_UDP, 40000, WEB, 53)
    conntrack.close()
    conntrack = ConntrackTable()
    conntrack.forget(socket.IPPROTO_UDP, 40000, WEB, 53)
    conntrack.close()
    assert kernel.deleted == [entry(socket.IPPROTO_UDP, WEB, 40000, 53, mark=0x30000)]
