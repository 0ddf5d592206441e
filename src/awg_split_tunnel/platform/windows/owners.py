"""Who owns a flow that no SOCKET event named, on Windows: a bounded lookup off the packet loop.

No CONNECT event comes when another WFP callout decided the connect first, nor for a connection older than
the handle (docs/WINDOWS.md); the router then asks the OS. Windows' only source is the IP Helper tables
(GetExtendedTcpTable / GetExtendedUdpTable, which psutil reads): a whole table per call, too slow for the
packet loop. So ``SocketOwners.lookup`` (the router's ``os_lookup`` on Windows) only queues the flow's
socket and answers ``OWNER_PENDING``; a worker thread reads each protocol's table once for all the
requests waiting, picks each request's socket, and hands the owners back to the loop as CONNECT events
with the local port — an exact match for the held flow (``router.divert_loop`` reads ``SocketOwners`` as
one of its event handles). Bounded: at most ``MAX_PENDING`` requests wait (more are answered "unknown" at
once), and the router waits ``core.packet_router.LOOKUP_TIMEOUT`` for an answer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from awg_split_tunnel.core.packet_router import OWNER_PENDING
from awg_split_tunnel.net.packet import IPPROTO_TCP
from awg_split_tunnel.platform.divert import SocketEvent, SocketEventKind
from awg_split_tunnel.process.lookup import socket_owner

log = logging.getLogger("awg_split_tunnel.router")

MAX_PENDING = 256
"""Lookups waiting for the worker at most; more flows get no owner (their rule's default) at once."""

SocketTable = Callable[[str], Iterable[Any]]
"""A protocol's socket table ("tcp" / "udp" → ``psutil.net_connections`` rows, every process's)."""


@dataclass(frozen=True, slots=True)
class _Request:
    proto: int
    local_addr: bytes
    local_port: int
    remote_addr: bytes
    remote_port: int


class SocketOwners:
    """The owner lookup on Windows: ``lookup`` from the router, answers as events from ``recv``."""

    def __init__(self, table: SocketTable = psutil.net_connections) -> None:
        self._table = table
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._answers: collections.deque[SocketEvent] = collections.deque()
        self._lock = threading.Lock()
        self._pending = 0
        self._loop: Any = None
        self._on_ready: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None
        self.refused = 0
        """Lookups answered "unknown" at once because ``MAX_PENDING`` were waiting."""
        self.table_reads = 0

    def lookup(
        self, proto: int, local_addr: bytes, local_port: int, remote_addr: bytes, remote_port: int
    ) -> int | None:
        """``OWNER_PENDING`` (the answer comes as an event), or None when it cannot come: not watched by a
        loop, or too many lookups waiting."""
        if self._loop is None or self._thread is None:
            return None
        with self._lock:
            if self._pending >= MAX_PENDING:
                self.refused += 1
                return None
            self._pending += 1
        self._requests.put(_Request(proto, local_addr, local_port, remote_addr, remote_port))
        return OWNER_PENDING

    # -- as an event handle (router.divert_loop.EventPort, FedPort) -------------------------------------

    def open(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="socket-owners", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self.unwatch()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._requests.put(None)
            thread.join(5.0)

    def fileno(self) -> int | None:
        return None

    def watch(self, loop: Any, on_ready: Callable[[], None]) -> None:
        self._loop, self._on_ready = loop, on_ready

    def unwatch(self) -> None:
        self._loop = self._on_ready = None

    def recv(self, timeout_ms: int = 0) -> SocketEvent | None:
        """The next owner found, as the CONNECT event the flow lacked; None when none waits."""
        try:
            return self._answers.popleft()
        except IndexError:
            return None

    # -- the worker ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while (first := self._requests.get()) is not None:
            batch = [first]
            stop = False
            while True:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[_Request]) -> None:
        tables: dict[str, list[Any]] = {}
        found = 0
        for request in batch:
            kind = "tcp" if request.proto == IPPROTO_TCP else "udp"
            rows = tables.get(kind)
            if rows is None:
                self.table_reads += 1
                try:
                    rows = tables[kind] = list(self._table(kind))
                except (psutil.Error, OSError) as exc:
                    log.debug("[Router] reading the %s socket table failed: %s", kind, exc)
                    rows = tables[kind] = []
            pid = socket_owner(
                rows, request.local_addr, request.local_port, request.remote_addr, request.remote_port
            )
            if pid is not None:
                found += 1
                self._answers.append(
                    SocketEvent(
                        SocketEventKind.CONNECT,
                        pid,
                        request.proto,
                        request.local_addr,
                        request.local_port,
                        request.remote_addr,
                        request.remote_port,
                    )
                )
        with self._lock:
            self._pending -= len(batch)
        loop, on_ready = self._loop, self._on_ready
        if found and loop is not None and on_ready is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(on_ready)
