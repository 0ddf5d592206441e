"""A WinDivert that behaves as its documentation and driver say, for the Windows data path's tests on any OS.

``FakeWinDivert`` implements ``platform.windows.windivert.WinDivertApi``:

- ``recv_ex`` returns up to ``*pAddrLen / sizeof(WINDIVERT_ADDRESS)`` (at most 255) queued packets, packed
  contiguously, one address each, while they fit in the buffer (the driver's
  ``windivert_read_service_request``); SOCKET/FLOW handles return addresses only;
- with nothing queued an overlapped read fails with ``ERROR_IO_PENDING`` and completes when a packet is
  queued (its event signalled, ``*pAddrLen`` written then); after ``shutdown`` with an empty queue, reads —
  pending or new — fail with ``ERROR_NO_DATA``;
- ``cancel_io`` of a read that already completed fails with ``ERROR_NOT_FOUND`` and ``overlapped_result``
  returns its bytes; a read cancelled in time fails with ``ERROR_OPERATION_ABORTED``;
- the I/O call resets the OVERLAPPED's event before it starts (documented for OVERLAPPED.hEvent);
- ``send_ex`` takes the packets packed contiguously, split by their IP headers.

``arrive_on_cancel`` makes a packet arrive in the very instant a read is cancelled: the read completes
first, the cancel then finds nothing to cancel — the race the reader must not lose a packet to.
"""

from __future__ import annotations

import collections
import ctypes
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydivert import Flag, Layer

from awg_split_tunnel.platform.windows.windivert import (
    ADDRESS_SIZE,
    ERROR_INSUFFICIENT_BUFFER,
    ERROR_IO_PENDING,
    ERROR_NO_DATA,
    ERROR_NOT_FOUND,
    ERROR_OPERATION_ABORTED,
    INFINITE,
    WINDIVERT_BATCH_MAX,
    Overlapped,
    WinDivertAddress,
)

ERROR_IO_INCOMPLETE = 996
WAIT_TIMEOUT = 258


@dataclass
class _Read:
    handle: FakeHandle
    buffer: Any
    size: int
    addresses: Any
    addr_len: ctypes.c_uint
    event: int
    done: bool = False
    error: int = 0
    transferred: int = 0


@dataclass
class FakeHandle:
    """One open handle: its queue, its pending read, and what was sent through it."""

    layer: Layer
    filter: str
    priority: int
    flags: Flag
    queue: collections.deque[tuple[bytes, WinDivertAddress]] = field(default_factory=collections.deque)
    pending: _Read | None = None
    shut: bool = False
    closed: bool = False
    reads: list[int] = field(default_factory=list)
    """Packets each completed read returned."""
    sent: list[tuple[bytes, WinDivertAddress]] = field(default_factory=list)
    sends: list[int] = field(default_factory=list)
    """Packets each WinDivertSendEx carried."""

    def close(self) -> None:
        self.closed = True


def _words(addr: bytes) -> bytes:
    """WINDIVERT's UINT32[4] address: IPv4-mapped for IPv4, least significant word first (little endian)."""
    if len(addr) == 4:
        addr = bytes(10) + b"\xff\xff" + addr
    return addr[::-1]


def network_address(ifidx: int = 7, outbound: bool = True) -> WinDivertAddress:
    addr = WinDivertAddress()
    addr.Layer = 0
    addr.Outbound = 1 if outbound else 0
    addr.Network.IfIdx = ifidx
    return addr


def socket_address(
    event: int,
    pid: int,
    proto: int,
    local_addr: bytes,
    local_port: int,
    remote_addr: bytes,
    remote_port: int,
    layer: Layer = Layer.SOCKET,
) -> WinDivertAddress:
    addr = WinDivertAddress()
    addr.Layer = int(layer)
    addr.Event = event
    s = addr.Socket if layer == Layer.SOCKET else addr.Flow
    s.ProcessId = pid
    s.Protocol = proto
    ctypes.memmove(ctypes.addressof(s.LocalAddr), _words(local_addr), 16)
    ctypes.memmove(ctypes.addressof(s.RemoteAddr), _words(remote_addr), 16)
    s.LocalPort = local_port
    s.RemotePort = remote_port
    return addr


