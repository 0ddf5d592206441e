"""`UapiSocket`: the asyncio adapter serving one device's UAPI (`uapi.py`) on its control socket.

The socket is ``/var/run/wireguard/NAME.sock`` (``/var/run/amneziawg/`` for a device with AmneziaWG
parameters, where `awg` looks), a stream UNIX socket of mode 0600 owned by the user running the device
(root): the private key is only ever sent over it, as WireGuard does. A socket left by a dead process is
replaced; one another live process answers on is left alone (`UapiSocketInUse`). Only the socket created
here is removed on stop. Not on Windows yet (wireguard-go uses a named pipe there): docs/UAPI.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import sys
from pathlib import Path
from typing import Protocol

from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.provider.wireguard.uapi import (
    ERRNO_UNKNOWN,
    BadRequest,
    DeviceState,
    GetRequest,
    SetRequest,
    UapiConnection,
    UapiError,
    format_errno,
    format_get,
)

log = logging.getLogger("awg_split_tunnel.wireguard")

WIREGUARD_SOCKET_DIR = Path("/var/run/wireguard")
AMNEZIAWG_SOCKET_DIR = Path("/var/run/amneziawg")
MAX_NAME = 15
"""`wg set` cuts interface names to IFNAMSIZ - 1 characters."""
READ_SIZE = 65536


class UapiSocketInUse(TunnelError):
    """Another live process answers on the socket path."""


class UapiDevice(Protocol):
    """What the socket serves: `WireGuardDevice`."""

    tunnel_id: str

    def uapi_state(self) -> DeviceState: ...

    def apply_uapi(self, request: SetRequest) -> None: ...


def socket_directory(amnezia: bool) -> Path:
    """Where `awg` (a device with AmneziaWG parameters) or `wg` looks for the device's socket."""
    return AMNEZIAWG_SOCKET_DIR if amnezia else WIREGUARD_SOCKET_DIR


def socket_name(name: str) -> str:
    """The socket's name for an interface or tunnel id: what `wg show` lists (at most 15 characters)."""
    return name[:MAX_NAME]


class UapiSocket:
    """Serves `device` on ``directory/NAME.sock`` from `start` to `stop`."""

    def __init__(self, device: UapiDevice, name: str, directory: Path) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"not a usable socket name: {name!r}")
        self.device = device
        self.name = socket_name(name)
        self.path = directory / f"{self.name}.sock"
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        """Create the socket and answer on it; `UapiSocketInUse` when a live process holds the path,
        `TunnelError` when it cannot be created."""
        if sys.platform == "win32":
            raise TunnelError("the UAPI control socket is not available on Windows yet")
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("[WG] %s: answering wg/awg on %s", self.device.tunnel_id, self.path)

    async def stop(self) -> None:
        """Stop answering, close the open connections, remove the socket (if it is still ours)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._clients):
            writer.close()
        self._clients.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._unlink()

    if sys.platform != "win32":

        def _bind(self) -> socket.socket:
            path = self.path
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._claim(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o077)  # never a moment where others may connect (wireguard-go does this)
            try:
                sock.bind(str(path))
                os.chmod(path, 0o600)
                info = os.stat(path)
                self._inode = (info.st_dev, info.st_ino)
                sock.listen(16)
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                raise TunnelError(f"cannot create the control socket {path}: {exc.strerror}") from None
            finally:
                os.umask(old_umask)
            return sock

        def _claim(self, path: Path) -> None:
            """Remove a socket a dead process left; refuse a live one or anything that is not a socket."""
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                return
            if not stat.S_ISSOCK(info.st_mode):
                raise TunnelError(f"{path} exists and is not a socket: not replaced")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(path))
            except OSError:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # nobody answers: a dead process's socket
                return
            finally:
                probe.close()
            raise UapiSocketInUse(f"{path} is in use by another process")

    def _unlink(self) -> None:
        if self._inode is None:
            return
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()
        except OSError:
            pass
        self._inode = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        connection = UapiConnection()
        try:
            while not connection.closed:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for request in connection.receive(data):
                    writer.write(self._answer(request))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()

    def _answer(self, request: GetRequest | SetRequest | BadRequest) -> bytes:
        """The bytes answering one request; never raises (the event loop also carries the tunnel)."""
        tag = self.device.tunnel_id
        if isinstance(request, BadRequest):
            log.warning("[WG] %s: malformed UAPI request: %s (errno %d)", tag, request.reason, request.code)
            return format_errno(request.code)
        try:
            if isinstance(request, GetRequest):
                return format_get(self.device.uapi_state())
            self.device.apply_uapi(request)
        except UapiError as exc:
            log.warning("[WG] %s: UAPI set refused: %s (errno %d)", tag, exc, exc.code)
            return format_errno(exc.code)
        except Exception as exc:  # a bug must not take the tunnel's event loop down
            log.error("[WG] %s: UAPI request failed: %s", tag, type(exc).__name__)
            return format_errno(ERRNO_UNKNOWN)
        log.info("[WG] %s: configuration changed through UAPI", tag)
        return format_errno(0)


async def serve_uapi(device: UapiDevice, name: str, amnezia: bool) -> UapiSocket | None:
    """Start answering `wg`/`awg` for `device` under `name`; None (with a warning saying why) when the
    socket cannot be had: the tunnel runs on without it."""
    uapi = UapiSocket(device, name, socket_directory(amnezia))
    try:
        await uapi.start()
    except (TunnelError, OSError) as exc:
        log.warning("[WG] %s: no wg/awg control socket: %s", device.tunnel_id, exc)
        return None
    return uapi
