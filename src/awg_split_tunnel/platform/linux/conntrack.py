"""Conntrack entries of the kernel data path, deleted over a ctnetlink socket.

A UDP flow's verdict lives in its conntrack entry (the ct mark), which outlives the app's socket by the
UDP timeout (30 s unanswered, 120 s after replies). The kernel hands a closed socket's port to the next
socket that asks, maybe another app's: the entry is deleted when the socket closes (a FLOW DELETED event),
so the next app's first datagram is queued and decided afresh instead of inheriting the verdict. When a
tunnel goes down or up, the entries of a flow class (their mark) are deleted the same way.

Two ctnetlink requests do it (``linux/netfilter/nfnetlink_conntrack.h``), packed here as ``sock_diag``
packs its own: a dump of one family's entries (the kernel filters it by mark when asked) and a delete by
an entry's original tuple, copied from the dump as the kernel gave it. pyroute2's ``Conntrack`` did the
same, but importing any part of pyroute2 loads all of it: ~12 MB of RSS in the router process
(docs/ARCHITECTURE.md, Memory).

The work runs on one worker thread of this table's, in order, never on the router's event loop.
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("awg_split_tunnel.router")

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

CTA_TUPLE_ORIG = 1
CTA_MARK = 8
CTA_ZONE = 18
CTA_MARK_MASK = 21
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_DST = 2
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3

_NLMSG = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NFGEN = struct.Struct("=BBH")  # family, version (0), resource id (0)
_NLA = struct.Struct("=HH")  # length, type
_BE32 = struct.Struct("!I")
_BE16 = struct.Struct("!H")
_ERRNO = struct.Struct("=i")
NLMSG_HDRLEN = _NLMSG.size
ENTRY_BODY = NLMSG_HDRLEN + _NFGEN.size
"""Where a conntrack message's attributes start."""
RECEIVE_BUFFER = 1 << 16
REPLY_TIMEOUT = 5.0
"""Seconds to wait for the kernel's next answer before the request is given up (logged)."""


@dataclass(frozen=True, slots=True)
class ConntrackEntry:
    """One entry of a dump: its original tuple's protocol, destination and ports, its ct mark, and
    ``identity`` — the attributes a delete names it by (the original tuple, and its zone), as received."""

    family: int
    proto: int
    dst: bytes
    sport: int
    dport: int
    mark: int
    identity: bytes


