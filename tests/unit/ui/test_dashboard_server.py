"""The dashboard's web server as a browser (and a hostile page) meets it: sign-in with the start's token,
Host and CSRF checks, no CORS, the daemon's state, rule edits saved through the config code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from awg_split_tunnel.errors import TunnelError
from awg_split_tunnel.ui.access import COOKIE, CSRF_HEADER
from awg_split_tunnel.ui.log_tail import LogTail
from awg_split_tunnel.ui.server import MAX_FLOWS, DashboardServer

CONFIG = """\
# dashboard test config
default: direct
tunnels:
  - id: office   # the office proxy
    type: socks5
    server: 198.18.0.5:1080
rules:
  # browsers through the office
  - process: firefox
    tunnel: office
    fallback: block
  # the rest of the list
"""


class FakeDaemon:
    """The handlers the daemon gives the control socket and the dashboard."""

    def __init__(self) -> None:
        self.state = "up"
        self.calls: list[Mapping[str, Any]] = []

    async def status(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "tunnels": [
                {"id": "office", "type": "socks5", "state": self.state, "reason": "probe ok",
                 "state_age": 3.0, "handshake_age": None, "rx_bytes": 1000, "tx_bytes": 200, "flows": 1},
            ],
            "router": {"flows": 2},
        }  # fmt: skip

    async def connections(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "flows": [
                {"proto": "tcp", "pid": 42, "exe": "/usr/bin/firefox", "src": "198.18.0.1:40000",
                 "dst": "198.18.0.10:80", "route": "tunnel", "tunnel": "office", "out": 3, "in": 2},
                {"proto": "udp", "pid": 43, "exe": "/usr/bin/firefox", "src": "198.18.0.1:40001",
                 "dst": "198.18.0.10:7", "route": "drop", "tunnel": None, "out": 1, "in": 0},
            ]
        }  # fmt: skip

    async def tunnel(self, request: Mapping[str, Any]) -> dict[str, Any]:
        self.calls.append(request)
        if request.get("id") != "office":
            raise TunnelError(f"no tunnel {request.get('id')!r}")
        self.state = "down" if request["action"] == "down" else "up"
        return {"id": "office", "state": self.state}

    def handlers(self) -> dict[str, Callable[[Mapping[str, Any]], Awaitable[Any]]]:
        return {"status": self.status, "connections": self.connections, "tunnel": self.tunnel}


class Browser:
    """An HTTP client speaking to the dashboard as a page would (or as a hostile page would, when told)."""

    def __init__(self, server: DashboardServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session
        self.base = f"http://127.0.0.1:{server.port}"
        self.cookie: str | None = None

    async def sign_in(self) -> None:
        async with self.session.get(self.server.url, allow_redirects=False) as response:
            assert response.status == 303
            assert response.headers["Location"] == "/"
            set_cookie = response.headers["Set-Cookie"]
            assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
            self.cookie = response.cookies[COOKIE].value

    async def send(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        host: str | None = None,
        csrf: str | None = "page",
        origin: str | None = None,
        cookie: str | None = "session",
    ) -> tuple[int, Any, Mapping[str, str]]:
        headers = {"Host": host or f"127.0.0.1:{self.server.port}"}
        if cookie == "session" and self.cookie is not None:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        elif cookie not in (None, "session"):
            headers["Cookie"] = f"{COOKIE}={cookie}"
        if csrf == "page":
            headers[CSRF_HEADER] = self.server.access.csrf
        elif csrf is not None:
            headers[CSRF_HEADER] = csrf
        if origin is not None:
            headers["Origin"] = origin
        async with self.session.request(
            method, self.base + path, json=body, headers=headers, allow_redirects=False
        ) as response:
            text = await response.text()
            data: Any = await response.json() if response.content_type == "application/json" else text
            return response.status, data, response.headers


Scenario = Callable[[Browser, FakeDaemon, Path], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, config: str = CONFIG) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    daemon = FakeDaemon()

    async def main() -> None:
        server = DashboardServer(daemon.handlers(), path, "127.0.0.1", 0, LogTail(), push_interval=0.05)
        await server.start()
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
                await scenario(Browser(server, session), daemon, path)
        finally:
            await server.stop()

    asyncio.run(main())


def test_the_start_url_signs_in_and_the_page_carries_the_csrf_token(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        assert "token=" in browser.server.url and browser.server.url.startswith("http://127.0.0.1:")
        await browser.sign_in()
        status, page, headers = await browser.send("GET", "/")
        assert status == 200 and browser.server.access.csrf in page
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        status, asset, _ = await browser.send("GET", "/static/uPlot.iife.min.js")
        assert status == 200 and "uPlot" in asset

    run(tmp_path, scenario)


def test_without_the_token_nothing_is_served(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        for target in ("/", "/api/state", "/static/dashboard.js", "/api/events"):
            status, body, _ = await browser.send("GET", target, cookie=None)
            assert status == 401, target
            assert "awg-split-tunnel ui" in str(body)
        status, _, _ = await browser.send("GET", "/api/state", cookie="guessed")
        assert status == 401
        status, _, headers = await browser.send("GET", "/?token=guessed", cookie=None)
        assert status == 401 and "Set-Cookie" not in headers
        status, _, _ = await browser.send("POST", "/api/tunnels/office/down", cookie=None)
        assert status == 401 and daemon.calls == []

    run(tmp_path, scenario)


def test_a_foreign_host_header_is_refused_even_with_the_token(tmp_path: Path) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1."""

    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        port = browser.server.port
        for host in (f"evil.example:{port}", "127.0.0.1:1", f"127.0.0.2:{port}"):
            status, body, _ = await browser.send("GET", "/api/state", host=host)
            assert status == 403 and "unknown Host" in body["error"], host
            token = browser.server.access.token
            status, _, headers = await browser.send("GET", f"/?token={token}", host=host, cookie=None)
            assert status == 403 and "Set-Cookie" not in headers
        status, _, _ = await browser.send("GET", "/api/state", host=f"localhost:{port}")
        assert status == 200

    run(tmp_path, scenario)


