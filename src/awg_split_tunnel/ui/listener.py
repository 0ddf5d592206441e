"""The dashboard's address, held from the daemon's start; its web server loaded at the first connection.

The web server (``ui/server.py``, aiohttp) costs the daemon ~11 MB of RSS once imported, for a page that
is often never opened (docs/ARCHITECTURE.md, Memory). ``DashboardListener`` binds and listens at start —
a taken port is reported then, and ``url`` (with this start's token) is known — and when the first
connection waits in the listen queue it loads ``DashboardServer`` on the same socket, which accepts it.
Where the event loop cannot watch a socket (the proactor loop on Windows) it is loaded at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from awg_split_tunnel.ui.access import Access, allowed_hosts
from awg_split_tunnel.ui.log_tail import LogTail

if TYPE_CHECKING:
    from awg_split_tunnel.core.config import SecretProtection

log = logging.getLogger("awg_split_tunnel.ui")

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


class DashboardListener:
    """The dashboard on loopback ``host``:``port`` (0: any free port; ``port`` tells which after
    ``start``); ``server`` is the ``DashboardServer`` once a browser has connected."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        config_path: Path,
        host: str,
        port: int,
        log_tail: LogTail | None = None,
        *,
        secrets: SecretProtection | None = None,
    ) -> None:
        self.handlers = handlers
        self.config_path = Path(config_path)
        self.secrets = secrets
        """What reads the config's `dpapi:` secrets, handed to the server (core/config.py)."""
        self.host = host
        self.port = port
        self.log_tail = log_tail
        self.access = Access.create(host, port)
        self.server: Any = None
        self._sock: socket.socket | None = None
        self._loading: asyncio.Task[None] | None = None
        self._watching = False

    @property
    def url(self) -> str:
        """The address that signs a browser in (it carries this start's token)."""
        return self.access.url(self.host, self.port)

    async def start(self) -> None:
        """Bind and listen; OSError when the address is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        sock.setblocking(False)
        self._sock = sock
        if self.port == 0:
            self.port = sock.getsockname()[1]
            self.access = Access(self.access.token, self.access.csrf, allowed_hosts(self.host, self.port))
        log.info("[UI] dashboard on http://%s (`awg-split-tunnel ui` opens it)", self.url.split("/")[2])
        try:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._first_connection)
            self._watching = True
        except NotImplementedError:  # a proactor loop (Windows) cannot watch a socket: load it now
            await self.loaded()

    def _first_connection(self) -> None:
        self._start_loading()

    def _start_loading(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self._sock
        if sock is None or self._loading is not None:
            return
        if self._watching:
            loop.remove_reader(sock.fileno())
            self._watching = False
        self._loading = loop.create_task(self._load(sock), name="dashboard-load")

    async def loaded(self) -> Any:
        """The ``DashboardServer``, loaded now if no browser has connected yet; None if it could not
        start or the dashboard is stopped."""
        self._start_loading()
        if self._loading is not None:
            await asyncio.shield(self._loading)
        return self.server

    async def _load(self, sock: socket.socket) -> None:
        from awg_split_tunnel.ui.server import DashboardServer

        server = DashboardServer(
            self.handlers,
            self.config_path,
            self.host,
            self.port,
            self.log_tail,
            secrets=self.secrets,
            access=self.access,
        )
        try:
            await server.start(sock)
        except Exception:
            log.exception("[UI] the dashboard could not start")
            return
        self.server = server

    async def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None and self._watching:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self._watching = False
        if self._loading is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if sock is not None:
            sock.close()
