"""The dashboard's web server (aiohttp), run by the daemon on its event loop (docs/DASHBOARD.md).

It reads the daemon's state through the same handlers the control socket calls (``status``,
``connections``, ``tunnel``), edits rules through `ConfigManager` like the CLI (the daemon applies the
change when it sees the file change), and pushes state to the page once a second as server-sent events.
Every request passes `Access` first (ui/access.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from awg_split_tunnel.core.config import Config, ConfigManager, SecretProtection, load_config
from awg_split_tunnel.core.routing import engine_from_config
from awg_split_tunnel.errors import AwgSplitTunnelError, ConfigError
from awg_split_tunnel.ui.access import (
    COOKIE,
    CSRF_HEADER,
    TOKEN_PARAMETER,
    Access,
    Refusal,
    allowed_hosts,
)
from awg_split_tunnel.ui.log_tail import LogTail
from awg_split_tunnel.ui.views import config_error, connection_rows, rules_view

log = logging.getLogger("awg_split_tunnel.ui")

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]
T = TypeVar("T")

STATIC = Path(__file__).parent / "static"
PUSH_INTERVAL = 1.0
"""Seconds between two state updates sent to an open page."""
MAX_FLOWS = 200
"""Connections shown on the page; the count of the rest is shown below them."""
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class DashboardServer:
    """Serves the dashboard on loopback `host`:`port` (0: any free port; `port` tells which after
    `start`)."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        config_path: Path,
        host: str,
        port: int,
        log_tail: LogTail | None = None,
        *,
        push_interval: float = PUSH_INTERVAL,
        secrets: SecretProtection | None = None,
        access: Access | None = None,
    ) -> None:
        self.handlers = handlers
        self.config_path = Path(config_path)
        self.secrets = secrets
        """What reads the config's `dpapi:` secrets (core/config.py)."""
        self.host = host
        self.port = port
        self.log_tail = log_tail or LogTail()
        self.push_interval = push_interval
        self.access = access or Access.create(host, port)
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._rules_cache: tuple[tuple[int, int] | None, Config | ConfigError] | None = None

    @property
    def url(self) -> str:
        """The address that signs a browser in (it carries this start's token)."""
        return self.access.url(self.host, self.port)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen (on ``sock`` when given: bound and listening already); OSError when the address is
        taken."""
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_static("/static", STATIC)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_post("/api/tunnels/{id}/{action}", self._tunnel)
        app.router.add_get("/api/rules", self._rules)
        app.router.add_post("/api/rules", self._add_rule)
        app.router.add_put("/api/rules/{index}", self._update_rule)
        app.router.add_delete("/api/rules/{index}", self._remove_rule)
        app.router.add_post("/api/rules/{index}/move", self._move_rule)
        app.router.add_post("/api/match", self._match)
        app.router.add_get("/api/logs", self._logs)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site: web.BaseSite = (
            web.TCPSite(runner, self.host, self.port) if sock is None else web.SockSite(runner, sock)
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if self.port == 0:
            self.port = runner.addresses[0][1]
            self.access = Access(self.access.token, self.access.csrf, allowed_hosts(self.host, self.port))
        log.info("[UI] dashboard on http://%s (`awg-split-tunnel ui` opens it)", self.url.split("/")[2])

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- access ------------------------------------------------------------------------------------------

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        host = request.headers.get("Host")
        token = request.query.get(TOKEN_PARAMETER)
        if request.path == "/" and token is not None:
            if not self.access.signs_in(host, token):
                return _refused(
                    request, Refusal.FOREIGN_HOST if _foreign(self.access, host) else Refusal.NO_SESSION
                )
            # The token leaves the address bar at once; from now on the cookie carries it.
            signed_in = web.Response(status=303, headers={"Location": "/"})
            signed_in.set_cookie(COOKIE, self.access.token, httponly=True, samesite="Strict", path="/")
            _secure(signed_in)
            return signed_in
        refusal = self.access.check(
            request.method,
            host,
            request.cookies.get(COOKIE),
            request.headers.get(CSRF_HEADER),
            request.headers.get("Origin"),
        )
        if refusal is not None:
            return _refused(request, refusal)
        response: web.StreamResponse
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _secure(exc)
            raise
        except AwgSplitTunnelError as exc:
            response = _error(exc)
        _secure(response)
        return response

    # -- pages and state ---------------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        page = (STATIC / "index.html").read_text(encoding="utf-8").replace("@CSRF@", self.access.csrf)
        return web.Response(text=page, content_type="text/html")

    async def state(self) -> dict[str, Any]:
        """Tunnels, the first `MAX_FLOWS` connections with their routes explained, and the rules' state."""
        status = await self.handlers["status"]({})
        answer = await self.handlers["connections"]({})  # its first page, and the total count
        flows = list(answer.get("flows") or [])
        total = int(answer.get("total", len(flows)))
        config = await asyncio.to_thread(self._current_config)
        decide = None
        if isinstance(config, Config):
            engine = engine_from_config(config)
            decide = engine.match_uncached
        states = {str(t.get("id")): str(t.get("state")) for t in status.get("tunnels", [])}
        return {
            "tunnels": status.get("tunnels", []),
            "router": status.get("router", {}),
            "flows": connection_rows(flows[:MAX_FLOWS], decide, states),
            "flows_total": max(total, len(flows)),
            "config_error": config_error(config) if isinstance(config, ConfigError) else None,
            "config_version": self.config_version,
        }

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(await self.state())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **SECURITY_HEADERS})
        await response.prepare(request)
        seen = 0
        with contextlib.suppress(ConnectionError):  # the page was closed
            while not self._closing.is_set():
                state = await self.state()
                lines = self.log_tail.since(seen)
                if lines:
                    seen = lines[-1]["seq"]
                state["logs"] = lines
                await response.write(f"event: state\ndata: {json.dumps(state, default=str)}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.push_interval)
        return response

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        level = LOG_LEVELS.get(request.query.get("level", "debug"), logging.DEBUG)
        return web.json_response({"logs": self.log_tail.since(_int(request.query.get("since", "0")), level)})

    async def _tunnel(self, request: web.Request) -> web.StreamResponse:
        action = request.match_info["action"]
        result = await self.handlers["tunnel"]({"id": request.match_info["id"], "action": action})
        log.info("[UI] tunnel %s %s from the dashboard", request.match_info["id"], action)
        return web.json_response(result)

    @property
    def config_version(self) -> str:
        """Changes whenever the config file does (the page then reloads its rules)."""
        cached = self._rules_cache
        return "" if cached is None else str(cached[0])

    # -- rules -------------------------------------------------------------------------------------------

    def _current_config(self) -> Config | ConfigError:
        """The config file as it is now (re-read only when it changed), or its error."""
        try:
            st = self.config_path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        cached = self._rules_cache
        if cached is not None and cached[0] == stamp and stamp is not None:
            return cached[1]
        try:
            result: Config | ConfigError = load_config(self.config_path, self.secrets)
        except ConfigError as exc:
            result = exc
        self._rules_cache = (stamp, result)
        return result

    async def _rules(self, request: web.Request) -> web.StreamResponse:
        config = await asyncio.to_thread(self._current_config)
        if isinstance(config, ConfigError):
            return web.json_response({"rules": [], "error": config_error(config)})
        return web.json_response(rules_view(config))

    async def _edit(self, change: Callable[[ConfigManager], T]) -> T:
        def edit() -> T:
            manager = ConfigManager(self.config_path, secrets=self.secrets)
            with manager.locked():
                manager.load()
                return change(manager)

        return await asyncio.to_thread(edit)

    async def _add_rule(self, request: web.Request) -> web.StreamResponse:
        body = await _body(request)
        index = body.pop("index", None)
        at = await self._edit(lambda m: m.add_rule(_rule(body), None if index is None else _int(index)))
        log.info("[UI] rule #%d added from the dashboard: %s", at, body.get("process"))
        return web.json_response({"index": at})

    async def _update_rule(self, request: web.Request) -> web.StreamResponse:
        body, index = await _body(request), _int(request.match_info["index"])
        await self._edit(lambda m: m.update_rule(index, _rule(body)))
        log.info("[UI] rule #%d changed from the dashboard: %s", index, body.get("process"))
        return web.json_response({"index": index})

    async def _remove_rule(self, request: web.Request) -> web.StreamResponse:
        index = _int(request.match_info["index"])
        removed = await self._edit(lambda m: m.remove_rule(index))
        log.info("[UI] rule #%d removed from the dashboard: %s", index, removed.process)
        return web.json_response({"index": index})

    async def _move_rule(self, request: web.Request) -> web.StreamResponse:
        body, index = await _body(request), _int(request.match_info["index"])
        to = _int(body.get("to"))
        await self._edit(lambda m: m.move_rule(index, to))
        return web.json_response({"index": to})

    async def _match(self, request: web.Request) -> web.StreamResponse:
        process = str((await _body(request)).get("process", "")).strip()
        if not process:
            raise AwgSplitTunnelError("give an exe name or a full path")
        config = await asyncio.to_thread(self._current_config)
        if isinstance(config, ConfigError):
            raise config
        decision = engine_from_config(config).match_uncached(process)
        rule = None if decision.rule_index is None else config.rules[decision.rule_index]
        return web.json_response(
            {
                "tunnel": decision.tunnel,
                "fallback": decision.fallback.value,
                "rule_index": decision.rule_index,
                "rule": None if rule is None else rule.process,
            }
        )


def _foreign(access: Access, host: str | None) -> bool:
    return host is None or host.lower() not in access.hosts


def _secure(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _refused(request: web.Request, refusal: Refusal) -> web.StreamResponse:
    status = 401 if refusal is Refusal.NO_SESSION else 403
    if request.path.startswith("/api/"):
        response: web.StreamResponse = web.json_response({"error": refusal.value}, status=status)
    else:
        response = web.Response(text=f"awg-split-tunnel dashboard: {refusal.value}\n", status=status)
    _secure(response)
    return response


def _error(exc: AwgSplitTunnelError) -> web.Response:
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, ConfigError):
        body["config_error"] = config_error(exc)
    return web.json_response(body, status=400)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise AwgSplitTunnelError("send JSON (Content-Type: application/json)")
    try:
        body = await request.json()
    except ValueError:
        raise AwgSplitTunnelError("the request is not JSON") from None
    if not isinstance(body, dict):
        raise AwgSplitTunnelError("the request must be a JSON object")
    return body


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        raise AwgSplitTunnelError(f"expected a number, got {value!r}") from None


def _rule(body: Mapping[str, Any]) -> dict[str, Any]:
    """A rule from the page: process and tunnel, fallback optional."""
    rule = {key: body.get(key) for key in ("process", "tunnel", "fallback")}
    if not isinstance(rule["process"], str) or not rule["process"].strip():
        raise ConfigError("a rule needs a process pattern", key="process")
    if not isinstance(rule["tunnel"], str) or not rule["tunnel"]:
        raise ConfigError("a rule needs a tunnel (a tunnel id or direct)", key="tunnel")
    rule["process"] = rule["process"].strip()
    if not rule["fallback"]:
        rule["fallback"] = None
    return rule
