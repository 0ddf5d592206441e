"""The daemon serves the dashboard on the config's loopback address, and `ui` (the control command behind
`awg-split-tunnel ui`) gives its sign-in address, or says why there is none."""

from __future__ import annotations

import asyncio
import logging
import socket
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
