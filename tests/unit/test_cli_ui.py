"""`awg-split-tunnel ui`: the running daemon's dashboard address, and a browser only where one can open."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from awg_split_tunnel.cli import app

runner = CliRunner()


def test_ui_prints_the_dashboards_sign_in_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from awg_split_tunnel.api import control

    url = "http://127.0.0.1:7799/?token=abc"
    asked: list[str] = []
    monkeypatch.setattr(control, "request", lambda cmd, **_: asked.append(cmd) or {"url": url})
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda target: opened.append(target) or True)
    result = runner.invoke(app, ["ui", "--url"])
    assert result.exit_code == 0 and result.output.strip() == url and asked == ["ui"]
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    result = runner.invoke(app, ["ui"])
    assert result.exit_code == 0 and url in result.output and "no graphical session" in result.output
    assert opened == []


def test_ui_without_a_daemon_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWG_SPLIT_TUNNEL_CONTROL", str(tmp_path / "none.sock"))
    result = runner.invoke(app, ["ui", "--url"])
    assert result.exit_code == 1
    assert (
        result.output.strip() == f"error: the daemon is not running (nothing listens at {tmp_path}/none.sock)"
    )
