"""The router's WinDivert handles on Windows: read in batches by a thread each, sent in batches.

``WindowsNetworkHandle`` and ``WindowsEventHandle`` are what ``platform.divert.router_handles`` gives the
router on Windows. They look to the router loop like the Linux handles (``recv_into``/``send``,
``recv``), except that they have no descriptor: ``watch(loop, on_ready)`` starts a ``BatchReader``
thread whose batches wait in the handle until the loop takes them, packet by packet, and ``on_ready`` is
called on the loop for each. Packets the loop sends are gathered and go out in one ``WinDivertSendEx``
after the loop's current callback (or when the batch is full). Unwatched, a read never blocks: it takes
what is queued (an overlapped read cancelled at once, its result collected).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
from collections.abc import Callable
from typing import Any

import psutil
from pydivert import Flag, Layer

from awg_split_tunnel.platform.divert import (
    MAX_PACKET,
    PRIORITY_FLOW,
    PRIORITY_NETWORK,
    PRIORITY_SOCKET,
    SocketEvent,
    socket_event,
)
from awg_split_tunnel.platform.windows.owners import SocketOwners, SocketTable
from awg_split_tunnel.platform.windows.reader import (
    BATCH_BYTES,
    BATCH_PACKETS,
    Batch,
    BatchReader,
    read_batch,
)
from awg_split_tunnel.platform.windows.windivert import (
    ADDRESS_SIZE,
    ERROR_NO_DATA,
    ERROR_OPERATION_ABORTED,
    WINDIVERT_SHUTDOWN_RECV,
    Overlapped,
    WinDivertAddress,
    WinDivertApi,
)

log = logging.getLogger("awg_split_tunnel.router")

SYSTEM_PID = 4
"""Windows' System process. Its SOCKET/FLOW events are the kernel's own, never an app's (mitmproxy's
redirector skips them as well): they are not taken as a flow's owner (docs/WINDOWS.md)."""

SEND_BATCH = 64
"""Packets gathered for one WinDivertSendEx."""

Opener = Callable[[str, Layer, int, Flag], tuple[Any, int]]
"""Opens a WinDivert handle: (an object whose ``close()`` closes it, the raw HANDLE)."""


def is_app_pid(pid: int) -> bool:
    """Whether an event's process may own a flow: not the Idle (0) or System (4) process. Windows hands
    out process ids in multiples of 4, so nothing lies between."""
    return pid > SYSTEM_PID


def packet_length(data: bytearray, offset: int, left: int) -> int:
    """The length of the IP packet at ``offset`` of a batch (WinDivert packs packets without lengths), from
    its header; the rest of the batch where the header gives none (a malformed or offloaded packet)."""
    version = data[offset] >> 4
    if version == 4 and left >= 20:
        length = (data[offset + 2] << 8) | data[offset + 3]
    elif version == 6 and left >= 40:
        length = 40 + ((data[offset + 4] << 8) | data[offset + 5])
    else:
        return left
    return length if 0 < length <= left else left


