"""WinDivert's batch calls and the kernel32 calls around overlapped I/O, behind one interface.

``WinDivertApi`` is what the reader threads and the handles call: ``WinDivertRecvEx`` /
``WinDivertSendEx`` with arrays of ``WINDIVERT_ADDRESS`` (up to ``WINDIVERT_BATCH_MAX`` packets per call),
``WinDivertShutdown``, ``CancelIoEx``, ``GetOverlappedResult`` and the events they wait on.
``NativeWinDivert`` calls the DLL pydivert ships through ctypes (Windows only); the tests run the same
code against a fake that behaves as these calls are documented to (docs/WINDOWS.md, "Reading and
sending in batches"). Arguments are the ctypes objects themselves (``c_uint``, an ``OVERLAPPED``, address
arrays); the native implementation passes them by reference, as the C prototypes want.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from pydivert.windivert_dll.structs import Overlapped, WinDivertAddress

ERROR_INSUFFICIENT_BUFFER = 122
ERROR_NO_DATA = 232
"""WinDivertRecvEx on a handle that was shut down and whose queue is empty (STATUS_PIPE_EMPTY)."""
ERROR_OPERATION_ABORTED = 995
"""GetOverlappedResult of a read that CancelIoEx cancelled before it completed."""
ERROR_IO_PENDING = 997
"""WinDivertRecvEx with an OVERLAPPED and nothing queued: the read completes later."""
ERROR_NOT_FOUND = 1168
"""CancelIoEx found no pending request to cancel (it had completed already)."""

WAIT_OBJECT_0 = 0
INFINITE = 0xFFFFFFFF

WINDIVERT_BATCH_MAX = 255
"""Most packets one WinDivertRecvEx / WinDivertSendEx carries (windivert.h)."""
WINDIVERT_SHUTDOWN_RECV = 1
WINDIVERT_SHUTDOWN_SEND = 2
WINDIVERT_SHUTDOWN_BOTH = 3

ADDRESS_SIZE = ctypes.sizeof(WinDivertAddress)
"""sizeof(WINDIVERT_ADDRESS): 80 bytes; ``pAddrLen`` counts bytes, not packets."""

__all__ = ["ADDRESS_SIZE", "Overlapped", "WinDivertAddress", "WinDivertApi"]


class WinDivertApi(Protocol):
    """The calls of WinDivert.dll and kernel32.dll the Windows data path makes. Each returns what the C
    function returns (a BOOL as bool); on False, ``last_error()`` is the calling thread's error code."""

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
        """``WinDivertRecvEx(handle, packets, size, &recv_len, 0, addresses, &addr_len, &overlapped)``.

        ``addr_len`` holds the byte size of ``addresses`` and receives the bytes written (packets × 80);
        the packets are packed contiguously in ``packets``. With nothing queued it fails with
        ``ERROR_IO_PENDING`` and completes later (``overlapped_result``); ``addr_len`` must stay alive till
        then. After ``shutdown`` with nothing queued it fails with ``ERROR_NO_DATA``."""
        ...

    def send_ex(
        self, handle: int, packets: Any, length: int, send_len: ctypes.c_uint, addresses: Any, addr_len: int
    ) -> bool:
        """``WinDivertSendEx(handle, packets, length, &send_len, 0, addresses, addr_len, NULL)``: the
        packets packed contiguously, one address each (``addr_len`` in bytes)."""
        ...

    def shutdown(self, handle: int, how: int) -> bool:
        """``WinDivertShutdown``: after ``WINDIVERT_SHUTDOWN_RECV`` nothing new is queued; what is queued
        can still be received, then receives fail with ``ERROR_NO_DATA``."""
        ...

    def cancel_io(self, handle: int, overlapped: Overlapped) -> bool:
        """``CancelIoEx``: False with ``ERROR_NOT_FOUND`` when the request had completed already."""
        ...

    def overlapped_result(
        self, handle: int, overlapped: Overlapped, transferred: ctypes.c_uint, wait: bool
    ) -> bool:
        """``GetOverlappedResult``: the bytes a completed request transferred; False with the request's
        error (``ERROR_OPERATION_ABORTED`` when cancelled, ``ERROR_NO_DATA`` after a shutdown)."""
        ...

    def create_event(self) -> int:
        """``CreateEventW(NULL, TRUE, FALSE, NULL)``: a manual-reset event, not signalled."""
        ...

    def set_event(self, event: int) -> None: ...

    def wait_any(self, events: Sequence[int], timeout_ms: int) -> int:
        """``WaitForMultipleObjects(n, events, FALSE, timeout)``: the index of a signalled event."""
        ...

    def close_event(self, event: int) -> None: ...

    def last_error(self) -> int: ...


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    from ctypes import wintypes

    class NativeWinDivert:
        """``WinDivertApi`` through ctypes: the WinDivert.dll pydivert ships, and kernel32.

        Loaded with ``use_last_error`` so that each call's error code is read on the thread that made
        it, whatever ctypes or Python did in between."""

        def __init__(self) -> None:
            from pydivert.windivert_dll import DLL_PATH

            dll = ctypes.WinDLL(DLL_PATH, use_last_error=True)
            k32 = ctypes.WinDLL("kernel32", use_last_error=True)
            p_uint = ctypes.POINTER(ctypes.c_uint)
            self._recv = dll.WinDivertRecvEx
            self._recv.argtypes = [
                wintypes.HANDLE,
                ctypes.c_void_p,
                ctypes.c_uint,
                p_uint,
                ctypes.c_uint64,
                ctypes.c_void_p,
                p_uint,
                ctypes.c_void_p,
            ]
            self._recv.restype = wintypes.BOOL
            self._send = dll.WinDivertSendEx
            self._send.argtypes = [
                wintypes.HANDLE,
                ctypes.c_void_p,
                ctypes.c_uint,
                p_uint,
                ctypes.c_uint64,
                ctypes.c_void_p,
                ctypes.c_uint,
                ctypes.c_void_p,
            ]
            self._send.restype = wintypes.BOOL
            self._shutdown = dll.WinDivertShutdown
            self._shutdown.argtypes = [wintypes.HANDLE, ctypes.c_int]
            self._shutdown.restype = wintypes.BOOL
            self._cancel = k32.CancelIoEx
            self._cancel.argtypes = [wintypes.HANDLE, ctypes.c_void_p]
            self._cancel.restype = wintypes.BOOL
            self._result = k32.GetOverlappedResult
            self._result.argtypes = [wintypes.HANDLE, ctypes.c_void_p, p_uint, wintypes.BOOL]
            self._result.restype = wintypes.BOOL
            self._create = k32.CreateEventW
            self._create.argtypes = [ctypes.c_void_p, wintypes.BOOL, wintypes.BOOL, ctypes.c_void_p]
            self._create.restype = wintypes.HANDLE
            self._set = k32.SetEvent
            self._set.argtypes = [wintypes.HANDLE]
            self._set.restype = wintypes.BOOL
            self._wait = k32.WaitForMultipleObjects
            self._wait.argtypes = [wintypes.DWORD, ctypes.c_void_p, wintypes.BOOL, wintypes.DWORD]
            self._wait.restype = wintypes.DWORD
            self._close = k32.CloseHandle
            self._close.argtypes = [wintypes.HANDLE]
            self._close.restype = wintypes.BOOL

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
            buffer = None if packets is None else ctypes.byref(packets)
            return bool(
                self._recv(
                    handle,
                    buffer,
                    size,
                    ctypes.byref(recv_len),
                    0,
                    ctypes.byref(addresses),
                    ctypes.byref(addr_len),
                    ctypes.byref(overlapped),
                )
            )

        def send_ex(
            self,
            handle: int,
            packets: Any,
            length: int,
            send_len: ctypes.c_uint,
            addresses: Any,
            addr_len: int,
        ) -> bool:
            return bool(
                self._send(
                    handle,
                    ctypes.byref(packets),
                    length,
                    ctypes.byref(send_len),
                    0,
                    ctypes.byref(addresses),
                    addr_len,
                    None,
                )
            )

        def shutdown(self, handle: int, how: int) -> bool:
            return bool(self._shutdown(handle, how))

        def cancel_io(self, handle: int, overlapped: Overlapped) -> bool:
            return bool(self._cancel(handle, ctypes.byref(overlapped)))

        def overlapped_result(
            self, handle: int, overlapped: Overlapped, transferred: ctypes.c_uint, wait: bool
        ) -> bool:
            return bool(self._result(handle, ctypes.byref(overlapped), ctypes.byref(transferred), wait))

        def create_event(self) -> int:
            event = self._create(None, True, False, None)
            if not event:
                raise ctypes.WinError(ctypes.get_last_error())
            return int(event)

        def set_event(self, event: int) -> None:
            self._set(event)

        def wait_any(self, events: Sequence[int], timeout_ms: int) -> int:
            array = (wintypes.HANDLE * len(events))(*events)
            return int(self._wait(len(events), array, False, timeout_ms))

        def close_event(self, event: int) -> None:
            self._close(event)

        def last_error(self) -> int:
            return ctypes.get_last_error()
