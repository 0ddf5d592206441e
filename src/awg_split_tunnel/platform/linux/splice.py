"""Relaying a TCP flow with ``os.splice`` (Linux): the bytes go socket → pipe → socket inside the kernel.

Used by ``TunnelProxy`` once a flow's upstream is open (the SOCKS5/HTTP negotiation done with asyncio
streams): reading on both transports is paused, whatever the streams had already buffered is written out
first, then each direction is a ``SplicePump`` on the event loop — non-blocking splices driven by
readiness, no thread, no copy of the payload through Python. A relay through asyncio streams costs a
read and a write of every chunk in Python: with it, curl through the transparent SOCKS5 tunnel got 0.70 of
an explicit SOCKS5 client's rate, with splice 0.83 (``benchmarks/split_tcp.py``, docs/DATAPATHS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import sys
from collections.abc import Callable

CHUNK = 1 << 20
"""Bytes asked of one splice (and the pipe's size)."""
FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
F_SETPIPE_SZ = 1031
"""fcntl to size a pipe (linux/fcntl.h)."""


def _pipe() -> tuple[int, int]:
    """A non-blocking pipe of CHUNK bytes (smaller if the kernel refuses: that only means more splices)."""
    if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
        raise OSError("os.splice needs Linux")
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, F_SETPIPE_SZ, CHUNK)
    return read_end, write_end


class SplicePump:
    """One direction of a flow: ``src`` → pipe → ``dst``, both non-blocking sockets (duplicated
    descriptors: the transports keep theirs). ``done`` resolves when ``src`` reached EOF and everything
    was passed on (then ``dst`` is shut down for writing), or with the error that broke it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
        counted: Callable[[int], None],
    ) -> None:
        self._loop = loop
        self._src, self._dst = src, dst
        self._counted = counted
        self._pipe_r, self._pipe_w = _pipe()
        self._in_pipe = 0
        self._eof = False
        self._reading = False
        self._writing = False
        self.done: asyncio.Future[None] = loop.create_future()
        # A relay reset from elsewhere (the other direction failed first, a withdrawn flow, a timeout)
        # may never await this pump's end: its error is then only the connection going away, not one to
        # log as "Future exception was never retrieved".
        self.done.add_done_callback(_mark_retrieved)

    def start(self) -> None:
        self._read_on()

    def close(self) -> None:
        """Stop watching and close the pipe (the sockets are the caller's)."""
        self._read_off()
        self._write_off()
        for fd in (self._pipe_r, self._pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pipe_r = self._pipe_w = -1
        if not self.done.done():
            self.done.cancel()

    def _readable(self) -> None:
        if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
            raise OSError("os.splice needs Linux")
        try:
            n = os.splice(
                self._src.fileno(), self._pipe_w, CHUNK, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(exc)
            return
        if n == 0:
            self._eof = True
            self._read_off()
        else:
            self._in_pipe += n
            self._counted(n)
        self._flush()

    def _writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
            raise OSError("os.splice needs Linux")
        while self._in_pipe:
            try:
                n = os.splice(
                    self._pipe_r,
                    self._dst.fileno(),
                    self._in_pipe,
                    flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK,
                )
            except (BlockingIOError, InterruptedError):
                # The other side reads slower: stop reading until it took what the pipe holds.
                self._read_off()
                self._write_on()
                return
            except OSError as exc:
                self._fail(exc)
                return
            self._in_pipe -= n
        self._write_off()
        if self._eof:
            with contextlib.suppress(OSError):
                self._dst.shutdown(socket.SHUT_WR)
            if not self.done.done():
                self.done.set_result(None)
        else:
            self._read_on()

    def _fail(self, exc: OSError) -> None:
        self._read_off()
        self._write_off()
        if not self.done.done():
            self.done.set_exception(exc)

    def _read_on(self) -> None:
        if not self._reading and not self._eof:
            self._loop.add_reader(self._src.fileno(), self._readable)
            self._reading = True

    def _read_off(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._src.fileno())
            self._reading = False

    def _write_on(self) -> None:
        if not self._writing:
            self._loop.add_writer(self._dst.fileno(), self._writable)
            self._writing = True

    def _write_off(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._dst.fileno())
            self._writing = False


def _mark_retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def take_buffered(reader: asyncio.StreamReader, transport: asyncio.ReadTransport) -> bytes:
    """What ``reader`` already holds, leaving ``transport`` paused and the reader empty: from then on
    every byte of the connection is still in the socket, for splice to take.

    A read that completes in its first step returned buffered bytes; one that would wait is cancelled,
    which consumes nothing. A reader that paused its transport itself (its buffer over the limit)
    resumes it when a read empties the buffer, and the transport may then read more before this
    coroutine runs again: it is paused again after every read, and the loop ends only on a read that
    found nothing. ``reader.at_eof()`` afterwards says whether the peer had closed its side.
    """
    taken = bytearray()
    transport.pause_reading()
    while not reader.at_eof():
        task = asyncio.ensure_future(reader.read(CHUNK))
        await asyncio.sleep(0)
        transport.pause_reading()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            break
        data = task.result()
        if not data:
            break
        taken += data
    return bytes(taken)


def duplicate(writer: asyncio.StreamWriter) -> socket.socket:
    """A socket object on a duplicate of the stream's socket descriptor."""
    sock = writer.get_extra_info("socket")
    dup = socket.socket(sock.family, sock.type, sock.proto, fileno=os.dup(sock.fileno()))
    dup.setblocking(False)
    return dup
