"""The dashboard in a real browser (Debian's headless Chromium, driven by Selenium) against the real
daemon in the lab: what a user sees and clicks, and what a hostile page cannot do."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from running_daemon import OPEN_REQUEST, RunningDaemon, read_line

from awg_split_tunnel.lab import (
    CLIENT,
    SOCKS_IP,
    SOCKS_PORT,
    WEB_IP,
    Lab,
    call_in_netns,
    start_dante,
    start_web,
)
from awg_split_tunnel.lab.browser import LabBrowser, browser_problem
from awg_split_tunnel.lab.topology import python_path
from awg_split_tunnel.tunnel_runtimes import BY_HAND
from awg_split_tunnel.ui.access import COOKIE, CSRF_HEADER

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        sys.platform != "linux" or os.geteuid() != 0, reason="needs root for network namespaces"
    ),
    pytest.mark.skipif(browser_problem() is not None, reason=f"a real browser {browser_problem()}"),
]

UI_PORT = 7799
PAGE_TIMEOUT = 15.0
"""Seconds for the page to show what the daemon knows (state is pushed once a second)."""


def config_text(dataplane: str) -> str:
    return f"""\
# dashboard test: one SOCKS5 tunnel
dataplane: {dataplane}
default: direct
ui:
  listen: 127.0.0.1:{UI_PORT}   # the client namespace's loopback
tunnels:
  - id: socks   # dante in ns socks
    type: socks5
    server: {SOCKS_IP}:{SOCKS_PORT}
rules:
  # blocked when the tunnel is down
  - process: app-block
    tunnel: socks
    fallback: block
  # the end of the rules
"""


@pytest.fixture(params=["kernel", "divert"])
def dataplane(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start_daemon(lab: Lab, dataplane: str) -> RunningDaemon:
    start_web(lab)
    start_dante(lab)
    config = lab.tmpdir / "config.yaml"
    config.write_text(config_text(dataplane))
    daemon = RunningDaemon(lab, config)
    daemon.wait_running()
    wait_for(lambda: "socks is UP" in daemon.output(), 15, "the SOCKS5 tunnel UP", daemon.output)
    return daemon


def cli(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    """`awg-split-tunnel ARGS` as a user runs it, talking to this daemon's control socket."""
    env = {**os.environ, "PYTHONPATH": python_path(), "AWG_SPLIT_TUNNEL_CONTROL": str(daemon.control)}
    return subprocess.run(
        [sys.executable, "-m", "awg_split_tunnel", *args], capture_output=True, text=True, env=env, timeout=30
    )


def socks_state(daemon: RunningDaemon) -> str:
    """The SOCKS5 tunnel's state as `awg-split-tunnel status --json` says it."""
    done = cli(daemon, "status", "--json")
    assert done.returncode == 0, done.stderr
    [tunnel] = json.loads(done.stdout)["tunnels"]
    return str(tunnel["state"])


def dashboard_url(daemon: RunningDaemon) -> str:
    done = cli(daemon, "ui", "--url")
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    assert url.startswith(f"http://127.0.0.1:{UI_PORT}/?token=")
    return url


@pytest.fixture
def browser(lab: Lab) -> Iterator[LabBrowser]:
    with LabBrowser(lab.ns_name(CLIENT)) as instance:
        yield instance


def wait_page(browser: LabBrowser, script: str, what: str) -> Any:
    """Poll a JavaScript expression in the page until it is truthy; its value."""
    found: list[Any] = []

    def check() -> bool:
        value = browser.call(lambda driver: driver.execute_script(f"return {script}"))
        found[:] = [value]
        return bool(value)

    wait_for(check, PAGE_TIMEOUT, what, lambda: str(found))
    return found[0]


def text_of(selector: str) -> str:
    return f"(document.querySelector({selector!r}) || {{}}).textContent"


def test_the_page_lists_the_tunnels_and_an_apps_live_connection_with_its_route(
    lab: Lab, dataplane: str, browser: LabBrowser
) -> None:
    daemon = start_daemon(lab, dataplane)
    url = dashboard_url(daemon)
    app = lab.spawn(
        CLIENT, [lab.apps.get("app-block") or _app(lab, "app-block"), "-c", OPEN_REQUEST, WEB_IP],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert read_line(app, 10.0) == "connected"
        browser.call(lambda driver: driver.get(url))
        card = wait_page(browser, text_of("#tunnel-socks"), "the socks tunnel's card")
        assert "socks5" in card and "up" in card.lower()
        row = wait_page(
            browser, text_of('#connections tr[data-app="app-block"]'), "app-block's connection listed"
        )
        assert f"{WEB_IP}:80" in row and "tunnel socks" in row and "rule #0" in row
        cells = browser.call(
            lambda driver: driver.execute_script(
                "return [...document.querySelectorAll('#connections tr[data-app=\"app-block\"] td')]"
                ".map((td) => td.textContent)"
            )
        )
        # Bytes each way as the daemon saw them (the kernel data path sees only the first packet), and age.
        if dataplane == "kernel":
            assert cells[-2] == "kernel"
        else:
            assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB) / \d+(\.\d)? (B|KiB|MiB)", cells[-2]), cells
            assert not cells[-2].startswith("0 B"), cells
        assert re.fullmatch(r"\d+s", cells[-1]), cells
        path = browser.call(
            lambda driver: driver.execute_script(
                "return document.querySelector('#connections tr[data-app=\"app-block\"] td').title"
            )
        )
        assert path == str(lab.apps["app-block"])
        # The page is where the browser was sent: the token left the address bar for a cookie.
        assert "token=" not in browser.call(lambda driver: driver.current_url)
    finally:
        app.kill()
        app.wait()