def attributes(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """The netlink attributes in ``data[start:end]``: (type without flags, start, payload start, end)."""
    while start + _NLA.size <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < _NLA.size or start + length > end:
            return
        yield kind & NLA_TYPE_MASK, start, start + _NLA.size, start + length
        start += (length + 3) & ~3


def _attribute(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = _NLA.pack(_NLA.size + len(payload), kind | (NLA_F_NESTED if nested else 0))
    return head + payload + bytes(-len(payload) % 4)


def request(kind: int, flags: int, seq: int, family: int, payload: bytes = b"") -> bytes:
    """One ctnetlink request: netlink header, ``nfgenmsg`` of ``family``, then ``payload`` (attributes)."""
    message_type = (NFNL_SUBSYS_CTNETLINK << 8) | kind
    length = ENTRY_BODY + len(payload)
    return (
        _NLMSG.pack(length, message_type, NLM_F_REQUEST | flags, seq, 0) + _NFGEN.pack(family, 0, 0) + payload
    )


def dump_request(seq: int, family: int, mark: int | None = None, mask: int = 0xFFFFFFFF) -> bytes:
    """Every entry of ``family``; with ``mark``, only those whose ct mark has it in the bits of ``mask``."""
    payload = b""
    if mark is not None:
        payload = _attribute(CTA_MARK, _BE32.pack(mark)) + _attribute(CTA_MARK_MASK, _BE32.pack(mask))
    return request(IPCTNL_MSG_CT_GET, NLM_F_DUMP, seq, family, payload)


def delete_request(seq: int, entry: ConntrackEntry) -> bytes:
    return request(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, seq, entry.family, entry.identity)


def parse_entry(data: bytes, start: int, end: int) -> ConntrackEntry | None:
    """The entry of the conntrack message at ``data[start:end]`` (its netlink header included), or None
    when it has no original tuple with ports."""
    family = data[start + NLMSG_HDRLEN]
    proto = sport = dport = mark = 0
    dst = b""
    identity = b""
    for kind, at, payload, stop in attributes(data, start + ENTRY_BODY, end):
        if kind == CTA_TUPLE_ORIG:
            identity += data[at:stop] + bytes(-(stop - at) % 4)
            for part, _, inner, inner_end in attributes(data, payload, stop):
                if part == CTA_TUPLE_IP:
                    for field, _, value, value_end in attributes(data, inner, inner_end):
                        if field in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                            dst = bytes(data[value:value_end])
                elif part == CTA_TUPLE_PROTO:
                    for field, _, value, _ in attributes(data, inner, inner_end):
                        if field == CTA_PROTO_NUM:
                            proto = data[value]
                        elif field == CTA_PROTO_SRC_PORT:
                            sport = _BE16.unpack_from(data, value)[0]
                        elif field == CTA_PROTO_DST_PORT:
                            dport = _BE16.unpack_from(data, value)[0]
        elif kind == CTA_ZONE:
            identity += data[at:stop] + bytes(-(stop - at) % 4)
        elif kind == CTA_MARK:
            mark = _BE32.unpack_from(data, payload)[0]
    if not dst or not proto:
        return None
    return ConntrackEntry(family, proto, dst, sport, dport, mark, bytes(identity))


_FORGET, _FORGET_MARKED, _CLOSE = 0, 1, 2


class ConntrackTable:
    """Deletes conntrack entries by their original tuple or by their mark. Calls return at once: the work
    is queued, as a plain tuple, for one worker thread that does it in order. Thousands of sockets closing
    at once (an app exiting) queue thousands of deletions: a tuple each costs ~150 B, where a
    ``concurrent.futures`` work item with its future, lock and condition cost ~1.9 KB; and the deletions
    waiting together are done with one dump of the table, not one each."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._work: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def forget(self, proto: int, sport: int, dst: bytes, dport: int) -> None:
        """Delete the entries of (proto, any source:sport → dst:dport). Matched without the source
        address: a flow routed into a packet tunnel is reported (FLOW DELETED) with its masqueraded
        source, while its entry's original tuple has the app's."""
        self._submit((_FORGET, proto, bytes(dst), sport, dport))

    def forget_marked(self, mark: int, mask: int) -> None:
        """Delete every entry whose ct mark has ``mark`` in the bits of ``mask``. Their flows' next
        packets are new to the kernel again (queued, decided afresh)."""
        self._submit((_FORGET_MARKED, mark, mask))

    def close(self) -> None:
        """Finish what was asked, then close the socket and end the worker."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None:
            self._work.put((_CLOSE,))
            worker.join()

    def _submit(self, work: tuple[Any, ...]) -> None:
        with self._lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="conntrack", daemon=True)
                self._worker.start()
        self._work.put(work)

    def _run(self) -> None:
        while True:
            batch = [self._work.get()]
            while True:
                try:
                    batch.append(self._work.get_nowait())
                except queue.Empty:
                    break
            flows: set[tuple[int, bytes, int, int]] = set()
            for work in batch:
                if work[0] == _FORGET:
                    flows.add(work[1:])
                    continue
                if flows:  # in the order asked
                    self._do(self._forget_flows, flows)
                    flows = set()
                if work[0] == _FORGET_MARKED:
                    self._do(self._forget_marked, work[1], work[2])
                else:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    return
            if flows:
                self._do(self._forget_flows, flows)

    @staticmethod
    def _do(work: Any, *args: Any) -> None:
        try:
            work(*args)
        except OSError as exc:
            log.debug("[Router] conntrack: %s", exc)
        except Exception:  # the worker must go on: what waits behind it would pile up
            log.exception("[Router] conntrack work failed")

    def _forget_flows(self, flows: set[tuple[int, bytes, int, int]]) -> int:
        """Delete the entries of these (proto, dst, sport, dport): one dump per family for all of them."""
        count = 0
        for family, size in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
            if any(len(dst) == size for _, dst, _, _ in flows):
                for entry in self._dump(family):
                    if (entry.proto, entry.dst, entry.sport, entry.dport) in flows:
                        count += self._delete(entry)
        return count

    def _forget_marked(self, mark: int, mask: int) -> int:
        count = 0
        for family in (socket.AF_INET, socket.AF_INET6):
            for entry in self._dump(family, mark, mask):
                if entry.mark & mask == mark:  # whatever the kernel's filter did
                    count += self._delete(entry)
        return count

    def _socket(self) -> socket.socket:
        if self._sock is None:
            if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
                raise OSError("conntrack needs Linux")
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            self._sock.settimeout(REPLY_TIMEOUT)
        return self._sock

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _dump(self, family: int, mark: int | None = None, mask: int = 0xFFFFFFFF) -> list[ConntrackEntry]:
        sock = self._socket()
        seq = self._next_seq()
        sock.send(dump_request(seq, family, mark, mask))
        entries: list[ConntrackEntry] = []
        while True:
            data = sock.recv(RECEIVE_BUFFER)
            start = 0
            while start + NLMSG_HDRLEN <= len(data):
                length, kind, _, message_seq, _ = _NLMSG.unpack_from(data, start)
                if length < NLMSG_HDRLEN:
                    break
                end = start + length
                if message_seq == seq:
                    if kind == NLMSG_DONE:
                        return entries
                    if kind == NLMSG_ERROR:
                        code = -_ERRNO.unpack_from(data, start + NLMSG_HDRLEN)[0]
                        if code:
                            raise OSError(code, f"conntrack dump: {errno.errorcode.get(code, code)}")
                        return entries
                    entry = parse_entry(data, start, end)
                    if entry is not None:
                        entries.append(entry)
                start = (end + 3) & ~3

    def _delete(self, entry: ConntrackEntry) -> int:
        """1 when the entry was deleted, 0 when it had ended meanwhile."""
        sock = self._socket()
        seq = self._next_seq()
        sock.send(delete_request(seq, entry))
        while True:
            data = sock.recv(RECEIVE_BUFFER)
            _, kind, _, message_seq, _ = _NLMSG.unpack_from(data)
            if message_seq == seq and kind == NLMSG_ERROR:
                code = -_ERRNO.unpack_from(data, NLMSG_HDRLEN)[0]
                if code == 0:
                    return 1
                if code != errno.ENOENT:
                    log.debug("[Router] conntrack delete failed: %s", errno.errorcode.get(code, code))
                return 0
