"""How the control API's bytes travel (api/control.py): a Unix socket on POSIX, a named pipe on Windows
(platform/windows/pipe.py). Who may connect is the transport's business; the framing (one JSON object per
line) and the commands are the control server's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol


class LineWriter(Protocol):
    """The writing half of a client connection (asyncio.StreamWriter is one)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...


ClientHandler = Callable[[asyncio.StreamReader, Any], Awaitable[None]]


class Listener(Protocol):
    async def close(self) -> None: ...


class Connection(Protocol):
    """A client's end, blocking (the CLI)."""

    def send(self, data: bytes) -> None: ...

    def receive_line(self, limit: int) -> bytes: ...

    def close(self) -> None: ...


class ControlTransport(Protocol):
    """How the control API's bytes travel: who may connect is the transport's business."""

    async def listen(self, address: Path, serve: ClientHandler, limit: int) -> Listener: ...

    def connect(self, address: Path, timeout: float) -> Connection:
        """FileNotFoundError when nothing listens at `address`, PermissionError when refused."""
        ...


class UnixSocketTransport:
    """POSIX: a Unix socket created under umask 077 (only its owner, root, can connect)."""

    async def listen(self, address: Path, serve: ClientHandler, limit: int) -> Listener:
        if sys.platform == "win32":
            raise OSError("Unix sockets are not the control transport on Windows")
        address.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            address.unlink()
        old_umask = os.umask(0o077)
        try:
            server = await asyncio.start_unix_server(serve, str(address), limit=limit)
        finally:
            os.umask(old_umask)
        return _UnixListener(server, address)

    def connect(self, address: Path, timeout: float) -> Connection:
        if sys.platform == "win32":
            raise OSError("Unix sockets are not the control transport on Windows")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(address))
        except BaseException:
            sock.close()
            raise
        return _SocketConnection(sock)


class _UnixListener:
    def __init__(self, server: asyncio.Server, address: Path) -> None:
        self._server = server
        self._address = address

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)
        with contextlib.suppress(OSError):
            self._address.unlink()


class _SocketConnection:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._stream = sock.makefile("rwb")

    def send(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    def receive_line(self, limit: int) -> bytes:
        return self._stream.readline(limit)

    def close(self) -> None:
        self._stream.close()
        self._sock.close()


def default_transport() -> ControlTransport:
    """The platform's control transport."""
    if sys.platform == "win32":
        from awg_split_tunnel.platform.windows.pipe import NamedPipeTransport

        return NamedPipeTransport()
    return UnixSocketTransport()