def _app(lab: Lab, name: str) -> Path:
    from awg_split_tunnel.lab import make_app

    return make_app(lab, name)


def test_clicking_down_takes_the_tunnel_down_and_blocks_its_block_app(lab: Lab, browser: LabBrowser) -> None:
    daemon = start_daemon(lab, "kernel")
    _app(lab, "app-block")
    # The router process learns that the tunnel is UP through its pipe just after the daemon logs it; a
    # block app's connection in between is refused (fail closed), so wait until the router has it.
    wait_for(lambda: lab.app("app-block").seen_ip == SOCKS_IP, 10, "the block app tunnelled", daemon.output)
    browser.call(lambda driver: driver.get(dashboard_url(daemon)))
    wait_page(
        browser, "document.querySelector('#tunnel-socks button[data-action=\"down\"]')", "a Down button"
    )
    browser.call(lambda driver: driver.execute_script(
        "document.querySelector('#tunnel-socks button[data-action=\"down\"]').click()"
    ))  # fmt: skip
    wait_for(lambda: socks_state(daemon) == "down", 10, "`status` to say DOWN", daemon.output)
    blocked = lab.app("app-block", timeout=2.0)
    assert not blocked.ok and blocked.seen_ip == ""
    card = wait_page(
        browser, "document.querySelector('#tunnel-socks[data-state=\"down\"]')?.textContent", "the card DOWN"
    )
    assert BY_HAND in card  # the state's reason, as `status` gives it
    browser.call(lambda driver: driver.execute_script(
        "document.querySelector('#tunnel-socks button[data-action=\"up\"]').click()"
    ))  # fmt: skip
    wait_for(lambda: socks_state(daemon) == "up", 15, "`status` to say UP again", daemon.output)
    wait_for(lambda: lab.app("app-block").seen_ip == SOCKS_IP, 10, "app-block through socks again")


def choose(driver: Any, **selects: str) -> None:
    """Pick the rule form's ``tunnel``/``fallback`` and submit it, in one step inside the page: the
    selects' options are drawn anew whenever the rules are read again, so an option found first could be
    gone by the click."""
    script = "".join(
        f"document.getElementById('rule-{name}').value = {value!r};" for name, value in selects.items()
    )
    driver.execute_script(script + "document.getElementById('rule-submit').click();")


def test_a_rule_added_in_the_page_is_in_the_yaml_with_its_comments(lab: Lab, browser: LabBrowser) -> None:
    daemon = start_daemon(lab, "kernel")
    browser.call(lambda driver: driver.get(dashboard_url(daemon)))
    wait_page(browser, "document.querySelectorAll('#rules tbody tr').length === 1", "the rule listed")

    def add_rule(driver: Any) -> None:
        from selenium.webdriver.common.by import By

        driver.find_element(By.ID, "rule-process").send_keys("app-new")
        choose(driver, tunnel="socks", fallback="drop")

    browser.call(add_rule)
    wait_page(browser, "document.querySelectorAll('#rules tbody tr').length === 2", "the new rule listed")
    text = daemon.config.read_text()
    for line in config_text("kernel").splitlines():
        if "#" in line:
            assert line in text
    assert "  - process: app-new\n    tunnel: socks\n    fallback: drop\n" in text
    # The daemon applies it like any edit of the file: the new app is dropped.
    wait_for(lambda: "2 rules, default direct" in daemon.output(), 10, "the new rule applied", daemon.output)
    _app(lab, "app-new")
    assert not lab.app("app-new", timeout=2.0).ok

    def test_match(driver: Any) -> str:
        from selenium.webdriver.common.by import By

        driver.find_element(By.ID, "match-process").send_keys("/opt/bin/app-new")
        driver.find_element(By.CSS_SELECTOR, "#match-form button").click()
        return ""

    browser.call(test_match)
    result = wait_page(browser, text_of("#match-result"), "the match result")
    assert "socks" in result and "drop" in result and "rule #1" in result

    # Moved up and edited in the page: the file follows, its comments stay.
    browser.call(lambda driver: driver.execute_script(
        "document.querySelector('#rules tr[data-index=\"1\"] button[title=\"move up\"]').click()"
    ))  # fmt: skip
    wait_page(
        browser, text_of('#rules tr[data-index="0"] td:nth-child(2)') + " === 'app-new'", "the rule moved up"
    )

    def edit_first(driver: Any) -> None:

        # Found and clicked in one step inside the page: the rule rows are drawn anew whenever the rules
        # are read again (after the move, after the daemon applied it), and a row found first could be
        # gone by the click.
        driver.execute_script(
            "document.querySelector('#rules tr[data-index=\"0\"] td.actions button:nth-child(3)').click()"
        )
        choose(driver, fallback="block")

    browser.call(edit_first)
    wait_page(
        browser, text_of('#rules tr[data-index="0"] td:nth-child(4)') + " === 'block'", "the rule edited"
    )
    text = daemon.config.read_text()
    assert text.index("process: app-new") < text.index("# blocked when the tunnel is down")
    assert "  - process: app-new\n    tunnel: socks\n    fallback: block\n" in text
    assert text.rstrip().endswith("# the end of the rules")

    # An invalid rule is refused with the file's line, and the file stays as it was.
    def bad_rule(driver: Any) -> None:
        from selenium.webdriver.common.by import By

        driver.find_element(By.ID, "rule-process").send_keys("re:(")
        driver.find_element(By.ID, "rule-submit").click()

    before = daemon.config.read_text()
    browser.call(bad_rule)
    error = wait_page(browser, text_of("#action-error"), "the refusal shown")
    assert "rules[2].process" in error and "config.yaml:" in error
    assert daemon.config.read_text() == before


