"""Conntrack entries of the kernel data path, through pyroute2's ctnetlink socket.

A UDP flow's verdict lives in its conntrack entry (the ct mark), which outlives the app's socket by the
UDP timeout (30 s unanswered, 120 s after replies). The kernel hands a closed socket's port to the next
socket that asks, maybe another app's: the entry is deleted when the socket closes (a FLOW DELETED event),
so the next app's first datagram is queued and decided afresh instead of inheriting the verdict.

pyroute2's synchronous API runs its own coroutines with ``run_until_complete`` and fails inside a
running asyncio loop (``scripts/repro/pyroute2_sync_in_asyncio.py``), which is where the router process
lives: every pyroute2 call here runs on one worker thread of this table's, in order.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import queue
import socket
import threading
from typing import Any

log = logging.getLogger("awg_split_tunnel.router")

_FORGET, _FORGET_MARKED, _CLOSE = 0, 1, 2


class ConntrackTable:
    """Deletes conntrack entries by their original tuple or by their mark; one netlink socket per family,
    opened lazily. Calls return at once: the work is queued, as a plain tuple, for one worker thread that
    does it in order. Thousands of sockets closing at once (an app exiting) queue thousands of deletions,
    each a netlink round trip: a tuple each costs ~150 B, where a ``concurrent.futures`` work item with its
    future, lock and condition cost ~1.9 KB (docs/ARCHITECTURE.md, Memory).

    pyroute2 needs the socket's family to match the tuple's (an IPv6 tuple on the default AF_INET socket
    is refused with EINVAL).
    """

    def __init__(self) -> None:
        self._sockets: dict[int, Any] = {}
        self._work: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()

    def forget(self, proto: int, sport: int, dst: bytes, dport: int) -> None:
        """Delete the entries of (proto, any source:sport → dst:dport). Matched without the source
        address: a flow routed into a packet tunnel is reported (FLOW DELETED) with its masqueraded
        source, while its entry's original tuple has the app's."""
        self._submit((_FORGET, proto, dst, sport, dport))

    def forget_marked(self, mark: int, mask: int) -> None:
        """Delete every entry whose ct mark has ``mark`` in the bits of ``mask``. Their flows' next
        packets are new to the kernel again (queued, decided afresh)."""
        self._submit((_FORGET_MARKED, mark, mask))

    def close(self) -> None:
        """Finish what was asked, then close the sockets and the worker."""
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
            work = self._work.get()
            try:
                if work[0] == _FORGET:
                    _, proto, dst, sport, dport = work
                    self._forget(proto, sport, dst, dport)
                elif work[0] == _FORGET_MARKED:
                    self._forget_marked(work[1], work[2])
                else:
                    self._close_sockets()
                    return
            except Exception:
                log.debug("[Router] conntrack work failed", exc_info=True)

    def _forget(self, proto: int, sport: int, dst: bytes, dport: int) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        family = socket.AF_INET if len(dst) == 4 else socket.AF_INET6
        wanted = NFCTAttrTuple(
            family=family, daddr=str(ipaddress.ip_address(dst)), proto=proto, sport=sport, dport=dport
        )
        sock = self._socket(family)
        found = False
        try:
            for entry in list(sock.dump_entries(tuple_orig=wanted)):
                sock.delete(entry)
                found = True
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                log.debug("[Router] conntrack delete failed: %s", exc)
        return found

    def _forget_marked(self, mark: int, mask: int) -> int:
        from pyroute2.netlink.exceptions import NetlinkError

        count = 0
        for family in (socket.AF_INET, socket.AF_INET6):
            sock = self._socket(family)
            try:
                entries = list(sock.dump_entries(mark=mark, mark_mask=mask))
            except NetlinkError as exc:
                log.debug("[Router] conntrack dump failed: %s", exc)
                continue
            for entry in entries:
                try:
                    sock.delete(entry)
                except NetlinkError:
                    continue  # ended meanwhile
                count += 1
        return count

    def _socket(self, family: int) -> Any:
        sock = self._sockets.get(family)
        if sock is None:
            from pyroute2 import Conntrack

            sock = self._sockets[family] = Conntrack(nfgen_family=family)
        return sock

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