def split_packets(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        if data[offset] >> 4 == 4:
            length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        else:
            length = 40 + int.from_bytes(data[offset + 4 : offset + 6], "big")
        out.append(data[offset : offset + length])
        offset += length
    return out


class FakeWinDivert:
    """``WinDivertApi`` with the driver's documented behaviour; the test side queues packets and events
    (``queue``) and reads what was sent (``handle(layer).sent``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.handles: dict[int, FakeHandle] = {}
        self._events: dict[int, bool] = {}
        self._reads: dict[int, _Read] = {}
        self._ids = iter(range(0x100, 1 << 30, 4))
        self._error = threading.local()
        self.arrive_on_cancel: list[tuple[Layer, bytes, WinDivertAddress]] = []
        self.cancels: list[tuple[Layer, str]] = []
        """What each CancelIoEx found, by layer: "cancelled" or "completed"."""

    # -- the test's side -------------------------------------------------------------------------------

    def opener(self, filter: str, layer: Layer, priority: int, flags: Flag) -> tuple[FakeHandle, int]:
        with self._cond:
            raw = next(self._ids)
            handle = self.handles[raw] = FakeHandle(layer, filter, priority, flags)
            return handle, raw

    def handle(self, layer: Layer) -> FakeHandle:
        """The open handle of ``layer`` (the last opened)."""
        return [h for h in self.handles.values() if h.layer == layer and not h.closed][-1]

    def queue(self, layer: Layer, items: Sequence[tuple[bytes, WinDivertAddress]]) -> None:
        """Queue packets (or events: empty bytes) on the handle of ``layer``, as the driver does."""
        with self._cond:
            handle = self.handle(layer)
            self._queue(handle, items)

    def wait_reading(self, layer: Layer, timeout: float = 5.0) -> None:
        """Until a read waits on the handle of ``layer`` (its reader thread is blocked in it)."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.handle(layer).pending is not None, timeout)

    def fail_reading(self, layer: Layer, code: int) -> None:
        """The pending read of ``layer``'s handle fails with ``code`` (e.g. the handle went away)."""
        with self._cond:
            handle = self.handle(layer)
            read, handle.pending = handle.pending, None
            assert read is not None
            self._complete(read, code)

    # -- WinDivertApi --------------------------------------------------------------------------------

    def recv_ex(
        self,
        handle: int,
        packets: Any,
        size: int,
        recv_len: ctypes.c_uint,
        addresses: Any,
        addr_len: ctypes.c_uint,
        overlapped: Overlapped,
    ) -> bool:
        with self._cond:
            h = self.handles[handle]
            assert h.pending is None, "one read at a time per handle here"
            self._events[overlapped.hEvent] = False  # the I/O call resets it before it starts
            read = _Read(h, packets, size, addresses, addr_len, overlapped.hEvent)
            self._reads[ctypes.addressof(overlapped)] = read
            if h.queue:
                self._fill(read)
                recv_len.value = read.transferred
                if read.error:
                    return self._fail(read.error)
                return True
            if h.shut:
                read.done, read.error = True, ERROR_NO_DATA
                return self._fail(ERROR_NO_DATA)
            h.pending = read
            self._cond.notify_all()
            return self._fail(ERROR_IO_PENDING)

    def send_ex(
        self, handle: int, packets: Any, length: int, send_len: ctypes.c_uint, addresses: Any, addr_len: int
    ) -> bool:
        with self._cond:
            h = self.handles[handle]
            data = ctypes.string_at(ctypes.addressof(packets), length)
            chunks = split_packets(data)
            assert len(chunks) * ADDRESS_SIZE == addr_len, "one address per packet"
            for i, chunk in enumerate(chunks):
                addr = WinDivertAddress()
                ctypes.memmove(
                    ctypes.addressof(addr), ctypes.addressof(addresses) + i * ADDRESS_SIZE, ADDRESS_SIZE
                )
                h.sent.append((chunk, addr))
            h.sends.append(len(chunks))
            send_len.value = length
            self._cond.notify_all()
            return True

    def shutdown(self, handle: int, how: int) -> bool:
        with self._cond:
            h = self.handles[handle]
            h.shut = True
            read = h.pending
            if read is not None and not h.queue:
                h.pending = None
                self._complete(read, ERROR_NO_DATA)
            return True

    def cancel_io(self, handle: int, overlapped: Overlapped) -> bool:
        with self._cond:
            h = self.handles[handle]
            for layer, data, addr in [a for a in self.arrive_on_cancel if a[0] == h.layer]:
                self.arrive_on_cancel.remove((layer, data, addr))
                self._queue(h, [(data, addr)])
            read = self._reads.get(ctypes.addressof(overlapped))
            if read is None or read.done:
                self.cancels.append((h.layer, "completed"))
                return self._fail(ERROR_NOT_FOUND)
            h.pending = None
            self._complete(read, ERROR_OPERATION_ABORTED)
            self.cancels.append((h.layer, "cancelled"))
            return True

    def overlapped_result(
        self, handle: int, overlapped: Overlapped, transferred: ctypes.c_uint, wait: bool
    ) -> bool:
        with self._cond:
            read = self._reads[ctypes.addressof(overlapped)]
            if not read.done:
                if not wait:
                    return self._fail(ERROR_IO_INCOMPLETE)
                self._cond.wait_for(lambda: read.done)
            transferred.value = read.transferred
            if read.error:
                return self._fail(read.error)
            return True

    def create_event(self) -> int:
        with self._cond:
            event = next(self._ids)
            self._events[event] = False
            return event

    def set_event(self, event: int) -> None:
        with self._cond:
            self._events[event] = True
            self._cond.notify_all()

    def wait_any(self, events: Sequence[int], timeout_ms: int) -> int:
        def signalled() -> int | None:
            for i, event in enumerate(events):
                if self._events.get(event):
                    return i
            return None

        with self._cond:
            timeout = None if timeout_ms == INFINITE else timeout_ms / 1000
            self._cond.wait_for(lambda: signalled() is not None, timeout)
            index = signalled()
            return WAIT_TIMEOUT if index is None else index

    def close_event(self, event: int) -> None:
        with self._cond:
            self._events.pop(event, None)

    def last_error(self) -> int:
        return int(getattr(self._error, "code", 0))

    # -- the driver's side ---------------------------------------------------------------------------

    def _fail(self, code: int) -> bool:
        self._error.code = code
        return False

    def _queue(self, h: FakeHandle, items: Sequence[tuple[bytes, WinDivertAddress]]) -> None:
        h.queue.extend(items)
        read = h.pending
        if read is not None and h.queue:
            h.pending = None
            self._fill(read)
        self._cond.notify_all()

    def _fill(self, read: _Read) -> None:
        """As windivert_read_service_request: packets while addresses and buffer space last."""
        h = read.handle
        most = min(read.addr_len.value // ADDRESS_SIZE, WINDIVERT_BATCH_MAX)
        offset = count = 0
        error = 0
        while h.queue and count < most:
            data, addr = h.queue[0]
            if h.layer == Layer.NETWORK:
                if len(data) > read.size - offset:
                    if count:
                        break  # does not fit: left for the next read
                    data, error = data[: read.size], ERROR_INSUFFICIENT_BUFFER
                ctypes.memmove(ctypes.addressof(read.buffer) + offset, data, len(data))
                offset += len(data)
            ctypes.memmove(
                ctypes.addressof(read.addresses) + count * ADDRESS_SIZE, ctypes.addressof(addr), ADDRESS_SIZE
            )
            h.queue.popleft()
            count += 1
        read.addr_len.value = count * ADDRESS_SIZE
        h.reads.append(count)
        self._complete(read, error, offset)

    def _complete(self, read: _Read, error: int, transferred: int = 0) -> None:
        read.done, read.error, read.transferred = True, error, transferred
        self._events[read.event] = True
        self._cond.notify_all()
