"""The daemon's local control API: `status`, `connections`, `tunnel up|down`.

One JSON object per line each way over a local stream socket: a Unix socket only root can open on
POSIX, loopback TCP on Windows (its port written to a file only Administrators can read). Requests are
``{"cmd": NAME, ...args}``; answers are ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT}``.
A malformed request gets an error answer; it never reaches a handler or breaks the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from awg_split_tunnel.errors import AwgSplitTunnelError, TunnelError

log = logging.getLogger("awg_split_tunnel.api")

MAX_REQUEST = 64 * 1024
"""A request line longer than this is refused (the API carries small commands only)."""

IDLE_TIMEOUT = 10.0
"""Seconds a client may stay silent (or stop in the middle of a line) before it is disconnected."""

MAX_CLIENTS = 32
"""Clients served at once; a connection beyond this is answered with an error and closed."""

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


def default_control_path() -> Path:
    """Where the daemon listens: env `AWG_SPLIT_TUNNEL_CONTROL`, else the platform's run directory."""
    override = os.environ.get("AWG_SPLIT_TUNNEL_CONTROL")
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData"))
        return base / "awg-split-tunnel" / "control.port"
    return Path("/run/awg-split-tunnel/control.sock")


class ControlServer:
    """Serves the handlers on the control socket; one task per client, errors answered, never raised.

    A client that sends nothing for `idle_timeout` seconds (also in the middle of a line) is
    disconnected; at most `max_clients` are served at once, and a connection beyond them gets one error
    line and is closed (counted in `refused`, logged once)."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        path: Path | None = None,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.handlers = dict(handlers)
        self.path = path or default_control_path()
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.clients = 0
        self.refused = 0
        self.timed_out = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if sys.platform == "win32":
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_REQUEST)
            port = self._server.sockets[0].getsockname()[1]
            self.path.write_text(str(port))
        else:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            old_umask = os.umask(0o077)
            try:
                self._server = await asyncio.start_unix_server(self._serve, str(self.path), limit=MAX_REQUEST)
            finally:
                os.umask(old_umask)
        log.debug("[API] listening on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.clients >= self.max_clients:
            await self._refuse(writer)
            return
        self.clients += 1
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), self.idle_timeout)
                except TimeoutError:
                    self.timed_out += 1
                    log.debug("[API] client idle for %g s: disconnected", self.idle_timeout)
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await _send(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                await _send(writer, await self.answer(line))
        except (ConnectionError, OSError):
            return
        finally:
            self.clients -= 1
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter) -> None:
        """Turn away a connection beyond `max_clients`: one error line, then closed."""
        self.refused += 1
        if self.refused == 1:
            log.warning(
                "[API] more than %d control clients at once: refusing the extra ones", self.max_clients
            )
        try:
            with contextlib.suppress(ConnectionError, OSError):
                await asyncio.wait_for(
                    _send(writer, {"ok": False, "error": f"too many clients (at most {self.max_clients})"}), 1
                )
        except TimeoutError:
            pass
        finally:
            writer.close()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The answer to one request line (public for tests)."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be an object with a "cmd" string'}
        handler = self.handlers.get(request["cmd"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {request['cmd']!r} (known: {known})"}
        try:
            return {"ok": True, "result": await handler(request)}
        except AwgSplitTunnelError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("[API] %s failed", request["cmd"])
            return {"ok": False, "error": f"{request['cmd']} failed: {exc}"}


async def _send(writer: asyncio.StreamWriter, answer: Mapping[str, Any]) -> None:
    writer.write(json.dumps(answer, default=str).encode() + b"\n")
    await writer.drain()


MAX_ANSWER = 16 * 1024 * 1024
"""The longest answer line a client reads (a ``connections`` page is far below it)."""


def request(cmd: str, *, path: Path | None = None, timeout: float = 5.0, **args: Any) -> Any:
    """Send one command to the running daemon and return its result; TunnelError with a clear
    message when no daemon answers or the daemon refuses."""
    for result in request_pages(cmd, path=path, timeout=timeout, follow=False, **args):
        return result
    raise TunnelError("the daemon sent no answer")  # pragma: no cover - request_pages yields or raises


def request_pages(
    cmd: str, *, path: Path | None = None, timeout: float = 5.0, follow: bool = True, **args: Any
) -> Iterator[Any]:
    """Send a command and yield its result, then (``follow``) ask for each following page on the same
    connection while a result names one in ``next`` (``connections``); TunnelError as ``request``."""
    path = path or default_control_path()
    try:
        if sys.platform == "win32":
            port = int(path.read_text().strip())
            sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(path))
    except FileNotFoundError:
        raise TunnelError(f"the daemon is not running (no control socket at {path})") from None
    except PermissionError:
        raise TunnelError(f"permission denied on {path}: run as root/Administrator") from None
    except (OSError, ValueError) as exc:
        raise TunnelError(f"cannot reach the daemon at {path}: {exc}") from None
    with sock, sock.makefile("rwb") as stream:
        following: Mapping[str, Any] | None = {}
        while following is not None:
            try:
                stream.write(json.dumps({**args, **following, "cmd": cmd}).encode() + b"\n")
                stream.flush()
                line = stream.readline(MAX_ANSWER)
            except OSError as exc:
                raise TunnelError(f"the daemon did not answer: {exc}") from None
            result = _result(line)
            yield result
            following = result.get("next") if follow and isinstance(result, dict) else None
            if following is not None and not isinstance(following, dict):
                raise TunnelError("the daemon sent an unreadable answer")


def _result(line: bytes) -> Any:
    try:
        answer = json.loads(line)
    except ValueError:
        raise TunnelError("the daemon sent an unreadable answer") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise TunnelError(str(error or "the daemon refused the request"))
    return answer.get("result")
