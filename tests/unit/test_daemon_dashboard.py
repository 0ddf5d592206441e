"""The daemon serves the dashboard on the config's loopback address, and `ui` (the control command behind
`awg-split-tunnel ui`) gives its sign-in address, or says why there is none."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from awg_split_tunnel.core.config import parse_config
from awg_split_tunnel.daemon import Daemon, DaemonError


def daemon_with(tmp_path: Path, ui: str) -> tuple[Daemon, object]:
    path = tmp_path / "config.yaml"
    path.write_text(f"default: direct\nui: {ui}\n")
    return Daemon(path, check_privileges=False), parse_config(
        path.read_text(), file=str(path), base_dir=tmp_path
    )


def test_the_dashboard_listens_where_the_config_says_and_ui_gives_its_address(tmp_path: Path) -> None:
    daemon, config = daemon_with(tmp_path, "{listen: 127.0.0.1:0}")

    async def scenario() -> str:
        await daemon._start_dashboard(config)  # type: ignore[arg-type]
        try:
            return str((await daemon._api_ui({}))["url"])
        finally:
            await daemon._dashboard.stop()

    url = asyncio.run(scenario())
    assert url.startswith("http://127.0.0.1:") and ":0/" not in url and "?token=" in url


def test_ui_off_serves_nothing_and_ui_says_so(tmp_path: Path) -> None:
    daemon, config = daemon_with(tmp_path, "off")

    async def scenario() -> None:
        await daemon._start_dashboard(config)  # type: ignore[arg-type]
        await daemon._api_ui({})

    with pytest.raises(DaemonError, match="the dashboard is off"):
        asyncio.run(scenario())


def test_a_taken_port_is_logged_and_the_daemon_runs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon, config = daemon_with(tmp_path, f"{{listen: 127.0.0.1:{port}}}")
        package_log = logging.getLogger("awg_split_tunnel")
        propagates, package_log.propagate = package_log.propagate, True  # to caplog's handler
        try:
            with caplog.at_level(logging.WARNING, logger="awg_split_tunnel"):
                asyncio.run(daemon._start_dashboard(config))  # type: ignore[arg-type]
        finally:
            package_log.propagate = propagates
    assert daemon._dashboard is None
    assert f"dashboard unavailable on 127.0.0.1:{port}" in caplog.text


def test_the_web_server_is_loaded_when_the_first_browser_connects_and_answers_it(tmp_path: Path) -> None:
    # Until someone opens the dashboard the daemon does without the web server (aiohttp: ~11 MB).
    daemon, config = daemon_with(tmp_path, "{listen: 127.0.0.1:0}")

    async def scenario() -> tuple[bool, bytes, bool]:
        await daemon._start_dashboard(config)  # type: ignore[arg-type]
        dashboard = daemon._dashboard
        try:
            await asyncio.sleep(0.1)
            loaded_before = dashboard.server is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", dashboard.port)
            writer.write(
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{dashboard.port}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return loaded_before, answer, dashboard.server is not None
        finally:
            await dashboard.stop()

    loaded_before, answer, loaded_after = asyncio.run(scenario())
    assert not loaded_before
    assert answer.startswith(b"HTTP/1.1 ") and loaded_after


STARTS_DASHBOARD = """
import asyncio, sys
from pathlib import Path
from awg_split_tunnel.core.config import parse_config
from awg_split_tunnel.daemon import Daemon

path = Path(sys.argv[1])
config = parse_config(path.read_text(), file=str(path), base_dir=path.parent)
daemon = Daemon(path, check_privileges=False)

async def main():
    await daemon._start_dashboard(config)
    print(daemon._dashboard.port > 0, "aiohttp" in sys.modules)
    await daemon._dashboard.stop()

asyncio.run(main())
"""


def test_a_daemon_whose_dashboard_nobody_opened_has_not_loaded_aiohttp(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("default: direct\nui: {listen: 127.0.0.1:0}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", STARTS_DASHBOARD, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert done.stdout.split() == ["True", "False"]


def test_where_the_loop_cannot_watch_a_socket_the_web_server_is_loaded_at_start(tmp_path: Path) -> None:
    # Windows' proactor loop has no add_reader: the dashboard must still answer its first browser.
    daemon, config = daemon_with(tmp_path, "{listen: 127.0.0.1:0}")

    async def scenario() -> tuple[bool, bytes]:
        loop = asyncio.get_running_loop()

        def no_add_reader(*args: object) -> None:
            raise NotImplementedError

        loop.add_reader = no_add_reader  # type: ignore[method-assign]
        await daemon._start_dashboard(config)  # type: ignore[arg-type]
        dashboard = daemon._dashboard
        try:
            loaded_at_start = dashboard.server is not None
            reader, writer = await asyncio.open_connection("127.0.0.1", dashboard.port)
            request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{dashboard.port}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return loaded_at_start, answer
        finally:
            await dashboard.stop()

    loaded_at_start, answer = asyncio.run(scenario())
    assert loaded_at_start
    assert answer.startswith(b"HTTP/1.1 ")
