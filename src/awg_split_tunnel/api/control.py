"""The daemon's local control API: `status`, `connections`, `tunnel up|down`.

One JSON object per line each way over a local transport (api/transport.py): a Unix socket only root
can open on POSIX, a named pipe only SYSTEM and Administrators can open on Windows
(platform/windows/pipe.py, docs/WINDOWS.md). Requests are
``{"cmd": NAME, ...args}``; answers are ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT}``.
A malformed request gets an error answer; it never reaches a handler or breaks the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from awg_split_tunnel.api.transport import ControlTransport, LineWriter, Listener, default_transport
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
    """Where the daemon listens: env `AWG_SPLIT_TUNNEL_CONTROL`, else the platform's: a Unix socket in the
    run directory, the named pipe `\\\\.\\pipe\\awg-split-tunnel` on Windows."""
    override = os.environ.get("AWG_SPLIT_TUNNEL_CONTROL")
    if override:
        return Path(override)
    if sys.platform == "win32":
        return Path("\\\\.\\pipe\\awg-split-tunnel")
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
        transport: ControlTransport | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.path = path or default_control_path()
        self.transport = transport or default_transport()
        self.idle_timeout = idle_timeout
        self.max_clients = max_clients
        self.clients = 0
        self.refused = 0
        self.timed_out = 0
        self._listener: Listener | None = None

    async def start(self) -> None:
        self._listener = await self.transport.listen(self.path, self._serve, MAX_REQUEST)
        log.debug("[API] listening on %s", self.path)

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    async def _serve(self, reader: asyncio.StreamReader, writer: LineWriter) -> None:
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

    async def _refuse(self, writer: LineWriter) -> None:
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


async def _send(writer: LineWriter, answer: Mapping[str, Any]) -> None:
    writer.write(json.dumps(answer, default=str).encode() + b"\n")
    await writer.drain()


MAX_ANSWER = 16 * 1024 * 1024
"""The longest answer line a client reads (a ``connections`` page is far below it)."""


def request(
    cmd: str,
    *,
    path: Path | None = None,
    timeout: float = 5.0,
    transport: ControlTransport | None = None,
    **args: Any,
) -> Any:
    """Send one command to the running daemon and return its result; TunnelError with a clear
    message when no daemon answers or the daemon refuses."""
    for result in request_pages(cmd, path=path, timeout=timeout, follow=False, transport=transport, **args):
        return result
    raise TunnelError("the daemon sent no answer")  # pragma: no cover - request_pages yields or raises


def request_pages(
    cmd: str,
    *,
    path: Path | None = None,
    timeout: float = 5.0,
    follow: bool = True,
    transport: ControlTransport | None = None,
    **args: Any,
) -> Iterator[Any]:
    """Send a command and yield its result, then (``follow``) ask for each following page on the same
    connection while a result names one in ``next`` (``connections``); TunnelError as ``request``."""
    path = path or default_control_path()
    try:
        connection = (transport or default_transport()).connect(path, timeout)
    except FileNotFoundError:
        raise TunnelError(f"the daemon is not running (nothing listens at {path})") from None
    except PermissionError:
        raise TunnelError(f"permission denied on {path}: run as root/Administrator") from None
    except (OSError, ValueError) as exc:
        raise TunnelError(f"cannot reach the daemon at {path}: {exc}") from None
    try:
        following: Mapping[str, Any] | None = {}
        while following is not None:
            try:
                connection.send(json.dumps({**args, **following, "cmd": cmd}).encode() + b"\n")
                line = connection.receive_line(MAX_ANSWER)
            except OSError as exc:
                raise TunnelError(f"the daemon did not answer: {exc}") from None
            result = _result(line)
            yield result
            following = result.get("next") if follow and isinstance(result, dict) else None
            if following is not None and not isinstance(following, dict):
                raise TunnelError("the daemon sent an unreadable answer")
    finally:
        connection.close()


def _result(line: bytes) -> Any:
    try:
        answer = json.loads(line)
    except ValueError:
        raise TunnelError("the daemon sent an unreadable answer") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else None
        raise TunnelError(str(error or "the daemon refused the request"))
    return answer.get("result")