class _WindowsHandle:
    """What both kinds share: open/close, the reader thread, and the batches waiting for the loop."""

    layer = Layer.NETWORK
    flags = Flag.DEFAULT
    packets = True
    read_batch = BATCH_PACKETS
    """Packets (or events) asked of one WinDivertRecvEx."""

    def __init__(self, api: WinDivertApi, opener: Opener, filter: str, priority: int) -> None:
        self.filter = filter
        self.priority = priority
        self._api = api
        self._opener = opener
        self._closer: Any = None
        self._raw: int | None = None
        self._reader: BatchReader | None = None
        self._ready: collections.deque[Batch] = collections.deque()
        self._batch: Batch | None = None
        self._used: Batch | None = None
        self._index = 0
        self._offset = 0
        self._loop: Any = None
        self._on_ready: Callable[[], None] | None = None
        self._spare: Batch | None = None
        self._error: OSError | None = None
        self._overlapped: Overlapped | None = None
        self._recv_len = ctypes.c_uint(0)
        self._addr_len = ctypes.c_uint(0)

    def open(self) -> None:
        self._closer, self._raw = self._opener(self.filter, self.layer, self.priority, self.flags)

    def close(self) -> None:
        """Stop reading and close the handle: WinDivert re-injects what is still queued in it."""
        self.unwatch()
        closer, self._closer, raw, self._raw = self._closer, None, self._raw, None
        if raw is not None:
            self._api.shutdown(raw, WINDIVERT_SHUTDOWN_RECV)
        if self._overlapped is not None:
            self._api.close_event(self._overlapped.hEvent)
            self._overlapped = None
        if closer is not None:
            closer.close()

    def __enter__(self) -> _WindowsHandle:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int | None:
        """None: a WinDivert handle is no descriptor; ``watch`` feeds the loop instead."""
        return None

    def refresh(self) -> bool:
        """False: WinDivert's filters cover interfaces that appear later (WFP callouts are system-wide)."""
        return False

    def watch(self, loop: Any, on_ready: Callable[[], None]) -> None:
        """Read the handle on a thread of its own; ``on_ready`` runs on ``loop`` after every batch."""
        if self._raw is None or self._reader is not None:
            return
        self._loop, self._on_ready = loop, on_ready
        self._reader = BatchReader(
            self._api,
            self._raw,
            self._delivered,
            packets=self.packets,
            batch=self.read_batch,
            name=f"windivert-{self.layer.name}",
            failed=self._reader_failed,
        )
        self._reader.start()

    def unwatch(self) -> None:
        """Stop the reader thread; what it read stays here for the loop to take."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()
        self._loop = self._on_ready = None

    def _delivered(self, batch: Batch) -> None:
        # On the reader thread: deque.append is atomic; the loop wakes once per batch.
        self._ready.append(batch)
        loop, on_ready = self._loop, self._on_ready
        if loop is not None and on_ready is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: the batch waits here
                loop.call_soon_threadsafe(on_ready)

    def _reader_failed(self, error: OSError) -> None:
        # On the reader thread, which has ended: the loop hears of it at its next read (the packet loop
        # must not stop silently: traffic would wait in the driver's queue).
        self._error = error
        loop, on_ready = self._loop, self._on_ready
        if loop is not None and on_ready is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_ready)

    def _next(self) -> tuple[Batch, int, int] | None:
        """The next packet's (batch, index, offset), or None when nothing waits; consumes it. Raises what
        ended the reader thread, once everything it read was taken.

        The batch of the previous packet goes back to the reader only now: the caller has copied that
        packet out, and the reader may read into its batch again."""
        used, self._used = self._used, None
        if used is not None:
            self._give_back(used)
        batch = self._batch
        if batch is None:
            if self._ready:
                batch = self._ready.popleft()
            elif self._reader is None and self._raw is not None:
                batch = self._read_now()
                if batch is None:
                    return None
            else:
                error, self._error = self._error, None
                if error is not None:
                    raise error
                return None
            self._batch, self._index, self._offset = batch, 0, 0
        index, offset = self._index, self._offset
        length = packet_length(batch.data, offset, batch.length - offset) if self.packets else 0
        if index + 1 >= batch.count or (self.packets and offset + length >= batch.length):
            self._batch, self._used = None, batch
        else:
            self._index, self._offset = index + 1, offset + length
        return batch, index, offset

    def _give_back(self, batch: Batch) -> None:
        # Batches belong to the reader that read them; one read by hand is this handle's own.
        reader = self._reader
        if reader is not None:
            reader.release(batch)

    def _read_now(self) -> Batch | None:
        """What is queued right now, without a reader thread and without blocking."""
        raw = self._raw
        assert raw is not None
        if self._spare is None:
            self._spare = Batch(BATCH_BYTES if self.packets else 0, SEND_BATCH)
        if self._overlapped is None:
            self._overlapped = Overlapped()
            self._overlapped.hEvent = self._api.create_event()
        batch = self._spare
        error = read_batch(self._api, raw, batch, self._overlapped, self._recv_len, self._addr_len, None, 0)
        if error and error not in (ERROR_NO_DATA, ERROR_OPERATION_ABORTED):
            log.error("[Router] reading a divert handle failed: Windows error %d", error)
        return batch if batch.count else None


class WindowsNetworkHandle(_WindowsHandle):
    """The NETWORK handle on Windows (``router.divert_loop.NetworkPort``), batched both ways."""

    send_batch = SEND_BATCH
    """Packets gathered for one WinDivertSendEx at most."""

    def __init__(self, api: WinDivertApi, opener: Opener, filter: str, priority: int) -> None:
        super().__init__(api, opener, filter, priority)
        self._send_buf = bytearray(BATCH_BYTES)
        self._c_send = (ctypes.c_char * BATCH_BYTES).from_buffer(self._send_buf)
        self._send_addrs = (WinDivertAddress * self.send_batch)()
        self._send_count = 0
        self._send_bytes = 0
        self._send_len = ctypes.c_uint(0)
        self.send_errors = 0
        self.sends = 0

    def close(self) -> None:
        self.flush()
        super().close()

    def recv_into(self, buf: bytearray, c_buf: Any, addr: Any, timeout_ms: int = 0) -> int:
        """The next packet into ``buf`` and ``addr``; 0 when none waits (never blocks)."""
        taken = self._next()
        if taken is None:
            return 0
        batch, index, offset = taken
        n = packet_length(batch.data, offset, batch.length - offset)
        ctypes.memmove(c_buf, ctypes.addressof(batch.c_data) + offset, n)
        ctypes.memmove(
            ctypes.addressof(addr), ctypes.addressof(batch.addresses) + index * ADDRESS_SIZE, ADDRESS_SIZE
        )
        return n

    def send(self, c_buf: Any, length: int, addr: Any) -> bool:
        """Gather the packet for the next WinDivertSendEx: after the loop's current callback, or now when
        the batch is full. False if the handle is closed."""
        if self._raw is None:
            return False
        if self._send_count >= self.send_batch or self._send_bytes + length > BATCH_BYTES:
            self.flush()
        base = ctypes.addressof(self._c_send)
        ctypes.memmove(base + self._send_bytes, c_buf, length)
        ctypes.memmove(
            ctypes.addressof(self._send_addrs) + self._send_count * ADDRESS_SIZE,
            ctypes.addressof(addr),
            ADDRESS_SIZE,
        )
        self._send_count += 1
        self._send_bytes += length
        if self._send_count == 1:
            if self._loop is not None:
                self._loop.call_soon(self.flush)
            else:
                self.flush()
        return True

    def flush(self) -> None:
        """Send the gathered packets in one WinDivertSendEx; a refusal loses them (counted, never raised:
        the senders retransmit)."""
        count, self._send_count = self._send_count, 0
        length, self._send_bytes = self._send_bytes, 0
        if not count or self._raw is None:
            return
        self.sends += 1
        if not self._api.send_ex(
            self._raw, self._c_send, length, self._send_len, self._send_addrs, count * ADDRESS_SIZE
        ):
            self.send_errors += count
            log.debug("[Router] WinDivertSendEx refused %d packets: error %d", count, self._api.last_error())

    @staticmethod
    def new_buffer() -> tuple[bytearray, Any, Any]:
        buf = bytearray(MAX_PACKET)
        return buf, (ctypes.c_char * MAX_PACKET).from_buffer(buf), WinDivertAddress()

    @staticmethod
    def copy_address(addr: Any) -> Any:
        copy = WinDivertAddress()
        ctypes.memmove(ctypes.addressof(copy), ctypes.addressof(addr), ADDRESS_SIZE)
        return copy

    @staticmethod
    def set_inbound(addr: Any, inbound: bool = True) -> None:
        addr.Outbound = 0 if inbound else 1

    @staticmethod
    def c_buffer(data: bytearray) -> Any:
        return (ctypes.c_char * len(data)).from_buffer(data)

    def stats(self) -> dict[str, int]:
        return {"send_errors": self.send_errors, "send_batches": self.sends}


class WindowsEventHandle(_WindowsHandle):
    """A SOCKET or FLOW handle on Windows (``router.divert_loop.EventPort``): events in batches of
    addresses (these layers carry no packet)."""

    flags = Flag.SNIFF | Flag.RECV_ONLY
    packets = False

    def __init__(self, api: WinDivertApi, opener: Opener, filter: str, priority: int, layer: Layer) -> None:
        super().__init__(api, opener, filter, priority)
        self.layer = layer

    def recv(self, timeout_ms: int = 0) -> SocketEvent | None:
        """The next event that waits, or None (never blocks)."""
        while (taken := self._next()) is not None:
            batch, index, _ = taken
            event = socket_event(batch.addresses[index], self.layer)
            if event is not None:
                return event
        return None


def windows_router_handles(
    api: WinDivertApi, opener: Opener, network_filter: str, socket_table: SocketTable = psutil.net_connections
) -> tuple[WindowsNetworkHandle, list[WindowsEventHandle | SocketOwners], Callable[[int], bool]]:
    """The router's unopened handles on Windows (``platform.divert.router_handles`` there): the NETWORK
    handle; SOCKET CONNECT events (TCP, and UDP: one per new remote, with the local port), FLOW events of
    UDP (DELETED ends a flow) and the owners found for flows no event named (``SocketOwners``, read from
    ``socket_table`` off the loop); and the filter that leaves out the System process's events."""
    events: list[WindowsEventHandle | SocketOwners] = [
        WindowsEventHandle(api, opener, "!loopback and (tcp or udp)", PRIORITY_SOCKET, Layer.SOCKET),
        WindowsEventHandle(api, opener, "!loopback and udp", PRIORITY_FLOW, Layer.FLOW),
        SocketOwners(socket_table),
    ]
    return WindowsNetworkHandle(api, opener, network_filter, PRIORITY_NETWORK), events, is_app_pid
