"""Reader threads that feed the router's event loop on Windows.

A WinDivert handle is no descriptor that an event loop can wait on, and the control plane's pipe is a
named pipe, not a socket (docs/WINDOWS.md, "The router's event loop"). So each handle gets a thread that
blocks in an overlapped ``WinDivertRecvEx`` for a whole batch and hands the batch to the loop
(``BatchReader``), and the pipe gets a thread that waits until it is readable and lets the loop read it
(``ConnectionWatcher``). The loop itself is a selector loop: the packet tunnels' UDP sockets are sockets.

No packet is lost when a reader stops: a read that completed while it was being cancelled is collected
(``GetOverlappedResult`` after ``CancelIoEx``) and handed over like any other.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable
from typing import Any

from awg_split_tunnel.platform.windows.windivert import (
    ADDRESS_SIZE,
    ERROR_IO_PENDING,
    ERROR_NO_DATA,
    ERROR_OPERATION_ABORTED,
    INFINITE,
    WAIT_OBJECT_0,
    Overlapped,
    WinDivertAddress,
    WinDivertApi,
)

BATCH_PACKETS = 64
"""Packets (or events) asked of one WinDivertRecvEx: as many as the loop routes per wake-up."""
BATCH_BYTES = 4 * 65575
"""Packet buffer of one batch: at least one packet of WinDivert's largest size (65,575 bytes) always fits,
and 64 MTU-size packets."""
SLOTS = 2
"""Batches per reader: one being filled by the driver while the loop routes the other. When the loop falls
behind the reader waits, and packets wait in the driver's queue (as they wait in the socket on Linux)."""


class Batch:
    """What one WinDivertRecvEx returned: ``count`` addresses and ``length`` bytes of packets, packed."""

    __slots__ = ("addresses", "c_data", "count", "data", "length")

    def __init__(self, data_size: int, packets: int) -> None:
        self.data = bytearray(data_size)
        self.c_data: Any = (ctypes.c_char * data_size).from_buffer(self.data) if data_size else None
        self.addresses: Any = (WinDivertAddress * packets)()
        self.count = 0
        self.length = 0


class BatchReader:
    """One thread reading a WinDivert handle in batches: ``deliver(batch)`` is called on that thread for
    every batch read; the consumer gives the batch back with ``release`` once it is done with it.

    ``stop()`` wakes the thread and waits for it: a read still pending is cancelled, and if it completed
    meanwhile its packets are delivered all the same. The thread also ends when the handle was shut down
    and its queue is empty (``ERROR_NO_DATA``); on any other failure it ends too, and ``failed(error)`` is
    called on it.
    """

    def __init__(
        self,
        api: WinDivertApi,
        handle: int,
        deliver: Callable[[Batch], None],
        *,
        packets: bool = True,
        batch: int = BATCH_PACKETS,
        name: str = "windivert-reader",
        failed: Callable[[OSError], None] | None = None,
    ) -> None:
        self._api = api
        self._handle = handle
        self._deliver = deliver
        self._on_failure = failed
        self._free: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._batches = [Batch(BATCH_BYTES if packets else 0, batch) for _ in range(SLOTS)]
        for slot in self._batches:
            self._free.put(slot)
        self._stop_event = api.create_event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: OSError | None = None
        self.batches = 0

    def start(self) -> None:
        self._thread.start()

    def release(self, batch: Batch) -> None:
        """The consumer is done with ``batch``: the thread may read into it again (if it is one of its)."""
        if any(batch is own for own in self._batches):
            self._free.put(batch)

    def stop(self) -> None:
        """End the thread; a read that completed before the cancel took effect is still delivered."""
        self._stopping = True
        self._api.set_event(self._stop_event)
        self._free.put(None)  # wakes a thread waiting for a free batch
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._api.close_event(self._stop_event)

    def _run(self) -> None:
        api = self._api
        overlapped = Overlapped()
        overlapped.hEvent = api.create_event()
        recv_len = ctypes.c_uint(0)
        addr_len = ctypes.c_uint(0)
        try:
            while not self._stopping:
                batch = self._free.get()
                if batch is None:
                    break
                error = read_batch(
                    api, self._handle, batch, overlapped, recv_len, addr_len, self._stop_event, INFINITE
                )
                if error:
                    self._failed(error)
                    break
                if batch.count == 0:
                    self._free.put(batch)
                    continue
                self.batches += 1
                self._deliver(batch)
        finally:
            api.close_event(overlapped.hEvent)

    def _failed(self, error: int) -> None:
        if error not in (ERROR_OPERATION_ABORTED, ERROR_NO_DATA):
            self.error = OSError(f"reading a divert handle failed: Windows error {error}")
            if self._on_failure is not None:
                self._on_failure(self.error)


def read_batch(
    api: WinDivertApi,
    handle: int,
    batch: Batch,
    overlapped: Overlapped,
    recv_len: ctypes.c_uint,
    addr_len: ctypes.c_uint,
    wake: int | None,
    timeout_ms: int,
) -> int:
    """One overlapped WinDivertRecvEx into ``batch``: 0 when it holds what was read (maybe nothing), else
    the Windows error code (``ERROR_NO_DATA``: shut down and empty; ``ERROR_OPERATION_ABORTED``: cancelled
    with nothing read).

    Waits up to ``timeout_ms`` (``INFINITE``: for ever) or until ``wake`` is signalled, then cancels. A read
    that completed before the cancel took effect is collected all the same: CancelIoEx then finds nothing
    to cancel, and GetOverlappedResult returns the packets, which the driver already took off its queue.
    """
    addr_len.value = len(batch.addresses) * ADDRESS_SIZE
    batch.count = batch.length = 0
    if not api.recv_ex(
        handle, batch.c_data, len(batch.data), recv_len, batch.addresses, addr_len, overlapped
    ):
        error = api.last_error()
        if error != ERROR_IO_PENDING:
            return error
        events = [overlapped.hEvent] if wake is None else [overlapped.hEvent, wake]
        if api.wait_any(events, timeout_ms) != WAIT_OBJECT_0:
            api.cancel_io(handle, overlapped)
        if not api.overlapped_result(handle, overlapped, recv_len, True):
            return api.last_error()
    batch.count = addr_len.value // ADDRESS_SIZE
    batch.length = recv_len.value
    return 0


class ConnectionWatcher:
    """Calls ``on_readable`` on ``loop``'s thread whenever ``conn`` (a ``multiprocessing`` connection) has
    something to read, from a thread that waits for it: a Windows pipe cannot be given to ``add_reader``.

    The thread waits again only after ``on_readable`` ran, so only one thread ever reads the connection
    (the loop's); ``on_readable`` should read everything that waits. ``stop()`` ends the watching.
    """

    def __init__(self, loop: Any, conn: Any, on_readable: Callable[[], None]) -> None:
        self._loop = loop
        self._conn = conn
        self._on_readable = on_readable
        self._handled = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="router-control-pipe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._handled.set()

    def _run(self) -> None:
        while not self._stopped:
            with contextlib.suppress(EOFError, OSError, ValueError):
                self._conn.poll(None)  # readable, or closed: either way the loop's reader finds out
            if self._stopped:
                return
            self._handled.clear()
            try:
                self._loop.call_soon_threadsafe(self._handle)
            except RuntimeError:
                return  # the loop is closed
            self._handled.wait()

    def _handle(self) -> None:
        try:
            if not self._stopped:
                self._on_readable()
        finally:
            self._handled.set()