def test_every_change_needs_the_csrf_token_and_a_same_origin(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        before = path.read_text()
        changes = [
            ("POST", "/api/tunnels/office/down", None),
            ("POST", "/api/rules", {"process": "curl", "tunnel": "direct"}),
            ("PUT", "/api/rules/0", {"process": "curl", "tunnel": "direct"}),
            ("DELETE", "/api/rules/0", None),
            ("POST", "/api/rules/0/move", {"to": 0}),
        ]
        for method, target, body in changes:
            status, answer, _ = await browser.send(method, target, body, csrf=None)
            assert status == 403 and "CSRF" in answer["error"], target
            status, _, _ = await browser.send(method, target, body, csrf="0" * 64)
            assert status == 403, target
            status, answer, _ = await browser.send(method, target, body, origin="http://evil.example")
            assert status == 403 and "cross-site" in answer["error"], target
        assert daemon.calls == [] and path.read_text() == before
        status, answer, _ = await browser.send(
            "POST", "/api/tunnels/office/down", origin=f"http://127.0.0.1:{browser.server.port}"
        )
        assert status == 200 and answer["state"] == "down"
        assert daemon.calls == [{"id": "office", "action": "down"}]

    run(tmp_path, scenario)


def test_no_cors_header_is_ever_sent(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        for method, target in (("OPTIONS", "/api/rules"), ("GET", "/api/state"), ("GET", "/")):
            status, _, headers = await browser.send(method, target, origin="http://evil.example")
            assert not [h for h in headers if h.lower().startswith("access-control-")], (method, target)
            if method == "OPTIONS":
                assert status in (403, 405)

    run(tmp_path, scenario)


def test_state_lists_tunnels_and_connections_with_the_route_and_why(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        status, state, _ = await browser.send("GET", "/api/state")
        assert status == 200
        assert [(t["id"], t["state"], t["reason"]) for t in state["tunnels"]] == [
            ("office", "up", "probe ok")
        ]
        first, second = state["flows"]
        assert (first["app"], first["path"], first["route"], first["tunnel"]) == (
            "firefox", "/usr/bin/firefox", "tunnel", "office"
        )  # fmt: skip
        assert first["reason"] == "rule #0"
        assert second["route"] == "dropped" and second["reason"] == "rule #0: office up, fallback block"
        assert state["flows_total"] == 2 and state["config_error"] is None

    run(tmp_path, scenario)


def test_state_is_pushed_as_server_sent_events_with_new_log_lines(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        logger = logging.getLogger("awg_split_tunnel.test_dashboard")
        logger.addHandler(browser.server.log_tail)
        logger.setLevel(logging.INFO)
        try:
            logger.warning("[Core] first line")
            headers = {"Host": f"127.0.0.1:{browser.server.port}", "Cookie": f"{COOKIE}={browser.cookie}"}
            async with browser.session.get(browser.base + "/api/events", headers=headers) as response:
                assert response.headers["Content-Type"] == "text/event-stream"
                events: list[str] = []
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        continue
                    events.append(line.decode())
                    if len(events) == 1:
                        daemon.state = "down"
                        logger.error("[Core] second line")
                    elif sum('"state": "down"' in e for e in events) == 2:
                        break  # the change was pushed, and the next state after it
        finally:
            logger.removeHandler(browser.server.log_tail)
        assert '"state": "up"' in events[0] and "first line" in events[0]
        assert sum("first line" in e for e in events) == 1  # each line is sent once
        assert sum("second line" in e for e in events) == 1

    run(tmp_path, scenario)


def test_rules_are_edited_through_the_config_code_comments_kept(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        status, answer, _ = await browser.send("POST", "/api/rules", {"process": "curl", "tunnel": "direct"})
        assert status == 200 and answer["index"] == 1
        status, answer, _ = await browser.send(
            "POST", "/api/rules", {"process": "wget", "tunnel": "office", "fallback": "drop", "index": 0}
        )
        assert status == 200 and answer["index"] == 0
        await browser.send(
            "PUT", "/api/rules/2", {"process": "curl", "tunnel": "office", "fallback": "block"}
        )
        await browser.send("POST", "/api/rules/2/move", {"to": 1})
        await browser.send("DELETE", "/api/rules/0")
        text = path.read_text()
        for comment in ("# dashboard test config", "# the office proxy", "# browsers through the office"):
            assert comment in text
        status, rules, _ = await browser.send("GET", "/api/rules")
        assert [(r["process"], r["tunnel"], r["fallback"]) for r in rules["rules"]] == [
            ("curl", "office", "block"),
            ("firefox", "office", "block"),
        ]
        assert rules["targets"] == ["direct", "office"]

    run(tmp_path, scenario)


def test_an_invalid_rule_is_refused_with_the_line_and_the_file_stays(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        before = path.read_text()
        status, answer, _ = await browser.send("POST", "/api/rules", {"process": "curl", "tunnel": "nowhere"})
        assert status == 400
        assert answer["config_error"]["key"] == "rules[1].tunnel" and answer["config_error"]["line"] == 13
        assert "unknown tunnel 'nowhere'" in answer["error"]
        status, answer, _ = await browser.send("POST", "/api/rules", {"process": "re:(", "tunnel": "direct"})
        assert status == 400 and "rules[1].process" in answer["error"]
        status, answer, _ = await browser.send("DELETE", "/api/rules/7")
        assert status == 400 and "no rule 7" in answer["error"]
        status, answer, _ = await browser.send("POST", "/api/rules", ["not", "an", "object"])
        assert status == 400
        assert path.read_text() == before

    run(tmp_path, scenario)


def test_a_broken_config_file_is_shown_with_its_line_not_a_blank_page(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        path.write_text(CONFIG.replace("fallback: block", "fallback: sometimes"))
        status, rules, _ = await browser.send("GET", "/api/rules")
        assert status == 200 and rules["error"]["line"] == 11 and rules["error"]["key"] == "rules[0].fallback"
        status, state, _ = await browser.send("GET", "/api/state")
        assert state["config_error"]["line"] == 11 and len(state["tunnels"]) == 1
        status, answer, _ = await browser.send("POST", "/api/match", {"process": "firefox"})
        assert status == 400 and ":11" in answer["error"]

    run(tmp_path, scenario)


def test_match_says_which_route_an_exe_would_get(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        status, answer, _ = await browser.send("POST", "/api/match", {"process": "/usr/lib/firefox/firefox"})
        assert status == 200
        assert answer == {"tunnel": "office", "fallback": "block", "rule_index": 0, "rule": "firefox"}
        status, answer, _ = await browser.send("POST", "/api/match", {"process": "curl"})
        assert answer["rule_index"] is None and answer["tunnel"] == "direct"

    run(tmp_path, scenario)


def test_unknown_tunnel_action_is_answered_with_the_daemons_error(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        await browser.sign_in()
        status, answer, _ = await browser.send("POST", "/api/tunnels/ghost/down")
        assert status == 400 and "no tunnel 'ghost'" in answer["error"]

    run(tmp_path, scenario)


def test_a_long_connection_list_is_cut_to_the_first_flows_with_the_total(tmp_path: Path) -> None:
    async def scenario(browser: Browser, daemon: FakeDaemon, path: Path) -> None:
        flow = {"proto": "tcp", "pid": 1, "exe": "/usr/bin/curl", "dst": "198.18.0.10:80", "route": "pass"}

        async def many(request: Mapping[str, Any]) -> dict[str, Any]:
            return {"flows": [flow] * 1000, "total": 5000, "next": {"listing": 1, "offset": 1000}}

        browser.server.handlers = {**browser.server.handlers, "connections": many}
        await browser.sign_in()
        status, state, _ = await browser.send("GET", "/api/state")
        assert status == 200 and len(state["flows"]) == MAX_FLOWS and state["flows_total"] == 5000

    run(tmp_path, scenario)