def request_in_client(lab: Lab, method: str, path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    def send() -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", UI_PORT, timeout=5)
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        response.read()
        connection.close()
        return response

    return call_in_netns(lab.ns_name(CLIENT), send)


def test_requests_without_the_token_from_a_foreign_host_or_without_csrf_are_refused(
    lab: Lab, dataplane: str
) -> None:
    daemon = start_daemon(lab, dataplane)
    token = dashboard_url(daemon).split("token=", 1)[1]
    own = f"127.0.0.1:{UI_PORT}"
    signed_in = request_in_client(lab, "GET", f"/?token={token}", {"Host": own})
    assert signed_in.status == 303
    cookie = f"{COOKIE}={token}"
    assert request_in_client(lab, "GET", "/api/state", {"Host": own, "Cookie": cookie}).status == 200
    assert request_in_client(lab, "GET", "/api/state", {"Host": own}).status == 401
    assert (
        request_in_client(lab, "GET", "/api/state", {"Host": "evil.example", "Cookie": cookie}).status == 403
    )
    down = request_in_client(lab, "POST", "/api/tunnels/socks/down", {"Host": own, "Cookie": cookie})
    assert down.status == 403
    assert socks_state(daemon) == "up"
    page = request_in_client(lab, "GET", "/", {"Host": own, "Cookie": cookie})
    assert page.status == 200
    assert not [h for h, _ in page.getheaders() if h.lower().startswith("access-control-")]
    with_csrf = request_in_client(
        lab, "POST", "/api/tunnels/socks/down", {"Host": own, "Cookie": cookie, CSRF_HEADER: "0" * 64}
    )
    assert with_csrf.status == 403 and socks_state(daemon) == "up"  # a guessed token is no better


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_demo_ui_keeps_the_five_apps_live_in_the_dashboard_until_ctrl_c_or_kill(stop: str) -> None:
    """Until Ctrl-C (or `kill`, or a closed terminal): then the demo stops the daemon, removes its lab's
    namespaces and exits 0."""
    import re
    import signal
    import time

    from awg_split_tunnel.lab.netns import list_netns

    env = {**os.environ, "PYTHONPATH": python_path()}
    demo = subprocess.Popen(
        [sys.executable, "-m", "awg_split_tunnel", "demo", "--ui"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert demo.stdout is not None
    try:
        seen: list[str] = []
        for line in demo.stdout:
            seen.append(line)
            if line.startswith("dashboard:"):
                break
        found = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", "".join(seen))
        assert found, "".join(seen)[-3000:]
        prefix = re.search(r"/tmp/([a-z0-9]+)-[^/]+/config\.yaml", "".join(seen))
        assert prefix is not None
        port, token = int(found.group(1)), found.group(2)
        own = f"127.0.0.1:{port}"

        def get(path: str, headers: dict[str, str]) -> tuple[int, bytes]:
            # this machine's loopback: the demo forwards it to the dashboard in its client namespace
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            connection.close()
            return response.status, body

        assert get(f"/?token={token}", {"Host": own})[0] == 303
        cookie = {"Host": own, "Cookie": f"{COOKIE}={token}"}
        apps = {"app-awg", "app-socks", "app-http", "app-direct", "app-drop"}
        listed: set[str] = set()

        def every_app_listed() -> bool:
            status, body = get("/api/state", cookie)
            assert status == 200
            listed.update(flow["app"] for flow in json.loads(body)["flows"])
            return apps <= listed

        wait_for(every_app_listed, 20, "the five apps' connections in the dashboard", lambda: str(listed))
        demo.send_signal(getattr(signal, stop))
        rest, _ = demo.communicate(timeout=60)
        assert demo.returncode == 0, "".join(seen)[-3000:] + rest[-3000:]
        deadline = time.monotonic() + 5
        while any(ns.startswith(prefix.group(1)) for ns in list_netns()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [ns for ns in list_netns() if ns.startswith(prefix.group(1))]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
