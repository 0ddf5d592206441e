"""The control API's transport on Windows: a named pipe only SYSTEM and Administrators can open.

As wireguard-go's UAPI pipe (``ipc/uapi_windows.go``) and wireguard-windows' manager pipe do
(docs/WINDOWS.md, Control pipe):

- the pipe's security descriptor is ``O:SYD:P(A;;GA;;;SY)(A;;GA;;;BA)``: owner SYSTEM, a protected DACL
  granting SYSTEM and Administrators, nobody else (no inherited Everyone/Users read);
- the first instance is created with ``FILE_FLAG_FIRST_PIPE_INSTANCE``: if any process (another daemon,
  or a user squatting on the name) already has a pipe of this name, creation fails instead of joining
  its instances;
- ``PIPE_REJECT_REMOTE_CLIENTS``: SMB clients from other machines are refused.

A browser cannot reach a pipe, so the old loopback-TCP attack (a web page POSTing a command) is gone.

The Win32 calls go through `PipeApi` (`Kernel32Pipes` on Windows); the transport's threads and framing
run on any OS against a fake that behaves as the API is documented to.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from awg_split_tunnel.platform.windows.security_descriptor import security_attributes

log = logging.getLogger("awg_split_tunnel.api")

PIPE_PREFIX = "\\\\.\\pipe\\"
DEFAULT_PIPE = PIPE_PREFIX + "awg-split-tunnel"
PIPE_SDDL = "O:SYD:P(A;;GA;;;SY)(A;;GA;;;BA)"
"""Owner SYSTEM; protected DACL: SYSTEM and Administrators full access, nobody else."""

PIPE_ACCESS_DUPLEX = 0x3
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
PIPE_TYPE_BYTE = 0x0
PIPE_READMODE_BYTE = 0x0
PIPE_WAIT = 0x0
PIPE_REJECT_REMOTE_CLIENTS = 0x8
PIPE_UNLIMITED_INSTANCES = 255
GENERIC_READ = 0x80000000
GENERIC_WRITE = 0x40000000
OPEN_EXISTING = 3
BUFFER_SIZE = 64 * 1024

ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_BROKEN_PIPE = 109
ERROR_PIPE_BUSY = 231
ERROR_NO_DATA = 232
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_PIPE_CONNECTED = 535

PEEK_INTERVAL = 0.02
"""Seconds between looks for data on an idle pipe. The handles are synchronous, and Windows runs the
calls on one synchronous handle one after another: a ReadFile blocked in one thread would hold up the
DisconnectNamedPipe (or WriteFile) of another. So nothing ever waits in ReadFile: a read is made only
when PeekNamedPipe says data is there, and writes are never concurrent with it."""

SERVER_OPEN_MODE = PIPE_ACCESS_DUPLEX
SERVER_PIPE_MODE = PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS


class PipeError(OSError):
    """A pipe call failed with Windows error `code` (also the OSError's errno)."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(code, f"{call} failed (Windows error {code})")
        self.code = code


class PipeApi(Protocol):
    """The Win32 pipe calls, blocking. Every failure raises PipeError with the Windows error code."""

    def create_named_pipe(self, name: str, open_mode: int, pipe_mode: int, sddl: str) -> int:
        """CreateNamedPipeW (unlimited instances, 64 KiB buffers) with this security descriptor."""

    def connect_named_pipe(self, pipe: int) -> None:
        """ConnectNamedPipe: wait for a client (a client already connected is success)."""

    def disconnect_named_pipe(self, pipe: int) -> None: ...

    def create_file(self, name: str) -> int:
        """CreateFileW(GENERIC_READ | GENERIC_WRITE, OPEN_EXISTING): a client's end."""

    def wait_named_pipe(self, name: str, timeout_ms: int) -> None: ...

    def read_file(self, handle: int, size: int) -> bytes:
        """ReadFile: at least one byte, or b"" once the other end is gone."""

    def peek_named_pipe(self, handle: int) -> int:
        """PeekNamedPipe: the bytes ready to read now (never blocks); PipeError once the other end is
        gone."""

    def write_file(self, handle: int, data: bytes) -> None: ...

    def close_handle(self, handle: int) -> None: ...


def pipe_name(address: Path | str) -> str:
    """The pipe a control address names: `\\\\.\\pipe\\NAME` as given, a bare name under it."""
    text = str(address).rstrip("\\")
    return text if text.lower().startswith(PIPE_PREFIX) else PIPE_PREFIX + text.replace("\\", "-")


ClientHandler = Callable[[asyncio.StreamReader, "PipeWriter"], Awaitable[None]]


class PipeWriter:
    """What the control server writes to: `write` buffers, `drain` sends (in a thread), `close`
    disconnects the client."""

    def __init__(self, api: PipeApi, handle: int, turn: asyncio.Lock) -> None:
        self._api = api
        self._handle = handle
        self._turn = turn
        self._pending = bytearray()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        self._pending += data

    async def drain(self) -> None:
        data, self._pending = bytes(self._pending), bytearray()
        if data and not self._closed:
            async with self._turn:  # a write may block (the client reads slowly): in a thread, alone
                await asyncio.to_thread(self._api.write_file, self._handle, data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._api.disconnect_named_pipe(self._handle)


class PipeListener:
    """Accepts clients on one thread (ConnectNamedPipe blocks) and serves each as an asyncio task."""

    def __init__(self, api: PipeApi, name: str, first: int, serve: ClientHandler, limit: int) -> None:
        self._api = api
        self._name = name
        self._serve = serve
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._waiting = first
        self._stopping = False
        self._clients: set[PipeWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._accept, name="control-pipe", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        pipe = self._waiting
        while True:
            try:
                self._api.connect_named_pipe(pipe)
            except OSError as exc:
                if not self._stopping:
                    log.warning("[API] control pipe: %s", exc)
                self._api.close_handle(pipe)
                return
            if self._stopping:
                self._api.close_handle(pipe)
                return
            try:
                self._waiting = self._api.create_named_pipe(
                    self._name, SERVER_OPEN_MODE, SERVER_PIPE_MODE, PIPE_SDDL
                )
            except OSError as exc:
                log.error("[API] control pipe: no new instance (%s): control stops answering", exc)
                self._loop.call_soon_threadsafe(self._start_client, pipe)
                return
            self._loop.call_soon_threadsafe(self._start_client, pipe)
            pipe = self._waiting

    def _start_client(self, pipe: int) -> None:
        task = self._loop.create_task(self._client(pipe))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _client(self, pipe: int) -> None:
        reader = asyncio.StreamReader(limit=self._limit)
        turn = asyncio.Lock()
        writer = PipeWriter(self._api, pipe, turn)
        self._clients.add(writer)
        pump = asyncio.ensure_future(self._pump(pipe, reader, writer, turn))
        try:
            await self._serve(reader, writer)
        finally:
            writer.close()
            self._clients.discard(writer)
            await pump
            self._api.close_handle(pipe)

    async def _pump(
        self, pipe: int, reader: asyncio.StreamReader, writer: PipeWriter, turn: asyncio.Lock
    ) -> None:
        """Feed the client's bytes to `reader` (see PEEK_INTERVAL for why it polls)."""
        while not writer.closed:
            async with turn:
                try:
                    ready = self._api.peek_named_pipe(pipe)
                    data = self._api.read_file(pipe, min(ready, 65536)) if ready else None
                except OSError:
                    data = b""
            if data is None:
                await asyncio.sleep(PEEK_INTERVAL)
                continue
            if not data:
                break
            reader.feed_data(data)
        reader.feed_eof()

    async def close(self) -> None:
        self._stopping = True
        # Wake the accepting thread: a client of our own (SYSTEM or Administrator, so the DACL lets it in).
        with contextlib.suppress(OSError):
            self._api.close_handle(self._api.create_file(self._name))
        await asyncio.to_thread(self._thread.join, 2.0)
        for writer in list(self._clients):
            writer.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)


class NamedPipeTransport:
    """The control transport on Windows (api/control.py's `ControlTransport`)."""

    def __init__(self, api: PipeApi | None = None) -> None:
        self._api = api

    @property
    def api(self) -> PipeApi:
        if self._api is None:
            self._api = Kernel32Pipes()
        return self._api

    async def listen(self, address: Path, serve: ClientHandler, limit: int) -> PipeListener:
        name = pipe_name(address)
        try:
            first = self.api.create_named_pipe(
                name, SERVER_OPEN_MODE | FILE_FLAG_FIRST_PIPE_INSTANCE, SERVER_PIPE_MODE, PIPE_SDDL
            )
        except PipeError as exc:
            if exc.code == ERROR_ACCESS_DENIED:
                raise PipeError(
                    f"creating {name}: another process already has a pipe of this name; CreateNamedPipe",
                    exc.code,
                ) from None
            raise
        return PipeListener(self.api, name, first, serve, limit)

    def connect(self, address: Path, timeout: float) -> PipeConnection:
        """A client's connection; FileNotFoundError when no daemon listens, PermissionError when the
        pipe's DACL refuses this user."""
        name = pipe_name(address)
        api = self.api
        try:
            try:
                handle = api.create_file(name)
            except PipeError as exc:
                if exc.code != ERROR_PIPE_BUSY:
                    raise
                api.wait_named_pipe(name, max(1, int(timeout * 1000)))
                handle = api.create_file(name)
        except PipeError as exc:
            if exc.code == ERROR_FILE_NOT_FOUND:
                raise FileNotFoundError(exc.code, "no such pipe", name) from None
            if exc.code == ERROR_ACCESS_DENIED:
                raise PermissionError(exc.code, "access denied", name) from None
            raise
        return PipeConnection(api, handle, timeout)


class PipeConnection:
    """A client's end (the CLI, one thread): a reply not started within `timeout` seconds (or stalling
    that long) raises TimeoutError."""

    def __init__(self, api: PipeApi, handle: int, timeout: float) -> None:
        self._api = api
        self._handle = handle
        self._timeout = timeout
        self._buffer = bytearray()

    def send(self, data: bytes) -> None:
        self._api.write_file(self._handle, data)

    def receive_line(self, limit: int) -> bytes:
        deadline = time.monotonic() + self._timeout
        while b"\n" not in self._buffer and len(self._buffer) < limit:
            try:
                ready = self._api.peek_named_pipe(self._handle)
            except OSError:
                break  # the daemon closed its end
            if not ready:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no answer within {self._timeout:g} s")
                time.sleep(PEEK_INTERVAL)
                continue
            self._buffer += self._api.read_file(self._handle, min(ready, 65536))
            deadline = time.monotonic() + self._timeout
        end = self._buffer.find(b"\n")
        cut = len(self._buffer) if end < 0 else end + 1
        line, self._buffer = bytes(self._buffer[:cut]), self._buffer[cut:]
        return line

    def close(self) -> None:
        self._api.close_handle(self._handle)


# -- kernel32 through ctypes (Windows) ------------------------------------------------------------------

INVALID_HANDLE_VALUE = ctypes.c_void_p(-1).value


class Kernel32Pipes:
    """`PipeApi` on Windows."""

    def __init__(self) -> None:
        if sys.platform != "win32":
            raise OSError("named pipes are Windows only")
        self._k32: Any = ctypes.WinDLL("kernel32", use_last_error=True)
        self._adv: Any = ctypes.WinDLL("advapi32", use_last_error=True)
        self._k32.CreateNamedPipeW.restype = ctypes.c_void_p
        self._k32.CreateFileW.restype = ctypes.c_void_p

    def _fail(self, call: str) -> PipeError:
        return PipeError(call, ctypes.get_last_error())  # type: ignore[attr-defined,unused-ignore]

    def create_named_pipe(self, name: str, open_mode: int, pipe_mode: int, sddl: str) -> int:
        with security_attributes(self._adv, self._k32, sddl) as attributes:
            handle = self._k32.CreateNamedPipeW(
                ctypes.c_wchar_p(name),
                open_mode,
                pipe_mode,
                PIPE_UNLIMITED_INSTANCES,
                BUFFER_SIZE,
                BUFFER_SIZE,
                0,
                ctypes.byref(attributes),
            )
            if handle is None or handle == INVALID_HANDLE_VALUE:
                raise self._fail("CreateNamedPipeW")  # before LocalFree's own last error
        return int(handle)

    def connect_named_pipe(self, pipe: int) -> None:
        if not self._k32.ConnectNamedPipe(ctypes.c_void_p(pipe), None):
            error = PipeError("ConnectNamedPipe", ctypes.get_last_error())  # type: ignore[attr-defined,unused-ignore]
            if error.code != ERROR_PIPE_CONNECTED:
                raise error

    def disconnect_named_pipe(self, pipe: int) -> None:
        if not self._k32.DisconnectNamedPipe(ctypes.c_void_p(pipe)):
            raise self._fail("DisconnectNamedPipe")

    def create_file(self, name: str) -> int:
        handle = self._k32.CreateFileW(
            ctypes.c_wchar_p(name), GENERIC_READ | GENERIC_WRITE, 0, None, OPEN_EXISTING, 0, None
        )
        if handle is None or handle == INVALID_HANDLE_VALUE:
            raise self._fail("CreateFileW")
        return int(handle)

    def wait_named_pipe(self, name: str, timeout_ms: int) -> None:
        if not self._k32.WaitNamedPipeW(ctypes.c_wchar_p(name), timeout_ms):
            raise self._fail("WaitNamedPipeW")

    def read_file(self, handle: int, size: int) -> bytes:
        buffer = ctypes.create_string_buffer(size)
        done = ctypes.c_uint32()
        if not self._k32.ReadFile(ctypes.c_void_p(handle), buffer, size, ctypes.byref(done), None):
            error = PipeError("ReadFile", ctypes.get_last_error())  # type: ignore[attr-defined,unused-ignore]
            if error.code in (ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED, ERROR_NO_DATA):
                return b""
            raise error
        return buffer.raw[: done.value]

    def peek_named_pipe(self, handle: int) -> int:
        ready = ctypes.c_uint32()
        if not self._k32.PeekNamedPipe(ctypes.c_void_p(handle), None, 0, None, ctypes.byref(ready), None):
            raise self._fail("PeekNamedPipe")
        return ready.value

    def write_file(self, handle: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = ctypes.c_uint32()
            if not self._k32.WriteFile(
                ctypes.c_void_p(handle), bytes(view), len(view), ctypes.byref(done), None
            ):
                raise self._fail("WriteFile")
            view = view[done.value :]

    def close_handle(self, handle: int) -> None:
        self._k32.CloseHandle(ctypes.c_void_p(handle))
